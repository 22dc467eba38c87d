"""Checkpoints: which steps a previous attempt's files complete, writing them back, and the
tracker that picks the files to upload as partial docs. Outputs come from the simulator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app import simulator
from app.adapters.process import build_argv
from app.checkpoint import (
    MAX_FILES,
    Checkpoint,
    CheckpointFile,
    OutputTracker,
    ResumePlan,
    check_path,
    checkpoint_from_mapping,
    plan_resume,
    restore,
)
from app.collect import collect_docs
from app.domain import JobOptions
from app.errors import CheckpointError, WorkerError
from app.progress import STEP_NAMES

ROOT = Path(__file__).resolve().parents[2]
SHA = "0123456789abcdef0123456789abcdef01234567"
MAX = 100_000


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "repo"
    (r / "src").mkdir(parents=True)
    (r / "src" / "core.py").write_text("def core():\n    return 1\n")
    (r / "app.py").write_text("print('hello')\n")
    (r / "README.md").write_text("# Demo\n")
    return r


def sim(repo: Path, out: Path, *steps: str, extra: tuple[str, ...] = ()) -> None:
    argv = ["analyze", str(repo), "--output-dir", str(out), "--steps", ",".join(steps), *extra]
    assert simulator.main(argv) == 0


def files_of(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def plan_of(out: Path, **kw: object) -> ResumePlan:
    return plan_resume(
        checkpoint_from_mapping(SHA, files_of(out)),
        clone_commit=SHA,
        max_doc_bytes=MAX,
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("k", "done"),
    [
        (1, 1),
        (2, 2),
        (3, 3),
        (4, 4),
        # the simulator reviews only odd chapters: a review is complete once tutorials exist
        (5, 4),
        (6, 5),  # tutorials: never known complete, rerun (skips what exists)
    ],
)
def test_done_steps_after_each_step(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], k: int, done: int
) -> None:
    out = tmp_path / "out"
    sim(repo, out, *STEP_NAMES[:k])
    plan = plan_of(out)
    assert plan.done == STEP_NAMES[:done]
    assert plan.remaining == STEP_NAMES[done:]
    assert {f.path for f in plan.files} == set(files_of(out))  # all kept
    assert plan.options(JobOptions(model="m")) == JobOptions("m", STEP_NAMES[done:])


def test_a_missing_draft_reruns_chapters_and_drops_later_files(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    sim(repo, out, *STEP_NAMES)
    (out / "chapters" / "chapter_2_app_py.md").unlink()  # a gap in the checkpoint
    plan = plan_of(out)
    assert plan.done == STEP_NAMES[:3]
    paths = {f.path for f in plan.files}
    assert "chapters/chapter_1_readme_md.md" in paths  # partial work of the next step: kept
    assert not any(p.startswith(("reviewed-chapters/", "tutorials/")) for p in paths)


def test_resume_runs_the_remaining_steps_and_equals_a_full_run(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Attempt 1 stopped in step 4 after two chapters; attempt 2 restores, runs the command
    built from FONDATION_COMMAND with --steps appended, and writes only the missing chapter."""
    first = tmp_path / "first"
    sim(repo, first, *STEP_NAMES[:4])
    (first / "chapters" / "chapter_3_src.md").unlink()
    plan = plan_of(first)
    assert plan.remaining == STEP_NAMES[3:]

    out, rec = tmp_path / "out", tmp_path / "rec.jsonl"
    out.mkdir()
    restore(plan, out, max_doc_bytes=MAX)
    assert files_of(out) == files_of(first)
    template = f"{sys.executable} -m app.simulator analyze {{repo_dir}} --output-dir {{output_dir}}"
    argv = build_argv(template, repo_dir=repo, output_dir=out, options=plan.options(JobOptions()))
    assert argv[-2:] == ["--steps", "generate-chapters,review-chapters,generate-tutorials"]
    res = subprocess.run(
        [*argv, "--record-file", str(rec)], cwd=ROOT, capture_output=True, timeout=20, check=False
    )
    assert res.returncode == 0, res.stderr
    ran = [json.loads(line) for line in rec.read_text().splitlines()]
    assert [r["file"] for r in ran if r["event"] == "chapter"] == [
        "chapters/chapter_3_src.md",
        "reviewed-chapters/chapter_1_readme_md.md",
        "reviewed-chapters/chapter_3_src.md",
        "tutorials/tutorial_1_src.md",
    ]
    full = tmp_path / "full"
    sim(repo, full, *STEP_NAMES)
    assert collect_docs(out, max_doc_bytes=MAX) == collect_docs(full, max_doc_bytes=MAX)


