"""`fondation-worker run-one`: the message checks (the webhook route's own) and the exit codes.

The subprocess tests run the real command against a real git repository over smart HTTP on
127.0.0.1 and the simulator as the CLI, with the embedded store (no Convex needed): the job's
end is then read back from the run's local SQLite view."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.config import load_settings
from app.domain import CallbackAck, ClaimResult, Failure, FailureCode
from app.errors import LaunchError
from app.run_one import (
    HEADERS_ENV,
    MESSAGE_ENV,
    ExitCode,
    JobMessage,
    WatchedReporter,
    message_from_env,
    open_job_start,
)
from tests.support.gitserver import GitHttpServer, make_repo
from tests.support.jobs import SOURCE, sim, wait_for
from tests.support.signing import OTHER_SECRET, SECRET, cancel_body, headers_for, start_body
from tests.support.worker import REPO_ROOT, base_env


def launch_env(body: bytes, headers: dict[str, str]) -> dict[str, str]:
    return {MESSAGE_ENV: body.decode(), HEADERS_ENV: json.dumps(headers)}


# -- pure parts -------------------------------------------------------------------------------


def test_message_from_env_lowercases_headers_and_refuses_junk() -> None:
    body = start_body("j1", "https://github.com/a/b")
    msg = message_from_env(launch_env(body, {"Webhook-Id": "j1:1", "Content-Type": "x"}))
    assert msg.body == body and msg.headers == {"webhook-id": "j1:1", "content-type": "x"}
    assert "tok_" not in repr(msg)  # the callback token stays out of logs and tracebacks
    for env in (
        {},
        {MESSAGE_ENV: body.decode()},
        {MESSAGE_ENV: body.decode(), HEADERS_ENV: "not json"},
        {MESSAGE_ENV: body.decode(), HEADERS_ENV: '["a"]'},
        {MESSAGE_ENV: body.decode(), HEADERS_ENV: '{"webhook-id": 1}'},
        {MESSAGE_ENV: body.decode(), HEADERS_ENV: json.dumps({"x": "y" * 9000})},
    ):
        with pytest.raises(LaunchError):
            message_from_env(env)


def _settings(**env: str) -> Any:
    return load_settings({"WEBHOOK_SECRETS": SECRET, **env})


def test_open_job_start_applies_the_webhook_checks() -> None:
    now = time.time()
    body = start_body("j2", "https://github.com/a/b")
    good = JobMessage(body, headers_for(body, "j2:1"))
    webhook_id, fingerprint, spec = open_job_start(_settings(), good, now)
    assert (webhook_id, spec.job_id, spec.attempt) == ("j2:1", "j2", 1)
    assert len(fingerprint) == 64
    refused = {
        "other secret": JobMessage(body, headers_for(body, "j2:1", secret=OTHER_SECRET)),
        "stale": JobMessage(body, headers_for(body, "j2:1", ts=int(now) - 3600)),
        "tampered": JobMessage(body.replace(b"a/b", b"a/c"), headers_for(body, "j2:1")),
        "id of another job": JobMessage(body, headers_for(body, "j3:1")),
        "not JSON media": JobMessage(
            body, {**headers_for(body, "j2:1"), "content-type": "text/plain"}
        ),
        "a cancel": JobMessage(cancel_body("j2"), headers_for(cancel_body("j2"), "j2:1:cancel")),
    }
    for name, msg in refused.items():
        with pytest.raises(Exception) as info:
            open_job_start(_settings(), msg, now)
        assert info.type.__module__ == "app.errors", name
    # A longer tolerance (set on the job definition for queued runs) accepts an older message.
    old = JobMessage(body, headers_for(body, "j2:1", ts=int(now) - 600))
    assert open_job_start(_settings(WEBHOOK_TOLERANCE_S="900"), old, now)[0] == "j2:1"


class _Inner:
    def __init__(self, claim: ClaimResult, ack: CallbackAck | None = None) -> None:
        self.claim_result, self.ack = claim, ack or CallbackAck()

    async def claim(self, spec: Any) -> ClaimResult:
        return self.claim_result

    async def progress(self, spec: Any, update: Any) -> CallbackAck:
        return self.ack

    async def put_docs(self, spec: Any, docs: Any) -> CallbackAck:
        return self.ack

    async def complete(self, spec: Any, docs_count: int, duration_ms: int) -> None:
        pass

    async def fail(self, spec: Any, failure: Failure) -> None:
        pass


async def test_exit_code_follows_what_was_reported() -> None:
    spec: Any = object()
    w = WatchedReporter(_Inner(ClaimResult(ok=True)))
    assert w.exit_code() is ExitCode.UNREPORTED  # nothing reported: the lease decides
    await w.claim(spec)
    await w.complete(spec, 3, 10)
    assert w.exit_code() is ExitCode.COMPLETED
    for code, expected in (
        (FailureCode.CLI_FAILED, ExitCode.FAILED),
        (FailureCode.CANCELED, ExitCode.CANCELED),
        (FailureCode.INTERRUPTED, ExitCode.INTERRUPTED),
    ):
        w = WatchedReporter(_Inner(ClaimResult(ok=True)))
        await w.fail(spec, Failure(code, "x"))
        assert w.exit_code() is expected
    w = WatchedReporter(_Inner(ClaimResult(ok=False, reason="stale_attempt")))
    await w.claim(spec)
    assert w.exit_code() is ExitCode.DROPPED
    w = WatchedReporter(_Inner(ClaimResult(ok=True), CallbackAck(stop=True, reason="superseded")))
    await w.progress(spec, None)
    assert w.exit_code() is ExitCode.DROPPED


# -- the real command -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitHttpServer]:
    root = tmp_path_factory.mktemp("repos")
    make_repo(root / "happy.git", SOURCE)
    make_repo(root / "fail.git", sim(fail_at_step=2))
    make_repo(root / "slow.git", sim(step_delay_s=1.0))
    with GitHttpServer(root) as server:
        yield server


def _run(tmp: Path, extra: dict[str, str]) -> subprocess.Popen[bytes]:
    env = {**base_env(tmp), **extra}
    log = (tmp / "run.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "run-one"],
        env=env,
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    return proc


def _status(tmp: Path, job_id: str) -> tuple[str, int]:
    """(status, docs); a failed job's status reads `failed:<code>`."""
    db = sqlite3.connect(tmp / "data" / "jobs.sqlite3", timeout=5)
    try:
        status, code = db.execute(
            "SELECT status, error_code FROM jobs WHERE job_id = ?", (job_id,)
        ).fetchone()
        (docs,) = db.execute("SELECT count(*) FROM docs WHERE job_id = ?", (job_id,)).fetchone()
    finally:
        db.close()
    return (f"{status}:{code}" if code else str(status)), int(docs)


