"""HTTP edge of the board: login, pages, actions and the live stream (Starlette + Jinja2).

Board logic lives in `model`, `source` and `live`; this module only checks access, calls the
source and renders. Every page is server-rendered; `static/board.js` swaps the sections the
live stream sends and fills the CSRF fields.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import (
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from app.adapters.sqlite_board import BoardStore
from app.adapters.sqlite_store import SqliteJobStore
from app.board import model
from app.board.auth import COOKIE_NAME, BoardAccess, Session, board_enabled, build_access
from app.board.embedded import EmbeddedSource, PendingDispatcher
from app.board.live import LiveHub
from app.board.source import BoardSource
from app.clock import Clock
from app.config import Settings
from app.errors import ConfigError, StoreError, WorkerError
from app.jobs import JobManager

log = logging.getLogger("fondation.board")
HERE = Path(__file__).parent
FLASH_COOKIE = "fw_board_flash"
SSE_KEEPALIVE_S = 15.0
MAX_STREAMS = 64
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
BOARD_SECTIONS = ("counts", "pending", "running", "recent")
JOB_SECTIONS = ("summary", "attempts", "steps", "logs", "docs")


def _ago(then: float, now: float) -> str:
    return model.format_duration(max(0.0, now - then)) + " ago"


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _lease(until: float | None, now: float) -> str:
    if until is None:
        return "—"
    left = until - now
    return "expired" if left <= 0 else model.format_duration(left)


def _templates() -> Jinja2Templates:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["dur"] = model.format_duration
    env.filters["utc"] = _utc
    env.globals.update(ago=_ago, lease=_lease, markdown=model.render_markdown)
    return Jinja2Templates(env=env)


@dataclass
class Board:
    """The board's parts, built once per app by `build_board`."""

    settings: Settings
    access: BoardAccess
    enabled: bool
    source: BoardSource | None = None
    hub: LiveHub | None = None
    dispatcher: PendingDispatcher | None = None
    templates: Jinja2Templates = field(default_factory=_templates)
    streams: int = 0
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        if self.dispatcher is not None:
            self._tasks.append(asyncio.create_task(self.dispatcher.run(), name="board-dispatch"))
        if self.hub is not None:
            self._tasks.append(asyncio.create_task(self.hub.run(), name="board-live"))

    async def stop(self) -> None:
        if self.hub is not None:
            self.hub.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        close = getattr(self.source, "aclose", None)
        if close is not None:
            await close()

    # -- rendering of live sections (shared by every open page) ------------------------

    def render_sections(
        self, names: tuple[str, ...], prefix: str, ctx: dict[str, Any]
    ) -> dict[str, Any]:
        env = self.templates.env
        sections = {
            f"{prefix}-{name}": env.get_template(f"_{prefix}_{name}.html").render(ctx)
            for name in names
        }
        data = ctx.get("snap") or ctx.get("detail")
        return {"version": getattr(data, "version", ""), "sections": sections}


def build_board(
    settings: Settings,
    *,
    store: SqliteJobStore,
    manager: JobManager,
    clock: Clock,
    source: BoardSource | None = None,
) -> Board:
    """The board for these settings; `enabled` is False without a board password. `source`
    replaces the Convex one (tests)."""
    access = build_access(settings, clock)
    enabled = board_enabled(settings)
    board = Board(settings=settings, access=access, enabled=enabled)
    if settings.embedded:
        board_store = BoardStore(store)
        board.dispatcher = PendingDispatcher(board_store, manager)
        board.source = EmbeddedSource(board_store, manager)
    elif source is not None:
        board.source = source
    elif enabled:
        if not settings.board_secret:
            raise ConfigError("BOARD_SECRET", "the board in Convex mode needs BOARD_SECRET")
        from app.board.convex import ConvexSource

        assert settings.convex_url is not None
        board.source = ConvexSource(settings.convex_url, settings.board_secret, clock=clock)
    if enabled and board.source is not None:
        source = board.source
        board.hub = LiveHub(
            wait_change=source.wait_change,
            probe=source.probe,
            stopping=lambda: manager.draining,
        )
    return board


# -- request helpers ---------------------------------------------------------------------


