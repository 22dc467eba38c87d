"""Checkpoints: the CLI's output files kept between attempts, so a retry runs only missing steps.

Two halves, no network and no clock of their own:

* capture — `OutputTracker` tells which output files are new or changed since the last upload,
  when a step ends (`step_ended`) or, within a long step, once a file stopped changing
  (`settled`). What it returns is uploaded as partial docs and becomes the job's checkpoint.
* restore — `plan_resume` checks a previous attempt's files (relative path -> bytes, and the
  commit they were made from) against the fresh clone, and decides which of the job's steps are
  complete; `restore` writes the files back into the empty output directory; `ResumePlan.options`
  gives the CLI options for the remaining steps (``{steps}`` in ``FONDATION_COMMAND``, else an
  appended ``--steps a,b``: see `app.adapters.process.build_argv`).

Only files of the collected layout (`app.collect`) are captured or restored, under the same
checks: known names, at most ``max_doc_bytes`` each, regular files inside the output directory,
no links. Anything a checkpoint holds beyond that makes it unusable: `CheckpointError`, which the
caller answers with a full run in a clean output directory, never a failed job.

When is a step complete (`completed_steps`)? Steps 1-3 by their YAML file;
``generate-chapters`` when every chapter ``step3_order.yaml`` lists has a draft (without a
readable order: when a review or a tutorial exists, as the CLI runs steps in order);
``review-chapters`` when every chapter has a reviewed version or a tutorial exists;
``generate-tutorials`` never (the CLI does not say how many tutorials it writes); and any step
the checkpoint says ended (`Checkpoint.ended`). The done steps
are the longest complete prefix of the job's steps. A step thought incomplete is simply run
again, and chapter, review and tutorial generation skip the files that exist, so this costs
little, while a step wrongly thought complete would lose output. Files of steps after the first
remaining one are not restored: they are regenerated from the steps that run again.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

# app.collect's reader and name rules: capture and restore apply its exact checks.
from app.collect import (
    CHAPTER_NAME,
    TUTORIAL_NAME,
    YAML_FILES,
    Reader,
    normalize_name,
    parse_order,
)
from app.domain import Checkpoint, CheckpointFile, JobOptions
from app.errors import CheckpointError, JobFailure
from app.progress import STEP_NAMES, StepPlan

__all__ = [
    "Checkpoint",
    "CheckpointFile",
    "OutputTracker",
    "PartialUpload",
    "ResumePlan",
    "check_path",
    "checkpoint_from_mapping",
    "completed_steps",
    "plan_resume",
    "promised_floor",
    "restore",
]

MAX_FILES = 1000
"""A course has a few dozen files; more in a checkpoint is not one we wrote."""
_SHA = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
_DIRS: dict[str, re.Pattern[str]] = {
    "chapters": CHAPTER_NAME,
    "reviewed-chapters": CHAPTER_NAME,
    "tutorials": TUTORIAL_NAME,
}
_YAML_OF_STEP = {name: file for name, (file, _) in zip(STEP_NAMES, YAML_FILES, strict=False)}


@dataclass(frozen=True, slots=True)
class ResumePlan:
    """What a resumed attempt restores and runs."""

    commit: str
    done: tuple[str, ...]
    """The job's steps the checkpoint completes; not run again."""
    remaining: tuple[str, ...]
    """The job's other steps, in order: what the CLI runs (empty: nothing left to run)."""
    files: tuple[CheckpointFile, ...]
    """Every file to write back, also those of incomplete steps (the CLI skips them)."""

    def options(self, options: JobOptions) -> JobOptions:
        """The CLI options of this attempt: the job's, with `--steps` cut to the remaining ones.

        Nothing done: the job's options unchanged, so a full run's command is the usual one.
        Nothing remaining: `ValueError` (empty steps would mean all six); collect instead."""
        if not self.remaining:
            raise ValueError("no step left to run")
        if not self.done:
            return options
        return replace(options, steps=self.remaining)

    def step_plan(self, reached: int = 0) -> StepPlan:
        """How this attempt reports steps: global numbers, never below `reached` (the step an
        earlier attempt reported) nor below the first remaining step."""
        floor = 0
        if self.done:  # at least at the first step left, or past the last one done
            floor = _rank(self.remaining[0]) if self.remaining else _rank(self.done[-1])
        floor = min(max(floor, reached), len(STEP_NAMES))
        return StepPlan(self.remaining, floor=floor)


