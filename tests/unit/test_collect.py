from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from app.collect import collect_docs, normalize_name, read_order, slugify
from app.domain import DocKind
from app.errors import JobFailure


def write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")


REAL_ORDER = """\
order:
  - index: 2
    name: Chapter Generator
    reasoning: builds on the CLI
  - index: 1
    name: CLI Entry
    reasoning: start here
"""


@pytest.fixture
def out(tmp_path: Path) -> Path:
    root = tmp_path / "out"
    write(root / "step1_abstractions.yaml", "- name: CLI Entry\n")
    write(root / "step2_relationships.yaml", "summary: x\nrelationships: []\n")
    write(root / "step3_order.yaml", REAL_ORDER)
    write(root / "chapters" / "chapter_1_cli_entry.md", "intro\n# CLI Entry\nbody\n")
    write(root / "chapters" / "chapter_2_chapter_generator.md", "no heading here\n")
    write(root / "reviewed-chapters" / "chapter_2_chapter_generator.md", "# Generator (reviewed)\n")
    write(root / "tutorials" / "tutorial_2_b.md", "# Tutorial B\n")
    write(root / "tutorials" / "tutorial_1_a.md", "```\n# not a title\n```\n")
    write(root / "notes.txt", "ignored")
    write(root / "chapters" / "README.md", "ignored too")
    return root


def test_real_layout(out: Path) -> None:
    docs = collect_docs(out, max_doc_bytes=10_000)
    got = [(d.slug, d.title, d.kind, d.chapter_index) for d in docs]
    assert got == [
        ("step1-abstractions", "Abstractions", DocKind.YAML, None),
        ("step2-relationships", "Relationships", DocKind.YAML, None),
        ("step3-order", "Chapter order", DocKind.YAML, None),
        ("chapter-1-cli-entry", "CLI Entry", DocKind.CHAPTER, 1),  # index 1 sorts first
        ("chapter-2-chapter-generator", "Generator (reviewed)", DocKind.CHAPTER, 2),
        ("tutorial-1-a", "Tutorial 1: a", DocKind.TUTORIAL, 1),
        ("tutorial-2-b", "Tutorial B", DocKind.TUTORIAL, 2),
    ]
    assert docs[4].content == "# Generator (reviewed)\n"  # reviewed replaced the draft
    assert docs[0].to_json()["chapterIndex"] is None


def test_order_by_name_when_index_differs_from_file_idx(out: Path) -> None:
    # index is the reading position; names tie entries to files whose idx differs
    write(
        out / "step3_order.yaml",
        "order:\n  - {index: 1, name: Chapter Generator}\n  - {index: 2, name: CLI Entry}\n",
    )
    chapters = [d for d in collect_docs(out, max_doc_bytes=10_000) if d.kind is DocKind.CHAPTER]
    assert [(d.slug, d.chapter_index) for d in chapters] == [
        ("chapter-2-chapter-generator", 1),
        ("chapter-1-cli-entry", 2),
    ]


@pytest.mark.parametrize(
    ("order_yaml", "expected"),
    [
        ("- 2\n- 1\n", ["chapter-2-chapter-generator", "chapter-1-cli-entry"]),  # PocketFlow ints
        ("order: [2, 1]\n", ["chapter-2-chapter-generator", "chapter-1-cli-entry"]),
        (
            "- Chapter Generator\n- CLI Entry\n",
            ["chapter-2-chapter-generator", "chapter-1-cli-entry"],
        ),
        ("- '2'\n", ["chapter-2-chapter-generator", "chapter-1-cli-entry"]),  # unlisted follow
        ("order: {a: 1}\n", ["chapter-1-cli-entry", "chapter-2-chapter-generator"]),  # fallback
        ("{{{ not yaml", ["chapter-1-cli-entry", "chapter-2-chapter-generator"]),
        ("- [nested]\n", ["chapter-1-cli-entry", "chapter-2-chapter-generator"]),
        ("- 99\n", ["chapter-1-cli-entry", "chapter-2-chapter-generator"]),  # unmatched entries
    ],
)
def test_order_formats(out: Path, order_yaml: str, expected: list[str]) -> None:
    write(out / "step3_order.yaml", order_yaml)
    chapters = [d for d in collect_docs(out, max_doc_bytes=10_000) if d.kind is DocKind.CHAPTER]
    assert [d.slug for d in chapters] == expected
    assert [d.chapter_index for d in chapters] == [1, 2]


