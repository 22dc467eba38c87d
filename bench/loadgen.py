"""Load generator for the webhook benchmarks, run in its own process:

    python -m bench.loadgen --port P --requests N --connections C --mode new|dup [--gap-ms G]

Every request is signed before the clock starts (Standard Webhooks, the test secret), so the
client spends its time on the wire. Raw HTTP/1.1 keep-alive over asyncio streams: one request
in flight per connection. Prints one JSON line: requests/s, latency percentiles, statuses.
Bounded by `--requests` and `--max-s`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections import Counter

from tests.support.signing import headers_for, start_body

READ_TIMEOUT_S = 15.0


def build_requests(args: argparse.Namespace) -> list[bytes]:
    out: list[bytes] = []
    host = f"127.0.0.1:{args.port}"
    for i in range(args.requests):
        if args.mode == "dup":
            job_id = f"{args.prefix}dup"
            if i > 0:
                out.append(out[0])
                continue
        else:
            job_id = f"{args.prefix}{i}"
        body = start_body(job_id, args.repo_url, token="tok_" + "b" * 40)
        headers = headers_for(body, f"{job_id}:1")
        lines = [f"POST {args.path} HTTP/1.1", f"host: {host}", f"content-length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        out.append(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return out


async def one_connection(
    port: int,
    queue: list[bytes],
    latencies: list[float],
    statuses: Counter[int],
    gap_s: float,
    deadline: float,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while queue and time.monotonic() < deadline:
            request = queue.pop()
            t0 = time.perf_counter()
            writer.write(request)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            if length:
                await asyncio.wait_for(reader.readexactly(length), READ_TIMEOUT_S)
            latencies.append(time.perf_counter() - t0)
            statuses[int(head.split(b" ", 2)[1])] += 1
            if gap_s:
                await asyncio.sleep(gap_s)
    finally:
        writer.close()


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    requests = build_requests(args)
    requests.reverse()  # popped from the end: sent in order
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    started = time.perf_counter()
    deadline = time.monotonic() + args.max_s
    await asyncio.gather(
        *(
            one_connection(args.port, requests, latencies, statuses, args.gap_ms / 1000, deadline)
            for _ in range(args.connections)
        )
    )
    elapsed = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "elapsed_s": elapsed,
        "rps": len(latencies) / elapsed if elapsed else 0.0,
        "p50_ms": pct(latencies, 50) * 1000,
        "p99_ms": pct(latencies, 99) * 1000,
        "max_ms": (max(latencies) * 1000) if latencies else float("nan"),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/v1/webhooks")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--mode", choices=["new", "dup"], default="new")
    p.add_argument("--prefix", default="bench-")
    p.add_argument("--repo-url", default="http://127.0.0.1:9/none.git")
    p.add_argument("--gap-ms", type=float, default=0.0)
    p.add_argument("--max-s", type=float, default=60.0)
    args = p.parse_args()
    print(json.dumps(asyncio.run(main_async(args))), flush=True)


if __name__ == "__main__":
    main()
