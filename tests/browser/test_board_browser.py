"""The board in a real browser: Debian's headless Chromium driven by Playwright, against a real
worker process running the simulator on repositories served over git smart HTTP on 127.0.0.1.

Never downloads a browser: `executable_path` is /usr/bin/chromium (`.ci/run` installs the
`chromium` package when missing). `UPDATE_SCREENSHOT=1` also writes docs/board.png."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.board.auth import COOKIE_NAME, Sessions
from app.clock import FakeClock
from tests.browser.conftest import CHROMIUM, PASSWORD, log_in, logged_in, row
from tests.support.gitserver import GitHttpServer, make_repo
from tests.support.jobs import (
    SOURCE,
    alive,
    processes_under,
    sim,
    spawned_child,
    submit,
    wait_for,
)
from tests.support.worker import REPO_ROOT, WorkerProcess, base_env

SESSION_SECRET = "session-secret-for-browser-tests"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(180),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed"),
]


@pytest.fixture(scope="module")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitHttpServer]:
    root = tmp_path_factory.mktemp("repos")
    make_repo(root / "happy.git", SOURCE)
    make_repo(root / "slow.git", sim(step_delay_s=0.8))
    make_repo(root / "fail.git", sim(fail_at_step=2, exit_code=3))
    make_repo(root / "hang.git", sim(hang_at_step=2, spawn_child=True))
    with GitHttpServer(root) as server:
        yield server


@pytest.fixture(scope="module")
def worker(
    tmp_path_factory: pytest.TempPathFactory, git_server: GitHttpServer
) -> Iterator[WorkerProcess]:
    tmp = tmp_path_factory.mktemp("board-worker")
    env = base_env(
        tmp,
        MAX_CONCURRENT_JOBS="2",
        BOARD_PASSWORD=PASSWORD,
        BOARD_SESSION_SECRET=SESSION_SECRET,
    )
    w = WorkerProcess(env, tmp / "worker.log").start()
    yield w
    w.stop(timeout_s=30)


def job_status(worker: WorkerProcess, job_id: str) -> dict[str, Any]:
    return dict(httpx.get(f"{worker.url}/v1/jobs/{job_id}", timeout=5).json())


def test_wrong_password_is_refused(page: Any, worker: WorkerProcess) -> None:
    log_in(page, worker.url, "not the password")
    page.wait_for_selector("p.error")
    assert page.inner_text("p.error") == "Wrong password."
    assert "/board/login" in page.url
    assert not [c for c in page.context.cookies() if c["name"] == COOKIE_NAME]


def test_step_advances_without_reload(
    page: Any, worker: WorkerProcess, git_server: GitHttpServer
) -> None:
    logged_in(page, worker.url)
    page.evaluate("window.__sameDocument = true")
    submit(worker, "live-1", git_server.url_for("slow.git"))
    step = f"{row('running', 'live-1')} td.step"
    page.wait_for_selector(step)
    first = page.inner_text(step)
    # The simulator moves a step every 0.8 s: the page must follow within 2 s of each.
    page.wait_for_function(
        "([sel, first]) => { const el = document.querySelector(sel);"
        " return el && el.innerText !== first && /^[2-9]\\//.test(el.innerText); }",
        arg=[step, first],
        timeout=10_000,
    )
    page.wait_for_selector(f"{row('recent', 'live-1')}[data-status='completed']", timeout=30_000)
    assert page.evaluate("window.__sameDocument") is True  # never reloaded


def test_failed_job_shows_code_and_message_then_retry_makes_attempt_2(
    page: Any, worker: WorkerProcess, git_server: GitHttpServer
) -> None:
    logged_in(page, worker.url)
    submit(worker, "fail-1", git_server.url_for("fail.git"))
    failed = f"{row('recent', 'fail-1')}[data-status='failed']"
    page.wait_for_selector(failed, timeout=30_000)
    assert page.inner_text(f"{failed} code") == "cli_failed"
    assert "exited with code 3" in page.inner_text(f"{failed} .msg")
    page.click(f"{failed} button.btn-retry")
    page.wait_for_url(f"{worker.url}/board")
    assert "attempt 2 queued" in page.inner_text(".flash")
    wait_for(lambda: job_status(worker, "fail-1")["attempt"] == 2, 10)
    page.goto(f"{worker.url}/board/jobs/fail-1")
    page.wait_for_selector("#job-attempts tr[data-attempt='2']")
    assert page.inner_text("#job-attempt") == "2"


def test_cancel_running_job_stops_its_cli(
    page: Any, worker: WorkerProcess, git_server: GitHttpServer
) -> None:
    logged_in(page, worker.url)
    submit(worker, "hang-1", git_server.url_for("hang.git"))
    wait_for(lambda: spawned_child(worker, "hang-1") is not None, 20)
    child = spawned_child(worker, "hang-1")
    assert child is not None and alive(child)
    marker = "/hang-1-1-"
    assert processes_under(marker)
    running = row("running", "hang-1")
    page.wait_for_selector(running)
    page.click(f"{running} button.btn-cancel")
    page.wait_for_selector(f"{row('recent', 'hang-1')}[data-status='canceled']", timeout=20_000)
    assert wait_for(lambda: not processes_under(marker), 10, 0.1)
    assert not alive(child)


def _set_session(page: Any, worker: WorkerProcess, value: str) -> None:
    page.context.clear_cookies()
    page.context.add_cookies(
        [{"name": COOKIE_NAME, "value": value, "url": worker.url, "httpOnly": True}]
    )


def test_forged_or_expired_cookie_is_refused(page: Any, worker: WorkerProcess) -> None:
    logged_in(page, worker.url)
    genuine = next(c for c in page.context.cookies() if c["name"] == COOKIE_NAME)
    assert genuine["httpOnly"] and genuine["sameSite"] == "Lax" and genuine["expires"] > 0
    assert page.evaluate("document.cookie") == ""  # HttpOnly: invisible to scripts
    payload = genuine["value"].rsplit(".", 1)[0]
    _set_session(page, worker, payload + ".Zm9yZ2VkLXNpZ25hdHVyZS0xMjM0NTY")
    page.goto(f"{worker.url}/board")
    assert "/board/login" in page.url
    # Genuinely signed with the worker's secret, but nine hours ago (TTL: eight).
    old = Sessions(SESSION_SECRET, 8 * 3600, FakeClock(wall_s=time.time() - 9 * 3600))
    _set_session(page, worker, old.new_cookie())
    page.goto(f"{worker.url}/board")
    assert "/board/login" in page.url
    page.context.clear_cookies()


def test_action_without_valid_csrf_changes_nothing(
    page: Any, worker: WorkerProcess, git_server: GitHttpServer
) -> None:
    submit(worker, "fail-2", git_server.url_for("fail.git"))
    worker.wait_status("fail-2", {"failed"})
    logged_in(page, worker.url)
    failed = f"{row('recent', 'fail-2')}[data-status='failed']"
    page.wait_for_selector(failed)
    # Forge the token, and submit at once (before the page script could refill it).
    with page.expect_response(lambda r: r.url.endswith("/fail-2/retry")) as answer:
        page.evaluate(
            "(sel) => { const f = document.querySelector(sel + ' form');"
            " f.querySelector('input[name=csrf]').value = 'forged';"
            " HTMLFormElement.prototype.submit.call(f); }",
            failed,
        )
    assert answer.value.status == 403
    page.wait_for_load_state()
    assert "invalid CSRF token" in page.inner_text("body")
    time.sleep(0.5)
    assert job_status(worker, "fail-2")["attempt"] == 1


def test_screenshot_of_the_board(
    page: Any, worker: WorkerProcess, git_server: GitHttpServer, tmp_path: Path
) -> None:
    """A board with jobs in every state: completed, failed, canceled, running, pending."""
    submit(worker, "course-happy", git_server.url_for("happy.git"))
    worker.wait_status("course-happy", {"completed"})
    for job_id in ("course-broken", "course-fails"):
        submit(worker, job_id, git_server.url_for("fail.git"))
        worker.wait_status(job_id, {"failed"})
    for job_id in ("course-a", "course-b"):  # both slots busy: retries stay pending
        submit(worker, job_id, git_server.url_for("hang.git"))
    wait_for(lambda: spawned_child(worker, "course-b") is not None, 20)
    logged_in(page, worker.url)
    page.click(f"{row('recent', 'course-fails')} button.btn-retry")
    page.wait_for_selector(row("pending", "course-fails"))
    page.fill(f"{row('pending', 'course-fails')} input[name=priority]", "5")
    page.click(f"{row('pending', 'course-fails')} button.btn-priority")
    page.wait_for_selector(f"{row('pending', 'course-fails')} input[value='5']")
    page.wait_for_selector(f"{row('running', 'course-b')}")
    shot = tmp_path / "board.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        shutil.copy(shot, REPO_ROOT / "docs" / "board.png")
    for job_id in ("course-fails", "course-a", "course-b"):
        page.click(f"[data-job='{job_id}'] button.btn-cancel")
        page.wait_for_url(f"{worker.url}/board")
    for job_id in ("course-a", "course-b"):
        worker.wait_status(job_id, {"canceled"})
