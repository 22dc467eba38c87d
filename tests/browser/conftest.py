"""Headless Chromium for the board's browser tests: Debian's /usr/bin/chromium driven by
Playwright (never `playwright install`), a fresh user-data-dir per module."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
PASSWORD = "board-password-for-tests"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser_context() -> Iterator[Any]:
    user_data = tempfile.mkdtemp(prefix="board-chromium-")
    with _sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            user_data,
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        context.set_default_timeout(15_000)
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(user_data, ignore_errors=True)


@pytest.fixture
def page(browser_context: Any) -> Iterator[Any]:
    p = browser_context.new_page()
    yield p
    p.close()


def _sync_playwright() -> Any:
    sync_api = pytest.importorskip("playwright.sync_api")
    return sync_api.sync_playwright()


def log_in(page: Any, url: str, password: str = PASSWORD) -> None:
    page.context.clear_cookies()
    page.goto(f"{url}/board")
    assert "/board/login" in page.url
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")


def logged_in(page: Any, url: str) -> None:
    log_in(page, url)
    page.wait_for_url(f"{url}/board")
    page.wait_for_selector("#live.on")  # the live stream is open


def row(section: str, job_id: str) -> str:
    return f"#board-{section} tr[data-job='{job_id}']"
