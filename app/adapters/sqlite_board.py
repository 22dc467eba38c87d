"""The operator board's queries and actions on the embedded store.

Kept apart from `sqlite_store` (which owns the schema and the runner's writes); it uses that
store's connection, lock and transaction helper. Every board read is one locked pass over a few
indexed queries, bounded by page sizes, so its cost does not grow with the number of jobs
beyond the per-status counts, which read an index only.

A job is shown by its latest attempt; an earlier attempt is "superseded". A retry inserts the
next attempt as `pending`: `take_next_pending` hands it to the runner when a slot is free.
"""

from __future__ import annotations

import json
import secrets
import sqlite3

from app.adapters.sqlite_store import ChangeFeed, SqliteJobStore
from app.board import model
from app.board.model import (
    ActionResult,
    AttemptRow,
    DocView,
    JobDetail,
    JobRow,
    Snapshot,
    StepMark,
)
from app.domain import JobOptions, JobSpec, JobStatus, Repository

_SCHEMA = """
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs(status, priority DESC, created_at);
CREATE INDEX IF NOT EXISTS jobs_status_updated ON jobs(status, updated_at);
CREATE INDEX IF NOT EXISTS jobs_updated ON jobs(updated_at);
CREATE INDEX IF NOT EXISTS jobs_retries ON jobs(job_id, attempt) WHERE attempt > 1;
CREATE TABLE IF NOT EXISTS board_counts (status TEXT PRIMARY KEY, n INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS board_count_insert AFTER INSERT ON jobs BEGIN
  INSERT INTO board_counts(status, n) VALUES (new.status, 1)
    ON CONFLICT(status) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS board_count_update AFTER UPDATE OF status ON jobs
WHEN old.status IS NOT new.status BEGIN
  UPDATE board_counts SET n = n - 1 WHERE status = old.status;
  INSERT INTO board_counts(status, n) VALUES (new.status, 1)
    ON CONFLICT(status) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS board_count_delete AFTER DELETE ON jobs BEGIN
  UPDATE board_counts SET n = n - 1 WHERE status = old.status;
END;
"""
# Recount once per process start: the table is a cache of `GROUP BY status`, kept by the
# triggers above so that the board never counts 10,000 rows per read.
_RECOUNT = """
DELETE FROM board_counts;
INSERT INTO board_counts(status, n) SELECT status, count(*) FROM jobs GROUP BY status;
"""
_LATEST = "NOT EXISTS (SELECT 1 FROM jobs n WHERE n.job_id = j.job_id AND n.attempt > j.attempt)"
_EVENTS_LIMIT = 5000


def _marks(statuses: tuple[str, ...]) -> str:
    return ",".join("?" for _ in statuses)


