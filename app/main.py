"""Wiring: build the services from settings, the Starlette app, and the uvicorn server whose
SIGTERM first drains the jobs while the server still answers (503), then exits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from types import FrameType

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.adapters.proctree import reap_forever
from app.adapters.sqlite_store import SqliteJobStore
from app.adapters.store import JobReporter
from app.board.auth import ApiGate
from app.board.routes import board_routes, build_board
from app.board.source import BoardSource
from app.clock import Clock, SystemClock
from app.config import Settings
from app.jobs import JobManager
from app.logs import Redactor
from app.metrics import Metrics, create_metrics
from app.routes import Problem, Services, problem_response, routes
from app.signing import Verifier
from app.telemetry import MetricsPusher
from app.urlpolicy import Resolver, system_resolver

log = logging.getLogger("fondation.main")
PRUNE_EVERY_S = 3600.0
HEAD_READ_TIMEOUT_S = 10.0
# Environment variables whose values are redacted wherever the worker writes text.
SECRET_ENV_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


def build_reporter(
    settings: Settings, store: SqliteJobStore, clock: Clock, metrics: Metrics
) -> JobReporter:
    """Convex when `CONVEX_URL` is set (mirrored into the local view), else the local store."""
    if settings.convex_url is None:
        return store
    from app.adapters.convex_store import ConvexJobStore, MirroredReporter

    convex = ConvexJobStore(settings, clock=clock, metrics=metrics)
    return MirroredReporter(primary=convex, mirror=store)


@dataclass(frozen=True)
class Runtime:
    """The job layer and the stores behind it, built once per process."""

    store: SqliteJobStore
    reporter: JobReporter
    manager: JobManager
    metrics: Metrics
    redactor: Redactor


def build_runtime(
    settings: Settings,
    *,
    environ: Mapping[str, str],
    clock: Clock,
    resolver: Resolver,
    reporter: JobReporter | None = None,
    redactor: Redactor | None = None,
    wrap_reporter: Callable[[JobReporter], JobReporter] | None = None,
) -> Runtime:
    """The store, reporter and `JobManager` shared by `serve` and `run-one`; `wrap_reporter`
    lets `run-one` watch the callbacks to learn how its attempt ended."""
    redactor = redactor or Redactor(settings.secret_values())
    for name, value in environ.items():  # e.g. ANTHROPIC_API_KEY, which the CLI may echo
        if any(marker in name.upper() for marker in SECRET_ENV_MARKERS):
            redactor.add(value)
    metrics = create_metrics()
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    store = SqliteJobStore(
        settings.db_path,
        clock=clock,
        worker_id=settings.worker_id,
        dedupe_ttl_s=settings.dedupe_ttl_s,
        retention_s=settings.job_retention_s,
    )
    reporter = reporter or build_reporter(settings, store, clock, metrics)
    if wrap_reporter is not None:
        reporter = wrap_reporter(reporter)
    manager = JobManager(
        settings=settings,
        reporter=reporter,
        clock=clock,
        metrics=metrics,
        environ=environ,
        resolver=resolver,
        redactor=redactor,
    )
    return Runtime(
        store=store, reporter=reporter, manager=manager, metrics=metrics, redactor=redactor
    )


def create_app(
    settings: Settings,
    *,
    environ: Mapping[str, str] | None = None,
    clock: Clock | None = None,
    resolver: Resolver | None = None,
    reporter: JobReporter | None = None,
    redactor: Redactor | None = None,
    board_source: BoardSource | None = None,
) -> Starlette:
    """The worker as an ASGI app; every dependency can be injected for tests."""
    clock = clock or SystemClock()
    environ = dict(os.environ if environ is None else environ)
    resolver = resolver or system_resolver
    runtime = build_runtime(
        settings,
        environ=environ,
        clock=clock,
        resolver=resolver,
        reporter=reporter,
        redactor=redactor,
    )
    store, reporter, manager, metrics = (
        runtime.store,
        runtime.reporter,
        runtime.manager,
        runtime.metrics,
    )
    board = build_board(settings, store=store, manager=manager, clock=clock, source=board_source)
    services = Services(
        settings=settings,
        store=store,
        manager=manager,
        verifier=Verifier.from_secrets(settings.webhook_secrets, settings.webhook_tolerance_s),
        metrics=metrics,
        clock=clock,
        resolver=resolver,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if settings.embedded:
            for job in store.interrupt_orphans():
                log.warning(
                    "job left unfinished by an earlier process marked interrupted",
                    extra={"job_id": job.job_id, "attempt": job.attempt},
                )
        pruner = asyncio.create_task(_prune_forever(store))
        board.start()
        reaper = asyncio.create_task(reap_forever())  # orphans reparented to this subreaper
        pusher: asyncio.Task[None] | None = None
        if settings.cockpit_metrics_url and settings.cockpit_token:
            pusher = asyncio.create_task(
                MetricsPusher(
                    metrics.registry,
                    url=settings.cockpit_metrics_url,
                    token=settings.cockpit_token,
                    instance=settings.worker_id,
                    interval_s=settings.metrics_push_interval_s,
                    clock=clock,
                ).run()
            )
        log.info(
            "worker ready",
            extra={
                "worker_id": settings.worker_id,
                "mode": "embedded" if settings.embedded else "convex",
                "slots": settings.max_concurrent_jobs,
            },
        )
        try:
            yield
        finally:
            pruner.cancel()
            await board.stop()
            reaper.cancel()
            if not manager.draining or manager.running_count:
                await manager.drain(settings.shutdown_grace_s)
            if pusher is not None:  # after the drain, so the final job outcomes are pushed
                pusher.cancel()
                await asyncio.gather(pusher, return_exceptions=True)
            close = getattr(reporter, "aclose", None)
            if close is not None:
                await close()
            store.close()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return problem_response(
            Problem(exc.status_code, f"http-{exc.status_code}", str(exc.detail), str(exc.detail))
        )

    async def crash(request: Request, exc: Exception) -> Response:
        log.error("unhandled error", exc_info=exc)
        return problem_response(
            Problem(500, "internal", "Internal Server Error", "the worker hit an internal error")
        )

    app = Starlette(
        routes=[*routes, *board_routes()],
        middleware=[Middleware(ApiGate, access=board.access)],
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error, Exception: crash},
    )
    app.state.services = services
    app.state.board = board
    return app


async def _prune_forever(store: SqliteJobStore) -> None:
    while True:
        try:
            store.prune()
        except Exception:  # a prune failure must never take the worker down
            log.exception("pruning old deliveries and jobs failed")
        await asyncio.sleep(PRUNE_EVERY_S)


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a limit on the request head: a connection that sends no
    complete request line and headers within `HEAD_READ_TIMEOUT_S` of opening (or of its last
    response) is closed. Without it a client dribbling header lines, or sending nothing, held
    its connection forever (slow-loris on the headers; the body has its own 10 s limit)."""

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(HEAD_READ_TIMEOUT_S, self._head_timeout)

    def _head_timeout(self) -> None:
        self._head_timer = None
        in_flight = self.cycle is not None and not self.cycle.response_complete
        if not in_flight and not self.transport.is_closing():
            self.transport.close()


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM/SIGINT: stop taking jobs (webhooks get 503), stop the CLIs and
    report them interrupted, then let uvicorn shut down. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, app: Starlette, grace_s: float) -> None:
        super().__init__(config)
        self._app = app
        self._grace_s = grace_s
        self._drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_task is not None:
            super().handle_exit(sig, frame)
            return
        log.info("signal received; draining", extra={"signal": signal.Signals(sig).name})
        self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        manager: JobManager = self._app.state.services.manager
        try:
            # Keep a margin of the grace for uvicorn's own shutdown and the process exit.
            await manager.drain(max(0.5, self._grace_s - 2.0))
        finally:
            self.should_exit = True


def serve(settings: Settings, environ: Mapping[str, str], redactor: Redactor | None = None) -> None:
    """Run the worker until SIGTERM, exiting within `SHUTDOWN_GRACE_S`. Pass the log
    formatter's `redactor` so that per-job tokens are scrubbed from log lines too."""
    app = create_app(settings, environ=environ, redactor=redactor)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=2,
        lifespan="on",
        http=HeadTimeoutProtocol,
    )
    DrainingServer(config, app, settings.shutdown_grace_s).run()
