"""Profile the duplicate-delivery path with py-spy: a worker (the same settings as
`bench.ack`), one recorded delivery, then the load generator re-sends it while py-spy samples
the worker's main thread. Prints the top frames by own and by cumulative samples.

    .venv/bin/python -m bench.profile_dup [--requests 20000] [--out prof.txt]

Needs py-spy (`pip install py-spy`; ptrace allowed). Not part of `python -m bench`.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from bench.ack import load
from bench.common import FakeConvex, bench_dir, start_worker


def summarize(raw: Path, top: int = 25) -> str:
    """Own and cumulative shares of frames in py-spy's raw (collapsed stacks) output."""
    own: collections.Counter[str] = collections.Counter()
    cum: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            cum[frame] += count
    lines = [f"samples: {total}", "own:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines.append("cumulative:")
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in cum.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("prof-dup.txt"))
    args = p.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    url = "http://127.0.0.1:9/never-cloned.git"
    env = {"MAX_CONCURRENT_JOBS": "100000", "PROGRESS_MIN_INTERVAL_S": "1", "HEARTBEAT_S": "15"}
    with (
        bench_dir("profdup") as tmp,
        FakeConvex(claim_ok=lambda _: False) as convex,
        start_worker(tmp, kill=True, CONVEX_URL=convex.url, **env) as w,
    ):
        assert w.proc is not None
        load(w.port, requests=1, connections=1, mode="dup", prefix="d-", url=url)
        load(w.port, requests=500, connections=16, mode="dup", prefix="d-", url=url)
        result: dict[str, object] = {}

        def drive() -> None:
            result["out"] = load(
                w.port, requests=args.requests, connections=16, mode="dup", prefix="d-", url=url
            )

        t = threading.Thread(target=drive)
        t.start()
        subprocess.run(
            [
                *(spy, "record", "-p", str(w.proc.pid), "-d", str(args.seconds), "-r", "200"),
                *("-f", "raw", "-o", str(args.out), "--nonblocking"),
            ],
            check=True,
            capture_output=True,
        )
        t.join()
    print(summarize(args.out))
    print("load:", result.get("out"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
