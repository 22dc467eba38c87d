"""Hostile input at the edge and in a job (issue 11): DNS rebinding, a full store, the event
stream. The app runs in process (ASGI transport, lifespan on) on the embedded store; jobs
clone from real git servers on 127.0.0.0/8 and run the simulator as their CLI."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import load_settings
from app.main import create_app
from app.urlpolicy import Resolver
from tests.support import asgi
from tests.support.gitserver import GitHttpServer, make_repo
from tests.support.jobs import SOURCE
from tests.support.signing import SECRET, headers_for, start_body

SIMULATOR = f"{sys.executable} -m app.simulator analyze {{repo_dir}} --output-dir {{output_dir}}"
FINAL = {"completed", "failed", "canceled"}


@contextlib.asynccontextmanager
async def embedded_app(
    tmp_path: Path, resolver: Resolver, **env: str
) -> AsyncIterator[httpx.AsyncClient]:
    settings = load_settings(
        {
            "WEBHOOK_SECRETS": SECRET,
            "DATA_DIR": str(tmp_path / "data"),
            "WORK_DIR": str(tmp_path / "work"),
            "SHUTDOWN_GRACE_S": "4",
            "WORKER_ID": "hostile-test",
            "FONDATION_COMMAND": SIMULATOR,
            "PROGRESS_MIN_INTERVAL_S": "0.2",
            **env,
        }
    )
    app = create_app(settings, environ={"PATH": os.environ["PATH"]}, resolver=resolver)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:
            client.app_ref = app  # type: ignore[attr-defined]
            yield client


async def submit(client: httpx.AsyncClient, job_id: str, url: str) -> httpx.Response:
    body = start_body(job_id, url)
    return await client.post("/v1/webhooks", content=body, headers=headers_for(body, f"{job_id}:1"))


async def final_job(client: httpx.AsyncClient, job_id: str, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        if job.get("status") in FINAL:
            return job
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish in {timeout_s} s")


# -- item 8: DNS rebinding -------------------------------------------------------------------


async def test_dns_rebinding_cannot_redirect_the_clone(tmp_path: Path) -> None:
    """The name `localhost` is checked through the worker's resolver, which answers
    127.0.0.2 (where the real repository is served). Any later lookup of the same name, git's
    own, gets the system's answer instead: 127.0.0.1, where another server waits on the same
    port, standing for the address a rebinding DNS server switches to after the check."""
    make_repo(tmp_path / "checked" / "demo.git", SOURCE)
    make_repo(tmp_path / "rebound" / "demo.git", {"README.md": "not the checked host\n"})
    lookups: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        lookups.append(host)
        return ["127.0.0.2"]

    with GitHttpServer(tmp_path / "checked", host="127.0.0.2") as checked:
        try:
            rebound = GitHttpServer(tmp_path / "rebound", port=checked.port).start()
        except OSError:
            pytest.skip("127.0.0.1 has that port taken")
        try:
            async with embedded_app(
                tmp_path,
                resolver,
                ALLOWED_GIT_HOSTS="localhost",
                ALLOW_INSECURE_GIT="1",
                ALLOW_PRIVATE_NETWORKS="1",  # both addresses are loopback: pinning is tested
            ) as client:
                url = f"http://localhost:{checked.port}/demo.git"
                assert (await submit(client, "rebind", url)).status_code == 202
                job = await final_job(client, "rebind")
        finally:
            rebound.stop()
        print(
            f"FIGURES rebinding: {len(lookups)} checked lookups; requests: checked "
            f"{checked.request_count}, rebound {rebound.request_count}; job {job['status']}"
        )
        assert rebound.request_count == 0
        assert checked.request_count > 0
        assert job["status"] == "completed", job
        assert lookups == ["localhost", "localhost"]  # at intake, and again before the clone


# -- item 9: the event stream ----------------------------------------------------------------


class _Stream:
    """One GET on the raw ASGI app, held open until `close` (httpx's ASGI transport would
    wait for the whole body, and an event stream of a running job has no end)."""

    def __init__(self, app: Any, path: str, headers: dict[str, str], query: str = "") -> None:
        self.start: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.body = bytearray()
        self._gone = asyncio.Event()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "root_path": "",
            # Header bytes as a client sends them; Starlette reads them as latin-1.
            "headers": [(k.lower().encode(), v.encode("latin-1")) for k, v in headers.items()],
            "client": ("127.0.0.1", 50000),
            "server": ("worker", 80),
            "state": {},
        }
        self.task = asyncio.create_task(app(scope, self._receive, self._send))

    async def _receive(self) -> dict[str, Any]:
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and not self.start.done():
            self.start.set_result(message)
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")

    async def status(self) -> int:
        return int((await asyncio.wait_for(asyncio.shield(self.start), 5))["status"])

    def header(self, name: str) -> str | None:
        for key, value in self.start.result()["headers"]:
            if key.decode().lower() == name:
                return str(value.decode())
        return None

    async def close(self) -> None:
        self._gone.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.task, 5)


@contextlib.asynccontextmanager
async def held_app(tmp_path: Path, **env: str) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """The app with a reporter that holds every claim: accepted jobs stay running."""
    async with asgi.held_app(tmp_path, **{"WORKER_ID": "hostile-test", **env}) as (app, client, _):
        yield app, client


URL = "https://github.com/owner/repo.git"


@pytest.mark.parametrize(
    ("header", "query"),
    [
        ("²", ""),  # str.isdigit() is true for it, int() is not
        ("1" * 5000, ""),  # past int()'s 4,300-digit limit
        ("99999999999999999999", ""),  # past SQLite's 64-bit integers
        ("-1", ""),
        ("1.0", ""),
        ("0x10", ""),
        ("", "after=%D9%A1%D9%A2"),  # Arabic-Indic digits in ?after=
        ("", "after=%C2%B2"),
    ],
)
async def test_last_event_id_is_parsed_strictly(tmp_path: Path, header: str, query: str) -> None:
    async with held_app(tmp_path) as (app, client):
        assert (await submit(client, "sse", URL)).status_code == 202
        headers = {"last-event-id": header} if header else {}
        stream = _Stream(app, "/v1/jobs/sse/events", headers, query)
        try:
            status = await stream.status()
        finally:
            await stream.close()
        assert status == 400
        assert stream.header("content-type") == "application/problem+json"
        assert b"invalid Last-Event-ID" in stream.body


async def test_concurrent_event_streams_are_capped(tmp_path: Path) -> None:
    async with held_app(tmp_path, MAX_EVENT_STREAMS="3", RETRY_AFTER_S="9") as (app, client):
        assert (await submit(client, "sse", URL)).status_code == 202
        streams = [_Stream(app, "/v1/jobs/sse/events", {}) for _ in range(3)]
        try:
            assert [await s.status() for s in streams] == [200, 200, 200]
            refused = _Stream(app, "/v1/jobs/sse/events", {})
            assert await refused.status() == 503
            assert refused.header("retry-after") == "9"
            await refused.close()
            await streams.pop().close()  # a closed stream gives its place back
            again = _Stream(app, "/v1/jobs/sse/events", {})
            streams.append(again)
            assert await again.status() == 200
        finally:
            for s in streams:
                await s.close()
        # Every stream closed: the count is back to zero, three may open again.
        fresh = [_Stream(app, "/v1/jobs/sse/events", {}) for _ in range(3)]
        try:
            assert [await s.status() for s in fresh] == [200, 200, 200]
        finally:
            for s in fresh:
                await s.close()


# -- item 5: step-line floods ----------------------------------------------------------------

FLOOD_CLI = """
import sys, time
end = time.monotonic() + float(sys.argv[1])
k = 0
while time.monotonic() < end:
    k += 1
    sys.stdout.write(f"[{k % 2 + 1}/2] " + "x" * 60_000 + "\\n")
    sys.stdout.flush()
    time.sleep(0.005)
