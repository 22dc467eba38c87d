"""The Convex reporter against a mock of the Convex HTTP API (httpx.MockTransport)."""

from __future__ import annotations

import json
import random
from typing import Any

import httpx
import pytest

from app.adapters.convex_store import MAX_BATCH_BYTES, ConvexJobStore, batch_docs
from app.clock import FakeClock
from app.config import Settings
from app.domain import Doc, DocKind, Failure, FailureCode, JobSpec, JobStatus, Progress, Repository
from app.errors import CallbackError
from app.metrics import create_metrics

SPEC = JobSpec("j1", 2, "tok_" + "x" * 40, Repository("https://github.com/o/r.git", "main"))


class FakeConvex:
    """Answers from a script of (status, body) per call; records every request."""

    def __init__(self, script: list[tuple[int, Any]] | None = None, default: Any = None) -> None:
        self.script = list(script or [])
        self.default = default if default is not None else {"ok": True}
        self.calls: list[dict[str, Any]] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.calls.append(body)
        if self.script:
            status, payload = self.script.pop(0)
            if isinstance(payload, Exception):
                raise payload
            return httpx.Response(status, json=payload)
        return httpx.Response(
            200, json={"status": "success", "value": self.default, "logLines": []}
        )


def make_store(fake: FakeConvex, clock: FakeClock | None = None) -> tuple[ConvexJobStore, Any]:
    metrics = create_metrics()
    settings = Settings(convex_url="https://happy-otter-123.convex.cloud", worker_id="w-1")
    store = ConvexJobStore(
        settings,
        clock=clock or FakeClock(),
        metrics=metrics,
        transport=httpx.MockTransport(fake.handler),
        rng=random.Random(1),
    )
    return store, metrics


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []

    async def fake_sleep(delay: float) -> None:
        slept.append(delay)

    monkeypatch.setattr("app.adapters.convex_store.asyncio.sleep", fake_sleep)
    return slept


async def test_claim_sends_contract_args_and_reads_clone_token() -> None:
    fake = FakeConvex(default={"ok": True, "cloneToken": "ghs_clone"})
    store, _ = make_store(fake)
    result = await store.claim(SPEC)
    assert result.ok and result.clone_token == "ghs_clone"
    call = fake.calls[0]
    assert call["path"] == "fondation:claim" and call["format"] == "json"
    assert call["args"] == {
        "jobId": "j1",
        "attempt": 2.0,
        "workerId": "w-1",
        "callbackToken": SPEC.callback_token,
    }
    assert "ghs_clone" not in repr(result)


async def test_claim_refused_is_not_an_error() -> None:
    store, _ = make_store(FakeConvex(default={"ok": False, "reason": "already_claimed"}))
    result = await store.claim(SPEC)
    assert not result.ok and result.reason == "already_claimed"


async def test_retries_network_errors_and_5xx_with_backoff(no_sleep: list[float]) -> None:
    fake = FakeConvex([(0, httpx.ConnectError("refused")), (502, {}), (503, {}), (429, {})])
    store, metrics = make_store(fake)
    ack = await store.progress(SPEC, Progress(3, JobStatus.ANALYZING, 2, 6, "step 2", ("log",)))
    assert not ack.stop
    assert len(fake.calls) == 5
    assert fake.calls[-1]["args"]["seq"] == 3.0 and fake.calls[-1]["args"]["logs"] == ["log"]
    assert len(no_sleep) == 4 and all(d >= 0 for d in no_sleep)
    # full jitter under an exponential cap
    assert all(d <= 0.25 * 2**i for i, d in enumerate(no_sleep))
    assert metrics.callback_retries.labels(function="fondation:progress")._value.get() == 4


async def test_function_error_is_not_retried() -> None:
    fake = FakeConvex(
        [(560, {"status": "error", "errorMessage": "Uncaught Error: bad transition"})]
    )
    store, metrics = make_store(fake)
    with pytest.raises(CallbackError) as info:
        await store.progress(SPEC, Progress(1, JobStatus.CLONING, 0, 0, "x"))
    assert not info.value.retryable and "bad transition" in str(info.value)
    assert len(fake.calls) == 1
    assert metrics.callback_failures.labels(function="fondation:progress")._value.get() == 1


async def test_4xx_is_not_retried() -> None:
    fake = FakeConvex([(400, {"code": "BadJsonBody"})])
    store, _ = make_store(fake)
    with pytest.raises(CallbackError):
        await store.claim(SPEC)
    assert len(fake.calls) == 1


