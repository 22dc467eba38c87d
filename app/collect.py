"""Turn the Fondation CLI's output directory into the docs uploaded with `fondation:putDocs`.

Layout read (CONTRACT §4, the real CLI's)::

    step1_abstractions.yaml  step2_relationships.yaml  step3_order.yaml      -> kind yaml
    chapters/chapter_<idx>_<name>.md                                         -> kind chapter
    reviewed-chapters/chapter_<idx>_<name>.md   (replaces the draft with the same idx and name;
                      reviewed_chapter_<idx>_<name>.md is accepted too)
    tutorials/tutorial_<idx>_<name>.md                                       -> kind tutorial

Anything else is ignored.

Doc order: the yaml docs (step 1, 2, 3), then the chapters in reading order, then the tutorials
by idx (then file name).

Chapter reading order comes from ``step3_order.yaml``. The real CLI writes::

    order:
      - index: 1            # the chapter number; also the <idx> of chapters/chapter_<idx>_<name>.md
        name: Chapter Generator
        reasoning: ...

and names the file ``chapter_<index>_<normalized name>.md`` (normalized: lower case, runs of
whitespace and of characters outside ``[a-z0-9_-]`` become ``_``). We accept:

* that mapping (``order:`` list of ``{index, name}``): entries sorted by ``index`` (stable);
  an entry matches the chapter whose file ``<name>`` equals the entry's normalized name, else
  the chapter whose file ``<idx>`` equals ``index``;
* a bare list, or a mapping whose ``order`` is a list, of ints (PocketFlow style: abstraction
  indices; matched against file ``<idx>``) or of strings (names, matched as above), in list order.

Chapters the order does not mention follow the ordered ones, by file idx. When
``step3_order.yaml`` is absent, unreadable or of another shape, chapters are ordered by file idx.

``chapter_index``: the 1-based position in that final reading order (1..N, no gaps) for
chapters; the 1-based position among tutorials for tutorials; None for yaml docs.

``slug``: the file name without ``.md``, lower case, ``_`` and other non ``[a-z0-9-]`` runs as
``-`` (``chapters/chapter_3_core_api.md`` -> ``chapter-3-core-api``,
``step1_abstractions.yaml`` -> ``step1-abstractions``). A reviewed chapter keeps its draft's
slug. If two files would give the same slug, later ones get ``-2``, ``-3``…

``title``: the first ``# `` heading of a Markdown file (outside code fences), else a readable
form of the file name (``Chapter 3: core api``); yaml docs are "Abstractions",
"Relationships" and "Chapter order".

Content is decoded as UTF-8; invalid bytes are REPLACED with U+FFFD (one bad byte in an
LLM-written chapter should not sink the whole course), then passed through ``scrub`` (the
worker's log redactor: a secret the CLI found never reaches a doc).

The output is hostile (the CLI runs on untrusted repositories). Each file is checked with
``lstat`` before it is opened, and opened ``O_NOFOLLOW | O_NONBLOCK`` (a FIFO or device never
blocks the reader); ``fstat`` must then show the same regular file. Failures, all
``JobFailure("output_invalid")``: a special file under a doc's name, a file with more than one
link (a hard link can reach a file outside the output), a file larger than ``max_doc_bytes``
(checked on disk, and again on the re-encoded text), a symlink or path that resolves outside
``output_dir``, more than ``max_docs`` docs or more than ``max_total_bytes`` in all, a missing
output directory, and no docs at all.

Collection is two steps so that the course is never held in memory at once: `plan_docs`
lists, checks and orders the files (metadata only, linear in their number), and `read_doc`
reads one planned doc; `collect_docs` does both for callers that want a list.
"""

from __future__ import annotations

import os
import re
import stat
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from app.domain import Doc, DocKind
from app.errors import JobFailure