def test_no_order_file_uses_file_idx(out: Path) -> None:
    (out / "step3_order.yaml").unlink()
    assert read_order(out) is None
    docs = collect_docs(out, max_doc_bytes=10_000)
    assert [d.slug for d in docs if d.kind is DocKind.CHAPTER] == [
        "chapter-1-cli-entry",
        "chapter-2-chapter-generator",
    ]


def test_reviewed_prefix_and_reviewed_without_draft(tmp_path: Path) -> None:
    write(tmp_path / "reviewed-chapters" / "reviewed_chapter_3_x.md", "# X\n")
    write(tmp_path / "chapters" / "chapter_1.md", "plain")
    docs = collect_docs(tmp_path, max_doc_bytes=100)
    assert [(d.slug, d.title, d.chapter_index) for d in docs] == [
        ("chapter-1", "Chapter 1", 1),
        ("chapter-3-x", "X", 2),
    ]


def test_too_big(out: Path) -> None:
    write(out / "chapters" / "chapter_1_cli_entry.md", "x" * 1001)
    with pytest.raises(JobFailure) as info:
        collect_docs(out, max_doc_bytes=1000)
    assert info.value.code == "output_invalid"
    assert "chapter_1_cli_entry.md" in info.value.message
    assert "1001" in info.value.message
    assert "1000" in info.value.message


def test_invalid_utf8_is_replaced(tmp_path: Path) -> None:
    write(tmp_path / "chapters" / "chapter_1_a.md", b"# Caf\xe9\nok\n")
    (doc,) = collect_docs(tmp_path, max_doc_bytes=100)
    assert doc.title == "Caf\ufffd"


def test_replacement_growing_past_limit_fails(tmp_path: Path) -> None:
    write(tmp_path / "chapters" / "chapter_1_a.md", b"\xff" * 10)  # 10 bytes -> 30 once replaced
    with pytest.raises(JobFailure, match="once decoded"):
        collect_docs(tmp_path, max_doc_bytes=20)


def test_no_docs(tmp_path: Path) -> None:
    write(tmp_path / "random.md", "# hi")
    with pytest.raises(JobFailure) as info:
        collect_docs(tmp_path, max_doc_bytes=100)
    assert info.value.code == "output_invalid"
    with pytest.raises(JobFailure):
        collect_docs(tmp_path / "missing", max_doc_bytes=100)


def test_symlink_outside_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    root = tmp_path / "out"
    write(root / "chapters" / "chapter_1_a.md", "# A")
    os.symlink(secret, root / "chapters" / "chapter_2_b.md")
    with pytest.raises(JobFailure) as info:
        collect_docs(root, max_doc_bytes=1000)
    assert info.value.code == "output_invalid"
    assert "chapter_2_b.md" in info.value.message


def test_symlinked_dir_outside_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    write(elsewhere / "tutorial_1_x.md", "# x")
    root = tmp_path / "out"
    write(root / "step1_abstractions.yaml", "[]")
    os.symlink(elsewhere, root / "tutorials")
    with pytest.raises(JobFailure, match="outside"):
        collect_docs(root, max_doc_bytes=1000)


def test_symlinked_yaml_outside_refused(tmp_path: Path) -> None:
    (tmp_path / "passwd").write_text("root:x:0:0")
    root = tmp_path / "out"
    root.mkdir()
    os.symlink(tmp_path / "passwd", root / "step1_abstractions.yaml")
    with pytest.raises(JobFailure, match="outside"):
        collect_docs(root, max_doc_bytes=1000)


def test_symlink_inside_allowed_and_dangling_refused(tmp_path: Path) -> None:
    write(tmp_path / "chapters" / "chapter_1_a.md", "# A")
    os.symlink(tmp_path / "chapters" / "chapter_1_a.md", tmp_path / "step1_abstractions.yaml")
    docs = collect_docs(tmp_path, max_doc_bytes=1000)
    assert [d.slug for d in docs] == ["step1-abstractions", "chapter-1-a"]
    os.symlink(tmp_path / "nope", tmp_path / "chapters" / "chapter_2_b.md")
    with pytest.raises(JobFailure):
        collect_docs(tmp_path, max_doc_bytes=1000)


def test_slug_collisions_made_unique(tmp_path: Path) -> None:
    write(tmp_path / "chapters" / "chapter_1_a_b.md", "1")
    write(tmp_path / "chapters" / "chapter_1_a-b.md", "2")
    slugs = [d.slug for d in collect_docs(tmp_path, max_doc_bytes=100)]
    assert sorted(slugs) == ["chapter-1-a-b", "chapter-1-a-b-2"]


