"""The whole system: the example host app with the Fondation component under convex-test behind
the local HTTP bridge, the component's dispatch reaching a real uvicorn worker, callbacks over
the Convex HTTP API to the host's re-exports (`fondation:claim` ...)."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.convex_bridge import ConvexBridge, node_ready, worker_bridge
from tests.support.gitserver import GitHttpServer, make_repo
from tests.support.signing import SECRET
from tests.support.worker import WorkerProcess, base_env, free_port

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not node_ready(), reason="run `cd deploy && npm ci` first (make test does)"),
]

SOURCE = {
    "README.md": "# Demo\n",
    "lib/util.py": "def util():\n    return 1\n",
    "src/main.py": "print('hi')\n",
}


@pytest.fixture(scope="module")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitHttpServer]:
    root = tmp_path_factory.mktemp("repos")
    make_repo(root / "happy.git", SOURCE)
    make_repo(
        root / "slow.git", {**SOURCE, ".fondation-sim.json": json.dumps({"step_delay_s": 1.0})}
    )
    with GitHttpServer(root) as server:
        yield server


def worker_env(tmp: Path, convex_url: str, **extra: Any) -> dict[str, str]:
    return base_env(tmp, CONVEX_URL=convex_url, HEARTBEAT_S="1", LEASE_S="4", **extra)


def create(bridge: ConvexBridge, url: str, **extra: Any) -> str:
    return bridge.create(url, **extra)


def test_created_job_completes_with_docs(tmp_path: Path, git_server: GitHttpServer) -> None:
    port = free_port()
    with ConvexBridge(
        tmp_path / "bridge.log",
        FONDATION_WORKER_URL=f"http://127.0.0.1:{port}",
        FONDATION_WEBHOOK_SECRET=SECRET,
    ) as bridge:
        worker = WorkerProcess(worker_env(tmp_path, bridge.url), tmp_path / "worker.log")
        worker.port, worker.url = port, f"http://127.0.0.1:{port}"
        worker.env["PORT"] = str(port)
        worker.start()
        try:
            job_id = create(bridge, git_server.url_for("happy"))
            job = bridge.wait_job(job_id, {"completed", "failed", "dead"}, timeout_s=60)
            assert job["status"] == "completed", job
            assert job["docsCount"] == 7 and job["attempt"] == 1
            docs = bridge.docs(job_id)
            assert [d["kind"] for d in docs] == ["yaml"] * 3 + ["chapter"] * 3 + ["tutorial"]
            chapters = [d["title"] for d in docs if d["kind"] == "chapter"]
            assert chapters == [
                "Chapter 1: src (reviewed)",
                "Chapter 2: lib",
                "Chapter 3: README.md (reviewed)",
            ]
            assert "callbackToken" not in job and "tokenHash" not in job
            # The host's own row, in the host's shape (issue 10, Must show 3).
            host = bridge.host_job(job_id)
            assert host["status"] == "completed", host
            assert isinstance(host["progress"], str) and host["progress"]
            assert isinstance(host["completedAt"], float | int)
            assert host["docsCount"] == 7
            host_docs = [d for d in bridge.table("docs") if d["jobId"] == host["_id"]]
            assert len(host_docs) == 7
            assert all(isinstance(d["chapterIndex"], float | int) for d in host_docs)
            paths = [c["path"] for c in bridge.calls()]
            for fn in (
                "fondation:claim",
                "fondation:progress",
                "fondation:putDocs",
                "fondation:complete",
            ):
                assert fn in paths
            assert (
                paths.index("fondation:claim")
                < paths.index("fondation:putDocs")
                < paths.index("fondation:complete")
            )
        finally:
            worker.stop()


def test_worker_killed_mid_job_is_completed_by_the_next_attempt(
    tmp_path: Path, git_server: GitHttpServer
) -> None:
    port = free_port()
    with worker_bridge(tmp_path / "bridge.log", port) as bridge:

        def start_worker(name: str) -> WorkerProcess:
            w = WorkerProcess(
                worker_env(tmp_path / name, bridge.url, WORKER_ID=name), tmp_path / f"{name}.log"
            )
            (tmp_path / name).mkdir(exist_ok=True)
            w.port, w.url = port, f"http://127.0.0.1:{port}"
            w.env["PORT"] = str(port)
            return w.start()

        first = start_worker("first")
        job_id = create(bridge, git_server.url_for("slow"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            job = bridge.job(job_id)
            if job["status"] == "analyzing" and job.get("currentStep", 0) >= 2:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"never reached step 2: {bridge.job(job_id)}")
        first.signal(signal.SIGKILL)
        first.wait(timeout_s=10)
        second = start_worker("second")
        try:
            job = bridge.wait_job(job_id, {"completed", "dead", "failed"}, timeout_s=90)
            assert job["status"] == "completed", job
            assert job["attempt"] == 2
            docs = bridge.docs(job_id)
            assert len(docs) == 7 and len({d["slug"] for d in docs}) == 7
            host = bridge.host_job(job_id)
            assert host["status"] == "completed" and isinstance(host["completedAt"], float | int)
            assert len([d for d in bridge.table("docs") if d["jobId"] == host["_id"]]) == 7
        finally:
            second.stop()
