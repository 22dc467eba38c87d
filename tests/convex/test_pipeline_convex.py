"""The pipeline's outcomes as Convex sees them (issue 17): a transient clone failure is retried
by Convex and a missing ref is not; on shutdown the final report reaches Convex before the
process exits, even when the attempt was stuck in a step and the report itself is slow.

The Convex functions run under convex-test behind the bridge; the worker is a real process."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.support.convex_bridge import ConvexBridge, FlakyProxy, node_ready
from tests.support.gitserver import GitHttpServer, _Handler, make_repo
from tests.support.jobs import SOURCE
from tests.support.signing import SECRET
from tests.support.worker import WorkerProcess, base_env, free_port

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not node_ready(), reason="run `cd deploy && npm ci` first (make test does)"),
]

FINAL = {"completed", "failed", "dead", "canceled"}


class _FlakyHandler(_Handler):
    """git smart HTTP; the first request for a repo named `flaky*` gets a 503."""

    def _serve(self) -> None:
        owner: FlakyGitServer = self.server.owner  # type: ignore[assignment]
        if "/flaky" in self.path and owner.take_failure():
            self._read_body()
            self._send(503, [("Retry-After", "1")], b"try again later\n")
            return
        super()._serve()


class FlakyGitServer(GitHttpServer):
    handler_class = _FlakyHandler

    def __init__(self, root: Path, failures: int) -> None:
        super().__init__(root)
        self._failures = failures
        self._failures_lock = threading.Lock()
        self.failed = 0

    def take_failure(self) -> bool:
        with self._failures_lock:
            if self.failed >= self._failures:
                return False
            self.failed += 1
            return True


@pytest.fixture(scope="module")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlakyGitServer]:
    root = tmp_path_factory.mktemp("repos")
    make_repo(root / "flaky.git", SOURCE)
    make_repo(root / "happy.git", SOURCE)
    server = FlakyGitServer(root, failures=1).start()
    try:
        yield server
    finally:
        server.stop()


def start_worker(tmp: Path, port: int, convex_url: str, **extra: Any) -> WorkerProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    env = base_env(tmp, **{"HEARTBEAT_S": "1", "LEASE_S": "4", **extra})
    env["CONVEX_URL"] = convex_url
    w = WorkerProcess(env, tmp / "worker.log")
    w.port, w.url = port, f"http://127.0.0.1:{port}"
    w.env["PORT"] = str(port)
    return w.start()


def bridge_for(tmp: Path, worker_url: str) -> ConvexBridge:
    return ConvexBridge(
        tmp / "bridge.log",
        FONDATION_WORKER_URL=worker_url,
        FONDATION_WEBHOOK_SECRET=SECRET,
        FONDATION_LEASE_MS=4000,
        FONDATION_CLAIM_TIMEOUT_MS=8000,
        FONDATION_SWEEP_INTERVAL_MS=500,
        FONDATION_RETRY_BASE_MS=200,
    )


def create(bridge: ConvexBridge, url: str, ref: str = "main") -> str:
    return bridge.create(url, ref=ref)


def _epoch_s(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


@pytest.mark.timeout(120)
def test_clone_503_once_is_retried_by_convex_and_a_missing_ref_is_not(
    tmp_path: Path, git_server: FlakyGitServer
) -> None:
    port = free_port()
    with bridge_for(tmp_path, f"http://127.0.0.1:{port}") as bridge:
        worker = start_worker(tmp_path / "w", port, bridge.url)
        try:
            t0 = time.monotonic()
            job_id = create(bridge, git_server.url_for("flaky"))
            job = bridge.wait_job(job_id, FINAL, timeout_s=60)
            print(
                f"[pipeline-convex] 503 once -> {job['status']} on attempt {job['attempt']} "
                f"in {time.monotonic() - t0:.2f} s"
            )
            assert git_server.failed == 1
            fails = [
                c["args"]
                for c in bridge.calls()
                if c["path"] == "fondation:fail" and c["args"]["jobId"] == job_id
            ]
            assert [(f["attempt"], f["code"], f["retryable"]) for f in fails] == [
                (1, "clone_failed", True)
            ], fails
            assert job["status"] == "completed" and job["attempt"] == 2, job

            missing = create(bridge, git_server.url_for("happy"), ref="no-such-branch")
            job = bridge.wait_job(missing, FINAL, timeout_s=60)
            assert job["status"] == "failed" and job["attempt"] == 1, job
            assert job["lastError"]["code"] == "clone_failed"
            assert "no-such-branch" in job["lastError"]["message"]
        finally:
            worker.stop()


@pytest.mark.timeout(120)
def test_sigterm_during_a_stuck_upload_still_reports_interrupted_before_exit(
    tmp_path: Path, git_server: FlakyGitServer
) -> None:
    """The upload never finishes (Convex holds putDocs) and the `fail` call is slow: the
    shutdown stops the upload in time for the final report, which arrives before the process
    exits, within SHUTDOWN_GRACE_S."""
    grace_s = 6.0
    worker_port = free_port()
    with bridge_for(tmp_path, f"http://127.0.0.1:{worker_port}") as bridge:
        port = int(bridge.url.rsplit(":", 1)[1])
        proxy = FlakyProxy(port, slow={b"fondation:putDocs": 30.0, b"fondation:fail": 0.5})
        proxy.start()
        worker = start_worker(tmp_path / "w", worker_port, proxy.url, SHUTDOWN_GRACE_S=str(grace_s))
        try:
            job_id = create(bridge, git_server.url_for("happy"))
            deadline = time.monotonic() + 60
            while bridge.job(job_id).get("status") != "gathering":
                assert time.monotonic() < deadline, bridge.job(job_id)
                time.sleep(0.05)
            time.sleep(0.5)  # collection takes milliseconds: the upload is now held
            sent = time.time()
            worker.signal(signal.SIGTERM)
            code = worker.wait(timeout_s=grace_s + 10)
            exited = time.time()
            assert code == 0 and exited - sent < grace_s, (code, exited - sent)
            fails = [
                c
                for c in bridge.calls()
                if c["path"] == "fondation:fail" and c["args"]["jobId"] == job_id
            ]
            assert len(fails) == 1, (bridge.calls()[-5:], worker.logs()[-3000:])
            args = fails[0]["args"]
            assert (args["code"], args["retryable"], args["attempt"]) == ("interrupted", True, 1)
            arrived = _epoch_s(fails[0]["at"])
            assert arrived <= exited, (fails[0]["at"], exited)
            print(
                f"[pipeline-convex] SIGTERM in a stuck upload: fail(interrupted) arrived after "
                f"{arrived - sent:.2f} s, exit after {exited - sent:.2f} s (grace {grace_s:g} s)"
            )
            job = bridge.job(job_id)
            assert job["lastError"]["code"] == "interrupted", job
        finally:
            worker.stop()
            proxy.down()