async def test_progress_gives_up_when_the_lease_would_expire(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock()

    async def sleep_and_advance(delay: float) -> None:
        clock.advance(max(delay, 1.0))

    monkeypatch.setattr("app.adapters.convex_store.asyncio.sleep", sleep_and_advance)
    fake = FakeConvex([(503, {})] * 1000)
    store, _ = make_store(fake, clock)
    with pytest.raises(CallbackError):
        await store.progress(SPEC, Progress(1, JobStatus.CLONING, 0, 0, "x"))
    assert 2 <= len(fake.calls) <= 62  # bounded by the 60 s lease


async def test_final_state_is_retried_past_the_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()

    async def sleep_and_advance(delay: float) -> None:
        clock.advance(30.0)

    monkeypatch.setattr("app.adapters.convex_store.asyncio.sleep", sleep_and_advance)
    fake = FakeConvex([(503, {})] * 20)  # 10 minutes of outage
    store, _ = make_store(fake, clock)
    await store.fail(SPEC, Failure(FailureCode.CLI_FAILED, "boom", True))
    assert len(fake.calls) == 21
    assert (
        fake.calls[-1]["args"]["code"] == "cli_failed"
        and fake.calls[-1]["args"]["retryable"] is True
    )


async def test_progress_refusal_asks_to_stop() -> None:
    store, _ = make_store(FakeConvex(default={"ok": False, "reason": "stale_attempt"}))
    ack = await store.progress(SPEC, Progress(1, JobStatus.CLONING, 0, 0, "x"))
    assert ack.stop and ack.reason == "stale_attempt"


def doc(i: int, size: int) -> Doc:
    return Doc(f"d{i}", f"D{i}", DocKind.CHAPTER, i, "x" * size)


def test_batches_respect_size_and_count() -> None:
    docs = [doc(i, 700_000) for i in range(20)]
    batches = batch_docs(docs)
    assert [d.slug for b in batches for d in b] == [d.slug for d in docs]
    for b in batches:
        assert sum(len(json.dumps(d.to_json())) for d in b) <= MAX_BATCH_BYTES
    assert len(batch_docs([doc(i, 10) for i in range(200)])) == 4  # 64 docs at most


async def test_put_docs_sends_every_batch_in_order() -> None:
    fake = FakeConvex()
    store, _ = make_store(fake)
    docs = [doc(i, 1_500_000) for i in range(5)]
    await store.put_docs(SPEC, docs)
    sent = [d["slug"] for c in fake.calls for d in c["args"]["docs"]]
    assert sent == [d.slug for d in docs] and len(fake.calls) >= 2
    assert fake.calls[0]["args"]["docs"][0]["chapterIndex"] == 0.0


# -- resume ---------------------------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def ok(value: Any) -> tuple[int, Any]:
    return 200, {"status": "success", "value": value, "logLines": []}


async def test_claim_fetches_the_announced_checkpoint_page_by_page() -> None:
    info = {"commit": COMMIT, "ended": ["extract"], "files": 3}
    fake = FakeConvex(
        [
            ok({"ok": True, "checkpoint": info}),
            ok(
                {
                    "ok": True,
                    "commit": COMMIT,
                    "files": [
                        {"path": "step1_abstractions.yaml", "content": "- a"},
                        {"path": "chapters/chapter_1_a.md", "content": "é"},
                    ],
                    "next": "chapters/chapter_1_a.md",
                }
            ),
            ok(
                {
                    "ok": True,
                    "commit": COMMIT,
                    "files": [
                        {"path": "step2_relationships.yaml", "content": "r"},
                    ],
                    "next": None,
                }
            ),
        ]
    )
    store, _ = make_store(fake)
    result = await store.claim(SPEC)
    assert result.checkpoint is not None
    assert result.checkpoint.commit == COMMIT and result.checkpoint.ended == ("extract",)
    assert [(f.path, f.data) for f in result.checkpoint.files] == [
        ("step1_abstractions.yaml", b"- a"),
        ("chapters/chapter_1_a.md", "é".encode()),
        ("step2_relationships.yaml", b"r"),
    ]
    assert [c["path"] for c in fake.calls] == ["fondation:claim"] + ["fondation:checkpointPage"] * 2
    assert "after" not in fake.calls[1]["args"]
    assert fake.calls[2]["args"]["after"] == "chapters/chapter_1_a.md"


async def test_a_checkpoint_that_cannot_be_fetched_means_a_full_run_not_a_failed_claim() -> None:
    info = {"commit": COMMIT, "ended": [], "files": 1}
    fake = FakeConvex([ok({"ok": True, "checkpoint": info}), ok({"ok": False, "reason": "x"})])
    store, _ = make_store(fake)
    result = await store.claim(SPEC)
    assert result.ok and result.checkpoint is None


async def test_partial_docs_carry_the_commit_and_the_ended_step_on_the_last_batch_only() -> None:
    from app.domain import PartialDocs

    fake = FakeConvex()
    store, _ = make_store(fake)
    big = "x" * (MAX_BATCH_BYTES // 2)
    docs = [
        Doc(f"chapter-{i}", "t", DocKind.CHAPTER, i, big, f"chapters/chapter_{i}_a.md")
        for i in range(3)
    ]
    await store.put_docs(SPEC, docs, PartialDocs(COMMIT, "generate-chapters"))
    calls = [c["args"] for c in fake.calls]
    assert len(calls) > 1
    assert all(c["partial"] is True and c["commit"] == COMMIT for c in calls)
    assert [c.get("endedStep") for c in calls] == [None] * (len(calls) - 1) + ["generate-chapters"]
    assert calls[0]["docs"][0]["path"] == "chapters/chapter_0_a.md"
    fake.calls.clear()
    await store.put_docs(SPEC, [], PartialDocs(COMMIT, "generate-tutorials"))
    assert [c["args"]["endedStep"] for c in fake.calls] == ["generate-tutorials"]
    fake.calls.clear()
    update = Progress(3, JobStatus.ANALYZING, 1, 6, "m", commit=COMMIT)
    await store.progress(SPEC, update)
    assert fake.calls[0]["args"]["commit"] == COMMIT
