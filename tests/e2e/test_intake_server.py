"""Every row of the contract's response table, against a real uvicorn worker process."""

from __future__ import annotations

import concurrent.futures
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.gitserver import StallingServer
from tests.support.signing import SECRET, cancel_body, headers_for, start_body
from tests.support.worker import WorkerProcess, base_env

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stall() -> Iterator[StallingServer]:
    with StallingServer() as s:
        yield s


@pytest.fixture(scope="module")
def worker(
    tmp_path_factory: pytest.TempPathFactory, stall: StallingServer
) -> Iterator[WorkerProcess]:
    tmp = tmp_path_factory.mktemp("intake")
    w = WorkerProcess(
        base_env(tmp, MAX_CONCURRENT_JOBS="2", MAX_BODY_BYTES="4096", RETRY_AFTER_S="9"),
        tmp / "worker.log",
    ).start()
    yield w
    w.stop(timeout_s=30)


def post(w: WorkerProcess, body: bytes, msg_id: str, **kw: object) -> httpx.Response:
    return httpx.post(
        f"{w.url}/v1/webhooks", content=body, headers=headers_for(body, msg_id, **kw), timeout=10
    )  # type: ignore[arg-type]


def assert_problem(r: httpx.Response, status: int) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    doc = r.json()
    assert doc["status"] == status and doc["title"] and doc["detail"] and doc["type"]
    assert "Traceback" not in r.text


def test_rows_start_duplicate_conflict_cancel(worker: WorkerProcess, stall: StallingServer) -> None:
    body = start_body("row1", stall.url_for("repo"))
    r = post(worker, body, "row1:1")
    assert r.status_code == 202 and r.json() == {
        "jobId": "row1",
        "attempt": 1,
        "status": "accepted",
    }
    r = post(worker, body, "row1:1")
    assert r.status_code == 200 and r.json()["duplicate"] is True
    assert_problem(
        post(worker, start_body("row1", stall.url_for("repo"), ref="other"), "row1:1"), 422
    )
    r = post(worker, cancel_body("row1"), "row1:1:cancel")
    assert r.status_code == 202
    done = worker.wait_status("row1", {"canceled"}, timeout_s=20)
    assert done["error"]["code"] == "canceled"


def test_rows_401(worker: WorkerProcess, stall: StallingServer) -> None:
    body = start_body("r401", stall.url_for("repo"))
    h = headers_for(body, "r401:1")
    for bad in (
        {k: v for k, v in h.items() if k != "webhook-signature"},
        {**h, "webhook-signature": "v1,Zm9v"},
        {**h, "webhook-signature": "garbage"},
        {**h, "webhook-timestamp": "yesterday"},
        headers_for(body, "r401:1", ts=int(time.time()) - 400),
        headers_for(body, "r401:1", ts=int(time.time()) + 400),
    ):
        assert_problem(httpx.post(f"{worker.url}/v1/webhooks", content=body, headers=bad), 401)
    assert httpx.get(f"{worker.url}/v1/jobs/r401").status_code == 404


def test_rows_400_415_422(worker: WorkerProcess, stall: StallingServer) -> None:
    assert_problem(post(worker, b"this is not json", "x:1"), 400)
    body = start_body("r415", stall.url_for("repo"))
    h = {**headers_for(body, "r415:1"), "content-type": "application/x-www-form-urlencoded"}
    assert_problem(httpx.post(f"{worker.url}/v1/webhooks", content=body, headers=h), 415)
    assert_problem(post(worker, b'{"type":"job.nope","data":{}}', "x:1"), 422)
    assert_problem(post(worker, b'{"type":"job.start","data":{"jobId":"a"}}', "a:1"), 422)
    for url in (
        "file:///etc/passwd",
        "https://github.com/o/r.git",
        "http://169.254.169.254/x.git",
        "http://user:pw@127.0.0.1/x.git",
    ):
        assert_problem(post(worker, start_body("r422", url), "r422:1"), 422)


