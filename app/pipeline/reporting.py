"""Reporting from a running attempt: progress without ever blocking the CLI's reader, the
CLI's step timings, and the final report shielded from a late cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping

from app.adapters.store import JobReporter
from app.domain import JobSpec, Progress
from app.errors import CallbackError
from app.metrics import Metrics

log = logging.getLogger("fondation.jobs")

MAX_PENDING_PROGRESS = 64


class ProgressSender:
    """Sends progress reports in order without ever blocking the CLI's output reader.

    Reports queue up while a call is in flight (bounded: under a long outage the oldest
    non-step reports are dropped; each report carries the full state, so only log lines
    are lost) and go out one at a time."""

    def __init__(
        self,
        reporter: JobReporter,
        spec: JobSpec,
        on_stop: Callable[[str | None], None],
        metrics: Metrics,
    ) -> None:
        self._reporter = reporter
        self._spec = spec
        self._on_stop = on_stop
        self._metrics = metrics
        self._pending: deque[Progress] = deque()
        self._wake = asyncio.Event()
        self._closed = False
        self._task = asyncio.create_task(self._loop(), name=f"progress-{spec.key}")

    def push(self, update: Progress) -> None:
        if self._closed:
            return
        if len(self._pending) >= MAX_PENDING_PROGRESS:
            self._pending.popleft()
        self._pending.append(update)
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                update = self._pending.popleft()
                try:
                    ack = await self._reporter.progress(self._spec, update)
                except CallbackError as exc:
                    log.warning(
                        "progress report failed",
                        extra={"job_id": self._spec.job_id, "error": str(exc)},
                    )
                    continue
                self._metrics.heartbeats.inc()
                if ack.stop:
                    self._on_stop(ack.reason)
            if self._closed:
                return

    async def close(self, timeout_s: float) -> None:
        """Send what is pending (bounded by `timeout_s`), then stop. No report goes out
        after this returns: a heartbeat must never follow the final report."""
        self._closed = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except TimeoutError:
            pass
        finally:
            if not self._task.done():
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task


class StepClock:
    """Times the CLI's steps: a metric (`cli_<n>`) and a log line per finished step."""

    def __init__(self, metrics: Metrics, ctx: Mapping[str, object], now: float) -> None:
        self._metrics = metrics
        self._ctx = ctx
        self._step = 0
        self._total = 0
        self._since = now

    def observe(self, step: int, total: int, message: str, now: float) -> None:
        if step == self._step:
            return
        self.finish(now)
        self._step, self._total, self._since = step, total, now
        log.info(
            "step started",
            extra={**self._ctx, "step": step, "total_steps": total, "step_message": message},
        )

    def finish(self, now: float) -> None:
        if not self._step:
            return
        duration_s = now - self._since
        self._metrics.step_duration_s.labels(step=f"cli_{self._step}").observe(duration_s)
        log.info(
            "step finished",
            extra={
                **self._ctx,
                "step": self._step,
                "total_steps": self._total,
                "duration_s": round(duration_s, 3),
            },
        )
        self._step = 0


async def send_final(
    call: Awaitable[None], *, cancelled: bool, deadline_s: float, ctx: Mapping[str, object]
) -> bool:
    """Send the final report shielded from cancellation; True when the caller was cancelled
    (before, with `cancelled`, or during the report) and must re-raise that once done.

    Uncancelled, the report takes as long as the reporter's own retry policy allows. Once
    the attempt is cancelled (shutdown past its grace), the report gets `deadline_s` more,
    then it is given up. A report that fails with `cancelled` set is logged, not raised:
    the cancellation is what the caller has to propagate."""
    task = asyncio.ensure_future(call)
    if not cancelled:
        try:
            await asyncio.shield(task)
            return False
        except asyncio.CancelledError:
            cancelled = True
    try:
        await asyncio.wait({task}, timeout=deadline_s)
    finally:
        if not task.done():
            log.error("final report given up at its deadline", extra=dict(ctx))
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if not task.cancelled() and task.exception() is not None:
        log.error("final report failed", extra={**ctx, "error": str(task.exception())})
    return cancelled
