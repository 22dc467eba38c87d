"""`fondation-worker run-one` as a real process: a real git repository over smart HTTP on
127.0.0.1, the simulator as the CLI, the embedded store (no Convex needed); the job's end is read
back from the run's local SQLite view."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.run_one import HEADERS_ENV, MESSAGE_ENV, ExitCode
from tests.support.gitserver import GitHttpServer, make_repo
from tests.support.jobs import SOURCE, sim, wait_for
from tests.support.signing import OTHER_SECRET, SECRET, headers_for, start_body
from tests.support.worker import REPO_ROOT, base_env

pytestmark = pytest.mark.e2e


def launch_env(body: bytes, headers: dict[str, str]) -> dict[str, str]:
    return {MESSAGE_ENV: body.decode(), HEADERS_ENV: json.dumps(headers)}


@pytest.fixture(scope="module")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitHttpServer]:
    root = tmp_path_factory.mktemp("repos")
    make_repo(root / "happy.git", SOURCE)
    make_repo(root / "fail.git", sim(fail_at_step=2))
    make_repo(root / "slow.git", sim(step_delay_s=1.0))
    with GitHttpServer(root) as server:
        yield server


_STARTED: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _no_run_outlives_its_test() -> Iterator[None]:
    """A test that fails half-way must not leave its `run-one` running into the next tests
    (seen: a leftover process failed two later tests that count processes)."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


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
    _STARTED.append(proc)
    return proc


def _status(tmp: Path, job_id: str) -> tuple[str, int]:
    """(status, docs); a failed job's status reads `failed:<code>`; ("", 0) before the job's
    row is written (the file exists a moment earlier: waiting on it raised TypeError)."""
    db = sqlite3.connect(tmp / "data" / "jobs.sqlite3", timeout=5)
    try:
        row = db.execute(
            "SELECT status, error_code FROM jobs WHERE job_id = ?", (job_id,)
        ).fetchone()
        if row is None:
            return "", 0
        status, code = row
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


ENV_DUMP = """
import json, os, sys
with open(sys.argv[1], "w") as f:
    json.dump(dict(os.environ), f)
sys.exit(3)
"""


def test_the_cli_in_a_run_never_sees_the_message_or_the_webhook_secret(
    tmp_path: Path, git_server: GitHttpServer
) -> None:
    script, dump = tmp_path / "envdump.py", tmp_path / "cli-env.json"
    script.write_text(ENV_DUMP)
    body = start_body("envcheck", git_server.url_for("happy"))
    env = {
        **launch_env(body, headers_for(body, "envcheck:1")),
        "FONDATION_COMMAND": f"{sys.executable} {script} {dump}",
    }
    assert _run(tmp_path, env).wait(timeout=90) == ExitCode.FAILED  # the wrapper exits 3
    seen = dump.read_text()
    token = json.loads(body)["data"]["callbackToken"]
    assert token not in seen and SECRET not in seen
    assert MESSAGE_ENV not in seen and HEADERS_ENV not in seen
