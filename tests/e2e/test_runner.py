"""Jobs run end to end: a real uvicorn worker, a real git repository served over HTTP on
127.0.0.1, the Fondation simulator as a real subprocess CLI, and the embedded store."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.support.gitserver import GitHttpServer, make_repo
from tests.support.jobs import (
    SOURCE,
    alive,
    processes_under,
    sim,
    spawned_child,
    submit,
    wait_for,
)
from tests.support.signing import SECRET, cancel_body, headers_for, start_body
from tests.support.worker import REPO_ROOT, WorkerProcess, base_env

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitHttpServer]:
    root = tmp_path_factory.mktemp("repos")
    make_repo(root / "happy.git", SOURCE, branches={"dev": {"docs/guide.md": "guide\n"}})
    make_repo(root / "slow.git", sim(step_delay_s=0.4))
    make_repo(root / "fail.git", sim(fail_at_step=2))
    make_repo(root / "hang.git", sim(hang_at_step=2, spawn_child=True))
    make_repo(root / "stubborn.git", sim(hang_at_step=2, spawn_child=True, ignore_sigterm=True))
    make_repo(root / "flood.git", sim(flood_lines=1_000_000))
    make_repo(root / "huge.git", sim(huge_doc_bytes=900_000))
    with GitHttpServer(root) as server:
        yield server


@pytest.fixture(scope="module")
def worker(
    tmp_path_factory: pytest.TempPathFactory, git_server: GitHttpServer
) -> Iterator[WorkerProcess]:
    tmp = tmp_path_factory.mktemp("runner")
    w = WorkerProcess(base_env(tmp, MAX_CONCURRENT_JOBS="2"), tmp / "worker.log").start()
    yield w
    w.stop(timeout_s=30)


def events(w: WorkerProcess, job_id: str, timeout_s: float = 60) -> list[dict[str, Any]]:
    """Read the job's SSE stream to its end (bounded)."""
    out: list[dict[str, Any]] = []
    with httpx.stream(
        "GET", f"{w.url}/v1/jobs/{job_id}/events", timeout=httpx.Timeout(timeout_s)
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data:"):
                out.append(json.loads(line[5:]))
    return out


def test_job_completes_with_docs_in_order(worker: WorkerProcess, git_server: GitHttpServer) -> None:
    submit(worker, "happy", git_server.url_for("happy"), ref="main")
    evs = events(worker, "happy")
    statuses = [e["status"] for e in evs if "status" in e]
    assert statuses[0] == "accepted" and statuses[-1] == "completed"
    for phase in ("claimed", "cloning", "analyzing", "gathering"):
        assert phase in statuses
    steps = [
        e["currentStep"] for e in evs if e["type"] == "progress" and e["status"] == "analyzing"
    ]
    assert steps == sorted(steps) and max(steps) == 6
    job = httpx.get(f"{worker.url}/v1/jobs/happy").json()
    assert job["status"] == "completed" and job["docsCount"] == 7
    kinds = [d["kind"] for d in job["docs"]]
    assert kinds == ["yaml", "yaml", "yaml", "chapter", "chapter", "chapter", "tutorial"]
    # The simulator orders chapters in reverse of the file index: the order file is honoured.
    assert [d["title"] for d in job["docs"] if d["kind"] == "chapter"] == [
        "Chapter 1: src (reviewed)",
        "Chapter 2: lib",
        "Chapter 3: README.md (reviewed)",
    ]
    assert [d["chapterIndex"] for d in job["docs"] if d["kind"] == "chapter"] == [1, 2, 3]
    docs = httpx.get(f"{worker.url}/v1/jobs/happy/docs").json()["docs"]
    assert "main.py" in next(d["content"] for d in docs if d["title"].startswith("Chapter 1"))
    assert list((Path(worker.env["WORK_DIR"])).iterdir()) == []


def test_branch_ref_is_cloned(worker: WorkerProcess, git_server: GitHttpServer) -> None:
    submit(worker, "dev", git_server.url_for("happy"), ref="dev")
    worker.wait_status("dev", {"completed"}, timeout_s=60)
    titles = [d["title"] for d in httpx.get(f"{worker.url}/v1/jobs/dev").json()["docs"]]
    assert any("docs" in t for t in titles)


def test_missing_ref_is_clone_failed(worker: WorkerProcess, git_server: GitHttpServer) -> None:
    submit(worker, "noref", git_server.url_for("happy"), ref="no-such-branch")
    job = worker.wait_status("noref", {"failed"}, timeout_s=60)
    assert job["error"]["code"] == "clone_failed"
    assert "no-such-branch" in job["error"]["message"]
    assert job["error"]["retryable"] is False


def test_cli_exit_1_is_cli_failed_with_stderr_tail(
    worker: WorkerProcess, git_server: GitHttpServer
) -> None:
    submit(worker, "fail", git_server.url_for("fail"))
    job = worker.wait_status("fail", {"failed"}, timeout_s=60)
    assert job["error"]["code"] == "cli_failed"
    assert "exited with code 1" in job["error"]["message"]
    assert "step 2" in job["error"]["message"].lower()


def test_cancel_mid_run_kills_the_group(worker: WorkerProcess, git_server: GitHttpServer) -> None:
    submit(worker, "cancelme", git_server.url_for("hang"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and spawned_child(worker, "cancelme") is None:
        time.sleep(0.1)
    child = spawned_child(worker, "cancelme")
    assert child is not None and alive(child)
    body = cancel_body("cancelme")
    r = httpx.post(
        f"{worker.url}/v1/webhooks", content=body, headers=headers_for(body, "cancelme:1:cancel")
    )
    assert r.status_code == 202
    job = worker.wait_status("cancelme", {"canceled"}, timeout_s=30)
    assert job["error"]["code"] == "canceled"
    assert not alive(child)
    assert processes_under("cancelme-1-") == []


def test_output_flood_keeps_memory_bounded(
    worker: WorkerProcess, git_server: GitHttpServer
) -> None:
    proc = psutil.Process(worker.proc.pid)  # type: ignore[union-attr]
    before = proc.memory_info().rss
    submit(worker, "flood", git_server.url_for("flood"))
    peak = before
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        peak = max(peak, proc.memory_info().rss)
        status = httpx.get(f"{worker.url}/v1/jobs/flood").json()["status"]
        if status in ("completed", "failed"):
            break
        time.sleep(0.05)
    assert status == "completed"
    # ~100 MB of output went through the worker; its memory grew by far less.
    assert peak - before < 80 * 1024 * 1024, (before, peak)
    text = httpx.get(f"{worker.url}/metrics").text
    lines = float(re.search(r"^fondation_cli_output_lines_total (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]
    assert lines >= 1_000_000


def test_oversized_doc_is_output_invalid(worker: WorkerProcess, git_server: GitHttpServer) -> None:
    submit(worker, "huge", git_server.url_for("huge"))
    job = worker.wait_status("huge", {"failed"}, timeout_s=60)
    assert job["error"]["code"] == "output_invalid"
    assert "MAX_DOC_BYTES" in job["error"]["message"] or "bytes" in job["error"]["message"]


def test_timeout_kills_the_group(tmp_path: Path, git_server: GitHttpServer) -> None:
    w = WorkerProcess(base_env(tmp_path, JOB_TIMEOUT_S="3"), tmp_path / "w.log").start()
    try:
        submit(w, "slowpoke", git_server.url_for("hang"))
        job = w.wait_status("slowpoke", {"failed"}, timeout_s=40)
        assert job["error"]["code"] == "timeout"
        child = spawned_child(w, "slowpoke")
        assert child is not None and not alive(child)
        assert processes_under("slowpoke-1-") == []
    finally:
        w.stop()


def test_sigterm_with_two_jobs_reports_interrupted_within_grace(
    tmp_path: Path, git_server: GitHttpServer
) -> None:
    grace_s = 6.0
    w = WorkerProcess(base_env(tmp_path, SHUTDOWN_GRACE_S=str(grace_s)), tmp_path / "w.log").start()
    submit(w, "t1", git_server.url_for("hang"))
    submit(w, "t2", git_server.url_for("stubborn"))
    for job_id in ("t1", "t2"):
        w.wait_status(job_id, {"analyzing"}, timeout_s=30)
    time.sleep(0.5)
    started = time.monotonic()
    w.signal(signal.SIGTERM)
    # While draining, new work is refused with 503 (the stubborn CLI keeps us busy a while).
    body = start_body("late", git_server.url_for("happy"))
    r = httpx.post(
        f"{w.url}/v1/webhooks", content=body, headers=headers_for(body, "late:1"), timeout=5
    )
    assert r.status_code == 503 and "retry-after" in r.headers
    code = w.wait(timeout_s=grace_s + 5)
    elapsed = time.monotonic() - started
    assert code == 0
    assert elapsed <= grace_s + 1.0, elapsed
    assert processes_under("t1-1-") == [] and processes_under("t2-1-") == []
    # Read the embedded store directly: both jobs were reported interrupted, retryable.
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sqlite3,sys,json;db=sqlite3.connect(sys.argv[1]);"
            "print(json.dumps(db.execute(\"select job_id,status,error_code,retryable from jobs where job_id in ('t1','t2') order by job_id\").fetchall()))",
            str(tmp_path / "data" / "jobs.sqlite3"),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert json.loads(out.stdout) == [
        ["t1", "failed", "interrupted", 1],
        ["t2", "failed", "interrupted", 1],
    ]


def test_submit_command_follows_to_completion(
    worker: WorkerProcess, git_server: GitHttpServer
) -> None:
    env = {**os.environ, "WEBHOOK_SECRET": SECRET, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "app",
            "submit",
            git_server.url_for("slow"),
            "--url",
            worker.url,
            "--job-id",
            "cli-job",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "cli-job"
    bars = [ln for ln in lines if ln.startswith("[")]
    steps = [int(m.group(1)) for ln in bars if (m := re.search(r"\] (\d)/6", ln))]
    assert steps == sorted(steps) and 1 in steps and 6 in steps
    assert lines[-1] == "job cli-job completed"


def test_submit_explains_401(worker: WorkerProcess, git_server: GitHttpServer) -> None:
    env = {
        **os.environ,
        "WEBHOOK_SECRET": "whsec_d3Jvbmctc2VjcmV0LXdyb25nLXNlY3JldA==",
        "PYTHONPATH": str(REPO_ROOT),
    }
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "app",
            "submit",
            git_server.url_for("happy"),
            "--url",
            worker.url,
            "--no-follow",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert "401" in out.stderr and "WEBHOOK_SECRET" in out.stderr


def test_log_lines_are_json_with_job_context(
    worker: WorkerProcess, git_server: GitHttpServer
) -> None:
    submit(worker, "logged", git_server.url_for("happy"))
    worker.wait_status("logged", {"completed"}, timeout_s=60)
    # "job finished" is written after the final callback: wait for it, bounded.
    assert wait_for(lambda: '"msg": "job finished", "job_id": "logged"' in worker.logs(), 10)
    records = [json.loads(line) for line in worker.logs().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "msg"} <= r.keys() for r in records)
    mine = [r for r in records if r.get("job_id") == "logged"]
    msgs = [r["msg"] for r in mine]
    assert "job claimed" in msgs and "job completed" in msgs
    assert all(r["attempt"] == 1 for r in mine)
    steps = [r for r in mine if r["msg"] == "step finished"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all(r["duration_s"] >= 0 and r["total_steps"] == 6 for r in steps)
    finished = next(r for r in mine if r["msg"] == "job finished")
    assert finished["status"] == "completed" and finished["duration_s"] > 0
    hook = next(r for r in records if r["msg"] == "webhook" and r["webhook_id"] == "logged:1")
    assert hook["outcome"] == "accepted" and hook["http_status"] == 202 and "ack_ms" in hook
