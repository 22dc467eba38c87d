"""The webhook receiver through the ASGI transport, with the app's lifespan running."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.support.asgi import held_app
from tests.support.fakes import HeldReporter
from tests.support.signing import OTHER_SECRET, SECRET, cancel_body, headers_for, start_body

URL = "https://github.com/owner/repo.git"


@contextlib.asynccontextmanager
async def running_app(
    tmp_path: Path, **env: str
) -> AsyncIterator[tuple[httpx.AsyncClient, HeldReporter]]:
    # The job API is open on loopback only.
    settings = {"WORKER_ID": "asgi-test", "HOST": "127.0.0.1", **env}
    async with held_app(tmp_path, **settings) as (_, client, reporter):
        yield client, reporter


async def post(client: httpx.AsyncClient, body: bytes, msg_id: str, **kw: object) -> httpx.Response:
    return await client.post("/v1/webhooks", content=body, headers=headers_for(body, msg_id, **kw))  # type: ignore[arg-type]


async def test_accept_then_duplicate_then_conflict(tmp_path: Path) -> None:
    async with running_app(tmp_path) as (client, _):
        body = start_body("job1", URL)
        r = await post(client, body, "job1:1")
        assert r.status_code == 202
        assert r.json() == {"jobId": "job1", "attempt": 1, "status": "accepted"}
        r = await post(client, body, "job1:1")
        assert r.status_code == 200
        assert r.json()["duplicate"] is True and r.json()["status"] == "accepted"
        other = start_body("job1", URL, ref="dev")
        r = await post(client, other, "job1:1")
        assert r.status_code == 422
        assert r.headers["content-type"] == "application/problem+json"
        assert set(r.json()) == {"type", "title", "status", "detail"}
        jobs = (await client.get("/v1/jobs")).json()["jobs"]
        assert [j["jobId"] for j in jobs] == ["job1"]


async def test_duplicate_answered_before_parsing_and_logged_at_debug(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_app(tmp_path) as (client, _):
        body = start_body("job1", URL)
        assert (await post(client, body, "job1:1")).status_code == 202
        with caplog.at_level(logging.INFO, logger="fondation.webhooks"):
            r = await post(client, body, "job1:1")
        assert r.status_code == 200 and r.json()["duplicate"] is True
        assert not [rec for rec in caplog.records if rec.name == "fondation.webhooks"]
        # Another body under a recorded id is a conflict, even one that is not JSON.
        r = await post(client, b"not json", "job1:1")
        assert r.status_code == 422 and r.json()["type"].endswith("idempotency-conflict")


async def test_fifty_concurrent_deliveries_make_one_job(tmp_path: Path) -> None:
    async with running_app(tmp_path) as (client, reporter):
        body = start_body("storm", URL)
        results = await asyncio.gather(*(post(client, body, "storm:1") for _ in range(50)))
        codes = sorted(r.status_code for r in results)
        assert codes.count(202) == 1
        assert codes.count(200) == 49
        await asyncio.sleep(0.05)
        assert [c for c in reporter.calls if c[0] == "claim"] == [("claim", "storm:1")]


async def test_slots_full_gives_503_with_retry_after_and_records_nothing(tmp_path: Path) -> None:
    async with running_app(tmp_path, MAX_CONCURRENT_JOBS="2", RETRY_AFTER_S="7") as (client, _):
        for i in range(2):
            assert (await post(client, start_body(f"s{i}", URL), f"s{i}:1")).status_code == 202
        r = await post(client, start_body("s2", URL), "s2:1")
        assert r.status_code == 503
        assert r.headers["retry-after"] == "7"
        # Nothing was recorded: once a slot frees, the same delivery is accepted, not a duplicate.
        assert (await client.get("/v1/jobs/s2")).status_code == 404
        # A duplicate of a running job still gets its 200 even while full.
        assert (await post(client, start_body("s0", URL), "s0:1")).status_code in (200, 422)


@pytest.mark.parametrize(
    ("mutate", "status"),
    [
        (lambda h, b: ({**h, "webhook-signature": "v1,AAAA"}, b), 401),
        (lambda h, b: ({k: v for k, v in h.items() if k != "webhook-id"}, b), 401),
        (lambda h, b: ({**h, "webhook-timestamp": str(int(h["webhook-timestamp"]) - 301)}, b), 401),
        (lambda h, b: (h, b + b" "), 401),
        (lambda h, b: ({**h, "content-type": "text/plain"}, b), 415),
    ],
)
async def test_signature_and_media_type_rows(tmp_path: Path, mutate, status: int) -> None:  # type: ignore[no-untyped-def]
    async with running_app(tmp_path) as (client, _):
        body = start_body("x", URL)
        h, b = mutate(headers_for(body, "x:1"), body)
        r = await client.post("/v1/webhooks", content=b, headers=h)
        assert r.status_code == status
        assert r.headers["content-type"] == "application/problem+json"
        assert (await client.get("/v1/jobs")).json()["jobs"] == []


async def test_wrong_secret_is_401(tmp_path: Path) -> None:
    async with running_app(tmp_path) as (client, _):
        body = start_body("x", URL)
        assert (await post(client, body, "x:1", secret=OTHER_SECRET)).status_code == 401


async def test_rotation_accepts_both_secrets(tmp_path: Path) -> None:
    async with running_app(tmp_path, WEBHOOK_SECRETS=f"{OTHER_SECRET},{SECRET}") as (client, _):
        assert (await post(client, start_body("a", URL), "a:1", secret=SECRET)).status_code == 202
        assert (
            await post(client, start_body("b", URL), "b:1", secret=OTHER_SECRET)
        ).status_code == 202


async def test_not_json_is_400_and_schema_is_422(tmp_path: Path) -> None:
    async with running_app(tmp_path) as (client, _):
        assert (await post(client, b"{nope", "x:1")).status_code == 400
        r = await post(client, b'{"type": "job.party", "data": {}}', "x:1")
        assert r.status_code == 422 and "type" in r.json()["detail"]


async def test_disallowed_repository_is_422(tmp_path: Path) -> None:
    async with running_app(tmp_path) as (client, _):
        r = await post(client, start_body("x", "https://evil.example/a.git"), "x:1")
        assert r.status_code == 422
        assert "ALLOWED_GIT_HOSTS" in r.json()["detail"]


async def test_body_over_limit_is_413(tmp_path: Path) -> None:
    async with running_app(tmp_path, MAX_BODY_BYTES="1024") as (client, _):
        body = start_body("x", URL, options={"model": "m" * 100}) + b" " * 2000
        assert (await post(client, body, "x:1")).status_code == 413


async def test_cancel_known_and_unknown(tmp_path: Path) -> None:
    async with running_app(tmp_path) as (client, _):
        assert (await post(client, start_body("c", URL), "c:1")).status_code == 202
        r = await post(client, cancel_body("c"), "c:1:cancel")
        assert r.status_code == 202 and r.json()["status"] == "canceling"
        r = await post(client, cancel_body("c"), "c:1:cancel")
        assert r.status_code == 200 and r.json()["duplicate"] is True
        assert (await post(client, cancel_body("zz"), "zz:1:cancel")).status_code == 404


async def test_draining_answers_503(tmp_path: Path) -> None:
    async with running_app(tmp_path) as (client, _):
        app_manager = client._transport.app.state.services.manager  # type: ignore[attr-defined]
        drain = asyncio.create_task(app_manager.drain(1.0))
        await asyncio.sleep(0)
        r = await post(client, start_body("late", URL), "late:1")
        assert r.status_code == 503 and "retry-after" in r.headers
        assert (await client.get("/readyz")).status_code == 503
        await drain


async def test_health_and_metrics(tmp_path: Path) -> None:
    async with running_app(tmp_path) as (client, _):
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        await post(client, start_body("m", URL), "m:1")
        text = (await client.get("/metrics")).text
        assert 'fondation_webhooks_total{outcome="accepted",type="job.start"} 1.0' in text
        assert "fondation_webhook_ack_seconds_bucket" in text


async def test_unknown_route_is_problem_json(tmp_path: Path) -> None:
    async with running_app(tmp_path) as (client, _):
        r = await client.get("/nope")
        assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
        r = await client.get("/v1/webhooks")
        assert r.status_code == 405


async def test_replay_after_restart_is_duplicate(tmp_path: Path) -> None:
    body = start_body("persist", URL)
    async with running_app(tmp_path) as (client, _):
        assert (await post(client, body, "persist:1")).status_code == 202
    async with running_app(tmp_path) as (client, _):
        r = await post(client, body, "persist:1")
        assert r.status_code == 200 and r.json()["duplicate"] is True
        # The earlier process never finished it: it is visibly interrupted, not silently lost.
        assert r.json()["status"] == "failed"
        job = (await client.get("/v1/jobs/persist")).json()
        assert job["error"]["code"] == "interrupted"
