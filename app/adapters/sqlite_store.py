"""The embedded job store: SQLite under DATA_DIR.

It always keeps the webhook deliveries (deduplication for at least 72 h) and a local view of
each job and its events; without `CONVEX_URL` it is also the store the runner reports to.
Writes are short and happen on the event loop's thread, so the dedupe-then-reserve step of the
webhook handler is atomic within a process; across processes the unique keys decide.

When SQLite fails (a full disk, an I/O error, a lock held too long) every method raises
`StoreError` with a short reason, never `sqlite3` errors; the reporter methods raise its
`CallbackError` (retryable), which the runner already survives. A job's state changes
(claim, complete, fail) are retried a few times, since losing one leaves the job unfinished;
a progress report is not (the next one carries the whole state); docs that cannot be
written fail the job with a message saying so.

Resume (embedded mode): partial docs are kept per job and path in `partial_docs`, with the
commit they were made from and the steps that ended in `checkpoints`; they are the files of
the job's furthest attempt, since a resumed attempt continues them (an attempt of another
commit starts over: its first partial batch replaces them). The next attempt's claim returns
them; `complete` drops them (the final docs replace them); `GET /v1/jobs/{id}/docs` shows them
while the job has no final docs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from app.clock import Clock
from app.domain import (
    CallbackAck,
    CancelRequest,
    Checkpoint,
    CheckpointFile,
    ClaimResult,
    Doc,
    DocKind,
    Failure,
    FailureCode,
    JobSpec,
    JobStatus,
    PartialDocs,
    Progress,
)
from app.errors import CallbackError, StoreError

T = TypeVar("T")

SCHEMA_VERSION = 2
DEFAULT_RETENTION_S = 7 * 24 * 3600.0
"""How long a finished job, its docs and its events stay in the embedded store
(JOB_RETENTION_S)."""
STATE_RETRY_DELAYS_S = (0.25, 0.5, 1.0, 2.0, 4.0)
"""Waits between the attempts of a job's state change (claim, complete, fail): ~8 s in all,
for an operator or the pruner to free space, short of the shutdown grace."""
STORE_FULL = "store_full"
"""`CallbackAck.reason` when the docs could not be stored and the job was failed for it."""
RECENT_DELIVERIES = 4096  # deliveries kept in memory for the duplicate path
_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
  webhook_id TEXT PRIMARY KEY,
  fingerprint TEXT NOT NULL,
  type TEXT NOT NULL,
  job_id TEXT NOT NULL,
  attempt INTEGER NOT NULL,
  created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_created ON deliveries(created_at);
CREATE TABLE IF NOT EXISTS jobs (
  job_id TEXT NOT NULL,
  attempt INTEGER NOT NULL,
  status TEXT NOT NULL,
  repository_url TEXT NOT NULL,
  ref TEXT,
  options TEXT NOT NULL,
  priority INTEGER NOT NULL,
  accepted_by TEXT NOT NULL,
  claimed_by TEXT,
  seq INTEGER NOT NULL DEFAULT 0,
  current_step INTEGER NOT NULL DEFAULT 0,
  total_steps INTEGER NOT NULL DEFAULT 0,
  message TEXT NOT NULL DEFAULT '',
  docs_count INTEGER NOT NULL DEFAULT 0,
  error_code TEXT,
  error_message TEXT,
  retryable INTEGER,
  duration_ms INTEGER,
  created_at REAL NOT NULL,
  updated_at REAL NOT NULL,
  PRIMARY KEY (job_id, attempt)
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created_at);
CREATE TABLE IF NOT EXISTS docs (
  job_id TEXT NOT NULL,
  attempt INTEGER NOT NULL,
  slug TEXT NOT NULL,
  position INTEGER NOT NULL,
  title TEXT NOT NULL,
  kind TEXT NOT NULL,
  chapter_index INTEGER,
  content TEXT NOT NULL,
  PRIMARY KEY (job_id, attempt, slug)
);
CREATE TABLE IF NOT EXISTS events (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  job_id TEXT NOT NULL,
  attempt INTEGER NOT NULL,
  type TEXT NOT NULL,
  data TEXT NOT NULL,
  at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, id);
CREATE TABLE IF NOT EXISTS checkpoints (
  job_id TEXT PRIMARY KEY,
  attempt INTEGER NOT NULL,
  commit_sha TEXT NOT NULL,
  ended TEXT NOT NULL DEFAULT '[]',
  updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS partial_docs (
  job_id TEXT NOT NULL,
  path TEXT NOT NULL,
  attempt INTEGER NOT NULL,
  slug TEXT NOT NULL,
  title TEXT NOT NULL,
  kind TEXT NOT NULL,
  chapter_index INTEGER,
  content TEXT NOT NULL,
  PRIMARY KEY (job_id, path)
);
"""
# Columns added after version 1: (table, column, definition), added when missing.
_ADDED_COLUMNS = (("jobs", "commit_sha", "TEXT"),)
_ACTIVE = (
    JobStatus.ACCEPTED,
    JobStatus.CLAIMED,
    JobStatus.CLONING,
    JobStatus.ANALYZING,
    JobStatus.GATHERING,
)