YAML_FILES: tuple[tuple[str, str], ...] = (
    ("step1_abstractions.yaml", "Abstractions"),
    ("step2_relationships.yaml", "Relationships"),
    ("step3_order.yaml", "Chapter order"),
)
ORDER_FILE = "step3_order.yaml"
CHAPTER_NAME = re.compile(r"^(?:reviewed_)?chapter_(\d{1,9})(?:_(.*))?\.md$", re.IGNORECASE)
TUTORIAL_NAME = re.compile(r"^tutorial_(\d{1,9})(?:_(.*))?\.md$", re.IGNORECASE)
"""File names accepted in ``chapters/``, ``reviewed-chapters/`` (`CHAPTER_NAME`) and
``tutorials/`` (`TUTORIAL_NAME`): group 1 is the idx, group 2 the name."""
_MAX_ORDER_BYTES = 1_000_000
MAX_DOCS = 1000
"""A course has a few yaml files and tens of chapters; thousands of files are not a course."""
MAX_TOTAL_BYTES = 64 * 1024 * 1024
"""All docs of one job together (each is also capped by ``max_doc_bytes``)."""
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


def _fail(message: str) -> JobFailure:
    return JobFailure("output_invalid", message)


def normalize_name(name: str) -> str:
    """The real CLI's `normalizeFileName`: how an abstraction name appears in a file name."""
    out = re.sub(r"\s+", "_", name.strip().lower())
    out = re.sub(r"[^a-z0-9_-]", "_", out)
    return re.sub(r"_+", "_", out)


def slugify(file_name: str) -> str:
    stem = re.sub(r"\.(md|ya?ml)$", "", file_name, flags=re.IGNORECASE)
    slug = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")
    return slug or "doc"


@dataclass(slots=True)
class _File:
    path: Path  # resolved, inside the output dir
    name: str  # file name as listed
    idx: int
    stem_name: str  # the <name> part, as in the file name
    norm: str  # normalize_name(stem_name), computed once


class Reader:
    """Reads files of one output directory under the checks of the module doc (inside the
    directory, regular, one link, within a size limit; opened without following links).
    Also used by `app.checkpoint` to capture and restore output files under the same rules."""

    def __init__(self, root: Path, max_doc_bytes: int) -> None:
        self.root = root
        self.max_doc_bytes = max_doc_bytes

    def inside(self, path: Path, label: str) -> Path:
        """`path` resolved; refuses anything that leaves the output directory."""
        try:
            resolved = path.resolve(strict=True)
        except (OSError, RuntimeError) as exc:
            raise _fail(f"{label}: cannot resolve ({exc.__class__.__name__})") from None
        if resolved != self.root and not resolved.is_relative_to(self.root):
            raise _fail(f"{label}: points outside the output directory")
        return resolved

    def check_file(self, resolved: Path, label: str, limit: int) -> os.stat_result:
        """`lstat` of a resolved path: a regular file with one link, within `limit` bytes."""
        try:
            info = os.lstat(resolved)
        except OSError as exc:
            raise _fail(f"{label}: cannot stat ({exc.strerror})") from None
        if not stat.S_ISREG(info.st_mode):
            raise _fail(f"{label}: not a regular file")
        if info.st_nlink > 1:
            raise _fail(f"{label}: has {info.st_nlink} hard links; only single-link files are read")
        if info.st_size > limit:
            raise _fail(f"{label}: {info.st_size} bytes, over the limit of {limit} bytes")
        return info

    def read_bytes(self, path: Path, label: str, limit: int) -> bytes:
        resolved = self.inside(path, label)
        before = self.check_file(resolved, label, limit)
        try:
            fd = os.open(resolved, _OPEN_FLAGS)
        except OSError as exc:
            raise _fail(f"{label}: cannot open ({exc.strerror})") from None
        with os.fdopen(fd, "rb") as fh:
            info = os.fstat(fh.fileno())
            if (info.st_dev, info.st_ino) != (before.st_dev, before.st_ino):
                raise _fail(f"{label}: changed while being read")
            if not stat.S_ISREG(info.st_mode):
                raise _fail(f"{label}: not a regular file")
            if info.st_nlink > 1:
                raise _fail(f"{label}: has {info.st_nlink} hard links")
            if info.st_size > limit:
                raise _fail(f"{label}: {info.st_size} bytes, over the limit of {limit} bytes")
            data = fh.read(limit + 1)
        if len(data) > limit:
            raise _fail(f"{label}: more than {limit} bytes, over the limit")
        return data

    def read_text(self, path: Path, label: str) -> str:
        data = self.read_bytes(path, label, self.max_doc_bytes)
        text = data.decode("utf-8", errors="replace")
        size = len(text.encode("utf-8"))
        if size > self.max_doc_bytes:
            raise _fail(
                f"{label}: {size} bytes once decoded, over the limit of {self.max_doc_bytes} bytes"
            )
        return text

    def list_dir(self, name: str, pattern: re.Pattern[str], max_files: int) -> list[_File]:
        """The files of `name/` matching `pattern`, by name; more than `max_files` fails."""
        directory = self.root / name
        if not os.path.lexists(directory):
            return []
        resolved_dir = self.inside(directory, name + "/")
        if not resolved_dir.is_dir():
            return []
        matched: list[tuple[str, re.Match[str]]] = []
        with os.scandir(resolved_dir) as entries:
            for entry in entries:
                match = pattern.match(entry.name)
                if match is None:
                    continue
                matched.append((entry.name, match))
                if len(matched) > max_files:
                    raise _fail(f"{name}/: more than {max_files} docs")
        found: list[_File] = []
        for entry_name, match in sorted(matched, key=lambda m: m[0]):
            label = f"{name}/{entry_name}"
            resolved = self.inside(resolved_dir / entry_name, label)
            try:
                mode = os.lstat(resolved).st_mode
            except OSError:
                continue
            if not stat.S_ISREG(mode):
                continue  # a directory, FIFO or device under a chapter's name is not a chapter
            stem = match[2] or ""
            found.append(_File(resolved, entry_name, int(match[1]), stem, normalize_name(stem)))
        return found


