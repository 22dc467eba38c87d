"""Board scale: with 10,000 jobs in the store the board stays paginated and its server time
stays within 3x of an empty board's.

One real worker (embedded store, board on). First the empty board is measured; then two
simulator jobs that hang take both job slots (so the 10,000 seeded rows stay as they are:
pending rows are not dispatched), 10,000 jobs in a realistic mix of states are written into the
store's SQLite file in one transaction, and the board is measured again: page 1, and a deep page
(page 300). Server time is the page's `Server-Timing: board;dur=` (store reads + template
render, measured in the handler); client latency over loopback is printed too. The ratio is the
median server time with 10,000 jobs over the empty board's, in the same run.
"""

from __future__ import annotations

import json
import random
import re
import sqlite3
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.common import REPO_ROOT, BenchError, Result, bench_dir, post_job, start_worker, wait_for
from tests.support.gitserver import GitHttpServer, make_repo
from tests.support.jobs import sim

GOAL_RATIO = 3.0
JOBS = 10_000
PASSWORD = "bench-board-password"
MIX = (  # status, share of the 10,000
    ("completed", 0.86),
    ("failed", 0.07),
    ("dead", 0.01),
    ("canceled", 0.03),
    ("pending", 0.03),
)  # running: the two slot-holding jobs (embedded mode runs at most MAX_CONCURRENT_JOBS)
_TIMING = re.compile(r"board;dur=([0-9.]+)")
__all__ = ["REPO_ROOT", "run"]


def seed(db_path: Path, n: int, now: float) -> None:
    """`n` jobs in the MIX of states, written straight into the store's tables."""
    rng = random.Random(15)
    rows: list[tuple[Any, ...]] = []
    events: list[tuple[Any, ...]] = []
    statuses = [s for s, share in MIX for _ in range(int(n * share))]
    statuses += ["completed"] * (n - len(statuses))
    for i, status in enumerate(statuses):
        created = now - 30 * 86400 + i * 200.0
        failed = status in ("failed", "dead", "canceled")
        rows.append(
            (
                f"seed-{i:05d}",
                1,
                status,
                f"https://github.com/owner/repo{i % 97}.git",
                None,
                "{}",
                rng.randint(-5, 5),
                "other-worker",
                "other-worker" if status != "pending" else None,
                6 if status == "completed" else 3,
                6,
                status,
                "cli_failed" if failed else None,
                "the CLI exited with code 1" if failed else None,
                created,
                created + 60.0,
            )
        )
        events.append((f"seed-{i:05d}", 1, "status", json.dumps({"status": status}), created))
    db = sqlite3.connect(db_path, timeout=10)
    try:
        with db:
            db.executemany(
                """INSERT INTO jobs(job_id, attempt, status, repository_url, ref, options,
                   priority, accepted_by, claimed_by, current_step, total_steps, message,
                   error_code, error_message, created_at, updated_at)
                   VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)""",
                rows,
            )
            db.executemany(
                "INSERT INTO events(job_id, attempt, type, data, at) VALUES (?,?,?,?,?)", events
            )
    finally:
        db.close()


def measure(client: httpx.Client, proc: psutil.Process, path: str, n: int) -> dict[str, Any]:
    server, wall = [], []
    text = ""
    cpu0 = proc.cpu_times()
    for _ in range(n):
        t0 = time.perf_counter()
        r = client.get(path)
        wall.append((time.perf_counter() - t0) * 1000)
        if r.status_code != 200:
            raise BenchError(f"GET {path}: HTTP {r.status_code}")
        m = _TIMING.search(r.headers.get("server-timing", ""))
        if m is None:
            raise BenchError("no Server-Timing header on the board")
        server.append(float(m.group(1)))
        text = r.text
    cpu1 = proc.cpu_times()
    cpu_s = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return {
        "cpu_ms": cpu_s / n * 1000,
        "server_ms": statistics.median(server),
        "wall_ms": statistics.median(wall),
        "rows": text.count("<tr data-job="),
        "has_next": 'rel="next"' in text,
        "bytes": len(text),
    }


def run(smoke: bool) -> list[Result]:
    n = 40 if smoke else 200
    res = Result("board")
    with bench_dir("board") as tmp:
        make_repo(tmp / "repos" / "hang.git", sim(hang_at_step=2))
        with (
            GitHttpServer(tmp / "repos") as git,
            start_worker(tmp, MAX_CONCURRENT_JOBS="2", BOARD_PASSWORD=PASSWORD) as w,
            httpx.Client(base_url=w.url, timeout=10) as client,
        ):
            proc = psutil.Process(w.proc.pid)  # type: ignore[union-attr]
            r = client.post("/board/login", data={"password": PASSWORD})
            if r.status_code != 303:
                raise BenchError(f"login: HTTP {r.status_code}")
            measure(client, proc, "/board", 10)  # warm-up: templates compiled, caches filled
            empty = measure(client, proc, "/board", n)
            for i in range(2):
                if post_job(w, f"hold-{i}", git.url_for("hang.git")).status_code != 202:
                    raise BenchError("could not start a slot-holding job")
            wait_for(
                lambda: all(
                    client.get(f"/v1/jobs/hold-{i}").json()["status"] == "analyzing"
                    for i in range(2)
                ),
                30,
                "the slot-holding jobs",
            )
            seed(Path(w.env["DATA_DIR"]) / "jobs.sqlite3", JOBS, time.time())
            measure(client, proc, "/board", 10)
            full = measure(client, proc, "/board", n)
            deep = measure(client, proc, "/board?page=300", n)
    res.add("requests_per_case", n)
    res.add("empty_worker_cpu_ms_per_request", round(empty["cpu_ms"], 3))
    res.add("empty_handler_ms_p50", round(empty["server_ms"], 3))
    res.add("empty_wall_ms_p50", round(empty["wall_ms"], 3))
    res.add("jobs_in_store", JOBS + 2)
    res.add("full_worker_cpu_ms_per_request", round(full["cpu_ms"], 3))
    res.add("full_handler_ms_p50", round(full["server_ms"], 3))
    res.add("ratio_handler_time_10k_over_empty", round(full["server_ms"] / empty["server_ms"], 2))
    res.add("full_wall_ms_p50", round(full["wall_ms"], 3))
    res.add("full_rows_on_page", full["rows"])
    res.add("full_page_bytes", full["bytes"])
    res.add("deep_page_300_handler_ms_p50", round(deep["server_ms"], 3))
    res.add("deep_page_300_rows", deep["rows"])
    paginated = full["has_next"] and full["rows"] <= 10 + 20 + 20
    res.add("paginated", paginated)
    ratio = full["cpu_ms"] / max(empty["cpu_ms"], 1e-6)
    res.set_ratio(
        "ratio_server_cpu_10k_over_empty",
        ratio,
        f"<= {GOAL_RATIO:g} and paginated",
        ratio <= GOAL_RATIO and paginated,
    )
    return [res]
