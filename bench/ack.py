"""Ack throughput: the real `POST /v1/webhooks` against a bare Starlette app that only
computes the same HMAC and answers 202, same uvicorn settings, driven by `bench.loadgen` in
another process over loopback.

What the real worker does per request (embedded mode, INFO logs to a file, the production
defaults for progress/heartbeat intervals): read the body, verify the signature, check the
content type, decode and validate the envelope, check the repository URL policy, look the
delivery up, record delivery + job + event in SQLite (WAL, synchronous=NORMAL), start the job's
background task, log one JSON line, answer 202. The worker runs with `CONVEX_URL` pointing at
a recording fake of the Convex HTTP API (`bench.common.FakeConvex`, in the benchmark process)
that refuses every claim, so each accepted job also costs, in the same worker process while
the load runs, one `fondation:claim` HTTP call and the job's end (no clone, no CLI);
MAX_CONCURRENT_JOBS is huge, so no 503. The duplicate path re-sends one recorded delivery:
verify, validate, look up, answer 200 with `duplicate: true`.

`stalled_clones` measures the ack of a new job while as many clones stall as the default
executor has threads: before clones and DNS got their own threads, that ack hung.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    PY,
    REPO_ROOT,
    SECRET,
    BenchError,
    FakeConvex,
    Result,
    bench_dir,
    free_port,
    post_job,
    run_json,
    start_worker,
    wait_for,
)

GOAL = 0.7
STALLED = min(32, (os.cpu_count() or 1) + 4)  # the default executor's thread count


@contextlib.contextmanager
def bare_app(tmp: Path) -> Iterator[int]:
    port = free_port()
    log = (tmp / "bare.log").open("wb")
    proc = subprocess.Popen(
        [PY, "-m", "bench.bare_app", "--port", str(port)],
        cwd=REPO_ROOT,
        env={"WEBHOOK_SECRETS": SECRET, "PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    try:

        def healthy() -> bool:
            if proc.poll() is not None:
                raise BenchError(f"bare app exited: {(tmp / 'bare.log').read_text()[-2000:]}")
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 20, "the bare app")
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def load(port: int, *, requests: int, connections: int, mode: str, prefix: str, url: str) -> Any:
    argv = [PY, "-m", "bench.loadgen", "--port", str(port), "--requests", str(requests)]
    argv += ["--connections", str(connections), "--mode", mode, "--prefix", prefix]
    argv += ["--repo-url", url, "--max-s", "40"]
    out = run_json(argv, timeout_s=90)
    return out


def _check(out: dict[str, Any], expected: str, what: str) -> None:
    statuses = out["statuses"]
    if set(statuses) != {expected}:
        raise BenchError(f"{what}: unexpected statuses {statuses}")


def run(smoke: bool) -> list[Result]:
    n = 400 if smoke else 3000
    conns = 16
    rounds = 1 if smoke else 2
    tput = Result("ack_throughput")
    dup = Result("ack_duplicate")
    with bench_dir("ack") as tmp, FakeConvex(claim_ok=lambda job_id: False) as convex:
        url = "http://127.0.0.1:9/never-cloned.git"
        bare_runs: list[dict[str, Any]] = []
        real_runs: list[dict[str, Any]] = []
        dup_runs: list[dict[str, Any]] = []
        env = {
            "MAX_CONCURRENT_JOBS": "100000",
            "PROGRESS_MIN_INTERVAL_S": "1",
            "HEARTBEAT_S": "15",
            "CONVEX_URL": convex.url,
        }
        for r in range(rounds):
            with bare_app(tmp) as port:
                load(port, requests=200, connections=conns, mode="new", prefix="w-", url=url)
                out = load(port, requests=n, connections=conns, mode="new", prefix="b-", url=url)
                _check(out, "202", "bare app")
                bare_runs.append(out)
            wtmp = tmp / f"w{r}"
            wtmp.mkdir()
            with start_worker(wtmp, kill=True, **env) as w:
                load(w.port, requests=200, connections=conns, mode="new", prefix="w-", url=url)
                out = load(w.port, requests=n, connections=conns, mode="new", prefix="j-", url=url)
                _check(out, "202", "worker (new jobs)")
                real_runs.append(out)
            wtmp = tmp / f"d{r}"
            wtmp.mkdir()
            with start_worker(wtmp, kill=True, **env) as w:
                load(w.port, requests=1, connections=1, mode="dup", prefix="d-", url=url)
                out = load(w.port, requests=n, connections=conns, mode="dup", prefix="d-", url=url)
                _check(out, "200", "worker (duplicates)")
                dup_runs.append(out)
    bare = max(bare_runs, key=lambda o: o["rps"])
    real = max(real_runs, key=lambda o: o["rps"])
    dupe = max(dup_runs, key=lambda o: o["rps"])
    for res, label, o in ((tput, "bare", bare), (tput, "worker", real), (dup, "worker_dup", dupe)):
        res.add(f"{label}_rps", o["rps"])
        res.add(f"{label}_p50_ms", o["p50_ms"])
        res.add(f"{label}_p99_ms", o["p99_ms"])
    tput.add("requests_per_run", n)
    tput.add("connections", conns)
    ratio = real["rps"] / bare["rps"]
    tput.set_ratio("ratio_rps_worker_over_bare", ratio, f">= {GOAL}", ratio >= GOAL)
    dratio = dupe["rps"] / bare["rps"]
    dup.set_ratio("ratio_rps_duplicate_over_bare", dratio, f">= {GOAL}", dratio >= GOAL)
    out = [tput, dup]
    if not smoke:
        out.append(stalled_clones())
    return out


def stalled_clones() -> Result:
    """The ack of a new job while STALLED jobs sit in a clone that never progresses (a TCP
    server that accepts and never answers), against the same ack with none stalled."""
    from tests.support.gitserver import StallingServer

    res = Result("ack_stalled_clones")
    with bench_dir("stalled") as tmp, StallingServer() as stall:
        env = {"MAX_CONCURRENT_JOBS": str(STALLED + 4), "CLONE_TIMEOUT_S": "60"}
        with start_worker(tmp, kill=True, **env) as w:
            url = stall.url_for("stalled")

            def ack_ms(job_id: str, repo: str = url) -> float:
                t0 = time.perf_counter()
                try:
                    r = post_job(w, job_id, repo)
                except httpx.TimeoutException:
                    return float("inf")
                if r.status_code != 202:
                    raise BenchError(f"ack {r.status_code}: {r.text}")
                return (time.perf_counter() - t0) * 1000

            closed = "http://127.0.0.1:9/closed.git"  # these clones fail at once
            before = min(ack_ms(f"calm{i}", closed) for i in range(3))
            time.sleep(2.0)
            for i in range(STALLED):
                ack_ms(f"stall{i}")
            time.sleep(1.0)
            after = ack_ms("probe")  # post_job's timeout is 10 s: inf when it timed out
    res.add("ack_ms_no_stalled_clone", before)
    res.add("stalled_clones", STALLED)
    res.add("ack_ms_with_stalled_clones", after)
    ratio = after / before
    res.set_ratio("ratio_ack_stalled_over_calm", ratio, "<= 1.5", ratio <= 1.5)
    return res
