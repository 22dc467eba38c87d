"""Phase `upload`: read the planned docs one at a time, redact them (the same redactor as the
logs: a secret the CLI found never becomes a doc) and send them in bounded batches as they
are read (`put_docs`, idempotent per slug), so a course is never held in memory at once.
A refusal from the store (canceled upstream, superseded) becomes a stop request."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

from app.collect import read_docs
from app.domain import Doc
from app.pipeline.attempt import Attempt
from app.pipeline.collect import Collected

TIMEOUT_S = 600.0  # every put_docs call is also bounded by the lease
MAX_BATCH_BYTES = 4 * 1024 * 1024
MAX_BATCH_DOCS = 64


@dataclass(frozen=True, slots=True)
class Uploaded:
    docs_count: int


def _take(docs: Iterator[Doc], budget_bytes: int) -> list[Doc]:
    """Read the next batch: up to MAX_BATCH_DOCS docs, closed once `budget_bytes` is reached
    (so a batch holds at most the budget plus one doc)."""
    batch: list[Doc] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.content.encode("utf-8"))
        if len(batch) >= MAX_BATCH_DOCS or size >= budget_bytes:
            break
    return batch


async def upload(attempt: Attempt, inp: Collected) -> Uploaded:
    deps = attempt.deps
    max_doc_bytes = deps.settings.max_doc_bytes
    # Each batch stays under MAX_BATCH_BYTES: one doc is at most max_doc_bytes, so a batch is
    # closed before the doc that would take it over, given the budget left for it.
    budget_bytes = max(MAX_BATCH_BYTES - max_doc_bytes, 1)
    docs = read_docs(inp.plan, max_doc_bytes=max_doc_bytes, scrub=deps.redactor.scrub)
    sent = 0
    while not attempt.run.stop.is_set():
        batch = await asyncio.to_thread(_take, docs, budget_bytes)
        if not batch:
            break
        ack = await deps.reporter.put_docs(attempt.spec, batch)
        sent += len(batch)
        del batch  # released before the next one is read: one batch in memory at a time
        if ack.stop:
            attempt.superseded(ack.reason)
            break
    return Uploaded(sent)