def _title(text: str, fallback: str) -> str:
    fenced = False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith(("```", "~~~")):
            fenced = not fenced
            continue
        if not fenced and raw.startswith("# "):
            title = line[2:].strip().strip("#").strip()
            if title:
                return title[:300]
    return fallback


def _readable(kind: str, f: _File) -> str:
    name = re.sub(r"[_\-\s]+", " ", f.stem_name).strip()
    return f"{kind} {f.idx}: {name}" if name else f"{kind} {f.idx}"


def parse_order(data: Any) -> list[tuple[str | None, int | None]] | None:
    """Order entries of a parsed ``step3_order.yaml`` as (normalized name, idx) in reading
    order, or None if not understood."""
    items = data.get("order") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        return None
    if all(isinstance(i, dict) for i in items):
        keyed: list[tuple[int, int, str | None, int | None]] = []
        for pos, item in enumerate(items):
            index = item.get("index")
            name = item.get("name")
            index = index if isinstance(index, int) and not isinstance(index, bool) else None
            norm = normalize_name(name) if isinstance(name, str) and name.strip() else None
            if index is None and norm is None:
                return None
            keyed.append((index if index is not None else 10**12, pos, norm, index))
        keyed.sort(key=lambda k: (k[0], k[1]))
        return [(norm, index) for _, _, norm, index in keyed]
    out: list[tuple[str | None, int | None]] = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool):
            out.append((None, item))
        elif isinstance(item, str) and item.strip():
            # PocketFlow writes "- 2 # Name"; YAML drops the comment, but "2" may be quoted.
            text = item.strip()
            out.append((None, int(text)) if text.isdigit() else (normalize_name(text), None))
        else:
            return None
    return out