def _board(request: Request) -> Board:
    board: Board = request.app.state.board
    return board


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _secure(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


def _render(request: Request, name: str, ctx: dict[str, Any], status: int = 200) -> Response:
    board = _board(request)
    response = board.templates.TemplateResponse(request, name, ctx, status_code=status)
    return _secure(response)


def _redirect(url: str) -> Response:
    return _secure(RedirectResponse(url, status_code=303))


Page = Callable[[Request, Board, Session], Awaitable[Response]]


def _page(handler: Page) -> Callable[[Request], Awaitable[Response]]:
    """The board must be on and the session valid; else 404, or the login page."""

    async def wrapped(request: Request) -> Response:
        board = _board(request)
        if not board.enabled:
            return PlainTextResponse("Not Found", status_code=404)
        session = board.access.session_of(request.cookies)
        if session is None:
            if request.method == "GET" and "text/event-stream" not in request.headers.get(
                "accept", ""
            ):
                return _redirect("/board/login?next=" + quote(request.url.path))
            return _secure(PlainTextResponse("login required", status_code=401))
        try:
            return await handler(request, board, session)
        except StoreError as exc:
            # The embedded store failing (a full disk, mostly): as the webhook answers it.
            retry = {"Retry-After": str(board.settings.retry_after_s)}
            body = f"store-unavailable: {exc}"
            return _secure(PlainTextResponse(body, status_code=503, headers=retry))
        except WorkerError as exc:
            return _secure(PlainTextResponse(f"board source error: {exc}", status_code=502))

    return wrapped


def _base_ctx(board: Board, session: Session, **extra: Any) -> dict[str, Any]:
    return {"csrf": board.access.sessions.csrf_token(session), **extra}


def _take_flash(request: Request) -> str | None:
    raw = request.cookies.get(FLASH_COOKIE)
    return raw[:300] if raw else None


def _with_flash(response: Response, request: Request) -> Response:
    if FLASH_COOKIE in request.cookies:
        response.delete_cookie(FLASH_COOKIE, path="/board")
    return response


# -- login -----------------------------------------------------------------------------


async def login_form(request: Request) -> Response:
    board = _board(request)
    if not board.enabled:
        return PlainTextResponse("Not Found", status_code=404)
    return _render(request, "login.html", {"error": None, "next": _safe_next(request)})


def _safe_next(request: Request, raw: str | None = None) -> str:
    target = raw if raw is not None else request.query_params.get("next", "/board")
    # Only a path on the board itself: never another host (open redirect).
    if not target.startswith("/board") or target.startswith("//") or "\\" in target:
        return "/board"
    return target


async def login(request: Request) -> Response:
    board = _board(request)
    if not board.enabled:
        return PlainTextResponse("Not Found", status_code=404)
    client = _client(request)
    wait_s = board.access.limiter.retry_after_s(client)
    if wait_s:
        ctx = {"error": f"Too many failed logins: try again in {wait_s} s.", "next": "/board"}
        response = _render(request, "login.html", ctx, status=429)
        response.headers["Retry-After"] = str(wait_s)
        return response
    form = await request.form(max_files=0, max_fields=4)
    password = str(form.get("password") or "")[:1024]
    target = _safe_next(request, str(form.get("next") or "/board"))
    if not board.access.password(password):
        board.access.limiter.failed(client)
        log.warning("board login refused", extra={"client": client})
        return _render(
            request, "login.html", {"error": "Wrong password.", "next": target}, status=401
        )
    board.access.limiter.succeeded(client)
    response = _redirect(target)
    response.set_cookie(
        COOKIE_NAME,
        board.access.sessions.new_cookie(),
        max_age=board.access.sessions.ttl_s,
        path="/",
        secure=board.access.secure_cookie,
        httponly=True,
        samesite="lax",
    )
    return response


async def _logout(request: Request, board: Board, session: Session) -> Response:
    form = await request.form(max_files=0, max_fields=4)
    if not board.access.sessions.check_csrf(session, str(form.get("csrf") or "")):
        return _secure(PlainTextResponse("invalid CSRF token", status_code=403))
    response = _redirect("/board/login")
    response.delete_cookie(COOKIE_NAME, path="/")
    return response


# -- pages -------------------------------------------------------------------------------


def _page_number(request: Request) -> int:
    raw = request.query_params.get("page", "1")
    return min(10_000, max(1, int(raw))) if raw.isdigit() else 1


async def _index(request: Request, board: Board, session: Session) -> Response:
    assert board.source is not None
    started = time.perf_counter()
    page = _page_number(request)
    snap = await board.source.snapshot(page)
    ctx = _base_ctx(board, session, snap=snap, flash=_take_flash(request), page=page)
    response = _with_flash(_render(request, "board.html", ctx), request)
    # Read + render time, for the operator's devtools and bench/board.py.
    elapsed_ms = (time.perf_counter() - started) * 1000
    response.headers["Server-Timing"] = f"board;dur={elapsed_ms:.3f}"
    return response


async def _job(request: Request, board: Board, session: Session) -> Response:
    assert board.source is not None
    detail = await board.source.job(request.path_params["job_id"])
    if detail is None:
        return _secure(PlainTextResponse("no such job", status_code=404))
    ctx = _base_ctx(board, session, detail=detail, flash=_take_flash(request))
    return _with_flash(_render(request, "job.html", ctx), request)


async def _doc(request: Request, board: Board, session: Session) -> Response:
    assert board.source is not None
    detail = await board.source.job(request.path_params["job_id"])
    slug = request.path_params["slug"]
    doc = None if detail is None else next((d for d in detail.docs if d.slug == slug), None)
    if detail is None or doc is None:
        return _secure(PlainTextResponse("no such doc", status_code=404))
    ctx = _base_ctx(board, session, detail=detail, doc=doc)
    return _render(request, "doc.html", ctx)


# -- actions -------------------------------------------------------------------------------


async def _action(request: Request, board: Board, session: Session) -> Response:
    assert board.source is not None
    form = await request.form(max_files=0, max_fields=8)
    if not board.access.sessions.check_csrf(session, str(form.get("csrf") or "")):
        log.warning("board action without a valid CSRF token", extra={"client": _client(request)})
        return _secure(PlainTextResponse("invalid CSRF token", status_code=403))
    job_id = request.path_params["job_id"]
    action = request.path_params["action"]
    if action == "retry":
        result = await board.source.retry(job_id)
    elif action == "cancel":
        result = await board.source.cancel(job_id)
    elif action == "priority":
        priority = model.parse_priority(str(form.get("priority") or ""))
        if priority is None:
            result = model.ActionResult(
                False,
                f"priority must be an integer from {model.MIN_PRIORITY} to {model.MAX_PRIORITY}",
            )
        else:
            result = await board.source.set_priority(job_id, priority)
    else:
        return _secure(PlainTextResponse("unknown action", status_code=404))
    log.info(
        "board action",
        extra={"job_id": job_id, "action": action, "ok": result.ok, "client": _client(request)},
    )
    response = _redirect(_safe_next(request, str(form.get("back") or "/board")))
    flash = ("" if result.ok else "refused: ") + f"{action} {job_id}: {result.message}"
    response.set_cookie(
        FLASH_COOKIE,
        flash[:300],
        path="/board",
        httponly=True,
        samesite="lax",
        secure=board.access.secure_cookie,
    )
    return response


# -- live stream -------------------------------------------------------------------------


async def _events(request: Request, board: Board, session: Session) -> Response:
    assert board.hub is not None and board.source is not None
    source = board.source
    if board.streams >= MAX_STREAMS:
        return _secure(PlainTextResponse("too many open boards", status_code=503))
    job_id = request.query_params.get("job")
    if job_id:
        key = f"job:{job_id}"

        async def read_job() -> Any:
            return await source.job(job_id)

        def render_job(detail: Any) -> dict[str, Any]:
            if detail is None:
                return {"version": "", "sections": {}}
            return board.render_sections(JOB_SECTIONS, "job", {"detail": detail, "csrf": ""})

        queue = board.hub.subscribe(key, read_job, render_job)
    else:
        page = _page_number(request)
        key = f"board:{page}"

        async def read_board() -> Any:
            return await source.snapshot(page)

        def render_board(snap: Any) -> dict[str, Any]:
            return board.render_sections(
                BOARD_SECTIONS, "board", {"snap": snap, "csrf": "", "page": page}
            )

        queue = board.hub.subscribe(key, read_board, render_board)
    board.streams += 1
    hub = board.hub

    async def stream() -> AsyncIterator[bytes]:
        try:
            yield b"retry: 1000\n\n"
            while True:
                try:
                    # Not `asyncio.wait_for`, which on Python 3.11 can swallow the cancel of
                    # a closed stream (and lose an update) when both come at once.
                    async with asyncio.timeout(SSE_KEEPALIVE_S):
                        payload = await queue.get()
                except TimeoutError:
                    yield b": keepalive\n\n"
                    continue
                if payload is None:
                    return
                data = json.dumps(payload, separators=(",", ":"))
                yield f"event: update\ndata: {data}\n\n".encode()
        finally:
            board.streams -= 1
            hub.unsubscribe(key, queue)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


async def _favicon(request: Request) -> Response:
    return Response(status_code=204)


def board_routes() -> list[BaseRoute]:
    return [
        Route("/board", _page(_index), methods=["GET"]),
        Route("/board/login", login_form, methods=["GET"]),
        Route("/board/login", login, methods=["POST"]),
        Route("/board/logout", _page(_logout), methods=["POST"]),
        Route("/board/events", _page(_events), methods=["GET"]),
        Route("/board/jobs/{job_id}", _page(_job), methods=["GET"]),
        Route("/board/jobs/{job_id}/docs/{slug}", _page(_doc), methods=["GET"]),
        Route("/board/jobs/{job_id}/{action}", _page(_action), methods=["POST"]),
        Mount("/board/static", StaticFiles(directory=HERE / "static"), name="board-static"),
    ]


__all__ = ["Board", "board_routes", "build_board"]
