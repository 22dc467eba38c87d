"""Runs the phases of one attempt in order, then decides and reports the outcome.

The runner owns what is the same for every phase: the stop request is checked before each
phase and raced against it (except the CLI's, which stops its own process group), each phase
is announced and timed under its name (`step_duration_s`: clone, restore, cli, gather,
upload), and a phase's `JobFailure` ends the sequence. `decide_outcome` then says what
happened and `send_final` reports it, shielded from a late cancellation.

    clone -> restore_checkpoint -> run_cli -> collect -> upload

`restore_checkpoint` follows the clone because it needs the commit; without a checkpoint it
writes nothing. A resumed attempt's clone is pinned to the checkpoint's commit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from app.domain import Checkpoint, Failure, FailureCode, JobStatus
from app.errors import JobFailure
from app.pipeline import clone, collect, restore, run_cli, upload
from app.pipeline.attempt import Attempt, RunnerDeps, RunState, StopReason, Workspace
from app.pipeline.outcome import decide_outcome
from app.pipeline.reporting import send_final

log = logging.getLogger("fondation.jobs")

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass(frozen=True)
class Phase(Generic[In, Out]):
    name: str
    metric: str  # the `step_duration_s` label
    status: JobStatus | None  # announced when the phase starts (None: keep the current one)
    message: str
    run: Callable[[Attempt, In], Awaitable[Out]]
    # Raced against the stop request (and bounded by `timeout_s`, if any) here; False for a
    # phase that does both itself (the CLI: JOB_TIMEOUT_S, then TERM, grace, KILL). The clone
    # is raced with no timeout here: git enforces CLONE_TIMEOUT_S itself.
    raced: bool = True
    timeout_s: float | None = None
    timeout_retryable: bool = False  # whether another attempt may pass where this timed out


CLONE = Phase("clone", "clone", clone.STATUS, clone.MESSAGE, clone.clone)
RESTORE = Phase(
    "restore_checkpoint",
    "restore",
    None,
    restore.MESSAGE,
    restore.restore_checkpoint,
    timeout_s=restore.TIMEOUT_S,
    timeout_retryable=True,
)
RUN_CLI = Phase("run_cli", "cli", run_cli.STATUS, run_cli.MESSAGE, run_cli.run_cli, raced=False)
COLLECT = Phase(
    "collect",
    "gather",
    collect.STATUS,
    collect.MESSAGE,
    collect.collect,
    timeout_s=collect.TIMEOUT_S,
)
UPLOAD = Phase(
    "upload",
    "upload",
    None,
    "uploading the docs",
    upload.upload,
    timeout_s=upload.TIMEOUT_S,
    timeout_retryable=True,
)


class Stopped(Exception):
    """A stop was requested: the sequence ends; the stop reason decides the outcome."""


async def run_phase(attempt: Attempt, phase: Phase[In, Out], inp: In) -> Out:
    """Run one phase: stop checked before and after, raced against it, timed."""
    if attempt.run.stop.is_set():
        raise Stopped
    if phase.status is not None:
        attempt.enter(phase.status, phase.message)
    t0 = attempt.now()
    try:
        if phase.raced:
            out = await _until_stopped(attempt.run.stop, phase.run(attempt, inp), phase.timeout_s)
        else:
            out = await phase.run(attempt, inp)
    except _TimedOut:
        raise JobFailure(
            FailureCode.TIMEOUT,
            f"{phase.name} took longer than {phase.timeout_s:g} s",
            retryable=phase.timeout_retryable,
        ) from None
    finally:
        duration_s = attempt.now() - t0
        attempt.deps.metrics.step_duration_s.labels(step=phase.metric).observe(duration_s)
        log.debug(
            "phase finished",
            extra={**attempt.ctx, "phase": phase.name, "duration_s": round(duration_s, 3)},
        )
    if attempt.run.stop.is_set():
        raise Stopped
    return out


class _TimedOut(Exception):
    pass


async def _until_stopped(stop: asyncio.Event, work: Awaitable[Out], timeout_s: float | None) -> Out:
    """Await `work` unless `stop` is set first (`Stopped`) or `timeout_s` passes
    (`_TimedOut`); the work is then cancelled (each phase cleans up on cancel: git kills its
    processes; a thread is left to finish, its files are checked so it cannot block)."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    timed_out = False
    try:
        await asyncio.wait({task, stopper}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        timed_out = not task.done() and not stop.is_set()
    finally:
        stopper.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            if not stop.is_set() and not timed_out:  # we were cancelled ourselves
                raise asyncio.CancelledError
    if timed_out:
        raise _TimedOut
    if task.cancelled():
        raise Stopped
    return task.result()


async def run_phases(attempt: Attempt) -> upload.Uploaded:
    """The attempt's phases, each fed the previous one's record."""
    spec, ws = attempt.spec, attempt.workspace
    ws.create()
    checkpoint = attempt.checkpoint
    pinned = None if checkpoint is None else checkpoint.commit
    cloned = await run_phase(
        attempt,
        CLONE,
        clone.CloneInput(spec.repository.url, spec.repository.ref, ws.repo_dir, pinned),
    )
    attempt.tracker.set_commit(cloned.commit)  # every report from here on names it
    restored = await run_phase(
        attempt, RESTORE, restore.RestoreInput(checkpoint, cloned.commit, ws.out_dir)
    )
    ran = await run_phase(
        attempt,
        RUN_CLI,
        run_cli.CliInput(ws.repo_dir, ws.out_dir, restored.commit, restored.plan),
    )
    collected = await run_phase(attempt, COLLECT, collect.CollectInput(ran.out_dir))
    return await run_phase(attempt, UPLOAD, collected)


def attempt_budget_s(deps: RunnerDeps) -> float:
    """The longest an attempt may run: every phase's own bound, plus the CLI's kill grace."""
    s = deps.settings
    others = sum(p.timeout_s or 0.0 for p in (RESTORE, COLLECT, UPLOAD))
    # A resumed clone may fetch twice (the checkpoint's commit, then the ref); the CLI's
    # partial uploads get `flush_s` after it exits.
    return (
        2 * s.clone_timeout_s + s.job_timeout_s + deps.term_grace_s + deps.flush_s + others + 10.0
    )


async def run_attempt(
    deps: RunnerDeps,
    run: RunState,
    workspace: Workspace,
    clone_token: str | None,
    checkpoint: Checkpoint | None = None,
) -> Failure | None:
    """Run a claimed attempt and report its end; returns None on success or the failure.
    `checkpoint`: what the claim returned of earlier attempts (resume).

    Cancelled (shutdown past its grace), the attempt still reports `interrupted` before the
    cancellation goes on; a cancel that lands during the final report does not drop it."""
    attempt = Attempt(
        deps,
        run,
        workspace,
        clone_token,
        checkpoint=checkpoint,
        budget_s=attempt_budget_s(deps),
    )
    ticker = asyncio.create_task(attempt.tick())
    uploaded: upload.Uploaded | None = None
    error: JobFailure | None = None
    cancelled = False
    try:
        try:
            uploaded = await run_phases(attempt)
        except Stopped:
            pass
        except JobFailure as exc:
            error = exc
        except asyncio.CancelledError:
            cancelled = True
            run.request_stop(StopReason.SHUTDOWN)
        finally:
            ticker.cancel()
        outcome = decide_outcome(
            reason=run.reason,
            error=error,
            docs_count=None if uploaded is None else uploaded.docs_count,
            redactor=deps.redactor,
        )
        flush_s = 0.0 if cancelled else deps.flush_s if outcome.report else min(1.0, deps.flush_s)
        try:
            await attempt.sender.close(flush_s)
        except asyncio.CancelledError:
            cancelled = True
        if outcome.report:
            cancelled = await _report(attempt, outcome.failure, outcome.docs_count, cancelled)
    finally:
        await attempt.sender.close(0.0)  # whatever escaped: no heartbeat outlives the attempt
    if cancelled:
        raise asyncio.CancelledError
    return outcome.failure


async def _report(
    attempt: Attempt, failure: Failure | None, docs_count: int, cancelled: bool
) -> bool:
    deps, spec, ctx = attempt.deps, attempt.spec, attempt.ctx
    if failure is not None:
        log.warning(
            "job failed", extra={**ctx, "code": str(failure.code), "error": failure.message}
        )
        call = deps.reporter.fail(spec, failure)
        return await send_final(call, cancelled=cancelled, deadline_s=deps.final_report_s, ctx=ctx)
    duration_ms = int((attempt.now() - attempt.started) * 1000)
    call = deps.reporter.complete(spec, docs_count, duration_ms)
    cancelled = await send_final(call, cancelled=cancelled, deadline_s=deps.final_report_s, ctx=ctx)
    log.info("job completed", extra={**ctx, "docs": docs_count, "duration_ms": duration_ms})
    return cancelled
