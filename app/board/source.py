"""Where the board's data comes from, and where its actions go: the embedded store
(`app.board.embedded`) or the Convex component's operator functions (`app.board.convex`)."""

from __future__ import annotations

from typing import Protocol

from app.board.model import ActionResult, JobDetail, Snapshot


class BoardSource(Protocol):
    """One implementation per mode. Every read is one store read (one query in Convex)."""

    async def wait_change(self, timeout_s: float) -> None:
        """Return soon after the data may have changed, or after `timeout_s`. The live poller
        calls `snapshot` after each return, so this paces the store reads."""
        ...

    async def probe(self) -> str | None:
        """A cheap version of the data, or None when only a full read can tell."""
        ...

    async def snapshot(self, page: int) -> Snapshot:
        """Counts, the pending queue in dispatch order, running jobs, and one page of recently
        finished jobs (most recent first)."""
        ...

    async def job(self, job_id: str) -> JobDetail | None: ...

    async def retry(self, job_id: str) -> ActionResult:
        """Start a new attempt of a failed or dead job."""
        ...

    async def cancel(self, job_id: str) -> ActionResult:
        """Cancel a pending or running job (a running CLI is stopped)."""
        ...

    async def set_priority(self, job_id: str, priority: int) -> ActionResult:
        """Change a pending job's priority (higher runs first)."""
        ...
