"""Ack latency while working: p99 of `job.start` acks while MAX_CONCURRENT_JOBS (2) simulator
CLIs stream output at full speed (`flood_lines`), against the same probes with no job running.

The worker reports to a recording fake of the Convex HTTP API (`FakeConvex`): the flood jobs'
claims are accepted (they clone from a git server on 127.0.0.1 and run the simulator), the
probes' claims are refused, so every probe is a real new job that ends at once and never takes
a slot for long. MAX_CONCURRENT_JOBS = 2 flood slots + 50 for the probes (a probe's job
can outlive the next probe on a saturated loop; no probe may get a 503). Probes are sent one at
a time, 20 ms apart, by `bench.loadgen` in its own process. Production progress intervals.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import psutil

from bench.common import (
    PY,
    BenchError,
    FakeConvex,
    Result,
    bench_dir,
    headers_for,
    run_json,
    start_body,
    start_worker,
    wait_for,
)
from tests.support.gitserver import GitHttpServer, make_repo
from tests.support.signing import cancel_body

GOAL = 1.5
FLOOD_JOBS = 2  # the default MAX_CONCURRENT_JOBS
PROBE_SLOTS = 50  # a refused probe job can outlive the next probe on a saturated loop


def probe(port: int, n: int, prefix: str) -> Any:
    argv = [PY, "-m", "bench.loadgen", "--port", str(port), "--requests", str(n)]
    argv += ["--connections", "1", "--gap-ms", "20", "--mode", "new", "--prefix", prefix]
    argv += ["--repo-url", "http://127.0.0.1:9/never-cloned.git", "--max-s", "30"]
    out = run_json(argv, timeout_s=60)
    if set(out["statuses"]) != {"202"}:
        raise BenchError(f"probe statuses {out['statuses']}")
    return out


def cli_lines(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("fondation_cli_output_lines_total"):
            return float(line.split()[-1])
    return 0.0


def run(smoke: bool) -> list[Result]:
    n = 80 if smoke else 400
    res = Result("ack_busy")
    with bench_dir("busy") as tmp:
        root = tmp / "repos"
        sim = {"flood_lines": 50_000_000}
        make_repo(
            root / "flood.git", {"README.md": "# f\n", ".fondation-sim.json": json.dumps(sim)}
        )
        with (
            GitHttpServer(root) as git,
            FakeConvex(claim_ok=lambda job_id: job_id.startswith("flood")) as convex,
            start_worker(
                tmp,
                MAX_CONCURRENT_JOBS=str(FLOOD_JOBS + PROBE_SLOTS),
                PROGRESS_MIN_INTERVAL_S="1",
                HEARTBEAT_S="15",
                CONVEX_URL=convex.url,
            ) as w,
        ):
            proc = psutil.Process(w.proc.pid)  # type: ignore[union-attr]
            probe(w.port, 20, "warm-")
            idle = probe(w.port, n, "probe-idle-")
            for i in range(FLOOD_JOBS):
                body = start_body(f"flood{i}", git.url_for("flood"))
                r = httpx.post(
                    f"{w.url}/v1/webhooks",
                    content=body,
                    headers=headers_for(body, f"flood{i}:1"),
                    timeout=10,
                )
                if r.status_code != 202:
                    raise BenchError(f"flood job refused: {r.status_code} {r.text}")

            def flooding() -> bool:
                steps = {
                    c[2]
                    for c in convex.snapshot()
                    if c[1].endswith(":progress") and c[3].get("currentStep") == 2
                }
                return len(steps) == FLOOD_JOBS

            wait_for(flooding, 30, "the flood jobs to reach step 2")
            lines0, cpu0, t0 = cli_lines(w.url), proc.cpu_times(), time.monotonic()
            busy = probe(w.port, n, "probe-busy-")
            lines1, cpu1, t1 = cli_lines(w.url), proc.cpu_times(), time.monotonic()
            running = httpx.get(f"{w.url}/readyz", timeout=10).json().get("running")
            for i in range(FLOOD_JOBS):
                body = cancel_body(f"flood{i}")
                httpx.post(
                    f"{w.url}/v1/webhooks",
                    content=body,
                    headers=headers_for(body, f"flood{i}:1:cancel"),
                    timeout=10,
                )
        if running is None or running < FLOOD_JOBS:
            raise BenchError(f"flood jobs ended before the probes finished (running={running})")
    wall = t1 - t0
    res.add("idle_p50_ms", idle["p50_ms"])
    res.add("idle_p99_ms", idle["p99_ms"])
    res.add("busy_p50_ms", busy["p50_ms"])
    res.add("busy_p99_ms", busy["p99_ms"])
    res.add("busy_max_ms", busy["max_ms"])
    res.add("probes", n)
    res.add("cli_lines_per_s_during_probes", (lines1 - lines0) / wall)
    cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    res.add("worker_cpu_percent_during_probes", 100 * cpu / wall)
    ratio = busy["p99_ms"] / idle["p99_ms"]
    res.set_ratio("ratio_p99_busy_over_idle", ratio, f"<= {GOAL}", ratio <= GOAL)
    return [res]
