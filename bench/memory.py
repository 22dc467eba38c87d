"""Memory: the worker's RSS idle (started, 20 webhooks answered) and with N jobs running (the
simulator CLI parked at step 2 with `hang_at_step`, after clone), for N = MAX_CONCURRENT_JOBS
= 2 and, in the full run, 8. Per-job overhead outside the CLI = (RSS with N jobs - idle RSS)/N,
worker process only; the CLIs' own RSS is reported apart. Embedded store, production
progress intervals.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import psutil

from bench.common import (
    BenchError,
    Result,
    bench_dir,
    headers_for,
    job_status,
    post_job,
    start_worker,
    wait_for,
)
from tests.support.gitserver import GitHttpServer, make_repo
from tests.support.signing import cancel_body

MiB = 1024 * 1024


def measure(tmp: Path, git: GitHttpServer, jobs: int) -> dict[str, float]:
    with start_worker(
        tmp, MAX_CONCURRENT_JOBS=str(jobs), PROGRESS_MIN_INTERVAL_S="1", HEARTBEAT_S="15"
    ) as w:
        proc = psutil.Process(w.proc.pid)  # type: ignore[union-attr]
        for i in range(20):  # a warm worker: routes, store and signing exercised
            httpx.get(f"{w.url}/readyz", timeout=10)
            body = cancel_body(f"none{i}")
            httpx.post(
                f"{w.url}/v1/webhooks", content=body, headers=headers_for(body, f"n{i}"), timeout=10
            )
        time.sleep(1.0)
        idle = proc.memory_info().rss
        ids = [f"mem{jobs}-{i}" for i in range(jobs)]
        for job_id in ids:
            r = post_job(w, job_id, git.url_for("hang"))
            if r.status_code != 202:
                raise BenchError(f"job refused: {r.status_code} {r.text}")
        wait_for(lambda: all(job_status(w, j) == "analyzing" for j in ids), 60, "jobs in the CLI")
        time.sleep(2.0)  # the CLIs reach their hang; the worker settles
        busy = proc.memory_info().rss
        cli = 0
        for child in proc.children(recursive=True):
            try:
                cli += child.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        for job_id in ids:
            body = cancel_body(job_id)
            httpx.post(
                f"{w.url}/v1/webhooks",
                content=body,
                headers=headers_for(body, f"{job_id}:1:cancel"),
                timeout=10,
            )
        wait_for(lambda: all(job_status(w, j) == "canceled" for j in ids), 30, "cancels")
    return {"idle": idle / MiB, "busy": busy / MiB, "cli": cli / MiB / jobs}


def run(smoke: bool) -> list[Result]:
    res = Result("memory")
    counts = (2,) if smoke else (2, 8)
    with bench_dir("memory") as tmp:
        sim = json.dumps({"hang_at_step": 2})
        make_repo(tmp / "repos" / "hang.git", {"README.md": "# h\n", ".fondation-sim.json": sim})
        with GitHttpServer(tmp / "repos") as git:
            out = {}
            for n in counts:
                (tmp / f"w{n}").mkdir()
                out[n] = measure(tmp / f"w{n}", git, n)
    for n, m in out.items():
        res.add(f"jobs{n}_idle_rss_mib", m["idle"])
        res.add(f"jobs{n}_busy_rss_mib", m["busy"])
        res.add(f"jobs{n}_cli_rss_mib_per_job", m["cli"])
        res.add(f"jobs{n}_overhead_mib_per_job", (m["busy"] - m["idle"]) / n)
    m = out[2]
    ratio = m["busy"] / m["idle"]
    res.set_ratio("ratio_rss_2jobs_over_idle", ratio, "report only", None)
    return [res]