def test_helpers() -> None:
    assert normalize_name("  Chapter Generator (v2) ") == "chapter_generator_v2_"
    assert slugify("chapter_01_Intro.md") == "chapter-01-intro"
    assert slugify("step1_abstractions.yaml") == "step1-abstractions"


# ── hostile output (issue 11) ───────────────────────────────────────────────────────


def _collect_in_thread(root: Path, timeout_s: float = 5.0, **kw: object) -> BaseException | None:
    """Run collect_docs in a thread, bounded: a blocked open must not hang the test."""
    result: list[BaseException | None] = []

    def target() -> None:
        try:
            collect_docs(root, max_doc_bytes=1000, **kw)  # type: ignore[arg-type]
            result.append(None)
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        for fifo in root.rglob("*"):  # release the reader so the thread can end
            if stat.S_ISFIFO(fifo.lstat().st_mode):
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                os.close(fd)
        thread.join(5)
        raise AssertionError("collect_docs blocked on a special file")
    return result[0]


def test_fifo_named_like_a_doc_is_refused_without_blocking(tmp_path: Path) -> None:
    write(tmp_path / "chapters" / "chapter_1_a.md", "# A\n")
    os.mkfifo(tmp_path / "step1_abstractions.yaml")
    exc = _collect_in_thread(tmp_path)
    assert isinstance(exc, JobFailure) and exc.code == "output_invalid", exc
    assert "step1_abstractions.yaml" in exc.message and "regular file" in exc.message


def test_fifo_chapter_is_skipped_and_fifo_order_file_refused_without_blocking(
    tmp_path: Path,
) -> None:
    write(tmp_path / "chapters" / "chapter_1_a.md", "# A\n")
    os.mkfifo(tmp_path / "chapters" / "chapter_2_b.md")
    assert _collect_in_thread(tmp_path) is None  # not a file: not a chapter
    os.mkfifo(tmp_path / "step3_order.yaml")
    exc = _collect_in_thread(tmp_path)
    assert isinstance(exc, JobFailure) and "step3_order.yaml" in exc.message, exc


def test_hard_link_to_a_file_outside_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "outside.txt"
    secret.write_text("not for upload\n")
    root = tmp_path / "out"
    write(root / "chapters" / "chapter_1_a.md", "# A\n")
    os.link(secret, root / "chapters" / "chapter_2_b.md")
    with pytest.raises(JobFailure) as info:
        collect_docs(root, max_doc_bytes=1000)
    assert info.value.code == "output_invalid" and "link" in info.value.message


def test_doc_count_and_total_bytes_are_capped(tmp_path: Path) -> None:
    for i in range(1, 6):
        write(tmp_path / "chapters" / f"chapter_{i}_c.md", f"# C{i}\n" + "x" * 100)
    assert len(collect_docs(tmp_path, max_doc_bytes=1000, max_docs=5)) == 5
    with pytest.raises(JobFailure, match="more than 4 docs"):
        collect_docs(tmp_path, max_doc_bytes=1000, max_docs=4)
    with pytest.raises(JobFailure, match="over the total limit"):
        collect_docs(tmp_path, max_doc_bytes=1000, max_total_bytes=400)


def test_chapter_ordering_is_linear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """2,000 chapters and an order naming 2,000 chapters that do not exist: the old ordering
    compared every order entry with every remaining chapter (4 M name normalisations)."""
    import app.collect as collect_mod

    n = 2000
    for i in range(1, n + 1):
        write(tmp_path / "chapters" / f"chapter_{i}_c{i}.md", "x")
    entries = "".join(f"  - index: {n + i}\n    name: Missing {i}\n" for i in range(1, n + 1))
    write(tmp_path / "step3_order.yaml", "order:\n" + entries)
    calls = 0
    real = collect_mod.normalize_name

    def counting(name: str) -> str:
        nonlocal calls
        calls += 1
        return real(name)

    monkeypatch.setattr(collect_mod, "normalize_name", counting)
    docs = collect_docs(tmp_path, max_doc_bytes=200_000, max_docs=n + 10)
    assert [d.chapter_index for d in docs if d.kind is DocKind.CHAPTER] == list(range(1, n + 1))
    assert calls <= 4 * n, calls
