"""The pipeline's runner and outcome, without git or a CLI: phases are plain coroutines."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from app.clock import SystemClock
from app.config import load_settings
from app.domain import (
    CallbackAck,
    ClaimResult,
    Doc,
    Failure,
    FailureCode,
    JobSpec,
    JobStatus,
    PartialDocs,
    Progress,
    Repository,
)
from app.errors import JobFailure
from app.logs import Redactor
from app.metrics import create_metrics
from app.pipeline.attempt import Attempt, RunnerDeps, RunState, StopReason, Workspace
from app.pipeline.collect import CollectInput
from app.pipeline.outcome import decide_outcome
from app.pipeline.reporting import send_final
from app.pipeline.runner import COLLECT, UPLOAD, Phase, Stopped, run_phase
from app.urlpolicy import UrlPolicy
from tests.support.fakes import public_resolver


@dataclass
class Recorder:
    calls: list[tuple[str, Any]] = field(default_factory=list)

    async def claim(self, spec: JobSpec) -> ClaimResult:
        return ClaimResult(ok=True)

    async def progress(self, spec: JobSpec, update: Progress) -> CallbackAck:
        self.calls.append(("progress", update.status))
        return CallbackAck()

    async def put_docs(
        self, spec: JobSpec, docs: Sequence[Doc], partial: PartialDocs | None = None
    ) -> CallbackAck:
        # What a batch looked like, not the docs themselves (memory is measured).
        size = sum(len(d.content.encode()) for d in docs)
        leaked = any("s3cret-value" in d.content or "s3cret-value" in d.title for d in docs)
        self.calls.append(("put_docs", (len(docs), size, leaked)))
        return CallbackAck()

    async def complete(self, spec: JobSpec, docs_count: int, duration_ms: int) -> None:
        self.calls.append(("complete", docs_count))

    async def fail(self, spec: JobSpec, failure: Failure) -> None:
        self.calls.append(("fail", failure))


def make_attempt(tmp_path: Path, budget_s: float = float("inf"), **env: str) -> Attempt:
    settings = load_settings({"DATA_DIR": str(tmp_path), "WORK_DIR": str(tmp_path), **env})
    deps = RunnerDeps(
        settings=settings,
        reporter=Recorder(),
        clock=SystemClock(),
        metrics=create_metrics(),
        environ={},
        resolver=public_resolver,
        redactor=Redactor(["s3cret-value"]),
        policy=UrlPolicy(allowed_hosts=("example.com",)),
    )
    spec = JobSpec("j1", 1, "tok", Repository("https://example.com/r.git", None))
    return Attempt(deps, RunState(spec), Workspace(tmp_path / "ws"), None, budget_s=budget_s)


def observed(attempt: Attempt, label: str) -> float:
    metric = attempt.deps.metrics.step_duration_s.labels(step=label)
    return float(metric._sum.get())


# ── outcome ──────────────────────────────────────────────────────────────────────────


def test_the_failing_step_decides_retryability() -> None:
    r = Redactor(["s3cret-value"])
    transient = JobFailure("clone_failed", "the git server failed", retryable=True)
    final = JobFailure("clone_failed", "ref 'x' not found")
    assert decide_outcome(reason=None, error=transient, docs_count=None, redactor=r).failure == (
        Failure(FailureCode.CLONE_FAILED, "the git server failed", True)
    )
    assert decide_outcome(reason=None, error=final, docs_count=None, redactor=r).failure == (
        Failure(FailureCode.CLONE_FAILED, "ref 'x' not found", False)
    )
    leaky = JobFailure("cli_failed", "boom s3cret-value", retryable=True)
    failure = decide_outcome(reason=None, error=leaky, docs_count=None, redactor=r).failure
    assert failure is not None and "s3cret-value" not in failure.message


def test_a_requested_stop_decides_whatever_the_step_raised() -> None:
    r = Redactor()
    error = JobFailure("output_invalid", "half-written output")
    cancel = decide_outcome(reason=StopReason.CANCEL, error=error, docs_count=None, redactor=r)
    assert cancel.failure == Failure(FailureCode.CANCELED, "canceled on request", False)
    down = decide_outcome(reason=StopReason.SHUTDOWN, error=error, docs_count=3, redactor=r)
    assert down.failure is not None and down.failure.code is FailureCode.INTERRUPTED
    assert down.failure.retryable and down.report
    other = decide_outcome(reason=StopReason.SUPERSEDED, error=None, docs_count=3, redactor=r)
    assert not other.report
    done = decide_outcome(reason=None, error=None, docs_count=7, redactor=r)
    assert done.failure is None and done.docs_count == 7


# ── runner ───────────────────────────────────────────────────────────────────────────


async def test_run_phase_times_each_phase_under_its_label(tmp_path: Path) -> None:
    attempt = make_attempt(tmp_path)

    async def work(_: Attempt, n: int) -> int:
        await asyncio.sleep(0.05)
        return n + 1

    phase = Phase("double", "gather", None, "", work)
    assert await run_phase(attempt, phase, 1) == 2
    assert observed(attempt, "gather") >= 0.04
    await attempt.sender.close(0.0)


async def test_a_stop_before_a_phase_skips_it_and_during_one_cancels_it(tmp_path: Path) -> None:
    attempt = make_attempt(tmp_path)
    started: list[str] = []
    cancelled = asyncio.Event()

    async def hang(_: Attempt, __: None) -> None:
        started.append("hang")
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    phase = Phase("hang", "upload", None, "", hang)
    run = asyncio.ensure_future(run_phase(attempt, phase, None))
    await asyncio.sleep(0.05)
    attempt.run.request_stop(StopReason.CANCEL)
    with pytest.raises(Stopped):
        await asyncio.wait_for(run, 5)
    assert cancelled.is_set()
    with pytest.raises(Stopped):
        await run_phase(attempt, phase, None)
    assert started == ["hang"]
    await attempt.sender.close(0.0)


# ── the final report ─────────────────────────────────────────────────────────────────


async def test_a_cancel_during_a_slow_final_report_does_not_drop_it() -> None:
    arrived = asyncio.Event()

    async def slow_report() -> None:
        await asyncio.sleep(0.3)
        arrived.set()

    async def attempt_end() -> None:
        if await send_final(slow_report(), cancelled=False, deadline_s=2.0, ctx={}):
            raise asyncio.CancelledError

    task = asyncio.ensure_future(attempt_end())
    await asyncio.sleep(0.05)
    task.cancel()  # lands while the report is in flight
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert arrived.is_set()


async def test_a_final_report_past_its_deadline_is_given_up() -> None:
    gave_up = asyncio.Event()

    async def stuck_report() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            gave_up.set()
            raise

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await send_final(stuck_report(), cancelled=True, deadline_s=0.2, ctx={})
    assert gave_up.is_set() and loop.time() - t0 < 2.0


# ── collect and upload (issue 11) ────────────────────────────────────────────────────


async def test_upload_sends_redacted_docs_in_bounded_batches_as_read(tmp_path: Path) -> None:
    """40 chapters of 400 KB: docs go out in batches of at most 4 MiB as they are read (the
    whole course is never held), and a secret the CLI wrote into a chapter is redacted."""
    attempt = make_attempt(tmp_path)
    attempt.workspace.create()
    out = attempt.workspace.out_dir
    (out / "chapters").mkdir()
    n, size = 40, 400_000
    for i in range(1, n + 1):
        leak = "token s3cret-value\n" if i == 1 else ""
        (out / "chapters" / f"chapter_{i}_c.md").write_text(f"# C{i}\n{leak}" + "x" * size)
    tracemalloc.start()
    try:
        collected = await run_phase(attempt, COLLECT, CollectInput(out))
        uploaded = await run_phase(attempt, UPLOAD, collected)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    await attempt.sender.close(0.0)
    assert isinstance(attempt.deps.reporter, Recorder)
    batches = [b for name, b in attempt.deps.reporter.calls if name == "put_docs"]
    assert uploaded.docs_count == n and sum(b[0] for b in batches) == n
    assert len(batches) >= 2 and max(b[1] for b in batches) <= 4 * 1024 * 1024, batches
    assert not any(b[2] for b in batches)
    total = n * size
    print(
        f"[pipeline] upload of {total / 1e6:.1f} MB: {len(batches)} batches, "
        f"peak traced memory {peak / 1e6:.1f} MB"
    )
    assert peak < total * 0.5, (peak, total)


async def test_a_phase_after_the_cli_past_its_deadline_fails_with_timeout(tmp_path: Path) -> None:
    attempt = make_attempt(tmp_path)
    cancelled = asyncio.Event()

    async def wedged(_: Attempt, __: None) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    phase = Phase("collect", "gather", None, "", wedged, timeout_s=0.2)
    with pytest.raises(JobFailure) as info:
        await asyncio.wait_for(run_phase(attempt, phase, None), 5)
    assert info.value.code == "timeout" and not info.value.retryable
    assert cancelled.is_set()
    await attempt.sender.close(0.0)


async def test_heartbeats_stop_once_the_attempt_is_past_its_deadline(tmp_path: Path) -> None:
    attempt = make_attempt(tmp_path, budget_s=0.3, PROGRESS_MIN_INTERVAL_S="0.1", HEARTBEAT_S="0.1")
    attempt.enter(JobStatus.CLONING, "cloning")
    await asyncio.wait_for(attempt.tick(), 5)  # returns instead of beating forever
    await attempt.sender.close(1.0)
    assert isinstance(attempt.deps.reporter, Recorder)
    beats = [c for c in attempt.deps.reporter.calls if c[0] == "progress"]
    assert 1 <= len(beats) <= 5, beats
