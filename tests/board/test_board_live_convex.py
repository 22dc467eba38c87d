"""The shared live poller (one read per change whatever the number of open boards), the
Convex data source against a fake of the operator functions, and the board in Convex mode."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from app.board import model
from app.board.convex import BoardSourceError, ConvexSource
from app.board.live import LiveHub
from app.clock import FakeClock
from app.config import load_settings
from app.main import create_app
from tests.support.fake_board_convex import FakeBoardConvex
from tests.support.fakes import HeldReporter, public_resolver
from tests.support.signing import SECRET

BOARD_SECRET = "board-secret-0123456789"


class CountingSource:
    """A source whose data changes when told; counts reads."""

    def __init__(self) -> None:
        self.version = 1
        self.reads = 0
        self.changed = asyncio.Event()

    def change(self) -> None:
        self.version += 1
        self.changed.set()

    async def wait_change(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.changed.wait(), timeout_s)
        self.changed.clear()

    async def probe(self) -> str:
        return str(self.version)

    async def read(self) -> Any:
        self.reads += 1
        return model.Snapshot(str(self.version), 0.0, (), (), (), ())


async def test_one_read_per_change_whatever_the_number_of_boards() -> None:
    source = CountingSource()
    hub = LiveHub(wait_change=source.wait_change, probe=source.probe, poll_s=0.2, debounce_s=0.01)
    task = asyncio.create_task(hub.run())
    try:
        queues = [
            hub.subscribe("board:1", source.read, lambda s: {"version": s.version})
            for _ in range(50)
        ]
        first = await asyncio.wait_for(queues[0].get(), 2)
        assert first == {"version": "1"} and source.reads == 1
        for q in queues[1:]:
            q.get_nowait()
        for expected in ("2", "3", "4"):
            source.change()
            got = [await asyncio.wait_for(q.get(), 2) for q in queues]
            assert got == [{"version": expected}] * 50
        assert source.reads == 4  # the first read, then one per change: not 50 per change
        await asyncio.sleep(0.5)  # idle polls probe the version but read nothing
        assert source.reads == 4
        late = hub.subscribe("board:1", source.read, lambda s: {"version": s.version})
        assert late.get_nowait() == {"version": "4"}  # a new page gets the latest at once
    finally:
        hub.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert queues[0].get_nowait() is None  # closing ends every stream


def convex_source(
    fake: FakeBoardConvex, clock: FakeClock, secret: str = BOARD_SECRET
) -> ConvexSource:
    return ConvexSource(
        "https://fake.convex.cloud", secret, clock=clock, transport=fake.transport()
    )


async def test_convex_source_reads_the_operator_functions() -> None:
    fake = FakeBoardConvex(BOARD_SECRET)
    fake.add("p1", "pending", priority=1)
    fake.add(
        "r1",
        "analyzing",
        currentStep=2,
        totalSteps=4,
        claimedBy="w-1",
        runner="warm",
        leaseUntil=fake.now_ms + 30_000,
    )
    fake.add("f1", "failed", error={"code": "cli_failed", "message": "exit 3"})
    source = convex_source(fake, FakeClock())
    snap = await source.snapshot(1)
    assert dict(snap.counts) == {"pending": 1, "analyzing": 1, "failed": 1}
    run = snap.running[0]
    assert (run.percent, run.runner, run.lease_until - snap.now) == (50, "warm w-1", 30.0)
    assert snap.recent[0].error_code == "cli_failed" and snap.recent[0].can_retry
    path, args = fake.calls[0]
    assert path == "fondation:boardSnapshot"
    assert args == {"boardSecret": BOARD_SECRET, "page": 1.0, "pageSize": float(model.PAGE_SIZE)}
    detail = await source.job("r1")
    assert detail is not None and [s.step for s in detail.steps] == [1, 2]
    assert await source.job("nope") is None
    assert (await source.retry("f1")).ok
    assert fake.jobs["f1"]["attempt"] == 2 and fake.calls[-1][0] == "fondation:retry"
    assert (await source.set_priority("p1", 7)).message == "priority set to 7"
    assert fake.calls[-1] == (
        "fondation:setPriority",
        {"boardSecret": BOARD_SECRET, "jobId": "p1", "priority": 7.0},
    )
    assert (await source.cancel("r1")).ok and fake.calls[-1][0] == "fondation:cancelJob"
    await source.aclose()


async def test_convex_source_polls_at_most_once_per_period() -> None:
    fake = FakeBoardConvex(BOARD_SECRET)
    clock = FakeClock()
    source = convex_source(fake, clock)
    for _ in range(10):
        await source.probe()
        await source.snapshot(1)
    assert len(fake.calls) == 1
    clock.advance(1.0)
    await source.probe()
    assert len(fake.calls) == 2
    await source.aclose()


async def test_convex_source_with_a_wrong_secret_fails_clearly() -> None:
    fake = FakeBoardConvex(BOARD_SECRET)
    source = convex_source(fake, FakeClock(), secret="wrong")
    with pytest.raises(BoardSourceError, match="forbidden"):
        await source.snapshot(1)
    await source.aclose()


def test_board_in_convex_mode_never_shows_the_board_secret(tmp_path: Path) -> None:
    fake = FakeBoardConvex(BOARD_SECRET)
    fake.add("f1", "failed", error={"code": "cli_failed", "message": "exit 3"})
    clock = FakeClock()
    settings = load_settings(
        {
            "WEBHOOK_SECRETS": SECRET,
            "DATA_DIR": str(tmp_path / "data"),
            "HOST": "127.0.0.1",
            "CONVEX_URL": "https://fake.convex.cloud",
            "BOARD_PASSWORD": "pw",
            "BOARD_SECRET": BOARD_SECRET,
        }
    )
    source = convex_source(fake, clock)
    app = create_app(
        settings,
        environ={},
        clock=clock,
        resolver=public_resolver,
        reporter=HeldReporter(),
        board_source=source,
    )
    with TestClient(app, follow_redirects=False) as client:
        client.post("/board/login", data={"password": "pw"})
        page = client.get("/board")
        assert page.status_code == 200 and "cli_failed" in page.text
        token = page.context["csrf"]  # type: ignore[attr-defined]
        r = client.post("/board/jobs/f1/retry", data={"csrf": token})
        assert r.status_code == 303 and fake.jobs["f1"]["attempt"] == 2
        job = client.get("/board/jobs/f1")
        assert "&lt;b&gt;line two&lt;/b&gt;" in job.text  # log lines are escaped
        for response in (page, job, client.get("/board/login")):
            assert BOARD_SECRET not in response.text
            assert BOARD_SECRET not in str(response.headers)


def test_convex_mode_needs_a_board_secret(tmp_path: Path) -> None:
    from app.errors import ConfigError

    settings = load_settings(
        {
            "WEBHOOK_SECRETS": SECRET,
            "DATA_DIR": str(tmp_path / "data"),
            "CONVEX_URL": "https://fake.convex.cloud",
            "BOARD_PASSWORD": "pw",
        }
    )
    with pytest.raises(ConfigError, match="BOARD_SECRET"):
        create_app(settings, environ={}, resolver=public_resolver, reporter=HeldReporter())


async def test_streams_end_when_the_worker_drains() -> None:
    source = CountingSource()
    draining = False
    hub = LiveHub(
        wait_change=source.wait_change,
        probe=source.probe,
        poll_s=0.05,
        debounce_s=0.01,
        stopping=lambda: draining,
    )
    task = asyncio.create_task(hub.run())
    queue = hub.subscribe("board:1", source.read, lambda s: {"version": s.version})
    assert await asyncio.wait_for(queue.get(), 2) == {"version": "1"}
    draining = True
    assert await asyncio.wait_for(queue.get(), 2) is None
    await asyncio.wait_for(task, 2)
