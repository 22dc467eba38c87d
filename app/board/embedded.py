"""The board on the embedded store: reads from SQLite, actions through the store and the
`JobManager` (a running CLI is stopped like a `job.cancel` webhook stops it).

Embedded mode has no queue of its own (a webhook is refused when no slot is free), so the
board's retries are its pending queue: `PendingDispatcher` starts them in dispatch order
(priority, then age) whenever a slot is free."""

from __future__ import annotations

import logging

from app.adapters.sqlite_board import BoardStore
from app.board.model import ActionResult, JobDetail, Snapshot
from app.jobs import JobManager

log = logging.getLogger("fondation.board")


class EmbeddedSource:
    """`BoardSource` over the embedded store."""

    def __init__(self, store: BoardStore, manager: JobManager) -> None:
        self._store = store
        self._manager = manager

    async def wait_change(self, timeout_s: float) -> None:
        await self._store.feed.wait(timeout_s)

    async def probe(self) -> str | None:
        return self._store.version()

    async def snapshot(self, page: int) -> Snapshot:
        return self._store.snapshot(page)

    async def job(self, job_id: str) -> JobDetail | None:
        return self._store.job(job_id)

    async def retry(self, job_id: str) -> ActionResult:
        return self._store.add_retry(job_id)

    async def cancel(self, job_id: str) -> ActionResult:
        done = self._store.cancel_pending(job_id)
        if done is not None:
            return done
        job = self._store.latest(job_id)
        if job is None:
            return ActionResult(False, f"no job {job_id!r}")
        if self._manager.cancel(job.job_id, job.attempt):
            return ActionResult(True, "stopping the CLI")
        return ActionResult(False, f"job is {job.status}: not running on this worker")

    async def set_priority(self, job_id: str, priority: int) -> ActionResult:
        return self._store.set_priority(job_id, priority)


class PendingDispatcher:
    """Starts pending attempts while slots are free; wakes on every store change."""

    def __init__(self, store: BoardStore, manager: JobManager, idle_wait_s: float = 1.0) -> None:
        self._store = store
        self._manager = manager
        self._idle_wait_s = idle_wait_s

    def dispatch(self) -> int:
        """Start as many pending attempts as there are free slots; returns how many.
        No await between the slot check and the start: the reservation is atomic."""
        started = 0
        while self._manager.has_free_slot():
            spec = self._store.take_next_pending()
            if spec is None:
                break
            self._manager.start(spec)
            log.info(
                "pending attempt started", extra={"job_id": spec.job_id, "attempt": spec.attempt}
            )
            started += 1
        return started

    async def run(self) -> None:
        while True:
            try:
                self.dispatch()
            except Exception:  # a failed pass must not stop later ones
                log.exception("dispatching pending attempts failed")
            await self._store.feed.wait(self._idle_wait_s)
