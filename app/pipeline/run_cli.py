"""Phase `run_cli`: the Fondation CLI on the checkout, its output streamed into progress.
Reads `workspace/repo`; the CLI writes `workspace/out`. Stops itself on the attempt's stop
request (SIGTERM to its group, SIGKILL after the grace), so the runner does not cancel it.

Resumed (`CliInput.plan`), the CLI runs only the steps left (`--steps`, see
`ResumePlan.options`), and not at all when none is left. While it runs, what each step writes
goes up as partial docs (`app.pipeline.partial`); they are all sent, or given up after the
flush deadline, before the phase returns: the checkpoint is saved before the workspace goes."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from app.adapters import process
from app.checkpoint import ResumePlan
from app.config import DEFAULT_CLI_ENV, DENIED_ENV_PREFIXES
from app.domain import FailureCode, JobStatus
from app.errors import JobFailure
from app.pipeline.attempt import Attempt
from app.pipeline.partial import PartialUploader
from app.pipeline.reporting import StepClock
from app.progress import StepPlan

log = logging.getLogger("fondation.jobs")

STATUS = JobStatus.ANALYZING
MESSAGE = "running the Fondation CLI"


@dataclass(frozen=True, slots=True)
class CliInput:
    repo_dir: Path
    out_dir: Path
    commit: str  # what was checked out (the checkpoint's partial docs are keyed on it)
    plan: ResumePlan | None = None  # resumed: the steps done and left


@dataclass(frozen=True, slots=True)
class CliOutput:
    out_dir: Path
    duration_s: float
    lines: int


async def run_cli(attempt: Attempt, inp: CliInput) -> CliOutput:
    deps, s = attempt.deps, attempt.deps.settings
    options = attempt.spec.options
    if inp.plan is not None:
        if not inp.plan.remaining:
            log.info("every step is in the checkpoint; the CLI is not run", extra=attempt.ctx)
            return CliOutput(inp.out_dir, 0.0, 0)
        options = inp.plan.options(options)
    argv = process.build_argv(
        s.fondation_command,
        repo_dir=inp.repo_dir,
        output_dir=inp.out_dir,
        options=options,
    )
    env = process.build_env(
        deps.environ,
        allow=(*DEFAULT_CLI_ENV, *s.cli_env_passthrough),
        deny_prefixes=DENIED_ENV_PREFIXES,
    )
    env = await asyncio.to_thread(
        deps.sandbox.prepare, attempt.workspace.root, inp.repo_dir, inp.out_dir, env
    )
    step_clock = StepClock(deps.metrics, attempt.ctx, attempt.now())
    tracker = attempt.tracker
    partial = PartialUploader(
        attempt,
        inp.out_dir,
        commit=inp.commit,
        run_steps=StepPlan(options.steps).run_steps,
        restored=() if inp.plan is None else inp.plan.files,
    )
    partial.steps_reached(tracker.current[0])

    def on_lines(lines: list[str]) -> None:
        # Called once per read with every line of it: per-line work stays in C.
        deps.metrics.cli_output_lines.inc(len(lines))
        now = attempt.now()
        for update in tracker.feed_many(deps.redactor.scrub_lines(lines), now):
            step_clock.observe(update.current_step, update.total_steps, update.message, now)
            attempt.sender.push(update)
        partial.steps_reached(tracker.current[0])  # a held step change counts too

    attempt.ticking = partial
    cancelled = False
    try:
        async with deps.sandbox.cli_slot():
            result = await process.run_cli(
                argv,
                env=env,
                cwd=attempt.workspace.root,
                timeout_s=s.job_timeout_s,
                term_grace_s=deps.term_grace_s,
                on_lines=on_lines,
                stop=attempt.run.stop,
                tail_lines=s.log_tail_lines,
                run_as=deps.sandbox.run_as,
            )
        if result.exit_code == 0 and not result.stopped and not result.timed_out:
            partial.cli_succeeded()
    except asyncio.CancelledError:
        cancelled = True  # shutdown past its grace: no time left for uploads
        raise
    finally:
        attempt.ticking = None
        await partial.close(0.0 if cancelled else deps.flush_s)
    step_clock.finish(attempt.now())
    output = CliOutput(inp.out_dir, result.duration_s, result.lines)
    if result.stopped or attempt.run.stop.is_set():
        return output  # the runner sees the stop request
    if result.timed_out:
        # Not retryable: the next attempt would run as long.
        raise JobFailure(
            FailureCode.TIMEOUT, f"the CLI ran longer than JOB_TIMEOUT_S={s.job_timeout_s:g}"
        )
    if result.exit_code != 0:
        tail = "\n".join(result.failure_tail[-15:])
        # The CLI calls a remote model: transient errors are common, another attempt may pass.
        raise JobFailure(
            FailureCode.CLI_FAILED,
            f"the CLI exited with code {result.exit_code}\n{tail}",
            retryable=True,
        )
    return output
