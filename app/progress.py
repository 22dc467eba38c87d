"""Step lines and the progress state machine the runner feeds with CLI output.

Pure: no clock, no I/O. The runner passes monotonic seconds (`now_s`) into every call, so tests
drive time by hand.

What the real Fondation CLI prints (packages/cli `analyze` command, a pino logger):

* not on a TTY (our case): ``[FONDATION_STEP_<i>/<n>] <message>``, usually as the ``msg`` of a
  pino JSON line (``{"level":30,"time":…,"msg":"[FONDATION_STEP_1/6] Extracting core …"}``),
  or as plain text when a pretty printer is configured;
* on a TTY: ``[<i>/<n>] <Phase>: <message>``.

Step-line rule (`parse_step`): take the JSON ``msg`` when the line is a JSON object with a string
``msg``, else the line itself; strip ANSI colour codes; then the marker must come FIRST, after
optional whitespace and at most one pretty-printer prefix (a ``[HH:MM:SS(.fff)]`` or ISO time
stamp, and/or a level word such as ``INFO``/``INFO (1234):``). A ``[1/2]`` anywhere later in a
sentence ("retrying [1/2]") is a log line, not a step. The marker must be followed by whitespace
or the end of the line. ``1 <= i <= n <= MAX_STEPS``.

The JSON line also carries ``"step": "<i>/<n>"`` and ``"phase": "<Phase>"``; older CLIs print
only these fields, with a plain ``msg`` and no marker. A JSON object whose ``step`` is such a
string is a step line too (the marker wins when both are there); its ``phase`` is kept.

Numbers restart with ``--steps``: a run of the last two steps prints ``1/2`` and ``2/2``.
`StepPlan` turns them back into the global step (1..6 of 6) from the step list the attempt was
started with, or from the phase, and never reports less than a floor (the step an earlier
attempt reached), so progress never goes backwards across attempts.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from app.domain import JobStatus, Progress

MAX_STEPS = 1000
"""Totals above this are not step lines (a CLI has a handful of steps; `[3/40000]` is data)."""

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_STEP = re.compile(
    r"""^\s*
    (?:\[\d{1,2}:\d{2}:\d{2}(?:[.,]\d{1,9})?\]\s+)?                 # [12:34:56.789]
    (?:\d{4}-\d{2}-\d{2}[T\ ]\d{2}:\d{2}:\d{2}(?:[.,]\d{1,9})?(?:Z|[+-]\d{2}:?\d{2})?\s+)?
    (?-i:(?:TRACE|DEBUG|INFO|WARN|WARNING|ERROR|FATAL)(?:\s*\(\d+\))?:?\s+)?  # INFO (42):
    \[(?:FONDATION_STEP_)?(?P<i>\d{1,6})/(?P<n>\d{1,6})\]
    (?:\s+(?P<text>.*))?$""",  # greedy to the end, stripped after: one scan of a long line
    re.VERBOSE | re.IGNORECASE | re.DOTALL,
)


_JSON_STEP = re.compile(r"^(\d{1,6})/(\d{1,6})$")

STEP_NAMES: tuple[str, ...] = (
    "extract",
    "analyze",
    "order",
    "generate-chapters",
    "review-chapters",
    "generate-tutorials",
)
"""The real CLI's six steps, in the order it runs them (`--steps` names)."""
PHASES: tuple[str, ...] = ("Extract", "Analyze", "Order", "Generate", "Review", "Tutorials")
"""The JSON ``phase`` of each step, in the same order."""
_PHASE_INDEX = {name.lower(): i for i, name in enumerate(PHASES, start=1)}


@dataclass(frozen=True, slots=True)
class StepLine:
    index: int
    total: int
    text: str
    phase: str | None = None


def _json_object(line: str) -> dict[str, Any] | None:
    stripped = line.strip()
    if not (stripped.startswith("{") and stripped.endswith("}")):
        return None
    try:
        obj = json.loads(stripped)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def line_text(line: str) -> str:
    """The human text of an output line: a JSON object's string `msg`, else the line itself."""
    obj = _json_object(line)
    if obj is not None:
        msg = obj.get("msg")
        if isinstance(msg, str):
            return msg
    return line


