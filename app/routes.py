"""HTTP edge: the webhook receiver, the embedded job API, health and metrics (Starlette)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from app.adapters.sqlite_store import Delivery, JobView, SqliteJobStore
from app.clock import Clock
from app.config import Settings
from app.domain import CancelRequest, Doc, JobSpec, JobStatus
from app.errors import BadJsonError, MediaTypeError, PayloadError, SignatureError, StoreError
from app.intake import parse_message, verify_message
from app.jobs import JobManager, NoSlotError
from app.metrics import Metrics
from app.payload import JOB_START, fingerprint
from app.signing import Verifier
from app.urlpolicy import Resolver

log = logging.getLogger("fondation.webhooks")

BODY_READ_TIMEOUT_S = 10.0
SSE_KEEPALIVE_S = 15.0
PROBLEM_BASE = "urn:fondation:problem:"
# An event id: ASCII digits that fit SQLite's 64-bit integers (str.isdigit() also takes "²"
# and Arabic-Indic digits, and int() refuses more than 4,300 digits: both gave a 500).
_EVENT_ID = re.compile(r"[0-9]{1,18}")


class StreamCount:
    """Open event streams; each polls the store every second, so they are capped
    (`MAX_EVENT_STREAMS`)."""

    def __init__(self) -> None:
        self.open = 0


@dataclass(frozen=True)
class Services:
    """What the routes need, built once by `app.main.create_app`."""

    settings: Settings
    store: SqliteJobStore
    manager: JobManager
    verifier: Verifier
    metrics: Metrics
    clock: Clock
    resolver: Resolver
    streams: StreamCount = field(default_factory=StreamCount)


class Problem(Exception):
    """An RFC 9457 answer; raised inside a handler, rendered by `problem_response`."""

    def __init__(
        self, status: int, slug: str, title: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.headers = headers or {}


def problem_response(p: Problem) -> JSONResponse:
    body = {"type": PROBLEM_BASE + p.slug, "title": p.title, "status": p.status, "detail": p.detail}
    return JSONResponse(
        body, status_code=p.status, headers=p.headers, media_type="application/problem+json"
    )


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def _read_body(request: Request, limit: int) -> bytes:
    """Read at most `limit` bytes; never reads past it (413) and never waits forever (408)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Problem(400, "bad-request", "Bad Request", "invalid Content-Length")
        if int(declared) > limit:
            raise Problem(413, "too-large", "Payload Too Large", f"body over {limit} bytes")
    chunks: list[bytes] = []
    size = 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise Problem(413, "too-large", "Payload Too Large", f"body over {limit} bytes")
            chunks.append(chunk)

    try:
        # asyncio.timeout, not wait_for: no extra task per request on the hot path.
        async with asyncio.timeout(BODY_READ_TIMEOUT_S):
            await read()
    except TimeoutError:
        raise Problem(408, "timeout", "Request Timeout", "the body was not sent in time") from None
    except ClientDisconnect:
        raise Problem(400, "bad-request", "Bad Request", "client disconnected") from None
    return b"".join(chunks)


def _duplicate(services: Services, delivery: Delivery, fingerprint: str) -> JSONResponse:
    if delivery.fingerprint != fingerprint:
        raise Problem(
            422,
            "idempotency-conflict",
            "Unprocessable Content",
            "this webhook-id was already used with a different body",
        )
    status = services.store.job_status(delivery.job_id, delivery.attempt) or "accepted"
    return JSONResponse(
        {
            "jobId": delivery.job_id,
            "attempt": delivery.attempt,
            "status": status,
            "duplicate": True,
        },
        status_code=200,
    )


def _busy(services: Services) -> Problem:
    retry = {"Retry-After": str(services.settings.retry_after_s)}
    if services.manager.draining:
        return Problem(503, "draining", "Service Unavailable", "the worker is shutting down", retry)
    return Problem(503, "no-slot", "Service Unavailable", "no free job slot", retry)


def _store_unavailable(services: Services, exc: StoreError) -> Problem:
    log.error("job store failed", extra={"error": str(exc)})
    retry = {"Retry-After": str(services.settings.retry_after_s)}
    return Problem(503, "store-unavailable", "Service Unavailable", str(exc), retry)


