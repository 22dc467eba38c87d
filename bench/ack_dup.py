"""Duplicate-delivery ack throughput against the bare HMAC app, in one run, interleaved.

Each round runs the bare app (`bench.bare_app`), then this tree's worker re-sending one
recorded delivery (`bench.loadgen --mode dup`: verify, lookup, 200 `duplicate: true`), and,
with `--baseline-tree DIR` (a checkout of an older commit, e.g. `git archive <sha> | tar -x`),
that tree's worker the same way. Same uvicorn settings, same load generator, same worker
settings as `bench.ack` (FakeConvex refusing claims; no job runs). Rounds alternate so the
machine's drift hits every side alike; each side's best round is kept and every round's ratio
is printed too.

    .venv/bin/python -m bench --only ack_dup
    .venv/bin/python -m bench.ack_dup --baseline-tree /tmp/before [--requests 3000 --rounds 2]
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from bench.ack import GOAL, bare_app, load
from bench.common import (
    PY,
    BenchError,
    FakeConvex,
    Result,
    bench_dir,
    start_worker,
    wait_for,
)
from tests.support.worker import base_env, free_port

URL = "http://127.0.0.1:9/never-cloned.git"
CONNECTIONS = 16
WORKER_ENV = {"MAX_CONCURRENT_JOBS": "100000", "PROGRESS_MIN_INTERVAL_S": "1", "HEARTBEAT_S": "15"}


@contextlib.contextmanager
def tree_worker(tree: Path, tmp: Path, **env: str) -> Iterator[int]:
    """`python -m app serve` from another checkout (its own `app` package); yields the port."""
    port = free_port()
    full = base_env(tmp, **WORKER_ENV, **env)
    full.update(PYTHONPATH=str(tree), PORT=str(port), HOST="127.0.0.1")
    log = (tmp / "worker.log").open("ab")
    proc = subprocess.Popen(
        [PY, "-m", "app", "serve"], cwd=tree, env=full, stdout=log, stderr=subprocess.STDOUT
    )
    log.close()

    def healthy() -> bool:
        if proc.poll() is not None:
            raise BenchError(
                f"worker from {tree} exited: {(tmp / 'worker.log').read_text()[-2000:]}"
            )
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, 20, f"the worker from {tree}")
        yield port
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _dup(port: int, n: int) -> dict[str, Any]:
    load(port, requests=1, connections=1, mode="dup", prefix="d-", url=URL)
    load(port, requests=200, connections=CONNECTIONS, mode="dup", prefix="d-", url=URL)
    out: dict[str, Any] = load(
        port, requests=n, connections=CONNECTIONS, mode="dup", prefix="d-", url=URL
    )
    if set(out["statuses"]) != {"200"}:
        raise BenchError(f"duplicates: unexpected statuses {out['statuses']}")
    return out


def measure(smoke: bool, baseline_tree: Path | None, n: int, rounds: int) -> Result:
    res = Result("ack_dup")
    runs: dict[str, list[dict[str, Any]]] = {"bare": [], "worker": [], "baseline": []}
    with bench_dir("ackdup") as tmp, FakeConvex(claim_ok=lambda job_id: False) as convex:
        for r in range(rounds):
            with bare_app(tmp) as port:
                load(port, requests=200, connections=CONNECTIONS, mode="new", prefix="w-", url=URL)
                out = load(
                    port, requests=n, connections=CONNECTIONS, mode="new", prefix="b-", url=URL
                )
                if set(out["statuses"]) != {"202"}:
                    raise BenchError(f"bare app: unexpected statuses {out['statuses']}")
                runs["bare"].append(out)
            (tmp / f"w{r}").mkdir()
            with start_worker(tmp / f"w{r}", kill=True, CONVEX_URL=convex.url, **WORKER_ENV) as w:
                runs["worker"].append(_dup(w.port, n))
            if baseline_tree is not None:
                (tmp / f"b{r}").mkdir()
                with tree_worker(baseline_tree, tmp / f"b{r}", CONVEX_URL=convex.url) as port:
                    runs["baseline"].append(_dup(port, n))
            ratio = runs["worker"][-1]["rps"] / runs["bare"][-1]["rps"]
            res.add(f"round{r}_ratio_worker_over_bare", ratio)
            if baseline_tree is not None:
                ratio = runs["baseline"][-1]["rps"] / runs["bare"][-1]["rps"]
                res.add(f"round{r}_ratio_baseline_over_bare", ratio)
    best = {k: max(v, key=lambda o: o["rps"]) for k, v in runs.items() if v}
    for label, o in best.items():
        res.add(f"{label}_rps", o["rps"])
        res.add(f"{label}_p50_ms", o["p50_ms"])
        res.add(f"{label}_p99_ms", o["p99_ms"])
    if "baseline" in best:
        res.add("baseline_tree", str(baseline_tree))
        res.add("ratio_baseline_over_bare", best["baseline"]["rps"] / best["bare"]["rps"])
    ratio = best["worker"]["rps"] / best["bare"]["rps"]
    res.set_ratio("ratio_rps_duplicate_over_bare", ratio, f">= {GOAL}", ratio >= GOAL)
    return res


def run(smoke: bool) -> list[Result]:
    n, rounds = (400, 1) if smoke else (3000, 2)
    return [measure(smoke, None, n, rounds)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--baseline-tree", type=Path)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    measure(False, args.baseline_tree, args.requests, args.rounds)


if __name__ == "__main__":
    main()
