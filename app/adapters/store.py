"""The interface the runner reports to: Convex's callback functions, or the embedded store."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from app.domain import CallbackAck, ClaimResult, Doc, Failure, JobSpec, PartialDocs, Progress


class JobReporter(Protocol):
    """Callbacks of one job attempt (CONTRACT §3). Implementations raise `CallbackError`."""

    async def claim(self, spec: JobSpec) -> ClaimResult:
        """Take the job; `ok=False` means another attempt or worker owns it: drop silently.
        The answer carries the job's checkpoint, if earlier attempts left one."""
        ...

    async def progress(self, spec: JobSpec, update: Progress) -> CallbackAck:
        """Report progress; doubles as the heartbeat that renews the lease. `update.commit`,
        once set, is the commit the attempt cloned: the job records it."""
        ...

    async def put_docs(
        self, spec: JobSpec, docs: Sequence[Doc], partial: PartialDocs | None = None
    ) -> CallbackAck:
        """Store a batch of docs; idempotent on (jobId, attempt, slug).

        With `partial`: files of a running attempt (each doc's `path` set), kept per job and
        path as its checkpoint (replacing one of another commit) and shown until `complete`;
        `partial.ended` joins the checkpoint's ended steps once the batch is stored."""
        ...

    async def complete(self, spec: JobSpec, docs_count: int, duration_ms: int) -> None:
        """Mark the attempt completed."""
        ...

    async def fail(self, spec: JobSpec, failure: Failure) -> None:
        """Mark the attempt failed; `failure.retryable` lets Convex re-dispatch."""
        ...
