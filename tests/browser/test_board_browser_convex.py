"""The board in Convex mode, in headless Chromium: a real worker process whose board reads and
acts through the host's operator functions, served by a fake of that spec over HTTP on
127.0.0.1 (the component does not export them yet: see docs/BOARD.md)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.browser.conftest import CHROMIUM, PASSWORD, logged_in, row
from tests.support.fake_board_convex import FakeBoardConvex
from tests.support.worker import WorkerProcess, base_env

BOARD_SECRET = "board-secret-shared-with-the-deployment"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(120),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed"),
]
pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def convex() -> Iterator[tuple[FakeBoardConvex, str]]:
    fake = FakeBoardConvex(BOARD_SECRET, now_ms=time.time() * 1000)
    fake.add(
        "run-1",
        "analyzing",
        currentStep=1,
        totalSteps=6,
        message="extracting",
        claimedBy="w-1",
        runner="warm",
        leaseUntil=fake.now_ms + 45_000,
    )
    fake.add("dead-1", "dead", error={"code": "cli_failed", "message": "exit 3, 3 attempts"})
    with fake.serve() as url:
        yield fake, url


@pytest.fixture(scope="module")
def worker(
    tmp_path_factory: pytest.TempPathFactory, convex: tuple[FakeBoardConvex, str]
) -> Iterator[WorkerProcess]:
    tmp = tmp_path_factory.mktemp("board-convex")
    env = base_env(tmp, CONVEX_URL=convex[1], BOARD_PASSWORD=PASSWORD, BOARD_SECRET=BOARD_SECRET)
    w = WorkerProcess(env, tmp / "worker.log").start()
    yield w
    w.stop(timeout_s=30)


def snapshot_calls(fake: FakeBoardConvex) -> int:
    with fake.lock:
        return sum(1 for path, _ in fake.calls if path == "fondation:boardSnapshot")


def test_live_update_from_one_shared_poll(
    page: Any, browser_context: Any, worker: WorkerProcess, convex: tuple[FakeBoardConvex, str]
) -> None:
    fake, _ = convex
    logged_in(page, worker.url)
    others = [browser_context.new_page() for _ in range(3)]
    for other in others:
        other.goto(f"{worker.url}/board")
        other.wait_for_selector("#live.on")
    step = f"{row('running', 'run-1')} td.step"
    assert page.inner_text(step).startswith("1/6")
    with fake.lock:
        fake.jobs["run-1"].update(currentStep=3, message="ordering chapters")
        fake.version += 1
    changed = time.monotonic()
    for p in (page, *others):
        p.wait_for_function(
            "(sel) => document.querySelector(sel).innerText.startsWith('3/6')",
            arg=step,
            timeout=4_000,
        )
    elapsed_s = time.monotonic() - changed
    assert elapsed_s < 2.5, elapsed_s  # poll 1 s + coalescing 0.2 s, on a loaded machine
    # Four open boards, one poll: about one snapshot call per second in all.
    before = snapshot_calls(fake)
    time.sleep(3.0)
    assert snapshot_calls(fake) - before <= 4
    for other in others:
        other.close()
    assert BOARD_SECRET not in page.content()


def test_retry_a_dead_job_through_the_operator_function(
    page: Any, worker: WorkerProcess, convex: tuple[FakeBoardConvex, str]
) -> None:
    fake, _ = convex
    logged_in(page, worker.url)
    dead = f"{row('recent', 'dead-1')}[data-status='dead']"
    page.wait_for_selector(dead)
    assert page.inner_text(f"{dead} code") == "cli_failed"
    page.click(f"{dead} button.btn-retry")
    page.wait_for_url(f"{worker.url}/board")
    assert "attempt 2 queued" in page.inner_text(".flash")
    page.wait_for_selector(row("pending", "dead-1"))
    assert "#2" in page.inner_text(row("pending", "dead-1"))
    with fake.lock:
        assert fake.jobs["dead-1"]["attempt"] == 2
        retry_calls = [args for path, args in fake.calls if path == "fondation:retry"]
    assert retry_calls == [{"boardSecret": BOARD_SECRET, "jobId": "dead-1"}]
