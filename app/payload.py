"""Parsing and validating webhook bodies into domain records (CONTRACT §2). Pure."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from app.domain import CancelRequest, JobOptions, JobSpec, Repository
from app.errors import PayloadError
from app.urlpolicy import check_ref

JOB_START = "job.start"
JOB_CANCEL = "job.cancel"
EVENT_TYPES = (JOB_START, JOB_CANCEL)

_JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$")
_STEP_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
MAX_STEPS = 16
MAX_ATTEMPT = 1000
MIN_TOKEN_CHARS = 32
MAX_TOKEN_CHARS = 512
PRIORITY_RANGE = (-1_000_000, 1_000_000)
OPTION_KEYS = frozenset({"model", "steps"})


@dataclass(frozen=True, slots=True)
class Envelope:
    """A verified, parsed webhook: its event and the body fingerprint for deduplication."""

    webhook_id: str
    event_type: str
    event: JobSpec | CancelRequest
    fingerprint: str


def fingerprint(body: bytes) -> str:
    """SHA-256 of the raw body: a replay with another body under the same id is a conflict."""
    return hashlib.sha256(body).hexdigest()


def decode_json(body: bytes) -> Any:
    """The body as JSON; raises `ValueError` when it is not JSON (a 400, not a 422)."""
    return json.loads(body.decode("utf-8"))


def _obj(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PayloadError(field, "must be an object")
    return value


def _str(obj: dict[str, Any], key: str, field: str, *, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise PayloadError(field, "is required")
        return None
    if not isinstance(value, str):
        raise PayloadError(field, "must be a string")
    return value


def _int(obj: dict[str, Any], key: str, field: str, lo: int, hi: int, default: int | None) -> int:
    value = obj.get(key, default)
    if value is None:
        raise PayloadError(field, "is required")
    # bool is an int in Python; JSON true must not pass as attempt 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise PayloadError(field, "must be an integer")
    if not lo <= value <= hi:
        raise PayloadError(field, f"must be between {lo} and {hi}")
    return value


def _job_id(data: dict[str, Any]) -> str:
    job_id = _str(data, "jobId", "data.jobId")
    assert job_id is not None
    if not _JOB_ID_RE.match(job_id):
        raise PayloadError("data.jobId", "must be 1-128 letters, digits, '_' or '-'")
    return job_id


def _options(raw: Any) -> JobOptions:
    if raw is None:
        return JobOptions()
    opts = _obj(raw, "data.options")
    unknown = sorted(set(opts) - OPTION_KEYS)
    if unknown:
        raise PayloadError("data.options", f"unknown option(s): {', '.join(unknown)}")
    model = _str(opts, "model", "data.options.model", required=False)
    if model is not None and not _MODEL_RE.match(model):
        raise PayloadError("data.options.model", "is not a valid model name")
    steps_raw = opts.get("steps")
    steps: tuple[str, ...] = ()
    if steps_raw is not None:
        if not isinstance(steps_raw, list) or len(steps_raw) > MAX_STEPS:
            raise PayloadError("data.options.steps", f"must be a list of at most {MAX_STEPS}")
        for step in steps_raw:
            if not isinstance(step, str) or not _STEP_RE.match(step):
                raise PayloadError("data.options.steps", f"invalid step name {step!r}")
        steps = tuple(steps_raw)
    return JobOptions(model=model, steps=steps)


def _job_start(data: dict[str, Any]) -> JobSpec:
    job_id = _job_id(data)
    attempt = _int(data, "attempt", "data.attempt", 1, MAX_ATTEMPT, None)
    token = _str(data, "callbackToken", "data.callbackToken")
    assert token is not None
    if not MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS or not token.isprintable():
        raise PayloadError(
            "data.callbackToken", f"must be {MIN_TOKEN_CHARS}-{MAX_TOKEN_CHARS} printable chars"
        )
    repo = _obj(data.get("repository"), "data.repository")
    url = _str(repo, "url", "data.repository.url")
    assert url is not None
    ref = check_ref(_str(repo, "ref", "data.repository.ref", required=False))
    priority = _int(data, "priority", "data.priority", *PRIORITY_RANGE, default=0)
    return JobSpec(
        job_id=job_id,
        attempt=attempt,
        callback_token=token,
        repository=Repository(url=url, ref=ref),
        options=_options(data.get("options")),
        priority=priority,
    )


def parse_envelope(webhook_id: str, doc: Any, body: bytes) -> Envelope:
    """Validate a decoded body against the schema; the id must match the event it carries."""
    top = _obj(doc, "body")
    event_type = _str(top, "type", "type")
    if event_type not in EVENT_TYPES:
        raise PayloadError("type", f"unknown event type {event_type!r}")
    _str(top, "timestamp", "timestamp", required=False)
    data = _obj(top.get("data"), "data")
    event: JobSpec | CancelRequest
    if event_type == JOB_START:
        event = _job_start(data)
        expected_id = f"{event.job_id}:{event.attempt}"
    else:
        event = CancelRequest(
            job_id=_job_id(data),
            attempt=_int(data, "attempt", "data.attempt", 1, MAX_ATTEMPT, None),
        )
        expected_id = f"{event.job_id}:{event.attempt}:cancel"
    if webhook_id != expected_id:
        raise PayloadError("webhook-id", f"must be {expected_id!r} for this {event_type}")
    return Envelope(
        webhook_id=webhook_id, event_type=event_type, event=event, fingerprint=fingerprint(body)
    )
