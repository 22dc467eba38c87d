"""Phase `clone`: check the URL again (DNS may have changed since the webhook), then a
shallow clone of the ref. Reads the spec's repository and the clone token; writes
`workspace/repo`. Its `JobFailure`s say whether another attempt may help (`app.adapters.git`
knows: a 5xx or a timeout may pass next time, a missing ref will not).

A resumed attempt clones the checkpoint's commit (`pinned`), not the ref: the branch may have
moved since the checkpoint was made, and its files only fit their own commit. When that
commit cannot be fetched for good (gone: force-pushed away, garbage-collected), the ref is
cloned instead and the attempt runs in full; a transient failure (timeout, 5xx) fails the
attempt as usual, so the next one tries the commit again."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from app.adapters import git
from app.domain import FailureCode, JobStatus
from app.errors import JobFailure, UrlPolicyError
from app.pipeline.attempt import Attempt

log = logging.getLogger("fondation.jobs")

STATUS = JobStatus.CLONING
MESSAGE = "cloning the repository"


@dataclass(frozen=True, slots=True)
class CloneInput:
    url: str
    ref: str | None
    dest: Path
    pinned: str | None = None
    """The checkpoint's commit, cloned instead of `ref` when it can be fetched."""


async def clone(attempt: Attempt, inp: CloneInput) -> git.CloneResult:
    deps = attempt.deps
    try:
        target = await deps.policy.check(inp.url, deps.resolver)
    except UrlPolicyError as exc:
        raise JobFailure(FailureCode.CLONE_FAILED, exc.reason, retryable=False) from None

    async def fetch(ref: str | None) -> git.CloneResult:
        # The sandbox's gate: a clone holding a token never runs while a same-uid CLI could
        # read its environment (a factory, so a stop while waiting leaves nothing un-awaited).
        return await deps.sandbox.clone(
            lambda: git.clone(
                inp.url,
                ref,
                inp.dest,
                token=attempt.clone_token,
                timeout_s=deps.settings.clone_timeout_s,
                max_bytes=deps.settings.clone_max_bytes,
                max_entries=deps.settings.clone_max_files,
                addresses=target.addresses,  # git connects to what was checked, no new lookup
                cache=deps.repo_cache,
            ),
            holds_token=bool(attempt.clone_token),
        )

    if inp.pinned is None:
        return await fetch(inp.ref)
    try:
        return await fetch(inp.pinned)
    except JobFailure as exc:
        if exc.retryable:
            raise
        log.warning(
            "the checkpoint's commit cannot be cloned; cloning the ref for a full run",
            extra={**attempt.ctx, "commit": inp.pinned, "error": exc.message},
        )
    await asyncio.to_thread(git.remove_tree, inp.dest)
    return await fetch(inp.ref)