def test_job_subset_and_nothing_left(repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    sim(repo, out, "extract", "analyze")
    plan = plan_of(out, job_steps=("extract", "analyze"))
    assert (plan.done, plan.remaining) == (("extract", "analyze"), ())
    with pytest.raises(ValueError, match="no step left"):
        plan.options(JobOptions())
    assert plan.step_plan().floor == 2
    nothing = plan_of(tmp_path / "none", job_steps=("extract",))  # no files: nothing done
    assert nothing.options(JobOptions(steps=("extract",))) == JobOptions(steps=("extract",))


def test_step_plan_floor(repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    sim(repo, out, *STEP_NAMES[:4])
    plan = plan_of(out)
    assert plan.step_plan().floor == 5  # at the first step left
    assert plan.step_plan(reached=6).floor == 6  # an earlier attempt got further
    assert plan.step_plan().run_steps == STEP_NAMES[4:]
    fresh = plan_of(tmp_path / "none")
    assert (fresh.step_plan(reached=3).floor, fresh.step_plan().floor) == (3, 0)


def test_commit_must_match(tmp_path: Path) -> None:
    cp = Checkpoint(SHA, (CheckpointFile("step1_abstractions.yaml", b"- a\n"),))
    with pytest.raises(CheckpointError, match="another commit") as info:
        plan_resume(cp, clone_commit="f" * 40, max_doc_bytes=MAX)
    assert isinstance(info.value, WorkerError)
    assert plan_resume(cp, clone_commit=SHA.upper(), max_doc_bytes=MAX).done == ("extract",)
    with pytest.raises(CheckpointError, match="full SHA"):
        plan_resume(Checkpoint("main", cp.files), clone_commit="main", max_doc_bytes=MAX)


@pytest.mark.parametrize(
    "path",
    [
        "",
        "../step1_abstractions.yaml",
        "/etc/passwd",
        "step4.yaml",
        "notes.txt",
        "chapters/../step1_abstractions.yaml",
        "chapters/sub/chapter_1_a.md",
        "chapters/readme.md",
        "chapters/chapter_1_a.txt",
        "chapters\\chapter_1_a.md",
        "chapters/chapter_1_a.md\n",
        "other/chapter_1_a.md",
        "tutorials/chapter_1_a.md",
        "chapters/",
        "chapters/" + "a" * 300 + ".md",
    ],
)
def test_refused_names(path: str) -> None:
    with pytest.raises(CheckpointError, match="refused file name"):
        check_path(path)


@pytest.mark.parametrize(
    "path",
    [
        "step1_abstractions.yaml",
        "step3_order.yaml",
        "chapters/chapter_12_core_api.md",
        "reviewed-chapters/chapter_1_a.md",
        "reviewed-chapters/reviewed_chapter_1_a.md",
        "tutorials/tutorial_2.md",
    ],
)
def test_accepted_names(path: str) -> None:
    check_path(path)


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ([("chapters/chapter_1_a.md", b"x" * (MAX + 1))], "over the limit"),
        ([("chapters/chapter_1_a.md", b"a"), ("chapters/CHAPTER_1_A.md", b"b")], "duplicate"),
        ([(f"chapters/chapter_{i}_a.md", b"a") for i in range(MAX_FILES + 1)], "files, over"),
        ([("step1_abstractions.yaml", b"a"), ("../x", b"b")], "refused"),
    ],
)
def test_unusable_checkpoints(files: list[tuple[str, bytes]], match: str) -> None:
    cp = Checkpoint(SHA, tuple(CheckpointFile(p, d) for p, d in files))
    with pytest.raises(CheckpointError, match=match):
        plan_resume(cp, clone_commit=SHA, max_doc_bytes=MAX)


