"""What every phase of one attempt gets: the injected dependencies, the stop request, the
workspace and the progress reporting. No phase logic here."""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from app.adapters.repo_cache import RepoCache
from app.adapters.store import JobReporter
from app.checkpoint import promised_floor
from app.clock import Clock
from app.config import Settings
from app.domain import Checkpoint, JobSpec, JobStatus
from app.isolation import CliSandbox
from app.logs import Redactor
from app.metrics import Metrics
from app.pipeline.reporting import ProgressSender
from app.progress import ProgressTracker, StepPlan
from app.urlpolicy import Resolver, UrlPolicy

log = logging.getLogger("fondation.jobs")


class StopReason(enum.StrEnum):
    CANCEL = "cancel"  # job.cancel webhook
    SHUTDOWN = "shutdown"  # SIGTERM: report interrupted so Convex re-dispatches at once
    SUPERSEDED = "superseded"  # the store says another attempt owns the job: drop silently


@dataclass(eq=False)
class RunState:
    """A running attempt as the job manager holds it; the reason is recorded before the stop
    is signalled, so whoever sees the stop knows why."""

    spec: JobSpec
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    reason: StopReason | None = None
    task: asyncio.Task[None] | None = None

    def request_stop(self, reason: StopReason) -> None:
        if self.reason is None:
            self.reason = reason
        self.stop.set()


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
    repo_cache: RepoCache | None = None  # None: every clone goes to the git host

    @property
    def term_grace_s(self) -> float:
        """SIGTERM→SIGKILL grace for the CLI; leaves room in the shutdown grace for the
        final `fail` callback after the kill."""
        return max(0.5, min(10.0, self.settings.shutdown_grace_s * 0.4))

    @property
    def final_report_s(self) -> float:
        """How long the final `complete`/`fail` may still take once its attempt is cancelled
        (shutdown past its grace): the report is shielded, under this deadline of its own."""
        return max(0.2, min(5.0, self.settings.shutdown_grace_s / 4))

    @property
    def flush_s(self) -> float:
        """How long queued progress reports may take to go out before the final report."""
        return min(5.0, self.settings.shutdown_grace_s / 4)


@dataclass(frozen=True, slots=True)
class Workspace:
    """The attempt's private directory: the checkout and the CLI's output side by side."""

    root: Path

    @property
    def repo_dir(self) -> Path:
        return self.root / "repo"

    @property
    def out_dir(self) -> Path:
        return self.root / "out"

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.out_dir.mkdir()


class Ticking(Protocol):
    """Something a running phase wants called on every heartbeat tick (monotonic seconds)."""

    def tick(self, now_s: float) -> None: ...


class Attempt:
    """The context the phases of one attempt share."""

    def __init__(
        self,
        deps: RunnerDeps,
        run: RunState,
        workspace: Workspace,
        clone_token: str | None,
        *,
        checkpoint: Checkpoint | None = None,
        budget_s: float = float("inf"),
    ) -> None:
        self.deps = deps
        self.run = run
        self.spec = run.spec
        self.workspace = workspace
        self.clone_token = clone_token
        self.checkpoint = checkpoint
        """What earlier attempts left (the claim's answer); the restore phase decides."""
        s = deps.settings
        # Steps are reported global (1..6 of 6). Resuming, the attempt starts at the step the
        # checkpoint promises, so the job's progress does not drop back while it clones; the
        # restore phase replans once it knows what really runs.
        floor = 0
        if checkpoint is not None:
            floor = promised_floor(
                checkpoint, job_steps=self.spec.options.steps, max_doc_bytes=s.max_doc_bytes
            )
        self.tracker = ProgressTracker(
            s.progress_min_interval_s,
            s.heartbeat_s,
            plan=StepPlan(self.spec.options.steps, floor=floor),
        )
        self.ticking: Ticking | None = None
        """Called on each heartbeat tick while set (the CLI's partial uploads)."""
        self.sender = ProgressSender(deps.reporter, self.spec, self.superseded, deps.metrics)
        self.ctx: dict[str, object] = {"job_id": self.spec.job_id, "attempt": self.spec.attempt}
        self.started = deps.clock.monotonic()
        # Past this, no phase may still be running: heartbeats stop, so the lease runs out
        # and Convex takes the job back even if something here is wedged.
        self.deadline = self.started + budget_s

    def now(self) -> float:
        return self.deps.clock.monotonic()

    def superseded(self, reason: str | None) -> None:
        """The store asked to stop: canceled upstream, or another attempt owns the job."""
        log.warning("store asked to stop the job", extra={**self.ctx, "reason": reason})
        self.run.request_stop(StopReason.CANCEL if reason == "canceled" else StopReason.SUPERSEDED)

    def enter(self, status: JobStatus, message: str) -> None:
        """Announce a phase: a progress report (status change) and a log line."""
        self.sender.push(self.tracker.set_phase(status, message, self.now()))
        log.info(message, extra={**self.ctx, "status": str(status)})

    async def tick(self) -> None:
        """Heartbeats while the attempt runs (cancelled by the runner), never past its
        deadline."""
        interval = min(1.0, self.tracker.min_interval_s)
        while True:
            await asyncio.sleep(interval)
            now = self.now()
            if now > self.deadline:
                log.error("attempt past its deadline; heartbeats stop", extra=self.ctx)
                return
            update = self.tracker.tick(now)
            if update is not None:
                self.sender.push(update)
            if self.ticking is not None:
                self.ticking.tick(now)
