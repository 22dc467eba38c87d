"""Slow consumer: a CLI that ignores SIGTERM (and whose grandchild does too, SIG_IGN is
inherited across exec). On cancel and on JOB_TIMEOUT_S the worker sends SIGTERM to the group,
waits the grace (0.4 x SHUTDOWN_GRACE_S, capped at 10 s), then SIGKILLs the whole group and
reports the job."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.gitserver import GitHttpServer, make_repo
from tests.support.jobs import (
    alive,
    assert_no_orphans,
    assert_workspace_empty,
    cancel,
    job,
    sim,
    spawned_child,
    submit,
    wait_for,
)
from tests.support.worker import WorkerProcess, base_env

pytestmark = pytest.mark.faults

SHUTDOWN_GRACE_S = 5.0
TERM_GRACE_S = SHUTDOWN_GRACE_S * 0.4  # RunnerDeps.term_grace_s
JOB_TIMEOUT_S = 4.0
# Measured figures, printed with -s and recorded in docs/RELIABILITY.md.
FIGURES: dict[str, float] = {}


@pytest.fixture(scope="module")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitHttpServer]:
    root = tmp_path_factory.mktemp("slow-repos")
    make_repo(root / "stubborn.git", sim(hang_at_step=2, spawn_child=True, ignore_sigterm=True))
    with GitHttpServer(root) as server:
        yield server


def _wait_child(w: WorkerProcess, job_id: str) -> int:
    assert wait_for(lambda: spawned_child(w, job_id) is not None, 30, 0.1), w.logs()[-3000:]
    child = spawned_child(w, job_id)
    assert child is not None and alive(child)
    return child


def test_cancel_of_a_sigterm_ignoring_cli_kills_the_group_after_the_grace(
    tmp_path: Path, git_server: GitHttpServer
) -> None:
    w = WorkerProcess(
        base_env(tmp_path, SHUTDOWN_GRACE_S=str(SHUTDOWN_GRACE_S)), tmp_path / "w.log"
    ).start()
    try:
        submit(w, "stub-cancel", git_server.url_for("stubborn"))
        child = _wait_child(w, "stub-cancel")
        t0 = time.monotonic()
        assert cancel(w, "stub-cancel").status_code == 202
        # SIGTERM is ignored: the CLI and its child must still be alive well inside the grace.
        time.sleep(TERM_GRACE_S / 2)
        assert alive(child), "the group was killed before the SIGTERM grace ran out"
        assert wait_for(lambda: job(w, "stub-cancel")["status"] == "canceled", 20, 0.05)
        elapsed = time.monotonic() - t0
        FIGURES["cancel_to_canceled_s"] = elapsed
        assert TERM_GRACE_S <= elapsed <= TERM_GRACE_S + 3.0, elapsed
        done = job(w, "stub-cancel")
        assert done["error"]["code"] == "canceled" and done["error"]["retryable"] is False
        assert not alive(child)
        assert_workspace_empty(w)
        assert_no_orphans(str(tmp_path))
        # The worker still takes and runs jobs afterwards.
        assert wait_for(lambda: w.proc is not None and w.proc.poll() is None, 1)
    finally:
        w.stop()
    print(f"\nFIGURES slow-consumer cancel: {FIGURES}")


def test_timeout_of_a_sigterm_ignoring_cli_kills_the_group_after_the_grace(
    tmp_path: Path, git_server: GitHttpServer
) -> None:
    w = WorkerProcess(
        base_env(
            tmp_path, SHUTDOWN_GRACE_S=str(SHUTDOWN_GRACE_S), JOB_TIMEOUT_S=str(JOB_TIMEOUT_S)
        ),
        tmp_path / "w.log",
    ).start()
    try:
        t0 = time.monotonic()
        submit(w, "stub-timeout", git_server.url_for("stubborn"))
        child = _wait_child(w, "stub-timeout")
        assert wait_for(lambda: job(w, "stub-timeout")["status"] == "failed", 40, 0.05)
        elapsed = time.monotonic() - t0
        FIGURES["submit_to_timeout_failed_s"] = elapsed
        done = job(w, "stub-timeout")
        assert done["error"]["code"] == "timeout", done
        assert "JOB_TIMEOUT_S" in done["error"]["message"]
        # The clone takes a moment; the run itself is JOB_TIMEOUT_S + the SIGTERM grace.
        assert JOB_TIMEOUT_S + TERM_GRACE_S <= elapsed <= JOB_TIMEOUT_S + TERM_GRACE_S + 6, elapsed
        assert not alive(child)
        assert_workspace_empty(w)
        assert_no_orphans(str(tmp_path))
    finally:
        w.stop()
    print(f"\nFIGURES slow-consumer timeout: {FIGURES}")