def parse_step(line: str) -> StepLine | None:
    """The step a CLI output line announces, or None for any other line (see the module doc)."""
    obj = _json_object(line)
    msg = obj.get("msg") if obj is not None else None
    text = _ANSI.sub("", msg if isinstance(msg, str) else line)
    phase = obj.get("phase") if obj is not None else None
    phase = phase.strip() if isinstance(phase, str) and phase.strip() else None
    match = _STEP.match(text)
    if match is not None:
        index, total, rest = int(match["i"]), int(match["n"]), match["text"] or ""
    else:
        field = obj.get("step") if obj is not None else None
        legacy = _JSON_STEP.match(field.strip()) if isinstance(field, str) else None
        if legacy is None:
            return None
        index, total = int(legacy[1]), int(legacy[2])
        rest = text if isinstance(msg, str) else ""
    if not 1 <= index <= total <= MAX_STEPS:
        return None
    return StepLine(index=index, total=total, text=rest.strip(), phase=phase)


def _may_be_step(line: str) -> bool:
    """Cheap pre-filter: only these lines can be step lines (a marker, or a JSON `step`)."""
    return "/" in line and (("[" in line and "]" in line) or '"step"' in line)


@dataclass(frozen=True, slots=True)
class StepPlan:
    """Maps an attempt's step numbers to the global step (1..`len(STEP_NAMES)`).

    `steps` is the `--steps` list the attempt's CLI was started with (empty: all six). A step
    line is placed by its `phase` when it names one of `PHASES`; else by its position in
    `steps` when its total is `len(steps)`; else taken as global when its total is six.
    Anything else is not a step of this plan (None: the runner logs the line). The result is
    never below `floor`, the global step an earlier attempt of the job reached.
    """

    steps: tuple[str, ...] = ()
    floor: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.floor <= len(STEP_NAMES):
            raise ValueError(f"floor must be within 0..{len(STEP_NAMES)}")

    @property
    def run_steps(self) -> tuple[str, ...]:
        return self.steps or STEP_NAMES

    @property
    def start(self) -> tuple[int, int]:
        """(step, total) to report before the CLI prints anything."""
        return (self.floor, len(STEP_NAMES)) if self.floor else (0, 0)

    def globalize(self, step: StepLine) -> StepLine | None:
        total = len(STEP_NAMES)
        index = _PHASE_INDEX.get(step.phase.lower()) if step.phase else None
        run = self.run_steps
        if index is None and step.total == len(run) and run[step.index - 1] in STEP_NAMES:
            index = STEP_NAMES.index(run[step.index - 1]) + 1
        if index is None and step.total == total:
            index = step.index
        if index is None:
            return None
        index = max(index, self.floor)
        return StepLine(index, total, step.text, PHASES[index - 1])

    def parse(self, line: str) -> StepLine | None:
        """`parse_step`, then `globalize`."""
        step = parse_step(line)
        return None if step is None else self.globalize(step)


