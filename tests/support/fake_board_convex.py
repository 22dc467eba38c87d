"""A fake of the host's operator functions (the board's Convex spec) behind Convex's HTTP API,
as an `httpx.MockTransport`: `POST /api/query|mutation {"path", "args", "format": "json"}`.
For fast unit tests of the board's Convex source; the real component is tested behind the
bridge (tests/convex/test_board_source_convex.py, tests/browser/test_board_browser_convex.py)."""

from __future__ import annotations

import hmac
import json
import threading
from dataclasses import dataclass, field
from typing import Any

import httpx

FINISHED = {"completed", "failed", "canceled", "dead"}
RUNNING = {"dispatched", "claimed", "cloning", "analyzing", "gathering"}


@dataclass
class FakeBoardConvex:
    secret: str
    now_ms: float = 1_800_000_000_000.0
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    version: int = 1
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, job_id: str, status: str, **fields: Any) -> dict[str, Any]:
        row = {
            "jobId": job_id,
            "attempt": 1,
            "status": status,
            "repositoryUrl": "https://github.com/o/r.git",
            "ref": None,
            "priority": 0,
            "currentStep": 0,
            "totalSteps": 0,
            "message": "",
            "claimedBy": None,
            "runner": None,
            "leaseUntil": None,
            "createdAt": self.now_ms - 60_000 + len(self.jobs),
            "updatedAt": self.now_ms,
            "error": None,
            **fields,
        }
        self.jobs[job_id] = row
        self.version += 1
        return row

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self._handle)

    def _handle(self, request: httpx.Request) -> httpx.Response:
        status, answer = self.answer(json.loads(request.content))
        return httpx.Response(status, json=answer)

    def answer(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON answer) for one `/api/query|mutation` body."""
        with self.lock:
            return self._answer(body)

    def _answer(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        path, args = body["path"], dict(body["args"])
        self.calls.append((path, dict(args)))
        if not hmac.compare_digest(str(args.pop("boardSecret", "")), self.secret):
            error = {
                "status": "error",
                "errorMessage": "forbidden",
                "errorData": {"code": "forbidden"},
            }
            return 560, error
        handler = {
            "fondation:boardSnapshot": self._snapshot,
            "fondation:boardJob": self._job,
            "fondation:retry": self._retry,
            "fondation:cancelJob": self._cancel,
            "fondation:setPriority": self._set_priority,
        }.get(path)
        if handler is None:
            return 404, {"code": "NotFound"}
        return 200, {"status": "success", "value": handler(**args)}

    def _snapshot(self, page: float, pageSize: float) -> dict[str, Any]:
        rows = list(self.jobs.values())
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        pending = sorted(
            (r for r in rows if r["status"] == "pending"),
            key=lambda r: (-r["priority"], r["createdAt"]),
        )
        recent = sorted((r for r in rows if r["status"] in FINISHED), key=lambda r: -r["updatedAt"])
        start = (int(page) - 1) * int(pageSize)
        return {
            "version": str(self.version),
            "now": self.now_ms,
            "counts": counts,
            "pending": pending[:50],
            "pendingTotal": len(pending),
            "running": [r for r in rows if r["status"] in RUNNING],
            "recent": recent[start : start + int(pageSize)],
            "hasNext": len(recent) > start + int(pageSize),
        }

    def _job(self, jobId: str) -> dict[str, Any] | None:
        row = self.jobs.get(jobId)
        if row is None:
            return None
        return {
            "version": str(self.version),
            "now": self.now_ms,
            "job": row,
            "attempts": [
                {
                    "attempt": a,
                    "status": row["status"] if a == row["attempt"] else "failed",
                    "startedAt": row["createdAt"],
                    "updatedAt": row["updatedAt"],
                    "error": row["error"]
                    if a == row["attempt"]
                    else {"code": "cli_failed", "message": "x"},
                }
                for a in range(1, row["attempt"] + 1)
            ],
            "steps": [
                {
                    "step": s,
                    "totalSteps": row["totalSteps"],
                    "message": f"step {s}",
                    "at": row["createdAt"] + s * 1000,
                }
                for s in range(1, row["currentStep"] + 1)
            ],
            "logs": ["line one", "<b>line two</b>"],
            "docs": [],
        }

    def _retry(self, jobId: str) -> dict[str, Any]:
        row = self.jobs.get(jobId)
        if row is None or row["status"] not in ("failed", "dead"):
            return {"ok": False, "message": "not retryable"}
        row.update(status="pending", attempt=row["attempt"] + 1, error=None, updatedAt=self.now_ms)
        self.version += 1
        return {"ok": True, "message": f"attempt {row['attempt']} queued"}

    def _cancel(self, jobId: str) -> dict[str, Any]:
        row = self.jobs.get(jobId)
        if row is None or row["status"] in FINISHED:
            return {"ok": False, "message": "not cancelable"}
        row.update(
            status="canceled", error={"code": "canceled", "message": "canceled by the operator"}
        )
        self.version += 1
        return {"ok": True, "message": "canceled"}

    def _set_priority(self, jobId: str, priority: float) -> dict[str, Any]:
        row = self.jobs.get(jobId)
        if row is None or row["status"] != "pending":
            return {"ok": False, "message": "only pending jobs move"}
        row["priority"] = int(priority)
        self.version += 1
        return {"ok": True, "message": f"priority set to {int(priority)}"}
