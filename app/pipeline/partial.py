"""Partial docs while the CLI runs: what each step wrote, uploaded as it ends, and files that
settled within a long step, on heartbeat ticks (so chapters reviewed before a SIGKILL are not
lost). The host shows them as the course grows; the store keeps them as the job's checkpoint.

Driven by `run_cli` without ever blocking the CLI's output reader: `steps_reached` and `tick`
only queue a request; one task takes them in order, reads the files on a thread
(`app.checkpoint.OutputTracker`) and calls `put_docs(..., partial=PartialDocs(...))`. A step's
last call carries `ended`, so the store counts the step in `Checkpoint.ended` only once all
its files are stored; a failed call hands its files back to the tracker for the next one.
Failures are logged and never fail the attempt: the final upload is what `complete` counts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from app.checkpoint import OutputTracker, PartialUpload
from app.collect import partial_doc
from app.domain import CheckpointFile, Doc, PartialDocs
from app.errors import WorkerError
from app.pipeline.attempt import Attempt
from app.progress import STEP_NAMES

log = logging.getLogger("fondation.jobs")

REFUSED_BATCH = frozenset({"invalid_doc", "doc_too_large", "invalid_commit", "invalid_step"})
"""Refusals of one batch (not of the attempt): logged; the job goes on, the final upload
decides. Any other refusal (canceled, final, stale_attempt) stops the attempt."""
SETTLE_S = 2.0
"""A file unchanged for this long within a step is taken as written (a finished chapter)."""


@dataclass(frozen=True, slots=True)
class _Request:
    step: str | None = None  # a step that ended: all its changed files, then `ended`
    settled_at_s: float | None = None  # a tick: files settled by then
    # neither: every changed file (the CLI is gone)


class PartialUploader:
    """One attempt's partial uploads; see the module doc."""

    def __init__(
        self,
        attempt: Attempt,
        out_dir: Path,
        *,
        commit: str,
        run_steps: Iterable[str],
        restored: Iterable[CheckpointFile] = (),
        settle_s: float = SETTLE_S,
    ) -> None:
        self._attempt = attempt
        self._commit = commit
        self._run_steps = tuple(run_steps)
        self._files = OutputTracker(
            out_dir,
            max_doc_bytes=attempt.deps.settings.max_doc_bytes,
            settle_s=settle_s,
            uploaded=restored,
        )
        self._queue: deque[_Request] = deque()
        self._retry: list[str] = []  # steps whose upload failed: ended again on the next tick
        self._wake = asyncio.Event()
        self._closed = False
        self._reached = 0  # the highest global step seen
        self.ended: list[str] = []
        """Steps whose files were all stored (the store counts them in the checkpoint)."""
        self.uploads = 0
        self._task = asyncio.create_task(self._loop(), name=f"partial-{attempt.spec.key}")

    def steps_reached(self, step: int) -> None:
        """The CLI is at global step `step`: every step of this run before it ended."""
        if step <= self._reached:
            return
        for index in range(max(self._reached, 1), step):  # several at once: a fast CLI
            self._end(STEP_NAMES[index - 1])
        self._reached = step

    def cli_succeeded(self) -> None:
        """The CLI exited 0: every step it ran ended."""
        for step in self._run_steps:
            self._end(step)

    def tick(self, now_s: float) -> None:
        """A heartbeat: look for settled files, unless a request is waiting anyway."""
        if self._queue or self._closed:
            return
        retry, self._retry = self._retry, []
        for step in retry:
            self._end(step)
        self._queue.append(_Request(settled_at_s=now_s))
        self._wake.set()

    def _end(self, step: str) -> None:
        queued = any(r.step == step for r in self._queue)
        if step in self._run_steps and not queued and step not in self.ended:
            self._queue.append(_Request(step=step))
            self._wake.set()

    async def close(self, timeout_s: float) -> None:
        """Upload what is queued, then everything changed since (bounded by `timeout_s`):
        what a stopped or failed CLI wrote is kept too. No call goes out after this returns."""
        if not self._closed:
            self._closed = True
            self._queue.append(_Request())
            self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except TimeoutError:
            log.warning("partial docs not all uploaded in time", extra=self._attempt.ctx)
        finally:
            if not self._task.done():
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task

    async def _loop(self) -> None:
        files = self._files
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                req = self._queue.popleft()
                try:
                    if req.step is not None:
                        upload = await asyncio.to_thread(files.step_ended, req.step)
                    elif req.settled_at_s is not None:
                        upload = await asyncio.to_thread(files.settled, req.settled_at_s)
                    else:
                        upload = await asyncio.to_thread(files.changed)
                    await self._send(upload)
                except Exception:  # never the attempt's end: the final upload decides
                    log.exception("partial docs upload crashed", extra=self._attempt.ctx)
            if self._closed:
                return

    async def _send(self, upload: PartialUpload) -> None:
        if not upload.files and upload.step is None:
            return
        attempt = self._attempt
        scrub = attempt.deps.redactor.scrub
        docs: list[Doc] = [partial_doc(f.path, f.data, scrub=scrub) for f in upload.files]
        try:
            ack = await attempt.deps.reporter.put_docs(
                attempt.spec, docs, partial=PartialDocs(self._commit, upload.step)
            )
        except WorkerError as exc:
            self._files.forget(upload.files)
            if upload.step is not None:
                self._retry.append(upload.step)
            log.warning(
                "partial docs upload failed",
                extra={**attempt.ctx, "step_ended": upload.step, "error": str(exc)},
            )
            return
        self.uploads += 1
        if ack.stop and ack.reason in REFUSED_BATCH:
            log.warning(
                "partial docs refused by the store",
                extra={**attempt.ctx, "step_ended": upload.step, "reason": ack.reason},
            )
            return
        if ack.stop:
            attempt.superseded(ack.reason)
            return
        if upload.step is not None:
            self.ended.append(upload.step)
        log.info(
            "partial docs uploaded",
            extra={**attempt.ctx, "step_ended": upload.step, "docs": len(docs)},
        )