class ProgressTracker:
    """What to report, and when, for one attempt.

    * `set_phase` and `final` always emit.
    * A step change (`feed` of a step line with another (index, total) than the current one)
      updates the state at once and emits at once when `min_interval_s` passed since the
      last emission, or while a burst allowance lasts (`step_burst` changes, one more earned
      per interval: a CLI whose first steps are instant still shows each). Otherwise `tick`
      emits it once the interval has passed. So a CLI flipping between steps makes at most
      `step_burst` + one report per interval (each report is a store write, a Convex call
      and log lines), and the step text is cut to `max_line_chars`.
    * Any other line is a log line: kept in a ring of the newest `max_log_lines`, each cut to
      `max_line_chars`; it triggers an emission only when `min_interval_s` passed since the last
      emission. `tick` flushes pending logs and a held step change under the same rule.
    * `tick` emits a heartbeat (same state, no logs) once nothing was emitted for `heartbeat_s`
      (never more often than `min_interval_s`).
    * Every emission carries the logs pending since the previous one, and a `seq` one higher.
    * With a `plan`, steps are reported global (`StepPlan`), starting at its floor.
    """

    def __init__(
        self,
        min_interval_s: float,
        heartbeat_s: float,
        max_log_lines: int = 20,
        max_line_chars: int = 500,
        step_burst: int = 8,
        plan: StepPlan | None = None,
    ) -> None:
        if min_interval_s < 0 or heartbeat_s <= 0 or max_log_lines < 0 or max_line_chars < 1:
            raise ValueError("invalid ProgressTracker limits")
        self.min_interval_s = min_interval_s
        self.heartbeat_s = max(heartbeat_s, min_interval_s)
        self.max_line_chars = max_line_chars
        self._logs: deque[str] = deque(maxlen=max_log_lines)
        self._seq = 0
        self._status = JobStatus.CLAIMED
        self._plan = plan
        self._step, self._total = plan.start if plan is not None else (0, 0)
        self._commit: str | None = None
        self._message = ""
        self._last_emit_s: float | None = None
        self._held = False  # a step change not reported yet
        self.step_burst = step_burst
        self._step_tokens = float(step_burst)
        self._tokens_at_s: float | None = None
        self.dropped_lines = 0
        """Log lines that fell out of the ring before they could be reported."""

    @property
    def plan(self) -> StepPlan | None:
        return self._plan

    def replan(self, plan: StepPlan) -> None:
        """Number the steps by `plan` from now on (the attempt learned which steps it runs);
        the current step becomes the plan's start until the CLI says otherwise."""
        self._plan = plan
        self._step, self._total = plan.start

    def set_commit(self, commit: str) -> None:
        """Every report from now on carries the commit the attempt cloned."""
        self._commit = commit

    @property
    def seq(self) -> int:
        """The `seq` of the last emission (0 before the first)."""
        return self._seq

    @property
    def message(self) -> str:
        """The current step's text (or the last phase message)."""
        return self._message

    @property
    def current(self) -> tuple[int, int]:
        return self._step, self._total

    def set_phase(self, status: JobStatus, message: str, now_s: float) -> Progress:
        self._status = status
        self._message = message
        return self._emit(now_s)

    def feed(self, line: str, now_s: float) -> Progress | None:
        step = parse_step(line) if self._plan is None else self._plan.parse(line)
        if step is not None and (step.index, step.total) != (self._step, self._total):
            self._step, self._total = step.index, step.total
            self._message = self._cut(step.text or f"Step {step.index}/{step.total}")
            self._held = True
            if self._interval_passed(now_s) or self._take_step_token(now_s):
                return self._emit(now_s)
            return None
        text = _ANSI.sub("", line_text(line)).rstrip()
        if not text.strip():
            return None
        text = self._cut(text)
        if self._logs.maxlen == 0:
            self.dropped_lines += 1
            return None
        if len(self._logs) == self._logs.maxlen:
            self.dropped_lines += 1
        self._logs.append(text)
        if self._interval_passed(now_s):
            return self._emit(now_s)
        return None

    def feed_many(self, lines: Sequence[str], now_s: float) -> list[Progress]:
        """`feed` for a batch read at once: the same reports, at a fraction of the cost.

        Only lines passing `_may_be_step` can be step lines; the rest are logs, of which only
        the newest `max_log_lines` can survive in the ring, so only those are cleaned."""
        out: list[Progress] = []
        logs: list[str] = []
        for line in lines:
            if _may_be_step(line):
                self._add_logs(logs)
                logs = []
                update = self.feed(line, now_s)
                if update is not None:
                    out.append(update)
            else:
                logs.append(line)
        if logs:
            self._add_logs(logs)
            if self._logs and self._interval_passed(now_s):
                out.append(self._emit(now_s))
        return out

    def _add_logs(self, lines: Sequence[str]) -> None:
        keep = self._logs.maxlen or 0
        self.dropped_lines += max(0, len(lines) - keep)
        for line in lines[len(lines) - keep :] if keep else ():
            text = _ANSI.sub("", line_text(line)).rstrip()
            if not text.strip():
                continue
            text = self._cut(text)
            if len(self._logs) == self._logs.maxlen:
                self.dropped_lines += 1
            self._logs.append(text)

    def _take_step_token(self, now_s: float) -> bool:
        if self._tokens_at_s is not None and self.min_interval_s > 0:
            earned = (now_s - self._tokens_at_s) / self.min_interval_s
            self._step_tokens = min(float(self.step_burst), self._step_tokens + earned)
        self._tokens_at_s = now_s
        if self._step_tokens < 1:
            return False
        self._step_tokens -= 1
        return True

    def _cut(self, text: str) -> str:
        if len(text) > self.max_line_chars:
            return text[: self.max_line_chars - 1] + "…"
        return text

    def tick(self, now_s: float) -> Progress | None:
        if (self._logs or self._held) and self._interval_passed(now_s):
            return self._emit(now_s)
        if self._last_emit_s is not None and now_s - self._last_emit_s >= self.heartbeat_s:
            return self._emit(now_s)
        return None

    def final(self, status: JobStatus, message: str, now_s: float) -> Progress:
        return self.set_phase(status, message, now_s)

    def _interval_passed(self, now_s: float) -> bool:
        return self._last_emit_s is None or now_s - self._last_emit_s >= self.min_interval_s

    def _emit(self, now_s: float) -> Progress:
        self._seq += 1
        self._last_emit_s = now_s
        self._held = False
        logs = tuple(self._logs)
        self._logs.clear()
        return Progress(
            seq=self._seq,
            status=self._status,
            current_step=self._step,
            total_steps=self._total,
            message=self._message,
            logs=logs,
            commit=self._commit,
        )
