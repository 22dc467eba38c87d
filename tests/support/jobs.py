"""Helpers for tests that drive a real worker process: submitting, polling, and process and
workspace checks."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.support.signing import SECRET, cancel_body, headers_for, start_body
from tests.support.worker import WorkerProcess

SOURCE = {
    "README.md": "# Demo\n",
    "lib/util.py": "def util():\n    return 1\n",
    "src/main.py": "print('hi')\n",
}


def sim(**switches: Any) -> dict[str, str]:
    """Repository files with simulator switches in `.fondation-sim.json`."""
    return {**SOURCE, ".fondation-sim.json": json.dumps(switches)}


def post_start(
    w: WorkerProcess, job_id: str, url: str, *, secret: str = SECRET, **kw: Any
) -> httpx.Response:
    body = start_body(job_id, url, **kw)
    return httpx.post(
        f"{w.url}/v1/webhooks",
        content=body,
        headers=headers_for(body, f"{job_id}:1", secret=secret),
        timeout=10,
    )


def submit(w: WorkerProcess, job_id: str, url: str, **kw: Any) -> None:
    r = post_start(w, job_id, url, **kw)
    assert r.status_code == 202, r.text


def cancel(w: WorkerProcess, job_id: str) -> httpx.Response:
    body = cancel_body(job_id)
    return httpx.post(
        f"{w.url}/v1/webhooks",
        content=body,
        headers=headers_for(body, f"{job_id}:1:cancel"),
        timeout=10,
    )


def wait_for(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> bool:
    """Poll `predicate` until true or `timeout_s` passes (bounded); returns the last result."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def _mentions(p: psutil.Process, marker: str) -> bool:
    try:
        if any(marker in part for part in (p.cmdline() or [])):
            return True
        return marker in (p.cwd() or "")
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def processes_under(marker: str) -> list[psutil.Process]:
    """Live (non-zombie) processes whose command line or working directory mentions `marker`.
    The working directory matters: a CLI's grandchild (`sleep 300`) names no path but runs in
    the job's workspace."""
    found = []
    me = psutil.Process()
    mine = {me.pid, *(a.pid for a in me.parents())}  # pytest and whatever launched it
    for p in psutil.process_iter():
        try:
            if p.pid in mine or p.status() == psutil.STATUS_ZOMBIE:
                continue
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if _mentions(p, marker):
            found.append(p)
    return found


def assert_no_orphans(marker: str, timeout_s: float = 5.0) -> None:
    ok = wait_for(lambda: not processes_under(marker), timeout_s, 0.1)
    assert ok, [(p.pid, _safe_cmdline(p)) for p in processes_under(marker)]


def _safe_cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def workspace_entries(w: WorkerProcess) -> list[str]:
    work = Path(w.env["WORK_DIR"])
    return sorted(p.name for p in work.iterdir()) if work.exists() else []


def assert_workspace_empty(w: WorkerProcess, timeout_s: float = 5.0) -> None:
    """The workspace is removed right after the final report: poll briefly for it."""
    ok = wait_for(lambda: not workspace_entries(w), timeout_s, 0.05)
    assert ok, workspace_entries(w)


def job(w: WorkerProcess, job_id: str) -> dict[str, Any]:
    r = httpx.get(f"{w.url}/v1/jobs/{job_id}", timeout=5)
    assert r.status_code == 200, r.text
    return dict(r.json())


def spawned_child(w: WorkerProcess, job_id: str) -> int | None:
    """The grandchild pid the simulator printed (`spawned child pid=N`), from the stored
    progress events."""
    import re
    import sqlite3

    db = sqlite3.connect(Path(w.env["DATA_DIR"]) / "jobs.sqlite3", timeout=5)
    try:
        rows = db.execute(
            "SELECT data FROM events WHERE job_id = ? AND type = 'progress'", (job_id,)
        ).fetchall()
    finally:
        db.close()
    for (data,) in rows:
        for line in json.loads(data).get("logs", []):
            m = re.search(r"spawned child pid=(\d+)", line)
            if m:
                return int(m.group(1))
    return None


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
