"""The board's Convex source (`app.board.convex.ConvexSource`) against the real component's
operator functions behind the bridge: what the component returns parses into the board's
models, every action answers, and a wrong secret is `forbidden`. No worker: the webhook goes
to a closed port, so runs stay pending (backoff) or end dead (`dispatch_failed`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.board.convex import BoardSourceError, ConvexSource
from app.clock import SystemClock
from tests.support.convex_bridge import ConvexBridge, node_ready
from tests.support.signing import SECRET
from tests.support.worker import free_port

BOARD_SECRET = "board-secret-0123456789-abcdef"
REPO = "https://github.com/owner/repo.git"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(120),
    pytest.mark.skipif(not node_ready(), reason="run `cd deploy && npm ci` first (make test does)"),
]


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConvexBridge]:
    tmp: Path = tmp_path_factory.mktemp("board-source")
    with ConvexBridge(
        tmp / "bridge.log",
        FONDATION_WORKER_URL=f"http://127.0.0.1:{free_port()}",  # nothing listens
        FONDATION_WEBHOOK_SECRET=SECRET,
        FONDATION_BOARD_SECRET=BOARD_SECRET,
        FONDATION_MAX_PARALLEL=1,
        FONDATION_RETRY_BASE_MS=600_000,
        FONDATION_RETRY_MAX_MS=600_000,
    ) as b:
        yield b


def source(bridge: ConvexBridge, secret: str = BOARD_SECRET) -> ConvexSource:
    return ConvexSource(bridge.url, secret, clock=SystemClock(), poll_s=0.0)


async def test_a_wrong_secret_is_forbidden_and_changes_nothing(bridge: ConvexBridge) -> None:
    run_id = bridge.create(REPO, maxAttempts=1)
    bridge.wait_job(run_id, {"dead"}, timeout_s=30)
    before = bridge.runs()
    wrong = source(bridge, secret="board-secret-0123456789-abcdeF")
    for call in (
        wrong.snapshot(1),
        wrong.job(run_id),
        wrong.retry(run_id),
        wrong.cancel(run_id),
        wrong.set_priority(run_id, 3),
    ):
        with pytest.raises(BoardSourceError, match="forbidden"):
            await call
    await wrong.aclose()
    assert bridge.runs() == before


async def test_the_source_reads_and_acts_through_the_component(bridge: ConvexBridge) -> None:
    dead = bridge.create(REPO, maxAttempts=1)
    bridge.wait_job(dead, {"dead"}, timeout_s=30)
    waiting = [bridge.create(REPO, maxAttempts=3) for _ in range(2)]
    for run_id in waiting:  # attempt 1 failed to deliver; attempt 2 waits out a long backoff
        deadline = time.monotonic() + 30
        while bridge.job(run_id).get("attempt") != 2 or bridge.job(run_id)["status"] != "pending":
            assert time.monotonic() < deadline, bridge.job(run_id)
            time.sleep(0.05)
    board = source(bridge)
    snap = await board.snapshot(1)
    counts = dict(snap.counts)
    assert counts["pending"] == 2 and counts["dead"] >= 1
    assert [r.job_id for r in snap.pending] == waiting
    assert snap.pending_total == 2
    row = next(r for r in snap.recent if r.job_id == dead)
    assert (row.status, row.error_code, row.can_retry) == ("dead", "dispatch_failed", True)
    detail = await board.job(dead)
    assert detail is not None and detail.job.attempt == 1
    assert [(a.attempt, a.status, a.error_code) for a in detail.attempts] == [
        (1, "dead", "dispatch_failed")
    ]
    assert await board.job("nope") is None

    # setPriority re-orders the pending queue; refused for anything but pending.
    result = await board.set_priority(waiting[1], 5)
    assert (result.ok, result.message) == (True, "priority set to 5")
    assert [r.job_id for r in (await board.snapshot(1)).pending] == waiting[::-1]
    assert not (await board.set_priority(dead, 5)).ok

    # retry: attempt 2 of the dead run, pending again (then dispatched by the loop).
    version = (await board.snapshot(1)).version
    result = await board.retry(dead)
    assert (result.ok, result.message) == (True, "attempt 2 queued")
    job = bridge.wait_job(dead, {"dead"}, timeout_s=30)
    assert job["attempt"] == 2
    assert (await board.snapshot(1)).version != version
    detail = await board.job(dead)
    assert detail is not None
    assert [a.attempt for a in detail.attempts] == [1, 2]

    # cancel a pending run.
    result = await board.cancel(waiting[0])
    assert (result.ok, result.message) == (True, "canceled")
    assert (await board.cancel(waiting[0])).ok  # canceling twice is harmless
    assert bridge.job(waiting[0])["status"] == "canceled"
    await board.aclose()
