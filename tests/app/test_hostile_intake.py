"""Hostile input at the edge and in a job (issue 11): DNS rebinding, a full store, the event
stream. The app runs in process (ASGI transport, lifespan on) on the embedded store; jobs
clone from real git servers on 127.0.0.0/8 and run the simulator as their CLI."""

from __future__ import annotations

import asyncio
import contextlib
import os
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