def check_path(path: str) -> tuple[str, str]:
    """(directory, file name) of a path of the collected layout; `CheckpointError` otherwise.

    Accepted: ``step1_abstractions.yaml`` and the other YAML files, and
    ``chapters/``, ``reviewed-chapters/``, ``tutorials/`` + a name `app.collect` accepts there.
    No other directory, no ``..``, no absolute path, no backslash or control character."""
    if not path or len(path) > 300 or any(ord(c) < 32 or c in "\\\x7f" for c in path):
        raise CheckpointError(f"refused file name {path[:80]!r}")
    head, sep, name = path.partition("/")
    if not sep:
        if path in dict(YAML_FILES):
            return "", path
        raise CheckpointError(f"refused file name {path[:80]!r}")
    pattern = _DIRS.get(head)
    if pattern is None or "/" in name or name in ("", ".", "..") or not pattern.match(name):
        raise CheckpointError(f"refused file name {path[:80]!r}")
    return head, name


def completed_steps(paths: Iterable[str], order_yaml: bytes | None) -> frozenset[str]:
    """The steps whose output `paths` hold in full (module doc: when a step is complete).

    `order_yaml`: the content of ``step3_order.yaml``, which lists the chapters, if present."""
    names = set(paths)
    drafts = _chapter_keys(n.removeprefix("chapters/") for n in names if n.startswith("chapters/"))
    reviewed = _chapter_keys(
        n.removeprefix("reviewed-chapters/") for n in names if n.startswith("reviewed-chapters/")
    )
    expected = _expected_chapters(order_yaml)
    has_tutorials = any(n.startswith("tutorials/") for n in names)
    outputs = {
        "extract": _YAML_OF_STEP["extract"] in names,
        "analyze": _YAML_OF_STEP["analyze"] in names,
        "order": _YAML_OF_STEP["order"] in names,
        # Without a readable order, a started review proves the drafts were all written.
        "generate-chapters": _all_covered(expected, drafts)
        if expected
        else bool(reviewed) or has_tutorials,
        "review-chapters": has_tutorials or _all_covered(expected, reviewed),
        "generate-tutorials": False,
    }
    return frozenset(step for step, complete in outputs.items() if complete)


def plan_resume(
    checkpoint: Checkpoint,
    *,
    clone_commit: str,
    job_steps: Sequence[str] = (),
    max_doc_bytes: int,
) -> ResumePlan:
    """Check `checkpoint` against the clone and split the job's steps into done and remaining.

    `job_steps`: the job's own `--steps` (empty: all six). Raises `CheckpointError` when the
    checkpoint was made from another commit, holds a refused name, a duplicate, a file over
    `max_doc_bytes`, or more than `MAX_FILES` files."""
    commit = checkpoint.commit.strip().lower()
    if not _SHA.match(commit):
        raise CheckpointError("the checkpoint's commit is not a full SHA")
    if commit != clone_commit.strip().lower():
        raise CheckpointError("the checkpoint was made from another commit")
    if len(checkpoint.files) > MAX_FILES:
        raise CheckpointError(f"{len(checkpoint.files)} files, over the limit of {MAX_FILES}")
    seen: set[str] = set()
    for f in checkpoint.files:
        check_path(f.path)
        key = f.path.lower()  # case-insensitive file systems would merge these
        if key in seen:
            raise CheckpointError(f"duplicate file {f.path!r}")
        seen.add(key)
        if len(f.data) > max_doc_bytes:
            raise CheckpointError(
                f"{f.path}: {len(f.data)} bytes, over the limit of {max_doc_bytes} bytes"
            )
    by_path = {f.path: f.data for f in checkpoint.files}
    complete = completed_steps(by_path, by_path.get(_YAML_OF_STEP["order"]))
    complete |= set(checkpoint.ended)
    steps = tuple(job_steps) or STEP_NAMES
    done: list[str] = []
    for step in steps:
        if step not in complete:
            break
        done.append(step)
    remaining = steps[len(done) :]
    # Keep the output of the done steps and the partial work of the next one; drop what later
    # steps wrote (a gap in the checkpoint): they run again on the regenerated files.
    last = _rank(remaining[0]) if remaining else len(STEP_NAMES)
    files = tuple(f for f in checkpoint.files if _rank(_step_of(f.path)) <= last)
    return ResumePlan(commit, tuple(done), remaining, files)