@dataclass(frozen=True, slots=True)
class Delivery:
    """A webhook delivery already seen."""

    webhook_id: str
    fingerprint: str
    type: str
    job_id: str
    attempt: int
    created_at: float


@dataclass(frozen=True, slots=True)
class JobView:
    """The local view of one job attempt, as `GET /v1/jobs/{jobId}` shows it."""

    job_id: str
    attempt: int
    status: JobStatus
    repository_url: str
    ref: str | None
    priority: int
    current_step: int
    total_steps: int
    message: str
    docs_count: int
    error_code: str | None
    error_message: str | None
    retryable: bool | None
    duration_ms: int | None
    worker_id: str | None
    created_at: float
    updated_at: float
    options: dict[str, Any] = field(default_factory=dict)
    commit: str | None = None

    def to_json(self) -> dict[str, Any]:
        error = None
        if self.error_code is not None:
            error = {
                "code": self.error_code,
                "message": self.error_message,
                "retryable": self.retryable,
            }
        return {
            "jobId": self.job_id,
            "attempt": self.attempt,
            "status": str(self.status),
            "repository": {"url": self.repository_url, "ref": self.ref},
            "options": self.options,
            "priority": self.priority,
            "currentStep": self.current_step,
            "totalSteps": self.total_steps,
            "message": self.message,
            "docsCount": self.docs_count,
            "error": error,
            "durationMs": self.duration_ms,
            "workerId": self.worker_id,
            "commit": self.commit,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
        }


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One change of a job, as the event stream sends it."""

    id: int
    job_id: str
    attempt: int
    type: str
    data: dict[str, Any]
    at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "jobId": self.job_id,
            "attempt": self.attempt,
            "type": self.type,
            "at": self.at,
            **self.data,
        }


@dataclass(frozen=True, slots=True)
class RecordResult:
    """Outcome of recording a delivery: `existing` is set when the id was seen before."""

    recorded: bool
    existing: Delivery | None = None


class ChangeFeed:
    """Wakes event-stream readers when the store changes (within this process)."""

    def __init__(self) -> None:
        self._waiters: set[asyncio.Future[None]] = set()

    def notify(self) -> None:
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()

    async def wait(self, timeout_s: float) -> None:
        """Return on the next change, or after `timeout_s` (to catch other processes)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(fut)
        try:
            # Not `asyncio.wait_for`: on Python 3.11 it swallows a cancellation that arrives
            # as the change completes the wait, and the caller's loop never ends.
            async with asyncio.timeout(timeout_s):
                await fut
        except TimeoutError:
            pass
        finally:
            self._waiters.discard(fut)


def _row_to_doc(r: sqlite3.Row, path: str | None = None) -> Doc:
    """A `docs` or `partial_docs` row as a Doc (`path`: partial docs only)."""
    return Doc(
        slug=r["slug"],
        title=r["title"],
        kind=DocKind(r["kind"]),
        chapter_index=r["chapter_index"],
        content=r["content"],
        path=path,
    )


