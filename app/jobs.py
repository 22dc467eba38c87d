"""Running accepted jobs: slots, the lifecycle of each attempt, cancel and drain.

An attempt: claim (with the job's checkpoint, if any) → the pipeline's phases
(`app.pipeline`: clone → restore the checkpoint → run the CLI → collect → upload) → complete,
or `fail` with a contract code; then its workspace is removed. Nothing
here knows about HTTP; the routes call `JobManager` and the reporter talks to Convex or the
embedded store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Mapping

from app.adapters import git
from app.adapters.repo_cache import RepoCache
from app.adapters.store import JobReporter
from app.clock import Clock
from app.config import Settings
from app.domain import Failure, FailureCode, JobSpec
from app.errors import CallbackError, WorkerError
from app.isolation import CliSandbox
from app.logs import Redactor
from app.metrics import Metrics
from app.pipeline import RunnerDeps, RunState, StopReason, Workspace, run_attempt
from app.urlpolicy import Resolver, UrlPolicy

__all__ = ["JobManager", "NoSlotError", "RunnerDeps", "StopReason"]

log = logging.getLogger("fondation.jobs")


class NoSlotError(WorkerError):
    """No job slot is free, or the worker is draining."""

    def __init__(self, draining: bool) -> None:
        super().__init__("draining" if draining else "no free job slot")
        self.draining = draining


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
            repo_cache=RepoCache.from_settings(settings),
        )
        self._running: dict[str, RunState] = {}
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
        run = RunState(spec=spec)
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
        """Stop taking jobs, stop every CLI and report them interrupted, within `grace_s`.

        The last `final_report_s` of the grace belong to the final reports: attempts still
        busy when the rest has passed are cancelled, and each then sends its report (shielded,
        under that deadline) before its task ends."""
        self._draining = True
        self._metrics.draining.set(1)
        for run in list(self._running.values()):
            run.request_stop(StopReason.SHUTDOWN)
        report_s = min(self.deps.final_report_s, grace_s / 2)
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s - report_s)
        except TimeoutError:
            log.error("jobs still running after the grace period; cancelling them")
            tasks = [r.task for r in self._running.values() if r.task is not None]
            for task in tasks:
                task.cancel()
            _, late = await asyncio.wait(tasks, timeout=report_s + 0.1) if tasks else ((), ())
            for task in late:  # a report past its own deadline: give up on it
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def wait_idle(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    # -- one attempt -------------------------------------------------------------------

    async def _run(self, run: RunState) -> None:
        spec = run.spec
        ctx = {"job_id": spec.job_id, "attempt": spec.attempt}
        started = self._clock.monotonic()
        workspace = Workspace(
            self._settings.work_dir / f"{spec.job_id}-{spec.attempt}-{secrets.token_hex(4)}"
        )
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
            result = await run_attempt(
                self.deps, run, workspace, clone_token, checkpoint=claim.checkpoint
            )
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
            await asyncio.to_thread(git.remove_tree, workspace.root)
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