def restore(plan: ResumePlan, output_dir: Path, *, max_doc_bytes: int) -> None:
    """Write the plan's files into `output_dir`, which must exist and be empty.

    Files are created exclusively and never through a link; afterwards every file is read back
    with `app.collect`'s reader (inside the directory, regular, within `max_doc_bytes`). On any
    failure `output_dir` is emptied again and `CheckpointError` raised: the caller runs in full.
    """
    root = output_dir.resolve()
    try:
        if any(root.iterdir()):
            raise CheckpointError("the output directory is not empty")
    except OSError as exc:
        raise CheckpointError(f"cannot list the output directory ({exc.strerror})") from None
    try:
        made: set[str] = set()
        reader = Reader(root, max_doc_bytes)
        for f in plan.files:
            head, _ = check_path(f.path)
            if head and head not in made:
                os.mkdir(root / head, 0o755)
                made.add(head)
            _write_new(root / f.path, f.data)
        for f in plan.files:
            if reader.read_bytes(root / f.path, f.path, max_doc_bytes) != f.data:
                raise CheckpointError(f"{f.path}: read back different bytes")
    except (CheckpointError, JobFailure, OSError) as exc:
        _empty(root)
        reason = exc.reason if isinstance(exc, CheckpointError) else str(exc)
        if isinstance(exc, OSError):
            reason = f"cannot write the checkpoint ({exc.strerror or exc.__class__.__name__})"
        raise CheckpointError(reason) from None


@dataclass(frozen=True, slots=True)
class PartialUpload:
    """Files to upload as partial docs: new or changed since the last upload."""

    step: str | None
    """The step that ended, or None for files that settled within a running step."""
    files: tuple[CheckpointFile, ...]


class OutputTracker:
    """Which output files are new or changed since they were last handed out for upload.

    Reads only files of the collected layout, through `app.collect`'s reader (a link, a file
    outside the directory or over `max_doc_bytes` is skipped and counted in `refused`: the final
    collection fails the job for it). Restored files count as uploaded (`uploaded=`).
    """

    def __init__(
        self,
        output_dir: Path,
        *,
        max_doc_bytes: int,
        settle_s: float = 2.0,
        uploaded: Iterable[CheckpointFile] = (),
    ) -> None:
        self.root = output_dir.resolve()
        self.max_doc_bytes = max_doc_bytes
        self.settle_s = settle_s
        self.refused: set[str] = set()
        self._sent: dict[str, str] = {f.path: _digest(f.data) for f in uploaded}
        self._seen: dict[str, tuple[tuple[int, int], float]] = {}  # path -> (stat key, since)

    def step_ended(self, step: str) -> PartialUpload:
        """Every layout file new or changed since the last upload: the step wrote them all."""
        return PartialUpload(step, tuple(self._take(self._list())))

    def changed(self) -> PartialUpload:
        """Every layout file new or changed since the last upload, with no step ended: what a
        stopped or failed CLI left."""
        return PartialUpload(None, tuple(self._take(self._list())))

    def settled(self, now_s: float) -> PartialUpload:
        """Within a step: new or changed files whose size and mtime have not moved for
        `settle_s` (a chapter the CLI finished writing), so a long step shows its chapters."""
        ready: list[tuple[str, Path]] = []
        for rel, path in self._list():
            try:
                info = path.lstat()
            except OSError:
                continue
            key = (info.st_size, info.st_mtime_ns)
            prev = self._seen.get(rel)
            if prev is None or prev[0] != key:
                self._seen[rel] = (key, now_s)
            elif now_s - prev[1] >= self.settle_s:
                ready.append((rel, path))
        return PartialUpload(None, tuple(self._take(ready)))

    def forget(self, files: Iterable[CheckpointFile]) -> None:
        """`files` were not uploaded after all (the call failed): hand them out again."""
        for f in files:
            if self._sent.get(f.path) == _digest(f.data):
                del self._sent[f.path]

    def _list(self) -> list[tuple[str, Path]]:
        """(relative path, path) of every layout file; a linked-away directory is refused."""
        reader = Reader(self.root, self.max_doc_bytes)
        found = [
            (name, self.root / name) for name, _ in YAML_FILES if os.path.lexists(self.root / name)
        ]
        for directory, pattern in _DIRS.items():
            path = self.root / directory
            if not os.path.lexists(path):
                continue
            try:
                resolved = reader.inside(path, directory + "/")
                entries = sorted(e.name for e in resolved.iterdir()) if resolved.is_dir() else []
            except (JobFailure, OSError):
                self.refused.add(directory + "/")
                continue
            found += [(f"{directory}/{e}", resolved / e) for e in entries if pattern.match(e)]
        return found

    def _take(self, listed: Iterable[tuple[str, Path]]) -> list[CheckpointFile]:
        reader = Reader(self.root, self.max_doc_bytes)
        out: list[CheckpointFile] = []
        for rel, path in listed:
            try:
                data = reader.read_bytes(path, rel, self.max_doc_bytes)
            except JobFailure:
                self.refused.add(rel)
                continue
            digest = _digest(data)
            if self._sent.get(rel) != digest:
                self._sent[rel] = digest
                out.append(CheckpointFile(rel, data))
        return out


