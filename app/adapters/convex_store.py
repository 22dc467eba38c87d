"""The Convex job store: the contract's callback functions over the Convex HTTP API.

`POST {CONVEX_URL}/api/mutation` with `{"path", "args", "format": "json"}`; arguments are
encoded with the `convex` package's codec (Python ints become Convex float64 numbers, as the
functions' `v.number()` validators expect). Convex answers 200 `{"status": "success", "value"}`,
or 560 `{"status": "error", "errorMessage"}` for an error thrown by the function; other 4xx
are request errors. Function errors and 4xx are not retried; network errors, 5xx and 429 are,
with exponential backoff and full jitter, until the attempt's lease would have expired (or,
for the final `complete`/`fail`, for as long as the process lives).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Sequence
from typing import Any

import httpx
from convex.values import coerce_args_to_convex, convex_to_json, json_to_convex

from app.adapters.sqlite_store import SqliteJobStore
from app.clock import Clock
from app.config import Settings
from app.domain import (
    CallbackAck,
    Checkpoint,
    CheckpointFile,
    ClaimResult,
    Doc,
    Failure,
    JobSpec,
    PartialDocs,
    Progress,
)
from app.errors import CallbackError
from app.metrics import Metrics

log = logging.getLogger("fondation.convex")

STATUS_UDF_FAILED = 560  # Convex's status for an error thrown inside the function
# Convex limits (docs "Limits"): a document is at most 1 MiB and a function's arguments at most
# 16 MiB; one mutation may write at most 16 MiB. Batches stay far below, so one slow call never
# holds the lease renewal hostage.
MAX_BATCH_BYTES = 4 * 1024 * 1024
MAX_BATCH_DOCS = 64
MAX_CHECKPOINT_PAGES = 200
"""Pages of 8 files: well past the 1,000 files a checkpoint may hold (`app.checkpoint`)."""
BACKOFF_BASE_S = 0.25
BACKOFF_CAP_S = 10.0


def batch_docs(docs: Sequence[Doc], max_bytes: int = MAX_BATCH_BYTES) -> list[list[Doc]]:
    """Split docs into batches whose encoded size stays under `max_bytes`."""
    batches: list[list[Doc]] = []
    current: list[Doc] = []
    size = 0
    for doc in docs:
        doc_size = len(json.dumps(doc.to_json()).encode()) + 2
        if current and (size + doc_size > max_bytes or len(current) >= MAX_BATCH_DOCS):
            batches.append(current)
            current, size = [], 0
        current.append(doc)
        size += doc_size
    if current:
        batches.append(current)
    return batches


class ConvexJobStore:
    """`JobReporter` on the Convex HTTP API. No deploy key: each call carries the job's token."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock,
        metrics: Metrics,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        assert settings.convex_url is not None
        self._url = settings.convex_url
        self._worker_id = settings.worker_id
        self._clock = clock
        self._metrics = metrics
        self._lease_s = settings.lease_s
        self._rng = rng or random.Random()  # jitter, not crypto
        self._client = httpx.AsyncClient(
            base_url=self._url,
            transport=transport,
            timeout=httpx.Timeout(15.0, connect=5.0),
            headers={"content-type": "application/json"},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def _args(self, spec: JobSpec, **extra: Any) -> dict[str, Any]:
        return {
            "jobId": spec.job_id,
            "attempt": spec.attempt,
            "workerId": self._worker_id,
            "callbackToken": spec.callback_token,
            **extra,
        }

    async def _call_once(self, function: str, args: dict[str, Any]) -> Any:
        body = {
            "path": function,
            "args": convex_to_json(coerce_args_to_convex(args)),
            "format": "json",
        }
        try:
            resp = await self._client.post("/api/mutation", json=body)
        except httpx.HTTPError as exc:
            raise CallbackError(
                function, f"network error: {type(exc).__name__}", retryable=True
            ) from None
        if resp.status_code == 200 or resp.status_code == STATUS_UDF_FAILED:
            try:
                doc = json.loads(resp.text, parse_int=float)
            except ValueError:
                raise CallbackError(function, "invalid JSON from Convex", retryable=True) from None
            if doc.get("status") == "success":
                return json_to_convex(doc.get("value"))
            message = str(doc.get("errorMessage", "function error"))[:500]
            raise CallbackError(function, f"function error: {message}", retryable=False)
        retryable = resp.status_code >= 500 or resp.status_code in (408, 429)
        raise CallbackError(function, f"HTTP {resp.status_code}", retryable=retryable)

    async def _call(self, function: str, args: dict[str, Any], *, deadline_s: float | None) -> Any:
        """Call with retries until success, a non-retryable error, or the deadline (monotonic;
        None = no deadline)."""
        attempt = 0
        while True:
            try:
                value = await self._call_once(function, args)
            except CallbackError as exc:
                now = self._clock.monotonic()
                if not exc.retryable or (deadline_s is not None and now >= deadline_s):
                    self._metrics.callback_failures.labels(function=function).inc()
                    self._metrics.callbacks.labels(function=function, result="error").inc()
                    raise
                delay = self._rng.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt))
                if deadline_s is not None:
                    delay = max(0.0, min(delay, deadline_s - now))
                attempt += 1
                self._metrics.callback_retries.labels(function=function).inc()
                log.warning(
                    "callback failed; retrying",
                    extra={
                        "function": function,
                        "error": exc.reason,
                        "retry_in_s": round(delay, 3),
                    },
                )
                await asyncio.sleep(delay)
                continue
            self._metrics.callbacks.labels(function=function, result="ok").inc()
            return value

    def _lease_deadline(self) -> float:
        return self._clock.monotonic() + self._lease_s

    async def claim(self, spec: JobSpec) -> ClaimResult:
        value = await self._call(
            "fondation:claim", self._args(spec), deadline_s=self._lease_deadline()
        )
        if not isinstance(value, dict):
            raise CallbackError("fondation:claim", "unexpected answer", retryable=False)
        token = value.get("cloneToken")
        ok = bool(value.get("ok"))
        checkpoint = None
        if ok and isinstance(value.get("checkpoint"), dict):
            checkpoint = await self._checkpoint(spec, value["checkpoint"])
        return ClaimResult(
            ok=ok,
            reason=None if value.get("reason") is None else str(value["reason"]),
            clone_token=token if isinstance(token, str) and token else None,
            checkpoint=checkpoint,
        )

    async def _checkpoint(self, spec: JobSpec, info: dict[str, Any]) -> Checkpoint | None:
        """The files the claim announced, fetched page by page (`fondation:checkpointPage`:
        a function's answer is bounded, a course may not be). Anything unexpected, or a
        fetch that fails within the lease, is logged and means a full run: never a failure."""
        ctx = {"job_id": spec.job_id, "attempt": spec.attempt}
        commit, ended = info.get("commit"), info.get("ended")
        if not isinstance(commit, str) or not isinstance(ended, list):
            log.warning("unreadable checkpoint in the claim; running every step", extra=ctx)
            return None
        files: list[CheckpointFile] = []
        after: str | None = None
        deadline_s = self._lease_deadline()
        for _ in range(MAX_CHECKPOINT_PAGES):
            args = self._args(spec) if after is None else self._args(spec, after=after)
            try:
                page = await self._call("fondation:checkpointPage", args, deadline_s=deadline_s)
            except CallbackError as exc:
                log.warning(
                    "checkpoint not fetched; running every step",
                    extra={**ctx, "error": exc.reason},
                )
                return None
            if not isinstance(page, dict) or page.get("ok") is not True:
                reason = page.get("reason") if isinstance(page, dict) else None
                log.warning(
                    "checkpoint refused; running every step", extra={**ctx, "reason": reason}
                )
                return None
            if page.get("commit") != commit:  # replaced by another commit meanwhile
                return None
            for f in page.get("files", []):
                if isinstance(f, dict) and isinstance(f.get("path"), str):
                    files.append(CheckpointFile(f["path"], str(f.get("content", "")).encode()))
            nxt = page.get("next")
            if not isinstance(nxt, str):
                break
            after = nxt
        else:
            log.warning("checkpoint has too many pages; running every step", extra=ctx)
            return None
        steps = tuple(str(s) for s in ended if isinstance(s, str))
        return Checkpoint(commit, tuple(files), steps)

    @staticmethod
    def _ack(value: Any) -> CallbackAck:
        if isinstance(value, dict) and value.get("ok") is False:
            return CallbackAck(stop=True, reason=str(value.get("reason", "refused")))
        return CallbackAck()

    async def progress(self, spec: JobSpec, update: Progress) -> CallbackAck:
        args = self._args(
            spec,
            seq=update.seq,
            status=str(update.status),
            currentStep=update.current_step,
            totalSteps=update.total_steps,
            message=update.message,
            logs=list(update.logs),
        )
        if update.commit is not None:
            args["commit"] = update.commit
        value = await self._call("fondation:progress", args, deadline_s=self._lease_deadline())
        return self._ack(value)

    async def put_docs(
        self, spec: JobSpec, docs: Sequence[Doc], partial: PartialDocs | None = None
    ) -> CallbackAck:
        batches = batch_docs(docs)
        if partial is not None and not batches:
            batches = [[]]  # a step that ended with no new file still says so
        for i, batch in enumerate(batches):
            args = self._args(spec, docs=[d.to_json() for d in batch])
            if partial is not None:
                args.update(partial=True, commit=partial.commit)
                if partial.ended is not None and i == len(batches) - 1:
                    args["endedStep"] = partial.ended  # only once all its files are stored
            value = await self._call("fondation:putDocs", args, deadline_s=self._lease_deadline())
            ack = self._ack(value)
            if ack.stop:
                return ack
        return CallbackAck()

    async def complete(self, spec: JobSpec, docs_count: int, duration_ms: int) -> None:
        # The final state is never given up while the process lives.
        args = self._args(spec, docsCount=docs_count, durationMs=duration_ms)
        await self._call("fondation:complete", args, deadline_s=None)

    async def fail(self, spec: JobSpec, failure: Failure) -> None:
        args = self._args(
            spec, code=str(failure.code), message=failure.message, retryable=failure.retryable
        )
        await self._call("fondation:fail", args, deadline_s=None)


