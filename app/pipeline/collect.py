"""Phase `collect`: list, check and order the CLI's output (rules in `app.collect`) without
reading it; the upload reads each doc as it sends it. Reads `workspace/out`, which the CLI
wrote and nobody trusts: special files, hard links, paths leaving the directory and too
many or too large files fail the job (`output_invalid`, not retryable)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from app.collect import PlannedDoc, plan_docs
from app.domain import JobStatus
from app.pipeline.attempt import Attempt

STATUS = JobStatus.GATHERING
MESSAGE = "collecting the generated docs"
TIMEOUT_S = 60.0  # listing and checking metadata; a slow or hostile filesystem ends here


@dataclass(frozen=True, slots=True)
class CollectInput:
    out_dir: Path


@dataclass(frozen=True, slots=True)
class Collected:
    plan: tuple[PlannedDoc, ...]


async def collect(attempt: Attempt, inp: CollectInput) -> Collected:
    max_doc_bytes = attempt.deps.settings.max_doc_bytes
    plan = await asyncio.to_thread(plan_docs, inp.out_dir, max_doc_bytes=max_doc_bytes)
    return Collected(plan)