def _launch(tmp: Path, job_id: str, url: str, **env: str) -> subprocess.Popen[bytes]:
    body = start_body(job_id, url)
    return _run(tmp, {**launch_env(body, headers_for(body, f"{job_id}:1")), **env})


def test_run_one_completes_a_job_and_exits_0(tmp_path: Path, git_server: GitHttpServer) -> None:
    proc = _launch(tmp_path, "happy", git_server.url_for("happy"))
    assert proc.wait(timeout=90) == ExitCode.COMPLETED, (tmp_path / "run.log").read_text()
    status, docs = _status(tmp_path, "happy")
    assert status == "completed" and docs > 0
    assert not any((tmp_path / "work").iterdir())  # the workspace is gone


def test_run_one_reports_a_cli_failure_and_exits_1(
    tmp_path: Path, git_server: GitHttpServer
) -> None:
    proc = _launch(tmp_path, "fail", git_server.url_for("fail"))
    assert proc.wait(timeout=90) == ExitCode.FAILED
    assert _status(tmp_path, "fail")[0] == "failed:cli_failed"


def test_run_one_refuses_a_badly_signed_message_and_touches_nothing(
    tmp_path: Path, git_server: GitHttpServer
) -> None:
    body = start_body("forged", git_server.url_for("happy"))
    forged = launch_env(body, headers_for(body, "forged:1", secret=OTHER_SECRET))
    assert _run(tmp_path, forged).wait(timeout=60) == ExitCode.REFUSED
    assert _run(tmp_path, {}).wait(timeout=60) == ExitCode.REFUSED  # no message at all
    no_secret = {**launch_env(body, headers_for(body, "forged:1")), "WEBHOOK_SECRETS": ""}
    assert _run(tmp_path, no_secret).wait(timeout=60) == ExitCode.CONFIG
    assert not (tmp_path / "data" / "jobs.sqlite3").exists() or not _jobs(tmp_path)
    assert "tok_" not in (tmp_path / "run.log").read_text()


def _jobs(tmp: Path) -> list[Any]:
    db = sqlite3.connect(tmp / "data" / "jobs.sqlite3", timeout=5)
    try:
        return db.execute("SELECT job_id FROM jobs").fetchall()
    finally:
        db.close()


def test_sigterm_reports_interrupted_and_exits_6(tmp_path: Path, git_server: GitHttpServer) -> None:
    proc = _launch(tmp_path, "slow", git_server.url_for("slow"))
    db = tmp_path / "data" / "jobs.sqlite3"
    assert wait_for(lambda: db.exists() and _status(tmp_path, "slow")[0] == "analyzing", 60, 0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == ExitCode.INTERRUPTED
    assert _status(tmp_path, "slow")[0] == "failed:interrupted"