async def _handle_webhook(request: Request, services: Services) -> tuple[str, str, Response]:
    """Returns (event type, outcome, response)."""
    body = await _read_body(request, services.settings.max_body_bytes)
    try:
        webhook_id = verify_message(
            services.verifier, request.headers, body, now_s=services.clock.now()
        )
    except SignatureError as exc:
        raise Problem(401, "invalid-signature", "Unauthorized", exc.reason) from None
    except MediaTypeError as exc:
        raise Problem(415, "unsupported-media-type", "Unsupported Media Type", str(exc)) from None
    store, manager = services.store, services.manager
    # A redelivery is answered before the body is parsed: a body with the recorded
    # fingerprint was valid when it was recorded; any other body is a conflict.
    existing = store.lookup_delivery(webhook_id)
    if existing is not None:
        return existing.type, "duplicate", _duplicate(services, existing, fingerprint(body))
    try:
        envelope = parse_message(webhook_id, body)
    except BadJsonError as exc:
        raise Problem(400, "bad-json", "Bad Request", str(exc)) from None
    except PayloadError as exc:
        raise Problem(422, "invalid-payload", "Unprocessable Content", str(exc)) from None

    event = envelope.event
    if isinstance(event, CancelRequest):
        job = store.get_job(event.job_id, event.attempt)
        if job is None:
            raise Problem(404, "unknown-job", "Not Found", "no such job attempt on this worker")
        recorded = store.record_cancel(webhook_id, envelope.fingerprint, event)
        if not recorded.recorded and recorded.existing is not None:
            return (
                "job.cancel",
                "duplicate",
                _duplicate(services, recorded.existing, envelope.fingerprint),
            )
        stopping = manager.cancel(event.job_id, event.attempt)
        status = "canceling" if stopping else str(job.status)
        body_out = {"jobId": event.job_id, "attempt": event.attempt, "status": status}
        return "job.cancel", "accepted", JSONResponse(body_out, status_code=202)

    assert isinstance(event, JobSpec) and envelope.event_type == JOB_START
    try:
        await manager.policy.check(event.repository.url, services.resolver)
    except PayloadError as exc:
        raise Problem(422, "repository-not-allowed", "Unprocessable Content", str(exc)) from None
    # From here to the 202 there is no await: dedupe, slot and record are one atomic step.
    existing = store.lookup_delivery(webhook_id)
    if existing is not None:
        return JOB_START, "duplicate", _duplicate(services, existing, envelope.fingerprint)
    if not manager.has_free_slot():
        raise _busy(services)
    recorded = store.record_start(webhook_id, envelope.fingerprint, event)
    if not recorded.recorded:
        assert recorded.existing is not None
        return JOB_START, "duplicate", _duplicate(services, recorded.existing, envelope.fingerprint)
    try:
        manager.start(event)
    except NoSlotError:  # pragma: no cover - checked just above without an await
        raise _busy(services) from None
    body_out = {"jobId": event.job_id, "attempt": event.attempt, "status": "accepted"}
    return JOB_START, "accepted", JSONResponse(body_out, status_code=202)


async def webhooks(request: Request) -> Response:
    services = _services(request)
    started = time.perf_counter()
    event_type, outcome = "unknown", "error"
    try:
        try:
            event_type, outcome, response = await _handle_webhook(request, services)
        except StoreError as exc:
            # Nothing was recorded and no slot taken: the sender may deliver again later.
            raise _store_unavailable(services, exc) from None
    except Problem as p:
        outcome = p.slug
        response = problem_response(p)
    elapsed = time.perf_counter() - started
    services.metrics.webhooks.labels(type=event_type, outcome=outcome).inc()
    services.metrics.ack_seconds.labels(outcome=outcome).observe(elapsed)
    # Redeliveries are counted by the metric above; one INFO line per delivery id is enough
    # (measured: the log line was the largest cost of the duplicate path after SQLite).
    log.log(
        logging.DEBUG if outcome == "duplicate" else logging.INFO,
        "webhook",
        extra={
            "webhook_id": request.headers.get("webhook-id", "")[:256],
            "type": event_type,
            "outcome": outcome,
            "http_status": response.status_code,
            "ack_ms": round(elapsed * 1000, 3),
        },
    )
    return response


# -- embedded job API ----------------------------------------------------------------------


def _embedded_only(services: Services) -> None:
    if not services.settings.embedded:
        raise Problem(404, "not-found", "Not Found", "the job API serves the embedded store only")


Handler = Callable[[Request], Awaitable[Response]]


def _guard(handler: Handler) -> Handler:
    """Render a `Problem` raised by a handler as its RFC 9457 response (a failing store as
    503)."""

    async def wrapped(request: Request) -> Response:
        try:
            try:
                return await handler(request)
            except StoreError as exc:
                raise _store_unavailable(_services(request), exc) from None
        except Problem as p:
            return problem_response(p)

    return wrapped


@_guard
async def list_jobs(request: Request) -> Response:
    services = _services(request)
    _embedded_only(services)
    status_raw = request.query_params.get("status")
    try:
        status = JobStatus(status_raw) if status_raw else None
        limit = min(500, max(1, int(request.query_params.get("limit", "50"))))
    except ValueError:
        raise Problem(400, "bad-request", "Bad Request", "invalid status or limit") from None
    jobs = services.store.list_jobs(limit=limit, status=status)
    return JSONResponse({"jobs": [j.to_json() for j in jobs]})


