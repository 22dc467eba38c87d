"""Phase `clone`: check the URL again (DNS may have changed since the webhook), then a
shallow clone of the ref. Reads the spec's repository and the clone token; writes
`workspace/repo`. Its `JobFailure`s say whether another attempt may help (`app.adapters.git`
knows: a 5xx or a timeout may pass next time, a missing ref will not)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.adapters import git
from app.domain import FailureCode, JobStatus
from app.errors import JobFailure, UrlPolicyError
from app.pipeline.attempt import Attempt

STATUS = JobStatus.CLONING
MESSAGE = "cloning the repository"


@dataclass(frozen=True, slots=True)
class CloneInput:
    url: str
    ref: str | None
    dest: Path


async def clone(attempt: Attempt, inp: CloneInput) -> git.CloneResult:
    deps = attempt.deps
    try:
        target = await deps.policy.check(inp.url, deps.resolver)
    except UrlPolicyError as exc:
        raise JobFailure(FailureCode.CLONE_FAILED, exc.reason, retryable=False) from None
    # The sandbox's gate: a clone holding a token never runs while a same-uid CLI could
    # read its environment (a factory, so a stop while waiting leaves nothing un-awaited).
    return await deps.sandbox.clone(
        lambda: git.clone(
            inp.url,
            inp.ref,
            inp.dest,
            token=attempt.clone_token,
            timeout_s=deps.settings.clone_timeout_s,
            max_bytes=deps.settings.clone_max_bytes,
            max_entries=deps.settings.clone_max_files,
            addresses=target.addresses,  # git connects to what was checked, no new lookup
        ),
        holds_token=bool(attempt.clone_token),
    )
