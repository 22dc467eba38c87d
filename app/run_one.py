"""`fondation-worker run-one`: run exactly one `job.start`, then exit with a code saying how it
ended. The command of the Scaleway Serverless Jobs definition (overflow runs; docs/SCALING.md).

The launch carries the same signed message a webhook would: the body in `FONDATION_JOB_MESSAGE`
and the Standard Webhooks headers (`webhook-id`, `webhook-timestamp`, `webhook-signature`,
`content-type`) as a JSON object in `FONDATION_JOB_HEADERS`. It is opened by
`app.intake.open_message`, the webhook route's own check, against `WEBHOOK_SECRETS`, and then runs
through the same `JobManager` as a webhook job: claim → clone → CLI → docs → complete or fail,
progress and lease as usual, SIGTERM → `interrupted`.

What a run's environment may hold. Scaleway keeps a run's environment overrides readable
through its API and in the run history, so the overrides carry only the message: its one
credential, the callback token, dies with the attempt (a later claim or callback with it is
refused), and its signature reveals nothing about the key. `WEBHOOK_SECRETS` outlives every
attempt: it comes from a Secret Manager reference on the job definition (`python -m deploy
--job-secret-ref`), never from the overrides, and without it `run-one` refuses to start (exit 2).

Exit codes (`ExitCode`):
  0 completed      the job completed and was reported completed
  1 failed         the job failed and was reported failed (clone_failed, cli_failed, timeout...)
  2 config         the settings are unusable, or WEBHOOK_SECRETS is missing
  3 refused        no message, or it fails the webhook checks (signature, age, JSON, schema),
                   or it is not a job.start; nothing was claimed or reported
  4 dropped        the claim was refused, or the store said another attempt owns the job
  5 canceled       canceled on request, reported canceled
  6 interrupted    stopped by SIGTERM (e.g. the run was stopped), reported interrupted
  7 unreported     the end could not be reported (callbacks gave up, internal error); the
                   lease expires and the sweeper re-dispatches
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from app.adapters.store import JobReporter
from app.clock import Clock
from app.config import Settings
from app.domain import (
    CallbackAck,
    ClaimResult,
    Doc,
    Failure,
    FailureCode,
    JobSpec,
    PartialDocs,
    Progress,
)
from app.errors import LaunchError, WorkerError
from app.intake import open_message
from app.logs import Redactor
from app.main import build_runtime
from app.payload import JOB_START
from app.pipeline.partial import REFUSED_BATCH
from app.signing import Verifier
from app.urlpolicy import Resolver

log = logging.getLogger("fondation.run_one")

MESSAGE_ENV = "FONDATION_JOB_MESSAGE"
HEADERS_ENV = "FONDATION_JOB_HEADERS"
MAX_HEADERS_CHARS = 8192
IDLE_POLL_S = 60.0


class ExitCode(enum.IntEnum):
    COMPLETED = 0
    FAILED = 1
    CONFIG = 2
    REFUSED = 3
    DROPPED = 4
    CANCELED = 5
    INTERRUPTED = 6
    UNREPORTED = 7


@dataclass(frozen=True, slots=True)
class JobMessage:
    """A signed message as it reaches a run: raw body and lower-cased headers."""

    body: bytes = field(repr=False)
    headers: Mapping[str, str] = field(repr=False)


def message_from_env(env: Mapping[str, str]) -> JobMessage:
    """Read the message from `FONDATION_JOB_MESSAGE` and `FONDATION_JOB_HEADERS`."""
    body = env.get(MESSAGE_ENV)
    raw_headers = env.get(HEADERS_ENV)
    if not body or not raw_headers:
        raise LaunchError(f"{MESSAGE_ENV} and {HEADERS_ENV} must both be set")
    if len(raw_headers) > MAX_HEADERS_CHARS:
        raise LaunchError(f"{HEADERS_ENV} is over {MAX_HEADERS_CHARS} characters")
    try:
        doc = json.loads(raw_headers)
    except ValueError:
        raise LaunchError(f"{HEADERS_ENV} is not JSON") from None
    if not isinstance(doc, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in doc.items()
    ):
        raise LaunchError(f"{HEADERS_ENV} must be a JSON object of strings")
    return JobMessage(body=body.encode(), headers={k.lower(): v for k, v in doc.items()})


class WatchedReporter:
    """Passes every callback through and remembers what was reported, so the exit code says
    how the attempt ended without reaching into the job layer."""

    def __init__(self, inner: JobReporter) -> None:
        self.inner = inner
        self.claim_refused: str | None = None
        self.store_stop: str | None = None
        self.completed = False
        self.failure: Failure | None = None  # set once `fail` was accepted

    async def claim(self, spec: JobSpec) -> ClaimResult:
        result = await self.inner.claim(spec)
        if not result.ok:
            self.claim_refused = result.reason or "refused"
        return result

    async def progress(self, spec: JobSpec, update: Progress) -> CallbackAck:
        return self._ack(await self.inner.progress(spec, update))

    async def put_docs(
        self, spec: JobSpec, docs: Sequence[Doc], partial: PartialDocs | None = None
    ) -> CallbackAck:
        ack = await self.inner.put_docs(spec, docs, partial)
        if partial is not None and ack.reason in REFUSED_BATCH:
            return ack  # one partial batch refused: the attempt goes on (app.pipeline.partial)
        return self._ack(ack)

    async def complete(self, spec: JobSpec, docs_count: int, duration_ms: int) -> None:
        await self.inner.complete(spec, docs_count, duration_ms)
        self.completed = True

    async def fail(self, spec: JobSpec, failure: Failure) -> None:
        await self.inner.fail(spec, failure)
        self.failure = failure

    async def aclose(self) -> None:
        close = getattr(self.inner, "aclose", None)
        if close is not None:
            await close()

    def _ack(self, ack: CallbackAck) -> CallbackAck:
        if ack.stop and self.store_stop is None:
            self.store_stop = ack.reason or "stop"
        return ack

    def exit_code(self) -> ExitCode:
        if self.completed:
            return ExitCode.COMPLETED
        if self.failure is not None:
            if self.failure.code is FailureCode.CANCELED:
                return ExitCode.CANCELED
            if self.failure.code is FailureCode.INTERRUPTED:
                return ExitCode.INTERRUPTED
            return ExitCode.FAILED
        if self.claim_refused is not None or self.store_stop is not None:
            return ExitCode.DROPPED
        return ExitCode.UNREPORTED


def open_job_start(
    settings: Settings, message: JobMessage, now_s: float
) -> tuple[str, str, JobSpec]:
    """Verify and parse as the webhook route does; returns (webhook id, fingerprint, spec).
    Raises `WorkerError` (signature, media type, JSON, schema) or `LaunchError` (not a start)."""
    verifier = Verifier.from_secrets(settings.webhook_secrets, settings.webhook_tolerance_s)
    envelope = open_message(verifier, message.headers, message.body, now_s=now_s)
    if envelope.event_type != JOB_START or not isinstance(envelope.event, JobSpec):
        raise LaunchError(f"a run takes a {JOB_START}, not a {envelope.event_type}")
    return envelope.webhook_id, envelope.fingerprint, envelope.event


async def run_one(
    settings: Settings,
    message: JobMessage,
    *,
    environ: Mapping[str, str],
    clock: Clock,
    resolver: Resolver,
    redactor: Redactor,
    reporter: JobReporter | None = None,
    handle_signals: bool = True,
) -> ExitCode:
    """Run the message's attempt to its end; SIGTERM/SIGINT drain it (reported interrupted),
    a second signal stops it at once."""
    if not settings.webhook_secrets:
        log.error("WEBHOOK_SECRETS is required to verify the message")
        return ExitCode.CONFIG
    try:
        webhook_id, fingerprint, spec = open_job_start(settings, message, clock.now())
    except WorkerError as exc:
        log.error("message refused", extra={"reason": str(exc)})
        return ExitCode.REFUSED
    ctx = {"job_id": spec.job_id, "attempt": spec.attempt}
    watched: list[WatchedReporter] = []

    def wrap(inner: JobReporter) -> JobReporter:
        watched.append(WatchedReporter(inner))
        return watched[0]

    runtime = build_runtime(
        settings,
        # The message stays with this process: the CLI's allow-list withholds it anyway.
        environ={k: v for k, v in environ.items() if k not in (MESSAGE_ENV, HEADERS_ENV)},
        clock=clock,
        resolver=resolver,
        reporter=reporter,
        redactor=redactor,
        wrap_reporter=wrap,
    )
    watch, manager = watched[0], runtime.manager
    loop = asyncio.get_running_loop()
    drains: list[asyncio.Task[None]] = []

    def on_signal(sig: signal.Signals) -> None:
        # First signal: stop the CLI and report interrupted within the grace. Second: at once.
        grace_s = max(0.5, settings.shutdown_grace_s - 2.0) if not drains else 0.0
        log.info("signal received; stopping the job", extra={**ctx, "signal": sig.name})
        drains.append(loop.create_task(manager.drain(grace_s)))

    signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        # As the route does: the local store records the delivery (the embedded view of the job).
        if not runtime.store.record_start(webhook_id, fingerprint, spec).recorded:
            log.warning("this message was already run here", extra=ctx)
            return ExitCode.DROPPED
        manager.start(spec)
        while not await manager.wait_idle(IDLE_POLL_S):
            pass
        if drains:
            await asyncio.gather(*drains, return_exceptions=True)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await watch.aclose()
        runtime.store.close()
    code = watch.exit_code()
    log.info("run finished", extra={**ctx, "exit_code": int(code), "outcome": code.name.lower()})
    return code