def _job_or_404(services: Services, job_id: str) -> JobView:
    job = services.store.get_job(job_id)
    if job is None:
        raise Problem(404, "unknown-job", "Not Found", f"no job {job_id!r}")
    return job


@_guard
async def get_job(request: Request) -> Response:
    services = _services(request)
    _embedded_only(services)
    job = _job_or_404(services, request.path_params["job_id"])
    docs, partial = _docs_of(services, job)
    out = job.to_json()
    out["partialDocs"] = partial
    out["docs"] = [
        {"slug": d.slug, "title": d.title, "kind": str(d.kind), "chapterIndex": d.chapter_index}
        | ({"path": d.path} if d.path is not None else {})
        for d in docs
    ]
    return JSONResponse(out)


def _docs_of(services: Services, job: JobView) -> tuple[list[Doc], bool]:
    """The job's docs: the final set once uploaded, else the partial docs its attempts have
    uploaded so far (True)."""
    docs = services.store.list_docs(job.job_id, job.attempt)
    if docs or job.status is JobStatus.COMPLETED:
        return docs, False
    return services.store.list_partial_docs(job.job_id), True


@_guard
async def get_docs(request: Request) -> Response:
    services = _services(request)
    _embedded_only(services)
    job = _job_or_404(services, request.path_params["job_id"])
    docs, partial = _docs_of(services, job)
    return JSONResponse(
        {"jobId": job.job_id, "partial": partial, "docs": [d.to_json() for d in docs]}
    )


@_guard
async def job_events(request: Request) -> Response:
    """Server-sent events of one job's changes, from `Last-Event-ID` (or `?after=`) on;
    the stream ends after the job's final status."""
    services = _services(request)
    _embedded_only(services)
    job = _job_or_404(services, request.path_params["job_id"])
    cursor_raw = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
    if not _EVENT_ID.fullmatch(cursor_raw):
        raise Problem(400, "bad-request", "Bad Request", "invalid Last-Event-ID")
    if services.streams.open >= services.settings.max_event_streams:
        raise Problem(
            503,
            "too-many-streams",
            "Service Unavailable",
            "too many open event streams",
            {"Retry-After": str(services.settings.retry_after_s)},
        )
    # Counted from here to the end of the response, whatever ends it (see _CountedStream).
    services.streams.open += 1
    return _CountedStream(
        services.streams,
        _event_stream(services, job.job_id, int(cursor_raw)),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


class _CountedStream(StreamingResponse):
    """A streaming response that gives its place in `StreamCount` back when it ends: after
    the last event, on a client disconnect, or when the server shuts down."""

    def __init__(
        self,
        count: StreamCount,
        content: AsyncIterator[bytes],
        *,
        media_type: str,
        headers: dict[str, str],
    ) -> None:
        super().__init__(content, media_type=media_type, headers=headers)
        self._count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._count.open -= 1


async def _event_stream(services: Services, job_id: str, cursor: int) -> AsyncIterator[bytes]:
    store = services.store
    idle_s = 0.0
    yield b"retry: 2000\n\n"
    while True:
        events = store.events_since(job_id, cursor)
        for ev in events:
            cursor = ev.id
            data = json.dumps(ev.to_json(), separators=(",", ":"))
            yield f"id: {ev.id}\nevent: {ev.type}\ndata: {data}\n\n".encode()
        job = store.get_job(job_id)
        if job is not None and job.status.is_final and not store.events_since(job_id, cursor, 1):
            return
        if services.manager.draining and not services.manager.is_running(job_id):
            return
        if events:
            idle_s = 0.0
            continue
        before = time.monotonic()
        await store.feed.wait(1.0)
        idle_s += time.monotonic() - before
        if idle_s >= SSE_KEEPALIVE_S:
            idle_s = 0.0
            yield b": keepalive\n\n"


# -- health and metrics ---------------------------------------------------------------------


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    manager = _services(request).manager
    body = {
        "status": "draining" if manager.draining else "ready",
        "running": manager.running_count,
        "freeSlot": manager.has_free_slot(),
    }
    return JSONResponse(body, status_code=503 if manager.draining else 200)


async def metrics(request: Request) -> Response:
    return Response(
        _services(request).metrics.render(),
        media_type="text/plain; version=0.0.4; charset=utf-8",
    )


routes = [
    Route("/v1/webhooks", webhooks, methods=["POST"]),
    Route("/v1/jobs", list_jobs, methods=["GET"]),
    Route("/v1/jobs/{job_id}", get_job, methods=["GET"]),
    Route("/v1/jobs/{job_id}/docs", get_docs, methods=["GET"]),
    Route("/v1/jobs/{job_id}/events", job_events, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