def _row_to_view(row: sqlite3.Row) -> JobView:
    return JobView(
        job_id=row["job_id"],
        attempt=row["attempt"],
        status=JobStatus(row["status"]),
        repository_url=row["repository_url"],
        ref=row["ref"],
        priority=row["priority"],
        current_step=row["current_step"],
        total_steps=row["total_steps"],
        message=row["message"],
        docs_count=row["docs_count"],
        error_code=row["error_code"],
        error_message=row["error_message"],
        retryable=None if row["retryable"] is None else bool(row["retryable"]),
        duration_ms=row["duration_ms"],
        worker_id=row["claimed_by"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        options=json.loads(row["options"]),
        commit=row["commit_sha"],
    )


class SqliteJobStore:
    """Deliveries, jobs, docs and events in one SQLite file; also a `JobReporter`."""

    def __init__(
        self,
        path: Path,
        *,
        clock: Clock,
        worker_id: str,
        dedupe_ttl_s: int,
        retention_s: float = DEFAULT_RETENTION_S,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._clock = clock
        self._worker_id = worker_id
        self._dedupe_ttl_s = dedupe_ttl_s
        self._retention_s = retention_s
        self._lock = threading.Lock()
        # Deliveries never change once recorded: the duplicate path answers from memory.
        self._recent: OrderedDict[str, Delivery] = OrderedDict()
        # Job statuses read by the duplicate path; every write through `_update` drops its
        # entry. (Another process writing the same file would not: one worker owns DATA_DIR.)
        self._statuses: OrderedDict[tuple[str, int], str] = OrderedDict()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        for table, column, definition in _ADDED_COLUMNS:
            have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self.feed = ChangeFeed()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self, callback: str | None = None) -> Iterator[sqlite3.Connection]:
        """One write transaction. A SQLite failure becomes `StoreError`, or `CallbackError`
        (retryable) for a reporter method named by `callback`."""
        with self._lock, self._errors(callback):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back already (it does on some SQLITE_FULL): never let
                # a failed ROLLBACK hide the error, nor leave the connection in a transaction.
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise
        self.feed.notify()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._errors(None):
            yield self._db

    @staticmethod
    @contextmanager
    def _errors(callback: str | None) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as exc:  # full, I/O error, locked, read-only
            reason = f"the job store failed: {exc}"
            if callback is None:
                raise StoreError(reason) from None
            raise CallbackError(callback, reason, retryable=True) from None

    async def _retried(self, callback: str, write: Callable[[], Awaitable[T]]) -> T:
        """Run a job state change, again after each of `STATE_RETRY_DELAYS_S` while the store
        fails; the last failure is raised."""
        for delay_s in STATE_RETRY_DELAYS_S:
            try:
                return await write()
            except CallbackError:
                await asyncio.sleep(delay_s)
        return await write()

    def _event(
        self, db: sqlite3.Connection, job_id: str, attempt: int, kind: str, data: dict[str, Any]
    ) -> None:
        db.execute(
            "INSERT INTO events(job_id, attempt, type, data, at) VALUES (?,?,?,?,?)",
            (job_id, attempt, kind, json.dumps(data), self._clock.now()),
        )

    def _update(self, db: sqlite3.Connection, job_id: str, attempt: int, **columns: object) -> None:
        """Set job columns (names are code constants, never input) and `updated_at`."""
        self._statuses.pop((job_id, attempt), None)
        assignments = ", ".join(f"{name} = ?" for name in columns)
        db.execute(
            f"UPDATE jobs SET {assignments}, updated_at = ? "  # noqa: S608
            "WHERE job_id = ? AND attempt = ?",
            (*columns.values(), self._clock.now(), job_id, attempt),
        )

    def _set_status(
        self,
        db: sqlite3.Connection,
        job_id: str,
        attempt: int,
        status: JobStatus,
        event: dict[str, Any],
        **columns: object,
    ) -> None:
        """Move a job to `status` and record the status event in the same transaction."""
        self._update(db, job_id, attempt, status=str(status), **columns)
        self._event(db, job_id, attempt, "status", {"status": str(status), **event})

    # -- deliveries ---------------------------------------------------------------------

    def lookup_delivery(self, webhook_id: str) -> Delivery | None:
        """The delivery with this id if seen within the dedupe window."""
        cutoff = self._clock.now() - self._dedupe_ttl_s
        with self._read():
            cached = self._recent.get(webhook_id)
            if cached is not None and cached.created_at >= cutoff:
                self._recent.move_to_end(webhook_id)
                return cached
            row = self._db.execute(
                "SELECT * FROM deliveries WHERE webhook_id = ? AND created_at >= ?",
                (webhook_id, cutoff),
            ).fetchone()
        if row is None:
            return None
        delivery = Delivery(**dict(row))
        self._remember(delivery)
        return delivery

    def _remember(self, delivery: Delivery) -> None:
        with self._lock:
            self._recent[delivery.webhook_id] = delivery
            self._recent.move_to_end(delivery.webhook_id)
            if len(self._recent) > RECENT_DELIVERIES:
                self._recent.popitem(last=False)

    def record_start(self, webhook_id: str, fingerprint: str, spec: JobSpec) -> RecordResult:
        """Record a `job.start` delivery and its job; a concurrent twin gets `existing`."""
        now = self._clock.now()
        with self._tx() as db:
            inserted = self._insert_delivery(db, webhook_id, fingerprint, "job.start", spec, now)
            if not inserted:
                return RecordResult(False, self._delivery(db, webhook_id))
            db.execute(
                """INSERT INTO jobs(job_id, attempt, status, repository_url, ref, options,
                   priority, accepted_by, created_at, updated_at)
                   VALUES (?,?,?,?,?,?,?,?,?,?)
                   ON CONFLICT(job_id, attempt) DO NOTHING""",
                (
                    spec.job_id,
                    spec.attempt,
                    JobStatus.ACCEPTED,
                    spec.repository.url,
                    spec.repository.ref,
                    json.dumps(spec.options.to_json()),
                    spec.priority,
                    self._worker_id,
                    now,
                    now,
                ),
            )
            self._event(db, spec.job_id, spec.attempt, "status", {"status": "accepted"})
        self._remember(
            Delivery(webhook_id, fingerprint, "job.start", spec.job_id, spec.attempt, now)
        )
        return RecordResult(True)

    def record_cancel(self, webhook_id: str, fingerprint: str, req: CancelRequest) -> RecordResult:
        """Record a `job.cancel` delivery."""
        now = self._clock.now()
        with self._tx() as db:
            if not self._insert_delivery(db, webhook_id, fingerprint, "job.cancel", req, now):
                return RecordResult(False, self._delivery(db, webhook_id))
            self._event(db, req.job_id, req.attempt, "cancel_requested", {})
        self._remember(
            Delivery(webhook_id, fingerprint, "job.cancel", req.job_id, req.attempt, now)
        )
        return RecordResult(True)

    def _insert_delivery(
        self,
        db: sqlite3.Connection,
        webhook_id: str,
        fingerprint: str,
        kind: str,
        event: JobSpec | CancelRequest,
        now: float,
    ) -> bool:
        # An expired delivery may be replaced: the window is a minimum, not a maximum.
        db.execute(
            "DELETE FROM deliveries WHERE webhook_id = ? AND created_at < ?",
            (webhook_id, now - self._dedupe_ttl_s),
        )
        cur = db.execute(
            """INSERT INTO deliveries(webhook_id, fingerprint, type, job_id, attempt, created_at)
               VALUES (?,?,?,?,?,?) ON CONFLICT(webhook_id) DO NOTHING""",
            (webhook_id, fingerprint, kind, event.job_id, event.attempt, now),
        )
        return cur.rowcount == 1

    def _delivery(self, db: sqlite3.Connection, webhook_id: str) -> Delivery | None:
        row = db.execute("SELECT * FROM deliveries WHERE webhook_id = ?", (webhook_id,)).fetchone()
        return None if row is None else Delivery(**dict(row))

    def prune(self) -> int:
        """Forget deliveries older than the dedupe window, and finished jobs (with their
        docs and events) not updated for `retention_s`; returns how many deliveries."""
        now = self._clock.now()
        final = [str(status) for status in JobStatus if status.is_final]
        marks = ",".join("?" for _ in final)
        with self._tx() as db:
            cur = db.execute(
                "DELETE FROM deliveries WHERE created_at < ?", (now - self._dedupe_ttl_s,)
            )
            db.execute("CREATE TEMP TABLE IF NOT EXISTS expired(job_id TEXT, attempt INTEGER)")
            db.execute("DELETE FROM temp.expired")
            db.execute(
                f"INSERT INTO temp.expired SELECT job_id, attempt FROM jobs "  # noqa: S608
                f"WHERE status IN ({marks}) AND updated_at < ?",
                (*final, now - self._retention_s),
            )
            for table in ("docs", "events", "jobs"):
                db.execute(
                    f"DELETE FROM {table} WHERE (job_id, attempt) IN "  # noqa: S608
                    "(SELECT job_id, attempt FROM temp.expired)"
                )
            for table in ("checkpoints", "partial_docs"):  # jobs with no attempt left
                db.execute(
                    f"DELETE FROM {table} WHERE NOT EXISTS (SELECT 1 FROM jobs "  # noqa: S608
                    f"WHERE jobs.job_id = {table}.job_id)"
                )
            # Events of attempts the store never knew (a cancel for another worker's job).
            db.execute(
                "DELETE FROM events WHERE at < ? AND NOT EXISTS (SELECT 1 FROM jobs "
                "WHERE jobs.job_id = events.job_id AND jobs.attempt = events.attempt)",
                (now - self._retention_s,),
            )
            return cur.rowcount

    # -- reads --------------------------------------------------------------------------

    def get_job(self, job_id: str, attempt: int | None = None) -> JobView | None:
        """The job's latest attempt (or the given one)."""
        with self._read():
            if attempt is None:
                row = self._db.execute(
                    "SELECT * FROM jobs WHERE job_id = ? ORDER BY attempt DESC LIMIT 1",
                    (job_id,),
                ).fetchone()
            else:
                row = self._db.execute(
                    "SELECT * FROM jobs WHERE job_id = ? AND attempt = ?", (job_id, attempt)
                ).fetchone()
        return None if row is None else _row_to_view(row)

    def job_status(self, job_id: str, attempt: int) -> str | None:
        """The attempt's status alone (the duplicate answer needs nothing else)."""
        key = (job_id, attempt)
        with self._lock:
            cached = self._statuses.get(key)
            if cached is not None:
                return cached
            row = self._db.execute(
                "SELECT status FROM jobs WHERE job_id = ? AND attempt = ?", key
            ).fetchone()
            if row is None:
                return None
            self._statuses[key] = status = str(row[0])
            if len(self._statuses) > RECENT_DELIVERIES:
                self._statuses.popitem(last=False)
        return status

    def list_jobs(self, *, limit: int = 50, status: JobStatus | None = None) -> list[JobView]:
        """Most recent first."""
        query = "SELECT * FROM jobs"
        args: list[Any] = []
        if status is not None:
            query += " WHERE status = ?"
            args.append(str(status))
        query += " ORDER BY created_at DESC LIMIT ?"
        args.append(limit)
        with self._read():
            rows = self._db.execute(query, args).fetchall()
        return [_row_to_view(r) for r in rows]

    def list_docs(self, job_id: str, attempt: int) -> list[Doc]:
        with self._read():
            rows = self._db.execute(
                "SELECT * FROM docs WHERE job_id = ? AND attempt = ? ORDER BY position",
                (job_id, attempt),
            ).fetchall()
        return [_row_to_doc(r) for r in rows]

    def list_partial_docs(self, job_id: str) -> list[Doc]:
        """The job's partial docs (its checkpoint's files), in course order: the YAML plans,
        the chapters by index (a reviewed chapter in place of its draft), the tutorials."""
        with self._read():
            rows = self._db.execute(
                "SELECT * FROM partial_docs WHERE job_id = ? ORDER BY path", (job_id,)
            ).fetchall()
        kinds = {str(DocKind.YAML): 0, str(DocKind.CHAPTER): 1, str(DocKind.TUTORIAL): 2}
        by_slug: dict[tuple[str, str], sqlite3.Row] = {}
        for r in rows:  # by path: chapters/ before reviewed-chapters/, which wins
            by_slug[(r["kind"], r["slug"])] = r
        ordered = sorted(
            by_slug.values(),
            key=lambda r: (kinds.get(r["kind"], 3), r["chapter_index"] or 0, r["path"]),
        )
        return [_row_to_doc(r, path=r["path"]) for r in ordered]

    def checkpoint(self, job_id: str) -> Checkpoint | None:
        """The files the job's furthest attempt uploaded as partial docs, with their commit."""
        with self._read():
            cp = self._db.execute(
                "SELECT * FROM checkpoints WHERE job_id = ?", (job_id,)
            ).fetchone()
            if cp is None:
                return None
            rows = self._db.execute(
                "SELECT path, content FROM partial_docs WHERE job_id = ? ORDER BY path",
                (job_id,),
            ).fetchall()
        files = tuple(CheckpointFile(r["path"], r["content"].encode("utf-8")) for r in rows)
        return Checkpoint(cp["commit_sha"], files, tuple(json.loads(cp["ended"])))

    def events_since(self, job_id: str, after_id: int, limit: int = 200) -> list[JobEvent]:
        with self._read():
            rows = self._db.execute(
                "SELECT * FROM events WHERE job_id = ? AND id > ? ORDER BY id LIMIT ?",
                (job_id, after_id, limit),
            ).fetchall()
        return [
            JobEvent(
                id=r["id"],
                job_id=r["job_id"],
                attempt=r["attempt"],
                type=r["type"],
                data=json.loads(r["data"]),
                at=r["at"],
            )
            for r in rows
        ]

    def interrupt_orphans(self) -> list[JobView]:
        """Mark this worker's unfinished jobs from an earlier process as failed/interrupted:
        in embedded mode nobody else would ever finish them."""
        placeholders = ",".join("?" for _ in _ACTIVE)
        with self._tx() as db:
            rows = db.execute(
                f"SELECT * FROM jobs WHERE status IN ({placeholders}) "  # noqa: S608
                "AND coalesce(claimed_by, accepted_by) = ?",
                (*_ACTIVE, self._worker_id),
            ).fetchall()
            for r in rows:
                self._set_status(
                    db,
                    r["job_id"],
                    r["attempt"],
                    JobStatus.FAILED,
                    {"code": "interrupted", "retryable": True},
                    error_code=str(FailureCode.INTERRUPTED),
                    error_message="the worker stopped before the job finished",
                    retryable=1,
                )
        return [_row_to_view(r) for r in rows]

    # -- JobReporter (embedded mode) ----------------------------------------------------

    def _status(self, db: sqlite3.Connection, spec: JobSpec) -> tuple[str, str | None] | None:
        row = db.execute(
            "SELECT status, claimed_by FROM jobs WHERE job_id = ? AND attempt = ?",
            (spec.job_id, spec.attempt),
        ).fetchone()
        return None if row is None else (row["status"], row["claimed_by"])

    async def claim(self, spec: JobSpec) -> ClaimResult:
        return await self._retried("claim", lambda: self._claim(spec))

    async def _claim(self, spec: JobSpec) -> ClaimResult:
        with self._tx("claim") as db:
            state = self._status(db, spec)
            if state is None:
                return ClaimResult(ok=False, reason="unknown_job")
            status, owner = state
            if JobStatus(status).is_final:
                return ClaimResult(ok=False, reason="final")
            if owner is not None and owner != self._worker_id:
                return ClaimResult(ok=False, reason="already_claimed")
            self._set_status(
                db,
                spec.job_id,
                spec.attempt,
                JobStatus.CLAIMED,
                {"workerId": self._worker_id},
                claimed_by=self._worker_id,
            )
        return ClaimResult(ok=True, checkpoint=self.checkpoint(spec.job_id))

    async def progress(self, spec: JobSpec, update: Progress) -> CallbackAck:
        with self._tx("progress") as db:
            row = db.execute(
                "SELECT status, seq FROM jobs WHERE job_id = ? AND attempt = ?",
                (spec.job_id, spec.attempt),
            ).fetchone()
            if row is None:
                return CallbackAck(stop=True, reason="unknown_job")
            if JobStatus(row["status"]).is_final:
                return CallbackAck(stop=True, reason="final")
            if update.seq <= row["seq"]:
                return CallbackAck()  # stale: ignored, as Convex does
            commit = {} if update.commit is None else {"commit_sha": update.commit}
            self._update(
                db,
                spec.job_id,
                spec.attempt,
                status=str(update.status),
                seq=update.seq,
                current_step=update.current_step,
                total_steps=update.total_steps,
                message=update.message,
                **commit,
            )
            self._event(
                db,
                spec.job_id,
                spec.attempt,
                "progress",
                {
                    "seq": update.seq,
                    "status": str(update.status),
                    "currentStep": update.current_step,
                    "totalSteps": update.total_steps,
                    "message": update.message,
                    "logs": list(update.logs),
                    **({} if update.commit is None else {"commit": update.commit}),
                },
            )
        return CallbackAck()

    async def put_docs(
        self, spec: JobSpec, docs: Sequence[Doc], partial: PartialDocs | None = None
    ) -> CallbackAck:
        """Store a batch of docs; when the store cannot take them (a full disk, mostly: docs
        are the big writes), fail the job saying so and ask the runner to stop. Partial docs
        that cannot be stored only raise `CallbackError`: the final upload decides."""
        if partial is not None:
            return self._put_partial(spec, docs, partial)
        try:
            return self._put_docs(spec, docs)
        except CallbackError as exc:
            failure = Failure(
                FailureCode.INTERNAL,
                f"the docs could not be saved: the job store is out of space or failing "
                f"({exc.reason})",
                retryable=True,
            )
            await self.fail(spec, failure)
            return CallbackAck(stop=True, reason=STORE_FULL)

    def _put_docs(self, spec: JobSpec, docs: Sequence[Doc]) -> CallbackAck:
        with self._tx("put_docs") as db:
            base = db.execute(
                "SELECT count(*) FROM docs WHERE job_id = ? AND attempt = ?",
                (spec.job_id, spec.attempt),
            ).fetchone()[0]
            for i, doc in enumerate(docs):
                db.execute(
                    """INSERT INTO docs(job_id, attempt, slug, position, title, kind,
                       chapter_index, content) VALUES (?,?,?,?,?,?,?,?)
                       ON CONFLICT(job_id, attempt, slug) DO UPDATE SET title = excluded.title,
                       kind = excluded.kind, chapter_index = excluded.chapter_index,
                       content = excluded.content""",
                    (
                        spec.job_id,
                        spec.attempt,
                        doc.slug,
                        base + i,
                        doc.title,
                        doc.kind,
                        doc.chapter_index,
                        doc.content,
                    ),
                )
        return CallbackAck()

    def _put_partial(self, spec: JobSpec, docs: Sequence[Doc], partial: PartialDocs) -> CallbackAck:
        with self._tx("put_docs") as db:
            state = self._status(db, spec)
            if state is None:
                return CallbackAck(stop=True, reason="unknown_job")
            if JobStatus(state[0]).is_final:
                return CallbackAck(stop=True, reason="final")
            cp = db.execute(
                "SELECT attempt, commit_sha, ended FROM checkpoints WHERE job_id = ?",
                (spec.job_id,),
            ).fetchone()
            if cp is not None and cp["attempt"] > spec.attempt:
                return CallbackAck(stop=True, reason="superseded")
            ended: list[str] = []
            if cp is None or cp["commit_sha"] != partial.commit:
                # Another commit: this attempt runs in full, its files replace the old ones.
                db.execute("DELETE FROM partial_docs WHERE job_id = ?", (spec.job_id,))
            else:
                ended = json.loads(cp["ended"])
            if partial.ended is not None and partial.ended not in ended:
                ended.append(partial.ended)
            db.execute(
                """INSERT INTO checkpoints(job_id, attempt, commit_sha, ended, updated_at)
                   VALUES (?,?,?,?,?) ON CONFLICT(job_id) DO UPDATE SET
                   attempt = excluded.attempt, commit_sha = excluded.commit_sha,
                   ended = excluded.ended, updated_at = excluded.updated_at""",
                (spec.job_id, spec.attempt, partial.commit, json.dumps(ended), self._clock.now()),
            )
            for doc in docs:
                if doc.path is None:
                    raise CallbackError("put_docs", "a partial doc without a path", retryable=False)
                db.execute(
                    """INSERT INTO partial_docs(job_id, path, attempt, slug, title, kind,
                       chapter_index, content) VALUES (?,?,?,?,?,?,?,?)
                       ON CONFLICT(job_id, path) DO UPDATE SET attempt = excluded.attempt,
                       slug = excluded.slug, title = excluded.title, kind = excluded.kind,
                       chapter_index = excluded.chapter_index, content = excluded.content""",
                    (
                        spec.job_id,
                        doc.path,
                        spec.attempt,
                        doc.slug,
                        doc.title,
                        str(doc.kind),
                        doc.chapter_index,
                        doc.content,
                    ),
                )
            self._event(
                db,
                spec.job_id,
                spec.attempt,
                "docs",
                {
                    "partial": True,
                    "paths": [d.path for d in docs],
                    "stepEnded": partial.ended,
                    "commit": partial.commit,
                },
            )
        return CallbackAck()

    async def complete(self, spec: JobSpec, docs_count: int, duration_ms: int) -> None:
        await self._retried("complete", lambda: self._complete(spec, docs_count, duration_ms))

    async def _complete(self, spec: JobSpec, docs_count: int, duration_ms: int) -> None:
        with self._tx("complete") as db:
            self._set_status(
                db,
                spec.job_id,
                spec.attempt,
                JobStatus.COMPLETED,
                {"docsCount": docs_count, "durationMs": duration_ms},
                docs_count=docs_count,
                duration_ms=duration_ms,
                message="completed",
            )
            # The final docs replace the checkpoint: no later attempt will resume from it.
            for table in ("checkpoints", "partial_docs"):
                db.execute(
                    f"DELETE FROM {table} WHERE job_id = ?",  # noqa: S608
                    (spec.job_id,),
                )

    async def fail(self, spec: JobSpec, failure: Failure) -> None:
        await self._retried("fail", lambda: self._fail(spec, failure))

    async def _fail(self, spec: JobSpec, failure: Failure) -> None:
        status = JobStatus.CANCELED if failure.code is FailureCode.CANCELED else JobStatus.FAILED
        with self._tx("fail") as db:
            self._set_status(
                db,
                spec.job_id,
                spec.attempt,
                status,
                {
                    "code": str(failure.code),
                    "message": failure.message,
                    "retryable": failure.retryable,
                },
                error_code=str(failure.code),
                error_message=failure.message,
                retryable=int(failure.retryable),
            )

    async def mark_dropped(self, spec: JobSpec, reason: str | None) -> None:
        """The upstream store refused the claim: the job runs elsewhere, not here."""
        with self._tx("mark_dropped") as db:
            self._set_status(
                db,
                spec.job_id,
                spec.attempt,
                JobStatus.FAILED,
                {"code": "not_claimed", "reason": reason},
                error_code="not_claimed",
                error_message=f"claim refused upstream ({reason}); not run by this worker",
                retryable=0,
            )
