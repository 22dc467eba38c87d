"""Phase `upload`: the docs to the store (`put_docs`, idempotent per slug). A refusal from
the store (canceled upstream, superseded) becomes a stop request."""

from __future__ import annotations

from dataclasses import dataclass

from app.pipeline.attempt import Attempt
from app.pipeline.collect import Collected


@dataclass(frozen=True, slots=True)
class Uploaded:
    docs_count: int


async def upload(attempt: Attempt, inp: Collected) -> Uploaded:
    ack = await attempt.deps.reporter.put_docs(attempt.spec, inp.docs)
    if ack.stop:
        attempt.superseded(ack.reason)
    return Uploaded(len(inp.docs))
