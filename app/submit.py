"""`fondation-worker submit`: send a correctly signed `job.start`, then follow the job."""

from __future__ import annotations

import json
import secrets
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx

from app.signing import signed_headers

FINAL = {"completed", "failed", "canceled", "dead"}
BAR_WIDTH = 24


@dataclass(frozen=True)
class SubmitRequest:
    url: str
    repository_url: str
    ref: str | None
    secret: str
    job_id: str
    model: str | None = None
    priority: int = 0
    # BOARD_API_TOKEN: following the job reads GET /v1/jobs/{id}/events, which needs it
    # when the worker listens beyond loopback.
    api_token: str | None = field(default=None, repr=False)


class SubmitError(Exception):
    """A message for the user, and the exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def secret_from_env(env: Mapping[str, str]) -> str:
    raw = env.get("WEBHOOK_SECRET") or env.get("WEBHOOK_SECRETS", "").split(",")[0].strip()
    if not raw:
        raise SubmitError("set WEBHOOK_SECRET (or WEBHOOK_SECRETS) to the worker's secret", 2)
    return raw


def new_job_id() -> str:
    return "local-" + secrets.token_hex(6)


def build_body(req: SubmitRequest, now_s: float) -> bytes:
    options = {"model": req.model} if req.model else None
    data: dict[str, Any] = {
        "jobId": req.job_id,
        "attempt": 1,
        "callbackToken": secrets.token_urlsafe(32),
        "repository": {"url": req.repository_url, "ref": req.ref},
        "priority": req.priority,
    }
    if options:
        data["options"] = options
    envelope = {
        "type": "job.start",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now_s)),
        "data": data,
    }
    return json.dumps(envelope, separators=(",", ":")).encode()


def _explain(resp: httpx.Response) -> str:
    try:
        detail = resp.json().get("detail", resp.text)
    except ValueError:
        detail = resp.text
    if resp.status_code == 401:
        return (
            f"401: the worker refused the signature ({detail}). Is WEBHOOK_SECRET one of the "
            "worker's WEBHOOK_SECRETS, and are both clocks right?"
        )
    if resp.status_code == 422:
        return f"422: the worker refused the job: {detail}"
    if resp.status_code == 503:
        after = resp.headers.get("retry-after", "a few")
        return f"503: the worker cannot take a job now ({detail}); retry in {after} s"
    return f"{resp.status_code}: {detail}"


def send(client: httpx.Client, req: SubmitRequest, now_s: float) -> dict[str, Any]:
    """POST the signed webhook; returns the worker's JSON answer or raises `SubmitError`."""
    body = build_body(req, now_s)
    headers = signed_headers(req.secret, f"{req.job_id}:1", int(now_s), body)
    headers["content-type"] = "application/json"
    try:
        resp = client.post(f"{req.url}/v1/webhooks", content=body, headers=headers)
    except httpx.HTTPError as exc:
        raise SubmitError(f"cannot reach the worker at {req.url}: {exc}") from None
    if resp.status_code not in (200, 202):
        raise SubmitError(_explain(resp))
    answer: dict[str, Any] = resp.json()
    return answer


def _sse_events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    event, data = "message", list[str]()
    for line in lines:
        if line == "":
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def render_bar(step: int, total: int, message: str) -> str:
    filled = int(BAR_WIDTH * step / total) if total else 0
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    count = f"{step}/{total}" if total else "-/-"
    return f"[{bar}] {count} {message}"


def follow(
    client: httpx.Client,
    url: str,
    job_id: str,
    out: TextIO,
    timeout_s: float,
    api_token: str | None = None,
) -> str:
    """Print the job's progress until it ends; returns the final status."""
    tty = out.isatty()
    last = ""
    status = "accepted"
    deadline = time.monotonic() + timeout_s
    cursor = 0
    auth = {"Authorization": f"Bearer {api_token}"} if api_token else {}
    while time.monotonic() < deadline:
        try:
            with client.stream(
                "GET",
                f"{url}/v1/jobs/{job_id}/events",
                headers={"Last-Event-ID": str(cursor), **auth},
                timeout=httpx.Timeout(10.0, read=30.0),
            ) as resp:
                if resp.status_code == 401:
                    raise SubmitError(
                        "cannot follow the job: the worker wants a token (set BOARD_API_TOKEN "
                        "or --token to its BOARD_API_TOKEN)"
                    )
                if resp.status_code != 200:
                    raise SubmitError(f"cannot follow the job: HTTP {resp.status_code}")
                for _kind, ev in _sse_events(resp.iter_lines()):
                    cursor = int(ev.get("id", cursor))
                    status = str(ev.get("status", status))
                    if "totalSteps" in ev or "message" in ev:
                        line = render_bar(
                            int(ev.get("currentStep", 0)),
                            int(ev.get("totalSteps", 0)),
                            str(ev.get("message", status)),
                        )
                    else:
                        line = f"status: {status}"
                        if ev.get("code"):
                            line += f" ({ev['code']}: {ev.get('message', '')})"
                    if line != last:
                        out.write(("\r\x1b[2K" + line) if tty else line + "\n")
                        out.flush()
                        last = line
                    if status in FINAL:
                        if tty:
                            out.write("\n")
                        return status
        except httpx.HTTPError:
            time.sleep(1.0)  # the stream broke (worker restart?): resume from the cursor
    raise SubmitError(f"gave up following the job after {timeout_s:g} s")


def run_submit(
    req: SubmitRequest, *, follow_job: bool, out: TextIO = sys.stdout, timeout_s: float = 7200
) -> int:
    with httpx.Client(timeout=httpx.Timeout(30.0)) as client:
        answer = send(client, req, time.time())
        dup = " (duplicate delivery)" if answer.get("duplicate") else ""
        out.write(f"{answer['jobId']}{dup}\n")
        out.flush()
        if not follow_job:
            return 0
        status = follow(client, req.url, req.job_id, out, timeout_s, req.api_token)
        out.write(f"job {req.job_id} {status}\n")
        return 0 if status == "completed" else 1