def _order_chapters(
    chapters: list[_File], order: list[tuple[str | None, int | None]] | None
) -> list[_File]:
    """Chapters in reading order; linear in chapters + order entries (each entry takes the
    first chapter not yet taken with its name, else with its index, in file-idx order)."""
    by_idx = sorted(chapters, key=lambda f: (f.idx, f.name))
    if order is None:
        return by_idx
    named: dict[str, deque[int]] = {}
    indexed: dict[int, deque[int]] = {}
    for pos, f in enumerate(by_idx):
        named.setdefault(f.norm, deque()).append(pos)
        indexed.setdefault(f.idx, deque()).append(pos)
    taken = [False] * len(by_idx)

    def first_free(queue: deque[int] | None) -> int | None:
        while queue:
            pos = queue.popleft()
            if not taken[pos]:
                return pos
        return None

    ordered: list[_File] = []
    for norm, idx in order:
        pick = first_free(named.get(norm)) if norm is not None else None
        if pick is None and idx is not None:
            pick = first_free(indexed.get(idx))
        if pick is not None:
            taken[pick] = True
            ordered.append(by_idx[pick])
    return ordered + [f for pos, f in enumerate(by_idx) if not taken[pos]]


def read_order(
    output_dir: Path, *, max_bytes: int = _MAX_ORDER_BYTES
) -> list[tuple[str | None, int | None]] | None:
    """The chapter order in `output_dir/step3_order.yaml`; None when absent or not understood."""
    root = output_dir.resolve()
    path = root / ORDER_FILE
    if not os.path.lexists(path):
        return None
    data = Reader(root, max_bytes).read_bytes(path, ORDER_FILE, max_bytes)
    try:
        parsed = yaml.safe_load(data.decode("utf-8", errors="replace"))
    except yaml.YAMLError:
        return None
    return parse_order(parsed)


@dataclass(frozen=True, slots=True)
class PlannedDoc:
    """One doc to read: where, under which slug and position, and its fallback title."""

    path: Path  # resolved, inside the output dir
    label: str  # the path as listed, for messages
    slug: str
    kind: DocKind
    chapter_index: int | None
    title: str  # yaml docs: the fixed title; Markdown: used when the file has no `# ` heading
    size: int  # bytes on disk when planned


def plan_docs(
    output_dir: Path,
    *,
    max_doc_bytes: int,
    max_docs: int = MAX_DOCS,
    max_total_bytes: int = MAX_TOTAL_BYTES,
) -> tuple[PlannedDoc, ...]:
    """Every doc of one CLI run, in upload order, checked but not read (see the module doc)."""
    if not output_dir.is_dir():
        raise _fail(f"output directory {output_dir.name!r} does not exist")
    root = output_dir.resolve()
    reader = Reader(root, max_doc_bytes)
    used: set[str] = set()
    planned: list[PlannedDoc] = []
    total = 0

    def unique(slug: str) -> str:
        candidate, n = slug, 1
        while candidate in used:
            n += 1
            candidate = f"{slug}-{n}"
        used.add(candidate)
        return candidate

    def add(path: Path, label: str, slug: str, kind: DocKind, pos: int | None, title: str) -> None:
        nonlocal total
        if len(planned) >= max_docs:
            raise _fail(f"more than {max_docs} docs")
        resolved = reader.inside(path, label)
        size = reader.check_file(resolved, label, max_doc_bytes).st_size
        total += size
        if total > max_total_bytes:
            raise _fail(f"the docs are over the total limit of {max_total_bytes} bytes")
        planned.append(PlannedDoc(resolved, label, unique(slug), kind, pos, title, size))

    for file_name, title in YAML_FILES:
        path = root / file_name
        if os.path.lexists(path):
            add(path, file_name, slugify(file_name), DocKind.YAML, None, title)

    drafts = reader.list_dir("chapters", CHAPTER_NAME, max_docs)
    reviewed = {
        (f.idx, f.norm): f for f in reader.list_dir("reviewed-chapters", CHAPTER_NAME, max_docs)
    }
    chapters: list[_File] = []
    for draft in drafts:
        chapters.append(reviewed.pop((draft.idx, draft.norm), draft))
    chapters.extend(reviewed.values())  # reviewed without a draft still count

    order = None
    if chapters:
        try:
            order = read_order(root)
        except JobFailure:
            order = None
    for position, f in enumerate(_order_chapters(chapters, order), start=1):
        slug = slugify(re.sub(r"^reviewed_", "", f.name, flags=re.IGNORECASE))
        label = f"{f.path.parent.name}/{f.name}"
        add(f.path, label, slug, DocKind.CHAPTER, position, _readable("Chapter", f))

    tutorials = reader.list_dir("tutorials", TUTORIAL_NAME, max_docs)
    tutorials.sort(key=lambda f: (f.idx, f.name))
    for position, f in enumerate(tutorials, start=1):
        label = f"tutorials/{f.name}"
        add(f.path, label, slugify(f.name), DocKind.TUTORIAL, position, _readable("Tutorial", f))

    if not planned:
        raise _fail("the CLI produced no docs (no step*.yaml, chapters or tutorials)")
    return tuple(planned)


