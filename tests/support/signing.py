"""Building signed webhook requests in tests."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from app.signing import signed_headers

SECRET = (
    "whsec_" + "dGVzdC1zZWNyZXQtZm9yLWZvbmRhdGlvbi13b3JrZXI="
)  # "test-secret-for-fondation-worker"
OTHER_SECRET = "whsec_b3RoZXItc2VjcmV0LW5vdC10aGUtd29ya2Vycw=="


def start_body(
    job_id: str,
    url: str,
    *,
    attempt: int = 1,
    ref: str | None = None,
    token: str | None = None,
    options: dict[str, Any] | None = None,
    priority: int = 0,
) -> bytes:
    data: dict[str, Any] = {
        "jobId": job_id,
        "attempt": attempt,
        "callbackToken": token or ("tok_" + secrets.token_hex(20)),
        "repository": {"url": url, "ref": ref},
        "priority": priority,
    }
    if options is not None:
        data["options"] = options
    doc = {"type": "job.start", "timestamp": "2026-11-28T10:00:00Z", "data": data}
    return json.dumps(doc).encode()


def cancel_body(job_id: str, attempt: int = 1) -> bytes:
    doc = {
        "type": "job.cancel",
        "timestamp": "2026-11-28T10:00:00Z",
        "data": {"jobId": job_id, "attempt": attempt},
    }
    return json.dumps(doc).encode()


def headers_for(
    body: bytes, msg_id: str, *, secret: str = SECRET, ts: int | None = None
) -> dict[str, str]:
    h = signed_headers(secret, msg_id, int(time.time()) if ts is None else ts, body)
    h["content-type"] = "application/json"
    return h
