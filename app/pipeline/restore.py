"""Phase `restore_checkpoint`: after the clone (it needs the commit), write what earlier
attempts left back into `workspace/out` and decide which steps still run.

Reads the claim's checkpoint and the cloned commit; writes `workspace/out` (empty before).
Never fails the attempt: a checkpoint that cannot be used (another commit, a refused name,
a file over the limit, a write that fails) is logged, the output directory is left empty and
the attempt runs in full (`Restored.plan` None). The checks are `app.checkpoint`'s."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from app.checkpoint import ResumePlan, plan_resume, restore
from app.domain import Checkpoint
from app.errors import CheckpointError
from app.pipeline.attempt import Attempt
from app.progress import StepPlan

log = logging.getLogger("fondation.jobs")

MESSAGE = "restoring the checkpoint"
TIMEOUT_S = 60.0  # writing a course's files; a slow filesystem ends here (the attempt fails)


@dataclass(frozen=True, slots=True)
class RestoreInput:
    checkpoint: Checkpoint | None
    commit: str  # what the clone checked out
    out_dir: Path


@dataclass(frozen=True, slots=True)
class Restored:
    commit: str
    plan: ResumePlan | None
    """None: run every step of the job (no checkpoint, or one that could not be used)."""


async def restore_checkpoint(attempt: Attempt, inp: RestoreInput) -> Restored:
    job_steps = attempt.spec.options.steps
    plan: ResumePlan | None = None
    if inp.checkpoint is not None:
        try:
            plan = await asyncio.to_thread(_restore, attempt, inp)
        except CheckpointError as exc:
            log.warning(
                "checkpoint not usable; running every step",
                extra={**attempt.ctx, "reason": exc.reason, "commit": inp.commit},
            )
    if plan is not None and plan.done:
        log.info(
            "resuming from the checkpoint",
            extra={
                **attempt.ctx,
                "done_steps": ",".join(plan.done),
                "remaining_steps": ",".join(plan.remaining),
                "files": len(plan.files),
            },
        )
        attempt.tracker.replan(plan.step_plan())
    else:
        attempt.tracker.replan(StepPlan(job_steps))
    return Restored(inp.commit, plan)


def _restore(attempt: Attempt, inp: RestoreInput) -> ResumePlan:
    assert inp.checkpoint is not None
    max_doc_bytes = attempt.deps.settings.max_doc_bytes
    plan = plan_resume(
        inp.checkpoint,
        clone_commit=inp.commit,
        job_steps=attempt.spec.options.steps,
        max_doc_bytes=max_doc_bytes,
    )
    restore(plan, inp.out_dir, max_doc_bytes=max_doc_bytes)
    return plan
