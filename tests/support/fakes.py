"""In-process fakes for app-layer tests."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from app.domain import CallbackAck, ClaimResult, Doc, Failure, JobSpec, PartialDocs, Progress


async def public_resolver(host: str, port: int) -> list[str]:
    """Every name resolves to a public address (no DNS in tests)."""
    return ["140.82.121.4"]


@dataclass
class HeldReporter:
    """A reporter whose `claim` waits until released, so accepted jobs hold their slot and
    never reach git. Released claims answer ok=False (the job is dropped)."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    calls: list[tuple[str, Any]] = field(default_factory=list)

    async def claim(self, spec: JobSpec) -> ClaimResult:
        self.calls.append(("claim", spec.key))
        await self.release.wait()
        return ClaimResult(ok=False, reason="released")

    async def progress(self, spec: JobSpec, update: Progress) -> CallbackAck:
        self.calls.append(("progress", update))
        return CallbackAck()

    async def put_docs(
        self, spec: JobSpec, docs: Sequence[Doc], partial: PartialDocs | None = None
    ) -> CallbackAck:
        self.calls.append(("put_docs", len(docs)))
        return CallbackAck()

    async def complete(self, spec: JobSpec, docs_count: int, duration_ms: int) -> None:
        self.calls.append(("complete", docs_count))

    async def fail(self, spec: JobSpec, failure: Failure) -> None:
        self.calls.append(("fail", failure))
