"""The board's view models and the pure rules around them: status groups, what each action
allows, the step timeline, durations, and the safe Markdown reader. No I/O, no framework."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from markdown_it import MarkdownIt

PENDING = ("pending",)
RUNNING = ("dispatched", "accepted", "claimed", "cloning", "analyzing", "gathering")
FINISHED = ("completed", "failed", "canceled", "dead")
ALL_STATUSES = (*PENDING, *RUNNING, *FINISHED)
RETRYABLE_STATUSES = ("failed", "dead")
CANCELABLE_STATUSES = (*PENDING, *RUNNING)
PAGE_SIZE = 20  # finished jobs per page
QUEUE_LIMIT = 10  # pending jobs shown (then "and N more")
RUNNING_LIMIT = 20
LOG_LINES = 40
MIN_PRIORITY, MAX_PRIORITY = -1000, 1000


@dataclass(frozen=True, slots=True)
class JobRow:
    """One job (its latest attempt) as a board row. Times are Unix seconds."""

    job_id: str
    attempt: int
    status: str
    repository_url: str
    ref: str | None
    priority: int
    current_step: int
    total_steps: int
    message: str
    runner: str | None  # "warm <worker id>" or "overflow <run id>"
    lease_until: float | None
    created_at: float
    updated_at: float
    error_code: str | None = None
    error_message: str | None = None

    @property
    def percent(self) -> int:
        if self.total_steps <= 0:
            return 0
        return max(0, min(100, round(100 * self.current_step / self.total_steps)))

    @property
    def can_retry(self) -> bool:
        return self.status in RETRYABLE_STATUSES

    @property
    def can_cancel(self) -> bool:
        return self.status in CANCELABLE_STATUSES

    @property
    def can_set_priority(self) -> bool:
        return self.status in PENDING


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the board page shows. `version` changes whenever any job does."""

    version: str
    now: float
    counts: tuple[tuple[str, int], ...]
    pending: tuple[JobRow, ...]
    running: tuple[JobRow, ...]
    recent: tuple[JobRow, ...]
    page: int = 1
    has_next: bool = False
    pending_total: int = 0

    @property
    def total(self) -> int:
        return sum(n for _, n in self.counts)


@dataclass(frozen=True, slots=True)
class StepSpan:
    step: int
    total: int
    message: str
    started_at: float
    duration_s: float | None  # None while the step runs


@dataclass(frozen=True, slots=True)
class AttemptRow:
    attempt: int
    status: str
    started_at: float
    updated_at: float
    error_code: str | None = None
    error_message: str | None = None


@dataclass(frozen=True, slots=True)
class DocView:
    slug: str
    title: str
    kind: str
    chapter_index: int | None
    content: str


@dataclass(frozen=True, slots=True)
class JobDetail:
    """The job page: the latest attempt, every attempt, its steps, logs and docs."""

    version: str
    now: float
    job: JobRow
    attempts: tuple[AttemptRow, ...]
    steps: tuple[StepSpan, ...]
    logs: tuple[str, ...]
    docs: tuple[DocView, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class ActionResult:
    ok: bool
    message: str


@dataclass(frozen=True, slots=True)
class StepMark:
    """A progress report that started a step (input of `timeline`)."""

    at: float
    step: int
    total: int
    message: str


def timeline(marks: Iterable[StepMark], *, ended_at: float | None) -> tuple[StepSpan, ...]:
    """Spans of consecutive steps: a step lasts until the next one starts, the last one until
    `ended_at` (None: still running). Repeated reports of the same step are one span."""
    spans: list[StepMark] = []
    for mark in marks:
        if mark.step <= 0 or (spans and spans[-1].step == mark.step):
            continue
        spans.append(mark)
    out: list[StepSpan] = []
    for i, mark in enumerate(spans):
        end = spans[i + 1].at if i + 1 < len(spans) else ended_at
        duration = None if end is None else max(0.0, end - mark.at)
        out.append(StepSpan(mark.step, mark.total, mark.message, mark.at, duration))
    return tuple(out)


def last_lines(batches: Sequence[Sequence[str]], limit: int = LOG_LINES) -> tuple[str, ...]:
    """The last `limit` log lines across report batches (oldest first)."""
    lines: list[str] = []
    for batch in reversed(batches):
        lines[:0] = batch
        if len(lines) >= limit:
            break
    return tuple(lines[-limit:])


def parse_priority(raw: str) -> int | None:
    """An operator's priority input, or None when it is not an integer in range."""
    try:
        value = int(raw.strip())
    except ValueError:
        return None
    return value if MIN_PRIORITY <= value <= MAX_PRIORITY else None


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "…"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 90:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 90:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


# Markdown from the CLI is hostile: raw HTML is escaped (html=False), and markdown-it's link
# validation refuses javascript:, vbscript:, file: and data: URLs.
_markdown = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})


def render_markdown(text: str) -> str:
    """HTML for a Markdown chapter, safe to insert in the page."""
    html: str = _markdown.render(text)
    return html