def test_restore_refuses_a_used_dir_and_cleans_up_after_a_failure(tmp_path: Path) -> None:
    good = CheckpointFile("chapters/chapter_1_a.md", b"# A\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "left.txt").write_text("x")
    plan = ResumePlan(SHA, ("extract",), (), (good,))
    with pytest.raises(CheckpointError, match="not empty"):
        restore(plan, out, max_doc_bytes=MAX)
    (out / "left.txt").unlink()
    bad = ResumePlan(SHA, (), (), (good, CheckpointFile("chapters/../../evil.md", b"x")))
    with pytest.raises(CheckpointError, match="refused"):
        restore(bad, out, max_doc_bytes=MAX)
    assert list(out.iterdir()) == []
    big = ResumePlan(SHA, (), (), (good, CheckpointFile("tutorials/tutorial_1.md", b"x" * 50)))
    with pytest.raises(CheckpointError, match="over the limit"):
        restore(big, out, max_doc_bytes=10)  # collect's reader checks sizes on disk too
    assert list(out.iterdir()) == []
    assert not (tmp_path / "evil.md").exists()


def test_tracker_hands_out_what_each_step_wrote(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    tracker = OutputTracker(out, max_doc_bytes=MAX)
    got: dict[str, list[str]] = {}
    for step in STEP_NAMES:
        sim(repo, out, step)
        upload = tracker.step_ended(step)
        assert upload.step == step
        got[step] = [f.path for f in upload.files]
        assert all(f.data == (out / f.path).read_bytes() for f in upload.files)
    assert got == {
        "extract": ["step1_abstractions.yaml"],
        "analyze": ["step2_relationships.yaml"],
        "order": ["step3_order.yaml"],
        "generate-chapters": [
            "chapters/chapter_1_readme_md.md",
            "chapters/chapter_2_app_py.md",
            "chapters/chapter_3_src.md",
        ],
        "review-chapters": [
            "reviewed-chapters/chapter_1_readme_md.md",
            "reviewed-chapters/chapter_3_src.md",
        ],
        "generate-tutorials": ["tutorials/tutorial_1_src.md"],
    }
    assert tracker.step_ended("generate-tutorials").files == ()  # nothing new
    sim(repo, out, "generate-tutorials", extra=("--overwrite",))
    assert tracker.step_ended("generate-tutorials").files == ()  # same bytes: not changed
    (out / "step3_order.yaml").write_text("order: []\n")
    assert [f.path for f in tracker.step_ended("order").files] == ["step3_order.yaml"]


def test_tracker_skips_restored_files_and_waits_for_settled_ones(tmp_path: Path) -> None:
    out = tmp_path / "out"
    restored = CheckpointFile("chapters/chapter_1_a.md", b"# A\n")
    out.mkdir()
    restore(ResumePlan(SHA, (), ("generate-chapters",), (restored,)), out, max_doc_bytes=MAX)
    tracker = OutputTracker(out, max_doc_bytes=MAX, settle_s=2.0, uploaded=[restored])
    new = out / "chapters" / "chapter_2_b.md"
    new.write_text("# B, half")
    assert tracker.settled(10.0).files == ()  # first sight
    assert tracker.settled(11.0).files == ()  # not still for 2 s yet
    new.write_text("# B, whole\n")
    os.utime(new, ns=(1, 1))
    assert tracker.settled(12.5).files == ()  # changed: the clock starts again
    upload = tracker.settled(14.5)
    assert (upload.step, [f.path for f in upload.files]) == (None, ["chapters/chapter_2_b.md"])
    assert upload.files[0].data == b"# B, whole\n"
    assert tracker.settled(20.0).files == ()
    assert tracker.step_ended("generate-chapters").files == ()  # already sent, not again


def test_tracker_refuses_links(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "chapters").mkdir(parents=True)
    secret = tmp_path / "secret.md"
    secret.write_text("token")
    (out / "chapters" / "chapter_1_a.md").symlink_to(secret)
    (out / "tutorials").symlink_to(tmp_path)
    (out / "chapters" / "chapter_2_b.md").write_text("ok")
    tracker = OutputTracker(out, max_doc_bytes=MAX)
    upload = tracker.step_ended("generate-chapters")
    assert [f.path for f in upload.files] == ["chapters/chapter_2_b.md"]
    assert tracker.refused >= {"tutorials/"}


def test_steps_seen_ending_count_as_done(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Files alone cannot tell the simulator's review is complete (it reviews odd chapters
    only); the previous attempt saw step 6 begin, so step 5 had ended."""
    out = tmp_path / "out"
    sim(repo, out, *STEP_NAMES[:5])
    files = files_of(out)
    assert plan_of(out).remaining == STEP_NAMES[4:]
    cp = checkpoint_from_mapping(SHA, files, ended=STEP_NAMES[:5])
    plan = plan_resume(cp, clone_commit=SHA, max_doc_bytes=MAX)
    assert (plan.done, plan.remaining) == (STEP_NAMES[:5], ("generate-tutorials",))
