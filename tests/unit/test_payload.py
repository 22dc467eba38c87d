"""Webhook body schema (CONTRACT §2)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.domain import CancelRequest, JobSpec
from app.errors import PayloadError
from app.payload import decode_json, fingerprint, parse_envelope

TOKEN = "t" * 40


def start(**data: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "jobId": "j1",
        "attempt": 1,
        "callbackToken": TOKEN,
        "repository": {"url": "https://github.com/o/r.git", "ref": "main"},
    }
    base.update(data)
    return {"type": "job.start", "timestamp": "2026-11-28T10:00:00Z", "data": base}


def parse(doc: Any, msg_id: str = "j1:1") -> Any:
    body = json.dumps(doc).encode()
    return parse_envelope(msg_id, doc, body)


def test_job_start_parses() -> None:
    env = parse(
        start(
            options={"model": "claude-sonnet-4-20250514", "steps": ["extract", "analyze"]},
            priority=5,
        )
    )
    spec = env.event
    assert isinstance(spec, JobSpec)
    assert spec.key == "j1:1" and spec.priority == 5
    assert spec.options.model == "claude-sonnet-4-20250514"
    assert spec.options.steps == ("extract", "analyze")
    assert TOKEN not in repr(spec)  # the token never shows in logs


def test_job_cancel_parses() -> None:
    doc = {"type": "job.cancel", "timestamp": "x", "data": {"jobId": "j1", "attempt": 2}}
    env = parse(doc, "j1:2:cancel")
    assert env.event == CancelRequest("j1", 2)


@pytest.mark.parametrize(
    ("doc", "msg_id", "field"),
    [
        ([], "j1:1", "body"),
        ({"type": "job.explode", "data": {}}, "j1:1", "type"),
        ({"type": 3, "data": {}}, "j1:1", "type"),
        ({"type": "job.start"}, "j1:1", "data"),
        (start(jobId="../etc"), "../etc:1", "data.jobId"),
        (start(jobId=""), ":1", "data.jobId"),
        (start(attempt=0), "j1:0", "data.attempt"),
        (start(attempt=True), "j1:True", "data.attempt"),
        (start(attempt="1"), "j1:1", "data.attempt"),
        (start(attempt=1.5), "j1:1.5", "data.attempt"),
        (start(callbackToken="short"), "j1:1", "data.callbackToken"),
        (start(callbackToken=None), "j1:1", "data.callbackToken"),
        (start(repository="https://github.com/o/r"), "j1:1", "data.repository"),
        (start(repository={"ref": "main"}), "j1:1", "data.repository.url"),
        (
            start(repository={"url": "https://github.com/o/r", "ref": "-x"}),
            "j1:1",
            "data.repository.ref",
        ),
        (start(options={"model": "x; rm -rf /"}), "j1:1", "data.options.model"),
        (start(options={"shell": "bash"}), "j1:1", "data.options"),
        (start(options={"steps": "extract"}), "j1:1", "data.options.steps"),
        (start(options={"steps": ["--evil"]}), "j1:1", "data.options.steps"),
        (start(options=[]), "j1:1", "data.options"),
        (start(priority=10**12), "j1:1", "data.priority"),
        (start(), "j1:2", "webhook-id"),
        (start(), "j1:1:cancel", "webhook-id"),
    ],
)
def test_schema_violations_name_the_field(doc: Any, msg_id: str, field: str) -> None:
    with pytest.raises(PayloadError) as info:
        parse(doc, msg_id)
    assert info.value.field == field


def test_decode_json_rejects_non_json() -> None:
    with pytest.raises(ValueError):
        decode_json(b"not json")
    with pytest.raises(ValueError):
        decode_json(b"\xff\xfe")


def test_fingerprint_depends_on_every_byte() -> None:
    assert fingerprint(b"{}") != fingerprint(b"{} ")
    assert len(fingerprint(b"")) == 64
