"""The worker app in-process, through httpx's ASGI transport, with its lifespan running."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from starlette.applications import Starlette

from app.config import load_settings
from app.main import create_app
from tests.support.fakes import HeldReporter, public_resolver
from tests.support.signing import SECRET


@contextlib.asynccontextmanager
async def held_app(
    tmp_path: Path, **env: str
) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient, HeldReporter]]:
    """The app with a reporter that holds every claim, so accepted jobs stay running until the
    block ends (then the reporter lets them go and the lifespan drains them). `env` adds to or
    overrides the settings (WORKER_ID, HOST, limits...)."""
    settings = load_settings(
        {
            "WEBHOOK_SECRETS": SECRET,
            "DATA_DIR": str(tmp_path / "data"),
            "WORK_DIR": str(tmp_path / "work"),
            "SHUTDOWN_GRACE_S": "2",
            **env,
        }
    )
    reporter = HeldReporter()
    app = create_app(settings, environ={}, resolver=public_resolver, reporter=reporter)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:
            try:
                yield app, client, reporter
            finally:
                reporter.release.set()
