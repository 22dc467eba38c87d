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
LLM-written chapter should not sink the whole course). Failures, all
``JobFailure("output_invalid")``: a file larger than ``max_doc_bytes`` (checked on disk, and
again on the re-encoded text), a symlink or path that resolves outside ``output_dir`` (the CLI
runs on untrusted repositories), a missing output directory, and no docs at all.
"""

from __future__ import annotations

import os
import re
import stat
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
_CHAPTER = re.compile(r"^(?:reviewed_)?chapter_(\d{1,9})(?:_(.*))?\.md$", re.IGNORECASE)
_TUTORIAL = re.compile(r"^tutorial_(\d{1,9})(?:_(.*))?\.md$", re.IGNORECASE)
_MAX_ORDER_BYTES = 1_000_000


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


class _Reader:
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

    def read_bytes(self, path: Path, label: str, limit: int) -> bytes:
        resolved = self.inside(path, label)
        try:
            fd = os.open(resolved, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            raise _fail(f"{label}: cannot open ({exc.strerror})") from None
        with os.fdopen(fd, "rb") as fh:
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise _fail(f"{label}: not a regular file")
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

    def list_dir(self, name: str, pattern: re.Pattern[str]) -> list[_File]:
        directory = self.root / name
        if not os.path.lexists(directory):
            return []
        resolved_dir = self.inside(directory, name + "/")
        if not resolved_dir.is_dir():
            return []
        found: list[_File] = []
        for entry in sorted(resolved_dir.iterdir(), key=lambda p: p.name):
            match = pattern.match(entry.name)
            if match is None:
                continue
            label = f"{name}/{entry.name}"
            resolved = self.inside(entry, label)
            if not resolved.is_file():
                continue
            found.append(_File(resolved, entry.name, int(match[1]), match[2] or ""))
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


def _parse_order(data: Any) -> list[tuple[str | None, int | None]] | None:
    """Order entries as (normalized name, idx) in reading order, or None if not understood."""
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
    by_idx = sorted(chapters, key=lambda f: (f.idx, f.name))
    if order is None:
        return by_idx
    remaining = list(by_idx)
    ordered: list[_File] = []
    for norm, idx in order:
        pick = None
        if norm is not None:
            pick = next((f for f in remaining if normalize_name(f.stem_name) == norm), None)
        if pick is None and idx is not None:
            pick = next((f for f in remaining if f.idx == idx), None)
        if pick is not None:
            remaining.remove(pick)
            ordered.append(pick)
    return ordered + remaining


def read_order(
    output_dir: Path, *, max_bytes: int = _MAX_ORDER_BYTES
) -> list[tuple[str | None, int | None]] | None:
    """The chapter order in `output_dir/step3_order.yaml`; None when absent or not understood."""
    root = output_dir.resolve()
    path = root / ORDER_FILE
    if not os.path.lexists(path):
        return None
    data = _Reader(root, max_bytes).read_bytes(path, ORDER_FILE, max_bytes)
    try:
        parsed = yaml.safe_load(data.decode("utf-8", errors="replace"))
    except yaml.YAMLError:
        return None
    return _parse_order(parsed)


def collect_docs(output_dir: Path, *, max_doc_bytes: int) -> list[Doc]:
    """All docs of one CLI run, in upload order (see the module doc for every rule)."""
    if not output_dir.is_dir():
        raise _fail(f"output directory {output_dir.name!r} does not exist")
    root = output_dir.resolve()
    reader = _Reader(root, max_doc_bytes)
    docs: list[Doc] = []
    used: set[str] = set()

    def unique(slug: str) -> str:
        candidate, n = slug, 1
        while candidate in used:
            n += 1
            candidate = f"{slug}-{n}"
        used.add(candidate)
        return candidate

    for file_name, title in YAML_FILES:
        path = root / file_name
        if not os.path.lexists(path):
            continue
        content = reader.read_text(path, file_name)
        docs.append(Doc(unique(slugify(file_name)), title, DocKind.YAML, None, content))

    drafts = reader.list_dir("chapters", _CHAPTER)
    reviewed = {
        (f.idx, normalize_name(f.stem_name)): f
        for f in reader.list_dir("reviewed-chapters", _CHAPTER)
    }
    chapters: list[_File] = []
    for draft in drafts:
        chapters.append(reviewed.pop((draft.idx, normalize_name(draft.stem_name)), draft))
    chapters.extend(reviewed.values())  # reviewed without a draft still count

    order = None
    if chapters:
        try:
            order = read_order(root)
        except JobFailure:
            order = None
    for position, f in enumerate(_order_chapters(chapters, order), start=1):
        label = f"{f.path.parent.name}/{f.name}"
        content = reader.read_text(f.path, label)
        slug_source = re.sub(r"^reviewed_", "", f.name, flags=re.IGNORECASE)
        docs.append(
            Doc(
                unique(slugify(slug_source)),
                _title(content, _readable("Chapter", f)),
                DocKind.CHAPTER,
                position,
                content,
            )
        )

    tutorials = sorted(reader.list_dir("tutorials", _TUTORIAL), key=lambda f: (f.idx, f.name))
    for position, f in enumerate(tutorials, start=1):
        content = reader.read_text(f.path, f"tutorials/{f.name}")
        docs.append(
            Doc(
                unique(slugify(f.name)),
                _title(content, _readable("Tutorial", f)),
                DocKind.TUTORIAL,
                position,
                content,
            )
        )

    if not docs:
        raise _fail("the CLI produced no docs (no step*.yaml, chapters or tutorials)")
    return docs