print(f"wrote {k} step lines", file=sys.stderr)
"""


async def test_step_line_flood_is_rate_limited_and_bounded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import sqlite3

    caplog.set_level(logging.INFO, logger="fondation.jobs")
    make_repo(tmp_path / "repos" / "demo.git", SOURCE)
    script = tmp_path / "flood.py"
    script.write_text(FLOOD_CLI)
    flood_s = 3.0

    async def loopback(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    with GitHttpServer(tmp_path / "repos") as srv:
        async with embedded_app(
            tmp_path,
            loopback,
            ALLOWED_GIT_HOSTS="127.0.0.1",
            ALLOW_INSECURE_GIT="1",
            ALLOW_PRIVATE_NETWORKS="1",
            PROGRESS_MIN_INTERVAL_S="1",
            FONDATION_COMMAND=f"{sys.executable} {script} {flood_s} {{output_dir}}",
        ) as client:
            assert (await submit(client, "flood", srv.url_for("demo"))).status_code == 202
            job = await final_job(client, "flood")
    data = tmp_path / "data"
    db = sqlite3.connect(data / "jobs.sqlite3")
    try:
        rows = db.execute(
            "SELECT data, at FROM events WHERE job_id = 'flood' AND type = 'progress'"
        ).fetchall()
    finally:
        db.close()
    stored = sum(len(r[0]) for r in rows)
    on_disk = sum(f.stat().st_size for f in data.glob("jobs.sqlite3*"))
    steps_logged = [r for r in caplog.records if r.getMessage() == "step started"]
    log_chars = sum(len(str(getattr(r, "step_message", ""))) for r in steps_logged)
    print(
        f"FIGURES step flood ({flood_s:g} s of [1/2]/[2/2] 60 KB lines): {len(rows)} progress "
        f"reports, {stored} B of events, {on_disk} B of SQLite files, "
        f"{len(steps_logged)} 'step started' log lines ({log_chars} chars); job {job['status']}"
    )
    assert job["status"] in FINAL
    # The burst allowance (8), then one report a second, plus the phase changes around it.
    assert len(rows) <= 8 + flood_s + 8
    assert stored < 300_000
    assert len(steps_logged) <= 8 + flood_s + 2 and log_chars <= (8 + flood_s + 2) * 500
    assert len(job["message"]) <= 500


# -- item 4: a full disk ---------------------------------------------------------------------


class FullDisk:
    """Stands in for the store's sqlite3 connection: statements `failing` picks fail as
    SQLite fails on a full disk (SQLITE_FULL), at most `times` times."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self.failing: Any = lambda sql, args: False
        self.times = 0
        self.failed = 0

    def fill(self, failing: Any, times: int = 1_000_000) -> None:
        self.failing, self.times, self.failed = failing, times, 0

    def execute(self, sql: str, *args: Any) -> Any:
        params = args[0] if args else ()
        if self.failed < self.times and self.failing(sql, params):
            self.failed += 1
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


