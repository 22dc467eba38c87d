"""Progress amplification: a CLI printing many lines (100,000 in 10 s; smoke 30,000 in 3 s)
must cause at most 2 progress calls per second per job, and every final state must arrive.

MAX_CONCURRENT_JOBS (2) jobs run at once with `bench/paced_cli.py` as FONDATION_COMMAND, the
worker reporting to a recording fake of the Convex HTTP API (`FakeConvex`) with the production
PROGRESS_MIN_INTERVAL_S=1 and HEARTBEAT_S=15. Calls are counted per job during the paced step
(the progress calls whose totalSteps is 2 and currentStep 1). The same run with a silent CLI of
the same length is the CPU baseline: the ratio is the worker's CPU seconds (user+system of the
worker process only, psutil) flooded over silent.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.common import (
    PY,
    REPO_ROOT,
    BenchError,
    FakeConvex,
    Result,
    bench_dir,
    headers_for,
    start_body,
    start_worker,
    wait_for,
)
from tests.support.gitserver import GitHttpServer, make_repo

GOAL_CALLS_PER_S = 2.0
JOBS = 2
PACED = REPO_ROOT / "bench" / "paced_cli.py"


def one_run(tmp: Path, git: GitHttpServer, lines: int, seconds: float) -> dict[str, Any]:
    command = (
        f"{PY} {PACED} --lines {lines} --seconds {seconds} -- "
        "analyze {repo_dir} --output-dir {output_dir}"
    )
    with (
        FakeConvex() as convex,
        start_worker(
            tmp,
            MAX_CONCURRENT_JOBS=str(JOBS),
            PROGRESS_MIN_INTERVAL_S="1",
            HEARTBEAT_S="15",
            CONVEX_URL=convex.url,
            FONDATION_COMMAND=command,
        ) as w,
    ):
        proc = psutil.Process(w.proc.pid)  # type: ignore[union-attr]
        cpu0 = proc.cpu_times()
        t0 = time.monotonic()
        ids = [f"prog{lines}-{i}" for i in range(JOBS)]
        for job_id in ids:
            body = start_body(job_id, git.url_for("small"))
            r = httpx.post(
                f"{w.url}/v1/webhooks",
                content=body,
                headers=headers_for(body, f"{job_id}:1"),
                timeout=10,
            )
            if r.status_code != 202:
                raise BenchError(f"job refused: {r.status_code} {r.text}")

        def finals() -> set[str]:
            return {c[2] for c in convex.snapshot() if c[1].endswith((":complete", ":fail"))}

        wait_for(lambda: finals() >= set(ids), seconds + 60, "every job's final state")
        wall = time.monotonic() - t0
        cpu1 = proc.cpu_times()
        calls = convex.snapshot()
    per_job: dict[str, list[float]] = defaultdict(list)
    totals: dict[str, int] = defaultdict(int)
    completes = 0
    for at, path, job_id, args in calls:
        if path.endswith(":progress"):
            totals[job_id] += 1
            if args.get("totalSteps") == 2 and args.get("currentStep") == 1:
                per_job[job_id].append(at)
        if path.endswith(":complete"):
            completes += 1
    rates, windows = [], []
    for job_id in ids:
        times = sorted(per_job.get(job_id, []))
        rates.append(len(times) / seconds)
        windows.append(max((sum(1 for u in times if t <= u < t + 1.0) for t in times), default=0))
    return {
        "cpu_s": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
        "wall_s": wall,
        "calls_per_s": max(rates),
        "max_calls_in_1s": max(windows),
        "progress_calls_per_job": max(totals[j] for j in ids),
        "completes": completes,
    }


def run(smoke: bool) -> list[Result]:
    lines, seconds = (30_000, 3.0) if smoke else (100_000, 10.0)
    res = Result("progress")
    with bench_dir("progress") as tmp:
        make_repo(tmp / "repos" / "small.git", {"README.md": "# s\n", "src/a.py": "a = 1\n"})
        with GitHttpServer(tmp / "repos") as git:
            (tmp / "loud").mkdir()
            (tmp / "quiet").mkdir()
            silent = one_run(tmp / "quiet", git, 0, seconds)
            loud = one_run(tmp / "loud", git, lines, seconds)
    res.add("lines_per_job", lines)
    res.add("seconds", seconds)
    res.add("jobs", JOBS)
    res.add("flood_calls_per_s_per_job", loud["calls_per_s"])
    res.add("flood_max_calls_in_1s_window", loud["max_calls_in_1s"])
    res.add("flood_progress_calls_per_job", loud["progress_calls_per_job"])
    res.add("silent_calls_per_s_per_job", silent["calls_per_s"])
    res.add("final_states_delivered", f"{loud['completes'] + silent['completes']}/{2 * JOBS}")
    res.add("flood_worker_cpu_s", loud["cpu_s"])
    res.add("silent_worker_cpu_s", silent["cpu_s"])
    ok = (
        loud["calls_per_s"] <= GOAL_CALLS_PER_S
        and loud["completes"] == JOBS
        and silent["completes"] == JOBS
    )
    ratio = loud["cpu_s"] / max(silent["cpu_s"], 1e-6)
    res.set_ratio(
        "ratio_cpu_flood_over_silent",
        ratio,
        f"calls/s/job <= {GOAL_CALLS_PER_S:g} and all final states",
        ok,
    )
    return [res]