class BoardStore:
    """Board reads and operator actions over one `SqliteJobStore`."""

    def __init__(self, store: SqliteJobStore) -> None:
        self.store = store
        with store._read() as db:  # the store's lock, and its errors as StoreError
            db.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}{_RECOUNT}COMMIT;")

    @property
    def feed(self) -> ChangeFeed:
        return self.store.feed

    def _row(self, r: sqlite3.Row) -> JobRow:
        owner = r["claimed_by"]
        return JobRow(
            job_id=r["job_id"],
            attempt=r["attempt"],
            status=r["status"],
            repository_url=r["repository_url"],
            ref=r["ref"],
            priority=r["priority"],
            current_step=r["current_step"],
            total_steps=r["total_steps"],
            message=r["message"],
            runner=None if owner is None else f"warm {owner}",
            lease_until=None,  # the embedded store runs jobs in-process: no lease
            created_at=r["created_at"],
            updated_at=r["updated_at"],
            error_code=r["error_code"],
            error_message=r["error_message"],
        )

    # -- reads --------------------------------------------------------------------------

    def version(self) -> str:
        """Changes whenever a job does: every write records an event."""
        with self.store._read() as db:
            row = db.execute("SELECT max(id) FROM events").fetchone()
        return str(row[0] or 0)

    def snapshot(self, page: int, *, page_size: int = model.PAGE_SIZE) -> Snapshot:
        page = max(1, page)
        with self.store._read() as db:
            version = db.execute("SELECT max(id) FROM events").fetchone()[0] or 0
            counts = dict(db.execute("SELECT status, n FROM board_counts").fetchall())
            # Attempts replaced by a retry are not jobs of their own: uncount them.
            for r in db.execute(
                "SELECT p.status, count(*) FROM jobs j INDEXED BY jobs_retries "
                "CROSS JOIN jobs p ON p.job_id = j.job_id AND p.attempt = j.attempt - 1 "
                "WHERE j.attempt > 1 GROUP BY p.status"
            ):
                counts[r[0]] = counts.get(r[0], 0) - r[1]
            pending = db.execute(
                f"SELECT * FROM jobs j WHERE status = 'pending' AND {_LATEST} "  # noqa: S608
                "ORDER BY priority DESC, created_at ASC, j.rowid ASC LIMIT ?",
                (model.QUEUE_LIMIT,),
            ).fetchall()
            running = db.execute(
                f"SELECT * FROM jobs j WHERE status IN ({_marks(model.RUNNING)}) "  # noqa: S608
                f"AND {_LATEST} ORDER BY created_at ASC LIMIT ?",
                (*model.RUNNING, model.RUNNING_LIMIT),
            ).fetchall()
            recent = self._recent(db, page, page_size)
        ordered = tuple((s, counts[s]) for s in model.ALL_STATUSES if counts.get(s, 0) > 0)
        return Snapshot(
            version=str(version),
            now=self.store._clock.now(),
            counts=ordered,
            pending=tuple(self._row(r) for r in pending),
            running=tuple(self._row(r) for r in running),
            recent=tuple(self._row(r) for r in recent[:page_size]),
            page=page,
            has_next=len(recent) > page_size,
            pending_total=counts.get("pending", 0),
        )

    def _recent(self, db: sqlite3.Connection, page: int, page_size: int) -> list[sqlite3.Row]:
        """One page of finished jobs, newest first (one row more, to tell if there is a next)."""
        if page == 1:
            # One short index range per final status, merged: reads about 4 pages, however
            # many jobs are pending or running (they are the newest rows).
            branches = " UNION ALL ".join(
                "SELECT * FROM (SELECT j.*, j.rowid AS rid FROM jobs j WHERE status = ? "  # noqa: S608
                f"AND {_LATEST} ORDER BY updated_at DESC LIMIT {int(page_size) + 1})"
                for _ in model.FINISHED
            )
            return db.execute(
                f"{branches} ORDER BY updated_at DESC, rid DESC LIMIT ?",
                (*model.FINISHED, page_size + 1),
            ).fetchall()
        # Deeper pages walk the updated_at index once, skipping the earlier pages.
        return db.execute(
            f"SELECT j.*, j.rowid AS rid FROM jobs j INDEXED BY jobs_updated "  # noqa: S608
            f"WHERE +status IN ({_marks(model.FINISHED)}) AND {_LATEST} "
            "ORDER BY updated_at DESC, rid DESC LIMIT ? OFFSET ?",
            (*model.FINISHED, page_size + 1, (page - 1) * page_size),
        ).fetchall()

    def job(self, job_id: str) -> JobDetail | None:
        with self.store._read() as db:
            version = db.execute("SELECT max(id) FROM events").fetchone()[0] or 0
            attempts = db.execute(
                "SELECT * FROM jobs WHERE job_id = ? ORDER BY attempt", (job_id,)
            ).fetchall()
            if not attempts:
                return None
            latest = attempts[-1]
            events = db.execute(
                "SELECT type, data, at FROM events WHERE job_id = ? AND attempt = ? "
                "ORDER BY id DESC LIMIT ?",
                (job_id, latest["attempt"], _EVENTS_LIMIT),
            ).fetchall()
            docs = db.execute(
                "SELECT slug, title, kind, chapter_index, content FROM docs "
                "WHERE job_id = ? AND attempt = ? ORDER BY position",
                (job_id, latest["attempt"]),
            ).fetchall()
        events = list(reversed(events))
        marks: list[StepMark] = []
        log_batches: list[list[str]] = []
        for ev in events:
            if ev["type"] != "progress":
                continue
            data = json.loads(ev["data"])
            marks.append(
                StepMark(
                    ev["at"],
                    int(data.get("currentStep", 0)),
                    int(data.get("totalSteps", 0)),
                    str(data.get("message", "")),
                )
            )
            if data.get("logs"):
                log_batches.append([str(line) for line in data["logs"]])
        shown = [
            DocView(d["slug"], d["title"], d["kind"], d["chapter_index"], d["content"])
            for d in docs
        ]
        if not shown and latest["status"] != "completed":
            # Running, or waiting for a retry: the partial docs its attempts uploaded so far.
            shown = [
                DocView(d.slug, d.title, str(d.kind), d.chapter_index, d.content)
                for d in self.store.list_partial_docs(job_id)
            ]
        row = self._row(latest)
        ended = row.updated_at if row.status in model.FINISHED else None
        return JobDetail(
            version=str(version),
            now=self.store._clock.now(),
            job=row,
            attempts=tuple(
                AttemptRow(
                    attempt=a["attempt"],
                    status=a["status"],
                    started_at=a["created_at"],
                    updated_at=a["updated_at"],
                    error_code=a["error_code"],
                    error_message=a["error_message"],
                )
                for a in attempts
            ),
            steps=model.timeline(marks, ended_at=ended),
            logs=model.last_lines(log_batches),
            docs=tuple(shown),
        )

    # -- operator actions ---------------------------------------------------------------

    def _latest(self, db: sqlite3.Connection, job_id: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = db.execute(
            "SELECT * FROM jobs WHERE job_id = ? ORDER BY attempt DESC LIMIT 1", (job_id,)
        ).fetchone()
        return row

    def add_retry(self, job_id: str) -> ActionResult:
        """Queue the next attempt of a failed or dead job as `pending`."""
        now = self.store._clock.now()
        with self.store._tx() as db:
            row = self._latest(db, job_id)
            if row is None:
                return ActionResult(False, f"no job {job_id!r}")
            if row["status"] not in model.RETRYABLE_STATUSES:
                return ActionResult(False, f"job is {row['status']}: only failed or dead retry")
            attempt = row["attempt"] + 1
            db.execute(
                """INSERT INTO jobs(job_id, attempt, status, repository_url, ref, options,
                   priority, accepted_by, created_at, updated_at)
                   SELECT job_id, ?, 'pending', repository_url, ref, options, priority,
                   accepted_by, ?, ? FROM jobs WHERE job_id = ? AND attempt = ?""",
                (attempt, now, now, job_id, row["attempt"]),
            )
            self.store._event(db, job_id, attempt, "status", {"status": "pending", "retry": True})
        return ActionResult(True, f"attempt {attempt} queued")

    def cancel_pending(self, job_id: str) -> ActionResult | None:
        """Cancel a pending job; None when the job is not pending (the caller decides)."""
        with self.store._tx() as db:
            row = self._latest(db, job_id)
            if row is None or row["status"] != "pending":
                return None
            self.store._set_status(
                db,
                job_id,
                row["attempt"],
                JobStatus.CANCELED,
                {"code": "canceled", "message": "canceled by the operator", "retryable": False},
                error_code="canceled",
                error_message="canceled by the operator",
                retryable=0,
            )
        return ActionResult(True, "canceled")

    def latest(self, job_id: str) -> JobRow | None:
        with self.store._read() as db:
            row = self._latest(db, job_id)
        return None if row is None else self._row(row)

    def set_priority(self, job_id: str, priority: int) -> ActionResult:
        with self.store._tx() as db:
            row = self._latest(db, job_id)
            if row is None:
                return ActionResult(False, f"no job {job_id!r}")
            if row["status"] != "pending":
                return ActionResult(False, f"job is {row['status']}: only pending jobs move")
            self.store._update(db, job_id, row["attempt"], priority=priority)
            self.store._event(db, job_id, row["attempt"], "priority", {"priority": priority})
        return ActionResult(True, f"priority set to {priority}")

    def take_next_pending(self) -> JobSpec | None:
        """Move the first pending job (priority, then age) to `accepted` and return its spec."""
        # A read first: no write transaction (and wake-up) for nothing.
        with self.store._read() as db:
            if db.execute("SELECT 1 FROM jobs WHERE status = 'pending'").fetchone() is None:
                return None
        with self.store._tx() as db:
            row = db.execute(
                f"SELECT * FROM jobs j WHERE status = 'pending' AND {_LATEST} "  # noqa: S608
                "ORDER BY priority DESC, created_at ASC, j.rowid ASC LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            self.store._set_status(
                db,
                row["job_id"],
                row["attempt"],
                JobStatus.ACCEPTED,
                {},
                accepted_by=self.store._worker_id,
            )
        options = json.loads(row["options"])
        return JobSpec(
            job_id=row["job_id"],
            attempt=row["attempt"],
            # Embedded mode reports to this store, not to Convex: the token is never checked
            # but is still a secret of the attempt (redacted from its logs).
            callback_token=secrets.token_urlsafe(32),
            repository=Repository(row["repository_url"], row["ref"]),
            options=JobOptions(model=options.get("model"), steps=tuple(options.get("steps", ()))),
            priority=row["priority"],
        )
