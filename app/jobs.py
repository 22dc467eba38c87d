"""Running accepted jobs: slots, the per-job pipeline, cancel and drain.

The pipeline of one attempt: claim → clone → run the CLI (progress streamed) → collect docs →
put docs → complete; any failure ends in `fail` with a contract code. Nothing here knows about
HTTP; the routes call `JobManager` and the reporter talks to Convex or the embedded store.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from app.adapters import git, process
from app.adapters.store import JobReporter
from app.clock import Clock
from app.collect import collect_docs
from app.config import DEFAULT_CLI_ENV, DENIED_ENV_PREFIXES, Settings
from app.domain import Doc, Failure, FailureCode, JobSpec, JobStatus, Progress
from app.errors import CallbackError, JobFailure, UrlPolicyError, WorkerError
from app.isolation import CliSandbox
from app.logs import Redactor
from app.metrics import Metrics
from app.progress import ProgressTracker
from app.urlpolicy import Resolver, UrlPolicy

log = logging.getLogger("fondation.jobs")

# Retry policy per failure code: whether Convex should try another attempt.
RETRYABLE = {
    FailureCode.CLONE_FAILED: False,
    FailureCode.CLI_FAILED: True,  # the CLI calls a remote model; transient errors are common
    FailureCode.TIMEOUT: False,
    FailureCode.CANCELED: False,
    FailureCode.INTERRUPTED: True,
    FailureCode.OUTPUT_INVALID: False,
    FailureCode.INTERNAL: True,
}
MAX_PENDING_PROGRESS = 64


class StopReason(enum.StrEnum):
    CANCEL = "cancel"  # job.cancel webhook
    SHUTDOWN = "shutdown"  # SIGTERM: report interrupted so Convex re-dispatches at once
    SUPERSEDED = "superseded"  # the store says another attempt owns the job: drop silently


class NoSlotError(WorkerError):
    """No job slot is free, or the worker is draining."""

    def __init__(self, draining: bool) -> None:
        super().__init__("draining" if draining else "no free job slot")
        self.draining = draining


@dataclass(eq=False)
class _Running:
    spec: JobSpec
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    reason: StopReason | None = None
    task: asyncio.Task[None] | None = None

    def request_stop(self, reason: StopReason) -> None:
        if self.reason is None:
            self.reason = reason
        self.stop.set()


class _ProgressSender:
    """Sends progress reports in order without ever blocking the CLI's output reader.

    Reports queue up while a call is in flight (bounded: under a long outage the oldest
    non-step reports are dropped; each report carries the full state, so only log lines
    are lost) and go out one at a time."""

    def __init__(
        self,
        reporter: JobReporter,
        spec: JobSpec,
        on_stop: Callable[[str | None], None],
        metrics: Metrics,
    ) -> None:
        self._reporter = reporter
        self._spec = spec
        self._on_stop = on_stop
        self._metrics = metrics
        self._pending: deque[Progress] = deque()
        self._wake = asyncio.Event()
        self._closed = False
        self._task = asyncio.create_task(self._loop(), name=f"progress-{spec.key}")

    def push(self, update: Progress) -> None:
        if len(self._pending) >= MAX_PENDING_PROGRESS:
            self._pending.popleft()
        self._pending.append(update)
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                update = self._pending.popleft()
                try:
                    ack = await self._reporter.progress(self._spec, update)
                except CallbackError as exc:
                    log.warning(
                        "progress report failed",
                        extra={"job_id": self._spec.job_id, "error": str(exc)},
                    )
                    continue
                self._metrics.heartbeats.inc()
                if ack.stop:
                    self._on_stop(ack.reason)
            if self._closed:
                return

    async def close(self, timeout_s: float) -> None:
        """Send what is pending (bounded by `timeout_s`), then stop."""
        self._closed = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@dataclass(frozen=True)
class RunnerDeps:
    """What every attempt needs from the outside, injected once."""

    settings: Settings
    reporter: JobReporter
    clock: Clock
    metrics: Metrics
    environ: Mapping[str, str]
    resolver: Resolver
    redactor: Redactor
    policy: UrlPolicy
    sandbox: CliSandbox = field(default_factory=CliSandbox)

    @property
    def term_grace_s(self) -> float:
        """SIGTERM→SIGKILL grace for the CLI; leaves room in the shutdown grace for the
        final `fail` callback after the kill."""
        return max(0.5, min(10.0, self.settings.shutdown_grace_s * 0.4))


class _StepClock:
    """Times the CLI's steps: a metric and a log line per finished step."""

    def __init__(self, metrics: Metrics, ctx: Mapping[str, object], now: float) -> None:
        self._metrics = metrics
        self._ctx = ctx
        self._step = 0
        self._total = 0
        self._since = now

    def observe(self, step: int, total: int, message: str, now: float) -> None:
        if step == self._step:
            return
        self.finish(now)
        self._step, self._total, self._since = step, total, now
        log.info(
            "step started",
            extra={**self._ctx, "step": step, "total_steps": total, "step_message": message},
        )

    def finish(self, now: float) -> None:
        if not self._step:
            return
        duration_s = now - self._since
        self._metrics.step_duration_s.labels(step=f"cli_{self._step}").observe(duration_s)
        log.info(
            "step finished",
            extra={
                **self._ctx,
                "step": self._step,
                "total_steps": self._total,
                "duration_s": round(duration_s, 3),
            },
        )
        self._step = 0


