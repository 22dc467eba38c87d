"""The worker's vocabulary: job statuses, the job a webhook asks for, and what a run reports.

Pure data, no I/O. Every record is a frozen dataclass so it can cross threads and tasks safely.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class JobStatus(enum.StrEnum):
    """Job status values shared with the Convex `jobs` table."""

    PENDING = "pending"
    DISPATCHED = "dispatched"
    ACCEPTED = "accepted"  # the worker recorded the webhook; not yet claimed
    CLAIMED = "claimed"
    CLONING = "cloning"
    ANALYZING = "analyzing"
    GATHERING = "gathering"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"
    DEAD = "dead"

    @property
    def is_final(self) -> bool:
        return self in _FINAL


_FINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.DEAD})


class FailureCode(enum.StrEnum):
    """The contract's failure codes for `fondation:fail`."""

    CLONE_FAILED = "clone_failed"
    CLI_FAILED = "cli_failed"
    TIMEOUT = "timeout"
    CANCELED = "canceled"
    INTERRUPTED = "interrupted"
    OUTPUT_INVALID = "output_invalid"
    INTERNAL = "internal"


class DocKind(enum.StrEnum):
    YAML = "yaml"
    CHAPTER = "chapter"
    TUTORIAL = "tutorial"


@dataclass(frozen=True, slots=True)
class Repository:
    url: str
    ref: str | None = None


@dataclass(frozen=True, slots=True)
class JobOptions:
    """Validated CLI options; only these reach the CLI."""

    model: str | None = None
    steps: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.model is not None:
            out["model"] = self.model
        if self.steps:
            out["steps"] = list(self.steps)
        return out


@dataclass(frozen=True, slots=True)
class JobSpec:
    """One attempt of one job, as a `job.start` webhook describes it."""

    job_id: str
    attempt: int
    callback_token: str = field(repr=False)  # secret: never printed
    repository: Repository
    options: JobOptions = JobOptions()
    priority: int = 0

    @property
    def key(self) -> str:
        return f"{self.job_id}:{self.attempt}"


@dataclass(frozen=True, slots=True)
class CancelRequest:
    job_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class Progress:
    """One `fondation:progress` report; `seq` strictly increases per attempt."""

    seq: int
    status: JobStatus
    current_step: int
    total_steps: int
    message: str
    logs: tuple[str, ...] = ()
    commit: str | None = None
    """The commit SHA the attempt cloned, once known: the job records what it was made from."""


@dataclass(frozen=True, slots=True)
class Doc:
    """One generated file of the course."""

    slug: str
    title: str
    kind: DocKind
    chapter_index: int | None
    content: str
    path: str | None = None
    """Partial docs only: the file's path in the output directory (``chapters/chapter_1_x.md``),
    the key of the job's checkpoint. Final docs are keyed by `slug`."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "slug": self.slug,
            "title": self.title,
            "kind": str(self.kind),
            "chapterIndex": self.chapter_index,
            "content": self.content,
        }
        if self.path is not None:
            out["path"] = self.path
        return out


@dataclass(frozen=True, slots=True)
class PartialDocs:
    """Marks a `putDocs` batch as partial docs: files a running attempt's CLI wrote so far (each
    with its `Doc.path`), shown while the job runs and kept as the job's checkpoint."""

    commit: str
    """The commit the attempt cloned: a checkpoint holds the files of one commit."""
    ended: str | None = None
    """The step this batch completes (its last batch): the store adds it to the checkpoint's
    ended steps only once the batch is stored."""


@dataclass(frozen=True, slots=True)
class CheckpointFile:
    """One output file: its path relative to the output directory (``/``-separated)."""

    path: str
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The files of a job's furthest attempt, and the commit that attempt analyzed."""

    commit: str
    files: tuple[CheckpointFile, ...]
    ended: tuple[str, ...] = ()
    """Steps that attempt saw end (the next one started, or the CLI exited 0) AND whose files
    it then uploaded in full (`OutputTracker.step_ended`): complete whatever the files say."""


@dataclass(frozen=True, slots=True)
class Failure:
    code: FailureCode
    message: str
    retryable: bool = False


@dataclass(frozen=True, slots=True)
class ClaimResult:
    ok: bool
    reason: str | None = None
    clone_token: str | None = field(default=None, repr=False)
    checkpoint: Checkpoint | None = None
    """What earlier attempts of the job left (`app.checkpoint` decides whether it is usable)."""


@dataclass(frozen=True, slots=True)
class CallbackAck:
    """What the store says back to a progress or docs call: `stop` asks the worker to drop the job
    (canceled upstream, or another attempt owns it now)."""

    stop: bool = False
    reason: str | None = None