def writes(sql: str, params: Any) -> bool:
    return sql.lstrip().split(None, 1)[0].upper() in ("INSERT", "UPDATE", "DELETE", "COMMIT")


def full_disk(app: Any) -> FullDisk:
    store = app.state.services.store
    disk = FullDisk(store._db)
    store._db = disk
    return disk


async def test_full_disk_at_intake_is_503_with_retry_after_and_records_nothing(
    tmp_path: Path,
) -> None:
    async with held_app(tmp_path, RETRY_AFTER_S="11") as (app, client):
        disk = full_disk(app)
        disk.fill(writes)
        r = await submit(client, "full", URL)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "11"
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["type"].endswith("store-unavailable")
        assert "disk" in r.json()["detail"]
        disk.fill(lambda sql, params: False)
        # Nothing was recorded and no slot was taken: the redelivery is accepted.
        assert (await client.get("/v1/jobs/full")).status_code == 404
        assert (await submit(client, "full", URL)).status_code == 202


@contextlib.asynccontextmanager
async def simulated_job(tmp_path: Path) -> AsyncIterator[tuple[Any, httpx.AsyncClient, str]]:
    """The embedded app, a served repository and the simulator (slow enough to report)."""
    make_repo(tmp_path / "repos" / "demo.git", {**SOURCE, ".fondation-sim.json": STEPS})

    async def loopback(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    settings = {
        "ALLOWED_GIT_HOSTS": "127.0.0.1",
        "ALLOW_INSECURE_GIT": "1",
        "ALLOW_PRIVATE_NETWORKS": "1",
    }
    with GitHttpServer(tmp_path / "repos") as srv:
        async with embedded_app(tmp_path, loopback, **settings) as client:
            yield client.app_ref, client, srv.url_for("demo")  # type: ignore[attr-defined]


STEPS = '{"step_delay_s": 0.15}'


async def test_progress_writes_failing_do_not_fail_a_finished_run(tmp_path: Path) -> None:
    # Before: the progress sender died on the store error, and the finished run was
    # recorded failed/internal.
    async with simulated_job(tmp_path) as (app, client, url):
        disk = full_disk(app)
        disk.fill(lambda sql, params: writes(sql, params) and "seq = ?" in sql, times=4)
        assert (await submit(client, "progress", url)).status_code == 202
        job = await final_job(client, "progress")
    print(f"FIGURES full disk, progress: {disk.failed} writes failed; job {job['status']}")
    assert disk.failed == 4
    assert job["status"] == "completed", job
    assert job["docsCount"] == 7


async def test_final_report_is_retried_until_the_store_takes_it(tmp_path: Path) -> None:
    async with simulated_job(tmp_path) as (app, client, url):
        disk = full_disk(app)
        disk.fill(lambda sql, params: writes(sql, params) and "completed" in params, times=2)
        assert (await submit(client, "final", url)).status_code == 202
        job = await final_job(client, "final")
    assert disk.failed == 2
    assert job["status"] == "completed", job


async def test_docs_that_do_not_fit_fail_the_job_with_a_clear_message(tmp_path: Path) -> None:
    async with simulated_job(tmp_path) as (app, client, url):
        disk = full_disk(app)
        disk.fill(lambda sql, params: "INSERT INTO docs" in sql)
        assert (await submit(client, "docs", url)).status_code == 202
        job = await final_job(client, "docs")
    print(f"FIGURES full disk, docs: job {job['status']} {job['error']}")
    assert job["status"] == "failed"
    assert job["error"]["code"] == "internal" and job["error"]["retryable"] is True
    assert "out of space" in job["error"]["message"]