def _step_of(path: str) -> str:
    """The step that writes this (checked) layout path."""
    head, _, _ = path.partition("/")
    by_dir = {
        "chapters": "generate-chapters",
        "reviewed-chapters": "review-chapters",
        "tutorials": "generate-tutorials",
    }
    if head in by_dir:
        return by_dir[head]
    return next(step for step, file in _YAML_OF_STEP.items() if file == path)


def _rank(step: str) -> int:
    """1-based position among the six steps; unknown names (not the real CLI's) sort last."""
    return STEP_NAMES.index(step) + 1 if step in STEP_NAMES else len(STEP_NAMES) + 1


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _chapter_keys(names: Iterable[str]) -> set[tuple[int, str]]:
    keys: set[tuple[int, str]] = set()
    for name in names:
        match = CHAPTER_NAME.match(name)
        if match is not None:
            keys.add((int(match[1]), normalize_name(match[2] or "")))
    return keys


def _expected_chapters(order_yaml: bytes | None) -> list[tuple[str | None, int | None]]:
    if order_yaml is None:
        return []
    try:
        parsed = yaml.safe_load(order_yaml.decode("utf-8", errors="replace"))
    except yaml.YAMLError:
        return []
    return parse_order(parsed) or []


def _all_covered(
    expected: Sequence[tuple[str | None, int | None]], have: set[tuple[int, str]]
) -> bool:
    """Does every order entry have its own chapter file? As `app.collect` matches them: by
    normalized name first, then by idx among the files no name claimed."""
    if not expected:
        return False
    left = set(have)
    by_idx: list[int | None] = []
    for norm, idx in expected:
        pick = next((k for k in sorted(left) if k[1] == norm), None) if norm else None
        if pick is None:
            by_idx.append(idx)
        else:
            left.discard(pick)
    for idx in by_idx:
        pick = next((k for k in sorted(left) if k[0] == idx), None)
        if pick is None:
            return False
        left.discard(pick)
    return True


def _write_new(path: Path, data: bytes) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _empty(root: Path) -> None:
    """Remove everything in `root` (links themselves, never what they point to)."""
    for entry in list(root.iterdir()):
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise


def checkpoint_from_mapping(
    commit: str, files: Mapping[str, bytes], ended: Sequence[str] = ()
) -> Checkpoint:
    """A `Checkpoint` from name -> bytes (as a claim's answer may carry it)."""
    return Checkpoint(commit, tuple(CheckpointFile(p, d) for p, d in files.items()), tuple(ended))


def promised_floor(checkpoint: Checkpoint, *, job_steps: Sequence[str], max_doc_bytes: int) -> int:
    """The global step an attempt resuming from `checkpoint` starts at, if the clone turns out
    to be its commit (0 when the checkpoint is unusable anyway): what to report until then."""
    try:
        plan = plan_resume(
            checkpoint,
            clone_commit=checkpoint.commit,
            job_steps=job_steps,
            max_doc_bytes=max_doc_bytes,
        )
    except CheckpointError:
        return 0
    return plan.step_plan().floor
