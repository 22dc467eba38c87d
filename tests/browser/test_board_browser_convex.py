"""The board in Convex mode, in headless Chromium, against the real component: the example host
app with the Fondation component under convex-test behind the HTTP bridge, its loop dispatching
to a real worker process (the simulator as CLI, a git server on 127.0.0.1), whose board reads and
acts through the host's operator functions (`fondation:boardSnapshot` … `fondation:retry`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import CHROMIUM, PASSWORD, logged_in, row
from tests.support.convex_bridge import ConvexBridge, node_ready
from tests.support.gitserver import GitHttpServer, make_repo
from tests.support.signing import SECRET
from tests.support.worker import WorkerProcess, base_env, free_port

BOARD_SECRET = "board-secret-shared-with-the-deployment"
SOURCE = {"README.md": "# Demo\n", "src/main.py": "print('hi')\n", "lib/util.py": "X = 1\n"}

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(180),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed"),
    pytest.mark.skipif(
        not node_ready(), reason="run `make deploy/convex/example/node_modules/.installed`"
    ),
]
pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitHttpServer]:
    root = tmp_path_factory.mktemp("repos")
    # Steps 2 s apart: long enough to tell one from the next on the page, short enough to wait for.
    make_repo(
        root / "slow.git", {**SOURCE, ".fondation-sim.json": json.dumps({"step_delay_s": 2.0})}
    )
    make_repo(
        root / "failing.git",
        {**SOURCE, ".fondation-sim.json": json.dumps({"fail_at_step": 2, "exit_code": 3})},
    )
    with GitHttpServer(root) as server:
        yield server


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ConvexBridge, WorkerProcess]]:
    tmp: Path = tmp_path_factory.mktemp("board-bridge")
    port = free_port()
    with ConvexBridge(
        tmp / "bridge.log",
        FONDATION_WORKER_URL=f"http://127.0.0.1:{port}",
        FONDATION_WEBHOOK_SECRET=SECRET,
        FONDATION_BOARD_SECRET=BOARD_SECRET,
        FONDATION_MAX_PARALLEL=2,
    ) as bridge:
        env = base_env(
            tmp,
            CONVEX_URL=bridge.url,
            HEARTBEAT_S="1",
            LEASE_S="4",
            BOARD_PASSWORD=PASSWORD,
            BOARD_SECRET=BOARD_SECRET,
        )
        worker = WorkerProcess(env, tmp / "worker.log")
        worker.port, worker.url = port, f"http://127.0.0.1:{port}"
        worker.env["PORT"] = str(port)
        worker.start()
        try:
            yield bridge, worker
        finally:
            worker.stop(timeout_s=30)


def snapshot_calls(bridge: ConvexBridge) -> int:
    return sum(1 for c in bridge.calls() if c["path"] == "fondation:boardSnapshot")


def shown_at_ms(page: Any, selector: str, prefix: str, timeout_ms: int = 30_000) -> float:
    """Wait until `selector`'s text starts with `prefix`; the browser's clock (ms) at that moment."""
    handle = page.wait_for_function(
        """([sel, prefix]) => {
            const el = document.querySelector(sel);
            return el !== null && el.innerText.startsWith(prefix) ? Date.now() : null;
        }""",
        arg=[selector, prefix],
        timeout=timeout_ms,
        polling=20,
    )
    return float(handle.json_value())


def test_a_step_change_in_the_component_shows_within_2_s_without_reload(
    page: Any,
    browser_context: Any,
    stack: tuple[ConvexBridge, WorkerProcess],
    git_server: GitHttpServer,
) -> None:
    bridge, worker = stack
    run_id = bridge.create(git_server.url_for("slow"))
    logged_in(page, worker.url)
    other = browser_context.new_page()
    other.goto(f"{worker.url}/board")
    other.wait_for_selector("#live.on")
    step = f"{row('running', run_id)} td.step"
    page.evaluate("window.__noReload = true")
    # Whatever step the page first shows, time the next one.
    shown = page.wait_for_function(
        "(sel) => document.querySelector(sel)?.innerText.match(/^(\\d+)\\//)?.[1] ?? null",
        arg=step,
        timeout=30_000,
    )
    target = int(shown.json_value()) + 1
    seen_ms = shown_at_ms(page, step, f"{target}/")
    trail = [
        s
        for s in bridge.component_table("boardSteps")
        if s["runId"] == run_id and s["step"] == target and s["attempt"] == 1
    ]
    changed_ms = min(float(s["at"]) for s in trail)  # when the component recorded it
    lag_s = (seen_ms - changed_ms) / 1000
    assert 0 <= lag_s < 2.0, lag_s
    assert page.evaluate("window.__noReload") is True  # same document: no reload
    other.wait_for_function(  # the other open board follows too
        "([sel, k]) => parseInt(document.querySelector(sel)?.innerText ?? '0') >= k",
        arg=[step, target],
        timeout=5_000,
    )
    # Two open boards, one shared poll: about one snapshot call per second in all.
    before = snapshot_calls(bridge)
    page.wait_for_timeout(3_000)
    assert snapshot_calls(bridge) - before <= 4
    other.close()
    assert BOARD_SECRET not in page.content()
    bridge.wait_job(run_id, {"completed"}, timeout_s=60)
    page.wait_for_selector(f"{row('recent', run_id)}[data-status='completed']")


def test_a_failed_job_retried_from_the_board_runs_attempt_2(
    page: Any, stack: tuple[ConvexBridge, WorkerProcess], git_server: GitHttpServer
) -> None:
    bridge, worker = stack
    run_id = bridge.create(git_server.url_for("failing"), maxAttempts=1)
    assert bridge.wait_job(run_id, {"failed", "dead"}, timeout_s=60)["attempt"] == 1
    logged_in(page, worker.url)
    failed = f"{row('recent', run_id)}[data-status='failed']"
    page.wait_for_selector(failed)
    assert page.inner_text(f"{failed} code") == "cli_failed"
    page.click(f"{failed} button.btn-retry")
    page.wait_for_url(f"{worker.url}/board")
    assert "attempt 2 queued" in page.inner_text(".flash")
    # The loop dispatches attempt 2 to the worker, which claims it (and fails it again: same repo).
    job = bridge.wait_job(run_id, {"failed", "dead"}, timeout_s=60)
    assert job["attempt"] == 2 and job["lastError"]["code"] == "cli_failed", job
    claims = [c["args"] for c in bridge.calls() if c["path"] == "fondation:claim"]
    assert [c["attempt"] for c in claims if c["jobId"] == run_id] == [1, 2]
    retries = [c["args"] for c in bridge.calls() if c["path"] == "fondation:retry"]
    assert retries == [{"boardSecret": "<redacted>", "jobId": run_id}]
    # The board follows: attempt 2 shows on the same page, then on the job page with attempt 1.
    page.wait_for_function(
        "(sel) => document.querySelector(sel)?.innerText === '#2'",
        arg=f"{row('recent', run_id)}[data-status='failed'] small",
        timeout=10_000,
    )
    page.click(f"{row('recent', run_id)} a.job-link")
    page.wait_for_selector("#job-attempts tr[data-attempt='2']")
    assert page.inner_text("#job-attempt") == "2"
    assert "cli_failed" in page.inner_text("#job-attempts tr[data-attempt='1']")
    assert BOARD_SECRET not in page.content()