class MirroredReporter:
    """Reports to Convex (the truth) and keeps the local SQLite view in step, so duplicate
    deliveries can be answered with the job's current status. Mirror errors are logged only."""

    def __init__(self, primary: ConvexJobStore, mirror: SqliteJobStore) -> None:
        self.primary = primary
        self.mirror = mirror

    async def aclose(self) -> None:
        await self.primary.aclose()

    async def _mirror(self, name: str, *args: Any) -> None:
        try:
            await getattr(self.mirror, name)(*args)
        except Exception:  # the local view must never break the job
            log.exception("local mirror update failed", extra={"function": name})

    async def claim(self, spec: JobSpec) -> ClaimResult:
        result = await self.primary.claim(spec)
        if result.ok:
            await self._mirror("claim", spec)
        else:
            await self._mirror("mark_dropped", spec, result.reason)
        return result

    async def progress(self, spec: JobSpec, update: Progress) -> CallbackAck:
        ack = await self.primary.progress(spec, update)
        await self._mirror("progress", spec, update)
        return ack

    async def put_docs(
        self, spec: JobSpec, docs: Sequence[Doc], partial: PartialDocs | None = None
    ) -> CallbackAck:
        return await self.primary.put_docs(spec, docs, partial)

    async def complete(self, spec: JobSpec, docs_count: int, duration_ms: int) -> None:
        await self.primary.complete(spec, docs_count, duration_ms)
        await self._mirror("complete", spec, docs_count, duration_ms)

    async def fail(self, spec: JobSpec, failure: Failure) -> None:
        await self.primary.fail(spec, failure)
        await self._mirror("fail", spec, failure)
