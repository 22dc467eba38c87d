"""The embedded SQLite store: dedupe window, job transitions, events, restart."""

from __future__ import annotations

from pathlib import Path

from app.adapters.sqlite_store import SqliteJobStore
from app.clock import FakeClock
from app.config import DEDUPE_MIN_S
from app.domain import (
    CancelRequest,
    Doc,
    DocKind,
    Failure,
    FailureCode,
    JobSpec,
    JobStatus,
    Progress,
    Repository,
)

SPEC = JobSpec("j1", 1, "t" * 40, Repository("https://github.com/o/r.git", "main"))


def store(tmp_path: Path, clock: FakeClock, worker: str = "w1") -> SqliteJobStore:
    return SqliteJobStore(
        tmp_path / "db.sqlite3", clock=clock, worker_id=worker, dedupe_ttl_s=DEDUPE_MIN_S
    )


def test_record_once_then_existing(tmp_path: Path) -> None:
    s = store(tmp_path, FakeClock())
    assert s.record_start("j1:1", "fp", SPEC).recorded
    again = s.record_start("j1:1", "fp2", SPEC)
    assert not again.recorded and again.existing is not None and again.existing.fingerprint == "fp"
    assert s.get_job("j1") is not None and s.get_job("j1").status is JobStatus.ACCEPTED  # type: ignore[union-attr]


def test_dedupe_window_is_at_least_72_hours(tmp_path: Path) -> None:
    clock = FakeClock()
    s = store(tmp_path, clock)
    s.record_start("j1:1", "fp", SPEC)
    clock.advance(72 * 3600 - 1)
    assert s.lookup_delivery("j1:1") is not None
    assert s.prune() == 0
    clock.advance(2)
    assert s.lookup_delivery("j1:1") is None
    assert s.prune() == 1


def test_two_stores_on_one_file_agree(tmp_path: Path) -> None:
    clock = FakeClock()
    a, b = store(tmp_path, clock, "a"), store(tmp_path, clock, "b")
    assert a.record_start("j1:1", "fp", SPEC).recorded
    assert not b.record_start("j1:1", "fp", SPEC).recorded


async def test_lifecycle_and_events(tmp_path: Path) -> None:
    s = store(tmp_path, FakeClock())
    s.record_start("j1:1", "fp", SPEC)
    assert (await s.claim(SPEC)).ok
    assert not (await store(tmp_path, FakeClock(), "other").claim(SPEC)).ok
    await s.progress(SPEC, Progress(2, JobStatus.ANALYZING, 1, 3, "step one"))
    await s.progress(SPEC, Progress(1, JobStatus.CLONING, 0, 0, "stale"))  # ignored
    job = s.get_job("j1")
    assert job is not None and job.status is JobStatus.ANALYZING and job.message == "step one"
    docs = [Doc("a", "A", DocKind.YAML, None, "x"), Doc("b", "B", DocKind.CHAPTER, 1, "y")]
    await s.put_docs(SPEC, docs)
    await s.put_docs(SPEC, docs[1:])  # idempotent on slug
    assert [d.slug for d in s.list_docs("j1", 1)] == ["a", "b"]
    await s.complete(SPEC, 2, 1234)
    job = s.get_job("j1")
    assert job is not None and job.status is JobStatus.COMPLETED and job.docs_count == 2
    types = [e.type for e in s.events_since("j1", 0)]
    assert types == ["status", "status", "progress", "status"]
    ack = await s.progress(SPEC, Progress(9, JobStatus.ANALYZING, 2, 3, "late"))
    assert ack.stop


async def test_fail_and_cancel_status(tmp_path: Path) -> None:
    s = store(tmp_path, FakeClock())
    s.record_start("j1:1", "fp", SPEC)
    s.record_cancel("j1:1:cancel", "fpc", CancelRequest("j1", 1))
    await s.fail(SPEC, Failure(FailureCode.CANCELED, "canceled on request"))
    job = s.get_job("j1")
    assert job is not None and job.status is JobStatus.CANCELED and job.error_code == "canceled"