class JobManager:
    """Owns the job slots and the background task of every running attempt."""

    def __init__(
        self,
        *,
        settings: Settings,
        reporter: JobReporter,
        clock: Clock,
        metrics: Metrics,
        environ: Mapping[str, str],
        resolver: Resolver,
        redactor: Redactor,
    ) -> None:
        self._settings = settings
        self._reporter = reporter
        self._metrics = metrics
        self._clock = clock
        self._redactor = redactor
        self.deps = RunnerDeps(
            settings=settings,
            reporter=reporter,
            clock=clock,
            metrics=metrics,
            environ=dict(environ),
            resolver=resolver,
            redactor=redactor,
            policy=UrlPolicy(
                allowed_hosts=settings.allowed_git_hosts,
                allow_insecure=settings.allow_insecure_git,
                allow_private=settings.allow_private_networks,
            ),
            sandbox=CliSandbox.from_settings(settings),
        )
        self._running: dict[str, _Running] = {}
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        metrics.job_slots.set(settings.max_concurrent_jobs)

    @property
    def policy(self) -> UrlPolicy:
        return self.deps.policy

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def running_count(self) -> int:
        return len(self._running)

    def has_free_slot(self) -> bool:
        return not self._draining and len(self._running) < self._settings.max_concurrent_jobs

    def is_running(self, job_id: str, attempt: int | None = None) -> bool:
        return any(
            r.spec.job_id == job_id and (attempt is None or r.spec.attempt == attempt)
            for r in self._running.values()
        )

    def start(self, spec: JobSpec) -> None:
        """Take a slot and run the attempt in the background. Synchronous on purpose: the
        check and the reservation happen without an await in between."""
        if not self.has_free_slot():
            raise NoSlotError(self._draining)
        run = _Running(spec=spec)
        self._running[spec.key] = run
        self._idle.clear()
        self._metrics.jobs_running.set(len(self._running))
        self._metrics.jobs_started.inc()
        run.task = asyncio.create_task(self._run(run), name=f"job-{spec.key}")

    def cancel(self, job_id: str, attempt: int) -> bool:
        """Stop a running attempt (its whole process group); False when it is not running."""
        run = self._running.get(f"{job_id}:{attempt}")
        if run is None:
            return False
        run.request_stop(StopReason.CANCEL)
        return True

    async def drain(self, grace_s: float) -> None:
        """Stop taking jobs, stop every CLI and report them interrupted, within `grace_s`."""
        self._draining = True
        self._metrics.draining.set(1)
        for run in list(self._running.values()):
            run.request_stop(StopReason.SHUTDOWN)
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
        except TimeoutError:
            log.error("jobs still running after the grace period; cancelling them")
            tasks = [r.task for r in self._running.values() if r.task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def wait_idle(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    # -- one attempt -------------------------------------------------------------------

    async def _run(self, run: _Running) -> None:
        spec = run.spec
        ctx = {"job_id": spec.job_id, "attempt": spec.attempt}
        started = self._clock.monotonic()
        workspace = self._settings.work_dir / f"{spec.job_id}-{spec.attempt}-{secrets.token_hex(4)}"
        self._redactor.add(spec.callback_token)
        clone_token: str | None = None
        status = "failed"
        code = ""
        try:
            claim = await self._reporter.claim(spec)
            if not claim.ok:
                log.info("claim refused; dropping the job", extra={**ctx, "reason": claim.reason})
                status, code = "dropped", str(claim.reason)
                return
            clone_token = claim.clone_token
            self._redactor.add(clone_token)
            log.info("job claimed", extra=ctx)
            result = await _Pipeline(self.deps, run, workspace, clone_token).execute()
            status = "completed"
            if result is not None:
                code = str(result.code)
                status = "canceled" if result.code is FailureCode.CANCELED else "failed"
        except asyncio.CancelledError:
            status, code = "failed", "interrupted"
            raise
        except CallbackError as exc:
            # The store refused or stayed unreachable until the lease ran out: the sweeper
            # upstream re-dispatches; nothing more this process can do.
            status, code = "failed", "callback"
            log.error("giving up on callbacks", extra={**ctx, "error": str(exc)})
        except Exception:
            status, code = "failed", "internal"
            log.exception("job crashed", extra=ctx)
            with contextlib.suppress(WorkerError):
                await self._reporter.fail(
                    spec, Failure(FailureCode.INTERNAL, "internal worker error", retryable=True)
                )
        finally:
            await asyncio.to_thread(git.remove_tree, workspace)
            duration_s = self._clock.monotonic() - started
            self._metrics.jobs_finished.labels(status=status, code=code).inc()
            self._metrics.job_duration_s.labels(status=status).observe(duration_s)
            self._running.pop(spec.key, None)
            self._metrics.jobs_running.set(len(self._running))
            if not self._running:
                self._idle.set()
            log.info(
                "job finished",
                extra={**ctx, "status": status, "code": code, "duration_s": round(duration_s, 3)},
            )
            self._redactor.discard(spec.callback_token)
            self._redactor.discard(clone_token)


class _Pipeline:
    """The steps of one claimed attempt; returns None on success or the reported failure."""

    def __init__(
        self, deps: RunnerDeps, run: _Running, workspace: Path, clone_token: str | None
    ) -> None:
        self.d = deps
        self.run = run
        self.spec = run.spec
        self.workspace = workspace
        self.clone_token = clone_token
        s = deps.settings
        self.tracker = ProgressTracker(s.progress_min_interval_s, s.heartbeat_s)
        self.sender = _ProgressSender(deps.reporter, self.spec, self._superseded, deps.metrics)
        self.ctx = {"job_id": self.spec.job_id, "attempt": self.spec.attempt}
        self.started = deps.clock.monotonic()

    def _superseded(self, reason: str | None) -> None:
        log.warning("store asked to stop the job", extra={**self.ctx, "reason": reason})
        self.run.request_stop(StopReason.CANCEL if reason == "canceled" else StopReason.SUPERSEDED)

    def _now(self) -> float:
        return self.d.clock.monotonic()

    def _phase(self, status: JobStatus, message: str) -> None:
        self.sender.push(self.tracker.set_phase(status, message, self._now()))
        log.info(message, extra={**self.ctx, "status": str(status)})

    async def _ticker(self) -> None:
        interval = min(1.0, self.tracker.min_interval_s)
        while True:
            await asyncio.sleep(interval)
            update = self.tracker.tick(self._now())
            if update is not None:
                self.sender.push(update)

    async def _until_stopped(self, work: Awaitable[object]) -> None:
        """Await `work`, unless a stop is requested first (the work is then left to its own
        cleanup: clone threads are bounded by their timeout)."""
        task = asyncio.ensure_future(work)
        stopper = asyncio.create_task(self.run.stop.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if task.done():
            task.result()
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    async def execute(self) -> Failure | None:
        """Run the attempt and report its end; returns None on success or the failure."""
        ticker = asyncio.create_task(self._ticker())
        failure: Failure | None = None
        docs: list[Doc] | None = None
        try:
            docs = await self._steps()
        except JobFailure as exc:
            code = FailureCode(exc.code)
            failure = Failure(code, self.d.redactor.scrub(exc.message)[:2000], RETRYABLE[code])
        finally:
            ticker.cancel()
        flush_s = min(5.0, self.d.settings.shutdown_grace_s / 4)
        if self.run.reason is not None:
            # A requested stop decides the outcome, whatever the interrupted step raised.
            failure = self._stop_failure()
            if self.run.reason is StopReason.SUPERSEDED:
                await self.sender.close(1.0)
                return failure  # another attempt owns the job: report nothing more
        await self.sender.close(flush_s)
        if failure is None and docs is not None:
            duration_ms = int((self._now() - self.started) * 1000)
            await self.d.reporter.complete(self.spec, len(docs), duration_ms)
            log.info(
                "job completed", extra={**self.ctx, "docs": len(docs), "duration_ms": duration_ms}
            )
            return None
        if failure is None:  # pragma: no cover - _steps returns docs or raises or stops
            failure = Failure(FailureCode.INTERNAL, "the job ended without a result", True)
        log.warning(
            "job failed", extra={**self.ctx, "code": str(failure.code), "error": failure.message}
        )
        await self.d.reporter.fail(self.spec, failure)
        return failure

    def _stop_failure(self) -> Failure:
        reason = self.run.reason
        if reason is StopReason.CANCEL:
            return Failure(FailureCode.CANCELED, "canceled on request", False)
        if reason is StopReason.SHUTDOWN:
            return Failure(FailureCode.INTERRUPTED, "the worker is shutting down", True)
        return Failure(FailureCode.INTERRUPTED, "superseded by another attempt", True)

    async def _steps(self) -> list[Doc] | None:
        """Clone, run, collect and upload; None when a stop was requested on the way."""
        s = self.d.settings
        repo_dir = self.workspace / "repo"
        out_dir = self.workspace / "out"
        self.workspace.mkdir(parents=True, exist_ok=True)
        out_dir.mkdir()

        # Clone. The URL is checked again: DNS may have changed since the webhook.
        self._phase(JobStatus.CLONING, "cloning the repository")
        t0 = self._now()
        try:
            await self.d.policy.check(self.spec.repository.url, self.d.resolver)
        except UrlPolicyError as exc:
            raise JobFailure(FailureCode.CLONE_FAILED, exc.reason) from None
        await self._until_stopped(
            self.d.sandbox.clone(
                lambda: git.clone(
                    self.spec.repository.url,
                    self.spec.repository.ref,
                    repo_dir,
                    token=self.clone_token,
                    timeout_s=s.clone_timeout_s,
                    max_bytes=s.clone_max_bytes,
                ),
                holds_token=bool(self.clone_token),
            )
        )
        if self.run.stop.is_set():
            return None
        self.d.metrics.step_duration_s.labels(step="clone").observe(self._now() - t0)

        # Run the CLI.
        self._phase(JobStatus.ANALYZING, "running the Fondation CLI")
        t0 = self._now()
        argv = process.build_argv(
            s.fondation_command, repo_dir=repo_dir, output_dir=out_dir, options=self.spec.options
        )
        env = process.build_env(
            self.d.environ,
            allow=(*DEFAULT_CLI_ENV, *s.cli_env_passthrough),
            deny_prefixes=DENIED_ENV_PREFIXES,
        )
        env = await asyncio.to_thread(
            self.d.sandbox.prepare, self.workspace, repo_dir, out_dir, env
        )
        step_clock = _StepClock(self.d.metrics, self.ctx, t0)

        def on_lines(lines: list[str]) -> None:
            # Called once per read with every line of it: per-line work stays in C.
            self.d.metrics.cli_output_lines.inc(len(lines))
            now = self._now()
            for update in self.tracker.feed_many(self.d.redactor.scrub_lines(lines), now):
                step, total = update.current_step, update.total_steps
                step_clock.observe(step, total, update.message, now)
                self.sender.push(update)

        async with self.d.sandbox.cli_slot():
            result = await process.run_cli(
                argv,
                env=env,
                cwd=self.workspace,
                timeout_s=s.job_timeout_s,
                term_grace_s=self.d.term_grace_s,
                on_lines=on_lines,
                stop=self.run.stop,
                tail_lines=s.log_tail_lines,
                run_as=self.d.sandbox.run_as,
            )
        step_clock.finish(self._now())
        self.d.metrics.step_duration_s.labels(step="cli").observe(self._now() - t0)
        if result.stopped or self.run.stop.is_set():
            return None
        if result.timed_out:
            raise JobFailure(
                FailureCode.TIMEOUT, f"the CLI ran longer than JOB_TIMEOUT_S={s.job_timeout_s:g}"
            )
        if result.exit_code != 0:
            tail = "\n".join(result.failure_tail[-15:])
            raise JobFailure(
                FailureCode.CLI_FAILED, f"the CLI exited with code {result.exit_code}\n{tail}"
            )

        # Collect and upload the course.
        self._phase(JobStatus.GATHERING, "collecting the generated docs")
        t0 = self._now()
        docs = await asyncio.to_thread(collect_docs, out_dir, max_doc_bytes=s.max_doc_bytes)
        if self.run.stop.is_set():
            return None
        ack = await self.d.reporter.put_docs(self.spec, docs)
        if ack.stop:
            self._superseded(ack.reason)
            return None
        self.d.metrics.step_duration_s.labels(step="gather").observe(self._now() - t0)
        return docs