def test_row_413_without_reading_past_the_limit(worker: WorkerProcess) -> None:
    body = b'{"pad":"' + b"x" * 5000 + b'"}'
    assert_problem(post(worker, body, "big:1"), 413)
    # Declared huge, barely sent: the answer comes before the body does.
    with socket.create_connection(("127.0.0.1", worker.port), timeout=10) as s:
        s.sendall(
            b"POST /v1/webhooks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 104857600\r\n\r\n{"
        )
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413")

    # Chunked, no length: cut off once past the limit.
    def gen() -> Iterator[bytes]:
        for _ in range(100):
            yield b"y" * 1024

    h = headers_for(b"", "chunk:1")
    r = httpx.post(f"{worker.url}/v1/webhooks", content=gen(), headers=h, timeout=10)
    assert r.status_code == 413


def test_row_503_when_slots_full(worker: WorkerProcess, stall: StallingServer) -> None:
    # Two stalled clones hold both slots.
    for i in range(2):
        assert (
            post(worker, start_body(f"full{i}", stall.url_for("repo")), f"full{i}:1").status_code
            == 202
        )
    r = post(worker, start_body("full2", stall.url_for("repo")), "full2:1")
    assert_problem(r, 503)
    assert r.headers["retry-after"] == "9"
    for i in range(2):
        assert post(worker, cancel_body(f"full{i}"), f"full{i}:1:cancel").status_code == 202
    for i in range(2):
        worker.wait_status(f"full{i}", {"canceled"}, timeout_s=20)
    # Nothing was kept of the refused delivery: its redelivery is a new job now.
    assert post(worker, start_body("full2", stall.url_for("repo")), "full2:1").status_code == 202
    post(worker, cancel_body("full2"), "full2:1:cancel")
    worker.wait_status("full2", {"canceled"}, timeout_s=20)


def test_fifty_concurrent_duplicates_one_job(worker: WorkerProcess, stall: StallingServer) -> None:
    body = start_body("conc", stall.url_for("repo"))
    h = headers_for(body, "conc:1")
    with httpx.Client(timeout=20) as client, concurrent.futures.ThreadPoolExecutor(50) as pool:
        codes = list(
            pool.map(
                lambda _: (
                    client.post(f"{worker.url}/v1/webhooks", content=body, headers=h).status_code
                ),
                range(50),
            )
        )
    assert codes.count(202) == 1, codes
    assert codes.count(200) == 49, codes
    jobs = httpx.get(f"{worker.url}/v1/jobs").json()["jobs"]
    assert [j["jobId"] for j in jobs].count("conc") == 1
    post(worker, cancel_body("conc"), "conc:1:cancel")
    worker.wait_status("conc", {"canceled"}, timeout_s=20)


def test_replay_after_restart(tmp_path: Path, stall: StallingServer) -> None:
    env = base_env(tmp_path)
    body = start_body("again", stall.url_for("repo"))
    w = WorkerProcess(env, tmp_path / "w1.log").start()
    try:
        assert post(w, body, "again:1").status_code == 202
        post(w, cancel_body("again"), "again:1:cancel")
        w.wait_status("again", {"canceled"}, timeout_s=20)
    finally:
        w.stop()
    w2 = WorkerProcess(env, tmp_path / "w2.log").start()
    try:
        r = post(w2, body, "again:1")
        assert r.status_code == 200 and r.json() == {
            "jobId": "again",
            "attempt": 1,
            "status": "canceled",
            "duplicate": True,
        }
        assert_problem(
            post(w2, start_body("again", stall.url_for("repo"), ref="x"), "again:1"), 422
        )
    finally:
        w2.stop()


def test_health_ready_metrics(worker: WorkerProcess) -> None:
    assert httpx.get(f"{worker.url}/healthz").status_code == 200
    assert httpx.get(f"{worker.url}/readyz").json()["status"] == "ready"
    text = httpx.get(f"{worker.url}/metrics").text
    assert "fondation_webhooks_total" in text and "fondation_job_slots 2.0" in text
    assert SECRET not in text