def test_restart_marks_own_orphans_interrupted(tmp_path: Path) -> None:
    clock = FakeClock()
    s = store(tmp_path, clock, "w1")
    s.record_start("j1:1", "fp", SPEC)
    other = JobSpec("j2", 1, "t" * 40, Repository("https://github.com/o/r.git"))
    store(tmp_path, clock, "w2").record_start("j2:1", "fp", other)
    s.close()
    again = store(tmp_path, clock, "w1")
    assert [j.job_id for j in again.interrupt_orphans()] == ["j1"]
    j1, j2 = again.get_job("j1"), again.get_job("j2")
    assert j1 is not None and j1.status is JobStatus.FAILED and j1.error_code == "interrupted"
    assert j2 is not None and j2.status is JobStatus.ACCEPTED  # another worker's job is left alone


async def test_finished_jobs_docs_and_events_are_pruned_after_the_retention(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    s = SqliteJobStore(
        tmp_path / "db.sqlite3",
        clock=clock,
        worker_id="w1",
        dedupe_ttl_s=DEDUPE_MIN_S,
        retention_s=7 * 24 * 3600,
    )
    done = SPEC
    running = JobSpec("j2", 1, "t" * 40, Repository("https://github.com/o/r.git", "main"))
    for spec in (done, running):
        s.record_start(f"{spec.key}", "fp", spec)
        await s.claim(spec)
        await s.progress(spec, Progress(1, JobStatus.ANALYZING, 1, 2, "step", ("log",)))
    await s.put_docs(done, [Doc("a", "A", DocKind.CHAPTER, 1, "# A\n")])
    await s.complete(done, 1, 10)
    clock.advance(7 * 24 * 3600 - 1)
    s.prune()
    assert s.get_job("j1") is not None and s.list_docs("j1", 1)
    clock.advance(2)
    s.prune()
    assert s.get_job("j1") is None
    assert s.list_docs("j1", 1) == [] and s.events_since("j1", 0) == []
    # A job still running is never pruned, however old.
    assert s.get_job("j2") is not None and s.events_since("j2", 0)


def test_a_failed_commit_is_a_store_error_and_leaves_no_transaction(tmp_path: Path) -> None:
    import sqlite3

    import pytest

    from app.errors import StoreError

    s = store(tmp_path, FakeClock())
    real = s._db

    class FullOnCommit:
        def execute(self, sql: str, *args: object) -> object:
            if sql == "COMMIT":
                raise sqlite3.OperationalError("database or disk is full")
            return real.execute(sql, *args)

        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

    s._db = FullOnCommit()  # type: ignore[assignment]
    with pytest.raises(StoreError, match="disk is full"):
        s.record_start("j1:1", "fp", SPEC)
    s._db = real
    assert not real.in_transaction
    assert s.lookup_delivery("j1:1") is None  # rolled back
    assert s.record_start("j1:1", "fp", SPEC).recorded


def test_duplicate_lookups_are_answered_from_memory(tmp_path: Path) -> None:
    clock = FakeClock()
    s = store(tmp_path, clock)
    s.record_start("j1:1", "fp", SPEC)
    s.record_cancel("c1", "fpc", CancelRequest("j1", 1))
    statements: list[str] = []
    s._db.set_trace_callback(statements.append)
    start, cancel = s.lookup_delivery("j1:1"), s.lookup_delivery("c1")
    assert start is not None and (start.fingerprint, start.type, start.job_id) == (
        "fp",
        "job.start",
        "j1",
    )
    assert cancel is not None and (cancel.type, cancel.attempt) == ("job.cancel", 1)
    assert statements == []  # no SQL for a delivery this process recorded
    assert s.job_status("j1", 1) == "accepted" and s.job_status("j1", 2) is None
    # A delivery recorded by another process is read once, then remembered.
    other = store(tmp_path, clock, "w2")
    other.record_start("j2:1", "fp2", JobSpec("j2", 1, "t" * 40, SPEC.repository))
    assert s.lookup_delivery("j2:1") is not None
    statements.clear()
    assert s.lookup_delivery("j2:1") is not None and statements == []


async def test_cached_job_status_follows_every_transition(tmp_path: Path) -> None:
    s = store(tmp_path, FakeClock())
    s.record_start("j1:1", "fp", SPEC)
    assert s.job_status("j1", 1) == "accepted"
    assert (await s.claim(SPEC)).ok
    assert s.job_status("j1", 1) == str(s.get_job("j1", 1).status)  # type: ignore[union-attr]
    await s.fail(SPEC, Failure(FailureCode.CLI_FAILED, "boom", True))
    assert s.job_status("j1", 1) == "failed"
