"""The board in Convex mode: the host's operator functions over Convex's HTTP API.

The bridge (and the `convex` package's HTTP client) serve `POST /api/query|mutation`, not
Convex's WebSocket sync protocol, so the board does not subscribe: one poller (`LiveHub`) calls
`fondation:boardSnapshot` at most once per `poll_s` for all open boards, and reads a job page's
`fondation:boardJob` only when the snapshot's `version` moved.

Every call carries `boardSecret` (BOARD_SECRET, shared by the worker and the deployment and
compared there in constant time); it stays on the server and is never rendered to the browser.

Functions (timestamps in ms; the full spec is docs/BOARD.md, the component's side
deploy/convex/src/component/operator.ts):
  query    fondation:boardSnapshot {boardSecret, page, pageSize} -> Snapshot
  query    fondation:boardJob      {boardSecret, jobId}          -> JobDetail | null
  mutation fondation:retry         {boardSecret, jobId}          -> {ok, message}
  mutation fondation:cancelJob     {boardSecret, jobId}          -> {ok, message}
  mutation fondation:setPriority   {boardSecret, jobId, priority}-> {ok, message}
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from convex.values import coerce_args_to_convex, convex_to_json, json_to_convex

from app.board import model
from app.board.model import (
    ActionResult,
    AttemptRow,
    DocView,
    JobDetail,
    JobRow,
    Snapshot,
    StepMark,
)
from app.clock import Clock
from app.errors import WorkerError

SNAPSHOT = "fondation:boardSnapshot"
JOB = "fondation:boardJob"
RETRY = "fondation:retry"
CANCEL = "fondation:cancelJob"
SET_PRIORITY = "fondation:setPriority"


class BoardSourceError(WorkerError):
    """The deployment refused or failed an operator call (the message is safe to show)."""


def _s(ms: Any) -> float:
    return float(ms) / 1000.0


def _row(raw: dict[str, Any]) -> JobRow:
    error = raw.get("error") or {}
    runner = raw.get("runner")
    claimed = raw.get("claimedBy")
    return JobRow(
        job_id=str(raw["jobId"]),
        attempt=int(raw["attempt"]),
        status=str(raw["status"]),
        repository_url=str(raw["repositoryUrl"]),
        ref=raw.get("ref"),
        priority=int(raw.get("priority", 0)),
        current_step=int(raw.get("currentStep", 0)),
        total_steps=int(raw.get("totalSteps", 0)),
        message=str(raw.get("message", "")),
        runner=None if claimed is None else f"{runner or 'warm'} {claimed}",
        lease_until=None if raw.get("leaseUntil") is None else _s(raw["leaseUntil"]),
        created_at=_s(raw["createdAt"]),
        updated_at=_s(raw["updatedAt"]),
        error_code=error.get("code"),
        error_message=error.get("message"),
    )


def parse_snapshot(value: dict[str, Any], page: int) -> Snapshot:
    counts = value.get("counts", {})
    return Snapshot(
        version=str(value["version"]),
        now=_s(value["now"]),
        counts=tuple((s, int(counts[s])) for s in model.ALL_STATUSES if int(counts.get(s, 0)) > 0),
        pending=tuple(_row(r) for r in value.get("pending", [])),
        running=tuple(_row(r) for r in value.get("running", [])),
        recent=tuple(_row(r) for r in value.get("recent", [])),
        page=page,
        has_next=bool(value.get("hasNext", False)),
        pending_total=int(value.get("pendingTotal", counts.get("pending", 0))),
    )


def parse_job(value: dict[str, Any]) -> JobDetail:
    job = _row(value["job"])
    marks = [
        StepMark(_s(s["at"]), int(s["step"]), int(s.get("totalSteps", 0)), str(s.get("message")))
        for s in value.get("steps", [])
    ]
    ended = job.updated_at if job.status in model.FINISHED else None
    return JobDetail(
        version=str(value["version"]),
        now=_s(value["now"]),
        job=job,
        attempts=tuple(
            AttemptRow(
                attempt=int(a["attempt"]),
                status=str(a["status"]),
                started_at=_s(a["startedAt"]),
                updated_at=_s(a["updatedAt"]),
                error_code=(a.get("error") or {}).get("code"),
                error_message=(a.get("error") or {}).get("message"),
            )
            for a in value.get("attempts", [])
        ),
        steps=model.timeline(marks, ended_at=ended),
        logs=tuple(str(line) for line in value.get("logs", []))[-model.LOG_LINES :],
        docs=tuple(
            DocView(
                str(d["slug"]),
                str(d["title"]),
                str(d["kind"]),
                None if d.get("chapterIndex") is None else int(d["chapterIndex"]),
                str(d["content"]),
            )
            for d in value.get("docs", [])
        ),
    )


class ConvexSource:
    """`BoardSource` on the component's operator functions."""

    def __init__(
        self,
        url: str,
        board_secret: str,
        *,
        clock: Clock,
        poll_s: float = 1.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._secret = board_secret
        self._clock = clock
        self._poll_s = poll_s
        self._client = httpx.AsyncClient(
            base_url=url, transport=transport, timeout=httpx.Timeout(10.0)
        )
        self._last: Snapshot | None = None
        self._last_at = float("-inf")
        self._lock = asyncio.Lock()
        self.calls = 0

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _call(self, kind: str, path: str, args: dict[str, Any]) -> Any:
        self.calls += 1
        body = {
            "path": path,
            "args": convex_to_json(coerce_args_to_convex({"boardSecret": self._secret, **args})),
            "format": "json",
        }
        try:
            resp = await self._client.post(f"/api/{kind}", json=body)
        except httpx.HTTPError as exc:
            raise BoardSourceError(f"Convex unreachable: {type(exc).__name__}") from None
        try:
            # Convex numbers are float64: parse ints as floats, as the convex package expects.
            doc = json.loads(resp.text, parse_int=float)
        except ValueError:
            raise BoardSourceError(f"Convex answered HTTP {resp.status_code}") from None
        if resp.status_code == 200 and doc.get("status") == "success":
            return json_to_convex(doc.get("value"))
        data = doc.get("errorData")
        code = data.get("code") if isinstance(data, dict) else None
        raise BoardSourceError(
            f"{path} failed: {code or doc.get('errorMessage', resp.status_code)}"
        )

    async def wait_change(self, timeout_s: float) -> None:
        await asyncio.sleep(max(timeout_s, self._poll_s))  # no push channel: poll

    async def probe(self) -> str:
        """The snapshot's version, from at most one `boardSnapshot` call per `poll_s`."""
        return (await self._page_one()).version

    async def _page_one(self) -> Snapshot:
        async with self._lock:
            if self._last is None or self._clock.monotonic() - self._last_at >= self._poll_s:
                value = await self._call(
                    "query", SNAPSHOT, {"page": 1, "pageSize": model.PAGE_SIZE}
                )
                self._last = parse_snapshot(value, 1)
                self._last_at = self._clock.monotonic()
            return self._last

    async def snapshot(self, page: int) -> Snapshot:
        if page <= 1:
            return await self._page_one()
        value = await self._call("query", SNAPSHOT, {"page": page, "pageSize": model.PAGE_SIZE})
        return parse_snapshot(value, page)

    async def job(self, job_id: str) -> JobDetail | None:
        value = await self._call("query", JOB, {"jobId": job_id})
        return None if value is None else parse_job(value)

    async def _action(self, path: str, args: dict[str, Any]) -> ActionResult:
        value = await self._call("mutation", path, args)
        self._last = None  # the next read sees the change
        return ActionResult(bool(value.get("ok")), str(value.get("message", "")))

    async def retry(self, job_id: str) -> ActionResult:
        return await self._action(RETRY, {"jobId": job_id})

    async def cancel(self, job_id: str) -> ActionResult:
        return await self._action(CANCEL, {"jobId": job_id})

    async def set_priority(self, job_id: str, priority: int) -> ActionResult:
        return await self._action(SET_PRIORITY, {"jobId": job_id, "priority": priority})