def _keep(text: str) -> str:
    return text


def partial_doc(path: str, data: bytes, *, scrub: Callable[[str], str] = _keep) -> Doc:
    """A partial doc (`Doc.path` set) from one file of the layout, read while the CLI runs.

    Slug, kind and title follow the rules of the module doc; ``chapter_index`` is the file's
    idx (the reading order is only final once the run is collected). `path` must be a layout
    path (`app.checkpoint.check_path`); a name outside the layout raises `ValueError`."""
    head, _, name = path.rpartition("/")
    content = scrub(data.decode("utf-8", errors="replace"))
    if not head:
        title = dict(YAML_FILES).get(name)
        if title is None:
            raise ValueError(f"not a layout file: {path!r}")
        return Doc(slugify(name), title, DocKind.YAML, None, content, path)
    pattern, kind, label = (
        (TUTORIAL_NAME, DocKind.TUTORIAL, "Tutorial")
        if head == "tutorials"
        else (CHAPTER_NAME, DocKind.CHAPTER, "Chapter")
    )
    match = pattern.match(name)
    if match is None or head not in ("chapters", "reviewed-chapters", "tutorials"):
        raise ValueError(f"not a layout file: {path!r}")
    stem = match[2] or ""
    file = _File(Path(path), name, int(match[1]), stem, normalize_name(stem))
    slug = slugify(re.sub(r"^reviewed_", "", name, flags=re.IGNORECASE))
    title = scrub(_title(content, _readable(label, file)))
    return Doc(slug, title, kind, file.idx, content, path)


def read_doc(
    planned: PlannedDoc, *, max_doc_bytes: int, scrub: Callable[[str], str] = _keep
) -> Doc:
    """Read one planned doc (checked again: the file may have changed since it was planned)."""
    reader = Reader(planned.path.parent, max_doc_bytes)
    content = scrub(reader.read_text(planned.path, planned.label))
    title = planned.title
    if planned.kind is not DocKind.YAML:
        title = scrub(_title(content, title))
    return Doc(planned.slug, title, planned.kind, planned.chapter_index, content)


def read_docs(
    plan: Iterable[PlannedDoc],
    *,
    max_doc_bytes: int,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    scrub: Callable[[str], str] = _keep,
) -> Iterator[Doc]:
    """The planned docs, read one at a time, the total bounded again as read."""
    total = 0
    for planned in plan:
        doc = read_doc(planned, max_doc_bytes=max_doc_bytes, scrub=scrub)
        total += len(doc.content.encode("utf-8"))
        if total > max_total_bytes:
            raise _fail(f"the docs are over the total limit of {max_total_bytes} bytes")
        yield doc


def collect_docs(
    output_dir: Path,
    *,
    max_doc_bytes: int,
    max_docs: int = MAX_DOCS,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    scrub: Callable[[str], str] = _keep,
) -> list[Doc]:
    """All docs of one CLI run, in upload order, read into memory (tests and tools; the
    worker reads them as it uploads, see `app.pipeline.upload`)."""
    plan = plan_docs(
        output_dir, max_doc_bytes=max_doc_bytes, max_docs=max_docs, max_total_bytes=max_total_bytes
    )
    docs = read_docs(
        plan, max_doc_bytes=max_doc_bytes, max_total_bytes=max_total_bytes, scrub=scrub
    )
    return list(docs)
