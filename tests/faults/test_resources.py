"""Resource bounds: the workspace is removed after every outcome, no process outlives its job,
and the worker's file descriptors (and memory) come back to their level after a batch."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.gitserver import GitHttpServer, make_repo
from tests.support.jobs import (
    assert_no_orphans,
    assert_workspace_empty,
    cancel,
    job,
    sim,
    submit,
    wait_for,
    workspace_entries,
)
from tests.support.worker import WorkerProcess, base_env

pytestmark = pytest.mark.faults

JOB_TIMEOUT_S = 5.0
# Slack for descriptors that are legitimately in flight when we sample: the server side of the
# test's last HTTP connection, which uvicorn closes a moment after the answer. Anything that
# leaks per job (a pipe, a git process, a socket) would show as at least one fd per job.
FD_TOLERANCE = 2
FIGURES: dict[str, object] = {}


@pytest.fixture(scope="module")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitHttpServer]:
    root = tmp_path_factory.mktemp("res-repos")
    make_repo(root / "happy.git", sim())
    make_repo(root / "fail.git", sim(fail_at_step=2))
    make_repo(root / "hang.git", sim(hang_at_step=2, spawn_child=True))
    make_repo(root / "huge.git", sim(huge_doc_bytes=900_000))
    with GitHttpServer(root) as server:
        yield server


def _idle(w: WorkerProcess) -> bool:
    return bool(httpx.get(f"{w.url}/readyz", timeout=5).json()["running"] == 0)


def _fds(proc: psutil.Process) -> int:
    return int(proc.num_fds())


def _run_round(w: WorkerProcess, git_server: GitHttpServer, tag: str) -> dict[str, str]:
    """One job per outcome (two slots: pairs); returns job id -> expected error code."""
    plan = {
        f"{tag}-ok": ("happy", None),
        f"{tag}-cli": ("fail", "cli_failed"),
        f"{tag}-clone": ("happy", "clone_failed"),
        f"{tag}-huge": ("huge", "output_invalid"),
        f"{tag}-cancel": ("hang", "canceled"),
    }
    ids = list(plan)
    for i in range(0, len(ids), 2):
        pair = ids[i : i + 2]
        for job_id in pair:
            repo, code = plan[job_id]
            submit(
                w, job_id, git_server.url_for(repo), ref="nope" if code == "clone_failed" else None
            )
        for job_id in pair:
            if plan[job_id][1] == "canceled":
                w.wait_status(job_id, {"analyzing"}, timeout_s=30)
                assert cancel(w, job_id).status_code == 202
            w.wait_status(job_id, {"completed", "failed", "canceled"}, timeout_s=60)
        assert wait_for(lambda: _idle(w), 10)
        assert_workspace_empty(w)
    for job_id, (_, code) in plan.items():
        done = job(w, job_id)
        assert (done.get("error") or {}).get("code") == code, done
    return {k: str(v[1]) for k, v in plan.items()}


@pytest.mark.timeout(180)
def test_workspace_processes_and_fds_after_every_outcome(
    tmp_path: Path, git_server: GitHttpServer
) -> None:
    env = base_env(
        tmp_path, JOB_TIMEOUT_S=str(JOB_TIMEOUT_S), SHUTDOWN_GRACE_S="5", MAX_CONCURRENT_JOBS="2"
    )
    w = WorkerProcess(env, tmp_path / "w.log").start()
    work = env["WORK_DIR"]
    try:
        assert w.proc is not None
        proc = psutil.Process(w.proc.pid)
        # Warm-up: the first job opens what stays open (thread pool, SQLite, metrics).
        submit(w, "warm", git_server.url_for("happy"))
        w.wait_status("warm", {"completed"}, timeout_s=60)
        assert wait_for(lambda: _idle(w), 10)
        assert_workspace_empty(w)
        time.sleep(0.3)
        fds0, rss0 = _fds(proc), proc.memory_info().rss
        t0 = time.monotonic()
        rounds = 3
        for r in range(rounds):
            _run_round(w, git_server, f"r{r}")
            assert_no_orphans(work)
        # timeout
        submit(w, "res-timeout", git_server.url_for("hang"))
        done = w.wait_status("res-timeout", {"failed"}, timeout_s=40)
        assert done["error"]["code"] == "timeout"
        assert wait_for(lambda: _idle(w), 10)
        assert_workspace_empty(w)
        assert_no_orphans(work)
        batch_s = time.monotonic() - t0
        # Back to the starting descriptors once idle (bounded wait for in-flight closes).
        wait_for(lambda: _fds(proc) <= fds0, 5, 0.1)
        fds1, rss1 = _fds(proc), proc.memory_info().rss
        FIGURES.update(
            jobs=rounds * 5 + 1,
            batch_s=round(batch_s, 1),
            fds_before=fds0,
            fds_after=fds1,
            rss_before_mib=round(rss0 / 2**20, 1),
            rss_after_mib=round(rss1 / 2**20, 1),
        )
        assert fds1 <= fds0 + FD_TOLERANCE, (fds0, fds1, proc.open_files())
        assert rss1 - rss0 < 40 * 2**20, (rss0, rss1)
        # interrupted: SIGTERM with a job running
        submit(w, "res-int", git_server.url_for("hang"))
        w.wait_status("res-int", {"analyzing"}, timeout_s=30)
        assert workspace_entries(w)  # the running job's workspace exists...
        t1 = time.monotonic()
        w.signal(signal.SIGTERM)
        assert w.wait(timeout_s=15) == 0
        FIGURES["sigterm_to_exit_s"] = round(time.monotonic() - t1, 2)
    finally:
        w.stop()
    assert_workspace_empty(w)  # ...and is gone after the interrupted report
    assert_no_orphans(work)
    w2 = WorkerProcess(env, tmp_path / "w2.log").start()  # read the store back
    try:
        done = job(w2, "res-int")
        assert done["status"] == "failed" and done["error"]["code"] == "interrupted", done
    finally:
        w2.stop()
    print(f"\nFIGURES resources: {FIGURES}")
