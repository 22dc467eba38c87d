"""`fondation-worker run-one`, pure parts: reading the message, the webhook route's checks, and
the exit code from what was reported (tests/e2e/test_run_one.py runs the real command)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from app.config import load_settings
from app.domain import CallbackAck, ClaimResult, Failure, FailureCode
from app.errors import LaunchError
from app.run_one import (
    HEADERS_ENV,
    MESSAGE_ENV,
    ExitCode,
    JobMessage,
    WatchedReporter,
    message_from_env,
    open_job_start,
)
from tests.support.signing import OTHER_SECRET, SECRET, cancel_body, headers_for, start_body


def launch_env(body: bytes, headers: dict[str, str]) -> dict[str, str]:
    return {MESSAGE_ENV: body.decode(), HEADERS_ENV: json.dumps(headers)}


# -- pure parts -------------------------------------------------------------------------------


def test_message_from_env_lowercases_headers_and_refuses_junk() -> None:
    body = start_body("j1", "https://github.com/a/b")
    msg = message_from_env(launch_env(body, {"Webhook-Id": "j1:1", "Content-Type": "x"}))
    assert msg.body == body and msg.headers == {"webhook-id": "j1:1", "content-type": "x"}
    assert "tok_" not in repr(msg)  # the callback token stays out of logs and tracebacks
    for env in (
        {},
        {MESSAGE_ENV: body.decode()},
        {MESSAGE_ENV: body.decode(), HEADERS_ENV: "not json"},
        {MESSAGE_ENV: body.decode(), HEADERS_ENV: '["a"]'},
        {MESSAGE_ENV: body.decode(), HEADERS_ENV: '{"webhook-id": 1}'},
        {MESSAGE_ENV: body.decode(), HEADERS_ENV: json.dumps({"x": "y" * 9000})},
    ):
        with pytest.raises(LaunchError):
            message_from_env(env)


def _settings(**env: str) -> Any:
    return load_settings({"WEBHOOK_SECRETS": SECRET, **env})


def test_open_job_start_applies_the_webhook_checks() -> None:
    now = time.time()
    body = start_body("j2", "https://github.com/a/b")
    good = JobMessage(body, headers_for(body, "j2:1"))
    webhook_id, fingerprint, spec = open_job_start(_settings(), good, now)
    assert (webhook_id, spec.job_id, spec.attempt) == ("j2:1", "j2", 1)
    assert len(fingerprint) == 64
    refused = {
        "other secret": JobMessage(body, headers_for(body, "j2:1", secret=OTHER_SECRET)),
        "stale": JobMessage(body, headers_for(body, "j2:1", ts=int(now) - 3600)),
        "tampered": JobMessage(body.replace(b"a/b", b"a/c"), headers_for(body, "j2:1")),
        "id of another job": JobMessage(body, headers_for(body, "j3:1")),
        "not JSON media": JobMessage(
            body, {**headers_for(body, "j2:1"), "content-type": "text/plain"}
        ),
        "a cancel": JobMessage(cancel_body("j2"), headers_for(cancel_body("j2"), "j2:1:cancel")),
    }
    for name, msg in refused.items():
        with pytest.raises(Exception) as info:
            open_job_start(_settings(), msg, now)
        assert info.type.__module__ == "app.errors", name
    # A longer tolerance (set on the job definition for queued runs) accepts an older message.
    old = JobMessage(body, headers_for(body, "j2:1", ts=int(now) - 600))
    assert open_job_start(_settings(WEBHOOK_TOLERANCE_S="900"), old, now)[0] == "j2:1"


class _Inner:
    def __init__(self, claim: ClaimResult, ack: CallbackAck | None = None) -> None:
        self.claim_result, self.ack = claim, ack or CallbackAck()

    async def claim(self, spec: Any) -> ClaimResult:
        return self.claim_result

    async def progress(self, spec: Any, update: Any) -> CallbackAck:
        return self.ack

    async def put_docs(self, spec: Any, docs: Any, partial: Any = None) -> CallbackAck:
        return self.ack

    async def complete(self, spec: Any, docs_count: int, duration_ms: int) -> None:
        pass

    async def fail(self, spec: Any, failure: Failure) -> None:
        pass


async def test_exit_code_follows_what_was_reported() -> None:
    spec: Any = object()
    w = WatchedReporter(_Inner(ClaimResult(ok=True)))
    assert w.exit_code() is ExitCode.UNREPORTED  # nothing reported: the lease decides
    await w.claim(spec)
    await w.complete(spec, 3, 10)
    assert w.exit_code() is ExitCode.COMPLETED
    for code, expected in (
        (FailureCode.CLI_FAILED, ExitCode.FAILED),
        (FailureCode.CANCELED, ExitCode.CANCELED),
        (FailureCode.INTERRUPTED, ExitCode.INTERRUPTED),
    ):
        w = WatchedReporter(_Inner(ClaimResult(ok=True)))
        await w.fail(spec, Failure(code, "x"))
        assert w.exit_code() is expected
    w = WatchedReporter(_Inner(ClaimResult(ok=False, reason="stale_attempt")))
    await w.claim(spec)
    assert w.exit_code() is ExitCode.DROPPED
    w = WatchedReporter(_Inner(ClaimResult(ok=True), CallbackAck(stop=True, reason="superseded")))
    await w.progress(spec, None)
    assert w.exit_code() is ExitCode.DROPPED
