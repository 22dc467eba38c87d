"""Phase `collect`: read the CLI's output directory into docs (rules in `app.collect`).
Reads `workspace/out`, which the CLI wrote and nobody trusts."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from app.collect import collect_docs
from app.domain import Doc, JobStatus
from app.pipeline.attempt import Attempt

STATUS = JobStatus.GATHERING
MESSAGE = "collecting the generated docs"


@dataclass(frozen=True, slots=True)
class CollectInput:
    out_dir: Path


@dataclass(frozen=True, slots=True)
class Collected:
    docs: tuple[Doc, ...]


async def collect(attempt: Attempt, inp: CollectInput) -> Collected:
    max_doc_bytes = attempt.deps.settings.max_doc_bytes
    docs = await asyncio.to_thread(collect_docs, inp.out_dir, max_doc_bytes=max_doc_bytes)
    return Collected(tuple(docs))
