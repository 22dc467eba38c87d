"""The simulator, run as a real subprocess (`python -m app.simulator`), every wait bounded."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.collect import collect_docs
from app.domain import DocKind, JobStatus
from app.errors import JobFailure
from app.progress import PHASES, STEP_NAMES, ProgressTracker, StepPlan, parse_step
from app.simulator import MARK, STEPS

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 20


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "repo"
    (r / "src").mkdir(parents=True)
    (r / "src" / "core.py").write_text("def core():\n    return 1\n")
    (r / "app.py").write_text("import src\nprint('hello')\nline3\nline4\nline5\nline6\n")
    (r / "README.md").write_text("# Demo\n")
    (r / ".git").mkdir()
    (r / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return r


def cmd(repo: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "app.simulator",
        "analyze",
        str(repo),
        "--output-dir",
        str(out),
        "--profile",
        "production",
        *extra,
    ]


def run(repo: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        cmd(repo, out, *extra), cwd=ROOT, capture_output=True, timeout=TIMEOUT, check=False
    )


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=TIMEOUT)
        for stream in (p.stdout, p.stderr):
            if stream is not None:
                stream.close()


def start(
    procs: list[subprocess.Popen[bytes]], repo: Path, out: Path, *extra: str
) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(
        cmd(repo, out, *extra),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    procs.append(p)
    return p


def read_until(p: subprocess.Popen[bytes], needle: str) -> list[str]:
    assert p.stdout is not None
    deadline = time.monotonic() + TIMEOUT
    lines: list[str] = []
    while time.monotonic() < deadline:
        raw = p.stdout.readline()
        if not raw:
            break
        line = raw.decode("utf-8", "replace")
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} not seen in {lines!r}")


def test_default_run(repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    t0 = time.monotonic()
    res = run(repo, out)
    assert time.monotonic() - t0 < 5  # < 2 s of its own; slack for slow CI
    assert res.returncode == 0, res.stderr
    stdout = res.stdout.decode().splitlines()
    steps = [s for s in map(parse_step, stdout) if s is not None]
    assert [(s.index, s.total) for s in steps] == [(i, 6) for i in range(1, 7)]
    assert steps[0].text == "Extracting core abstractions from codebase"
    assert res.stderr.strip()  # logs on stderr too
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [
        "chapters/chapter_1_readme_md.md",
        "chapters/chapter_2_app_py.md",
        "chapters/chapter_3_src.md",
        "reviewed-chapters/chapter_1_readme_md.md",
        "reviewed-chapters/chapter_3_src.md",
        "step1_abstractions.yaml",
        "step2_relationships.yaml",
        "step3_order.yaml",
        "tutorials/tutorial_1_src.md",
    ]
    for f in out.rglob("*"):
        if f.is_file():
            assert MARK in f.read_text().splitlines()[0]
    docs = collect_docs(out, max_doc_bytes=100_000)
    chapters = [d for d in docs if d.kind is DocKind.CHAPTER]
    # the order file lists abstractions reversed: ordering is honoured, not file idx
    assert [(d.slug, d.chapter_index) for d in chapters] == [
        ("chapter-3-src", 1),
        ("chapter-2-app-py", 2),
        ("chapter-1-readme-md", 3),
    ]
    assert [d.title for d in chapters] == [
        "Chapter 1: src (reviewed)",
        "Chapter 2: app.py",
        "Chapter 3: README.md (reviewed)",
    ]
    assert "core.py" in chapters[0].content
    assert "print('hello')" in chapters[1].content
    assert "line6" not in chapters[1].content  # only a few lines quoted
    assert [d.kind for d in docs[:3]] == [DocKind.YAML] * 3
    assert docs[-1].kind is DocKind.TUTORIAL


def test_help_says_simulator() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "app.simulator", "--help"],
        cwd=ROOT,
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert res.returncode == 0
    assert b"SIMULATOR" in res.stdout


def test_steps_subset_and_json(repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = run(repo, out, "--steps", "extract,analyze", "--json")
    assert res.returncode == 0
    lines = res.stdout.decode().splitlines()
    records = [json.loads(line) for line in lines]
    assert all("msg" in r for r in records)
    steps = [s for s in map(parse_step, lines) if s is not None]
    assert [(s.index, s.total) for s in steps] == [(1, 2), (2, 2)]
    assert sorted(p.name for p in out.iterdir()) == [
        "step1_abstractions.yaml",
        "step2_relationships.yaml",
    ]
    assert run(repo, out, "--steps", "extract,bogus").returncode == 2


def test_fail_at_step_from_config_and_flags_win(repo: Path, tmp_path: Path) -> None:
    (repo / ".fondation-sim.json").write_text(json.dumps({"fail_at_step": 2, "exit-code": 3}))
    res = run(repo, tmp_path / "out")
    assert res.returncode == 3
    assert b"simulated failure at step 2" in res.stderr
    steps = [s for s in map(parse_step, res.stdout.decode().splitlines()) if s]
    assert [s.index for s in steps] == [1, 2]
    assert run(repo, tmp_path / "out2", "--exit-code", "0", "--fail-at-step", "9").returncode == 0
    assert run(repo, tmp_path / "out3", "--exit-code", "5").returncode == 5


def test_bad_config_file(repo: Path, tmp_path: Path) -> None:
    (repo / ".fondation-sim.json").write_text(json.dumps({"fail_at_stepp": 2}))
    res = run(repo, tmp_path / "out")
    assert res.returncode == 2
    assert b"unknown key" in res.stderr


def test_flood_lines(repo: Path, tmp_path: Path) -> None:
    res = run(repo, tmp_path / "out", "--flood-lines", "5000")
    assert res.returncode == 0
    assert res.stdout.count(b"flood line") == 5000


def test_huge_doc(repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run(repo, out, "--huge-doc-bytes", "200000").returncode == 0
    assert (out / "chapters" / "chapter_3_src.md").stat().st_size == 200_000
    with pytest.raises(JobFailure) as info:
        collect_docs(out, max_doc_bytes=100_000)
    assert info.value.code == "output_invalid"
    assert "chapter_3_src.md" in info.value.message


def test_invalid_utf8(repo: Path, tmp_path: Path) -> None:
    res = run(repo, tmp_path / "out", "--invalid-utf8")
    assert res.returncode == 0
    assert b"\xff\xfe" in res.stdout


def test_step_delay(repo: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    assert (
        run(
            repo, tmp_path / "out", "--step-delay-s", "0.1", "--steps", "extract,analyze"
        ).returncode
        == 0
    )
    assert time.monotonic() - t0 >= 0.2


def test_hang_and_ignore_sigterm(
    repo: Path, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    p = start(procs, repo, tmp_path / "out", "--hang-at-step", "2", "--ignore-sigterm")
    read_until(p, "[FONDATION_STEP_2/6]")
    os.kill(p.pid, signal.SIGTERM)
    with pytest.raises(subprocess.TimeoutExpired):
        p.wait(timeout=0.5)
    os.killpg(p.pid, signal.SIGKILL)
    assert p.wait(timeout=TIMEOUT) == -signal.SIGKILL


def test_hang_dies_on_sigterm_by_default(
    repo: Path, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    p = start(procs, repo, tmp_path / "out", "--hang-at-step", "1")
    read_until(p, "[FONDATION_STEP_1/6]")
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(timeout=TIMEOUT) == -signal.SIGTERM


def test_spawn_child_in_same_group(
    repo: Path, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    p = start(procs, repo, tmp_path / "out", "--spawn-child", "--hang-at-step", "1")
    lines = read_until(p, "[FONDATION_STEP_1/6]")
    pid_line = next(line for line in lines if "spawned child pid=" in line)
    child = int(pid_line.rsplit("=", 1)[1])
    assert os.getpgid(child) == p.pid  # same group as the simulator (its own session leader)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=TIMEOUT)
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        # the orphan is reparented; it is gone (or a zombie) once killed
        try:
            with open(f"/proc/{child}/stat") as fh:
                if fh.read().split(")")[-1].split()[0] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("grandchild survived the group kill")


def test_empty_repo(tmp_path: Path) -> None:
    repo = tmp_path / "empty"
    repo.mkdir()
    out = tmp_path / "out"
    assert run(repo, out).returncode == 0
    docs = collect_docs(out, max_doc_bytes=100_000)
    assert [d.slug for d in docs if d.kind is DocKind.CHAPTER] == ["chapter-1-overview"]


def test_missing_repo(tmp_path: Path) -> None:
    assert run(tmp_path / "nope", tmp_path / "out").returncode == 1


def records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def written(path: Path, pid: int | None = None) -> list[tuple[object, object]]:
    return [
        (r["step"], r["file"])
        for r in records(path)
        if r["event"] == "chapter" and (pid is None or r["pid"] == pid)
    ]


def test_subset_skips_existing_chapters_and_records_them(repo: Path, tmp_path: Path) -> None:
    out, rec = tmp_path / "out", tmp_path / "rec.jsonl"
    assert run(repo, out, "--steps", "extract,analyze,order,generate-chapters").returncode == 0
    (out / "chapters" / "chapter_2_app_py.md").unlink()
    res = run(repo, out, "--steps", "generate-chapters,review-chapters", "--record-file", str(rec))
    assert res.returncode == 0, res.stderr
    steps = [s for s in map(parse_step, res.stdout.decode().splitlines()) if s is not None]
    assert [(s.index, s.total, s.text) for s in steps] == [
        (1, 2, "Generating chapter content"),
        (2, 2, "Reviewing and enhancing chapters"),
    ]
    got = records(rec)
    assert got[0]["event"] == "start"
    assert got[0]["steps"] == ["generate-chapters", "review-chapters"]
    assert [(r["step"], r["index"], r["total"]) for r in got if r["event"] == "step"] == [
        ("generate-chapters", 1, 2),
        ("review-chapters", 2, 2),
    ]
    assert written(rec) == [
        ("generate-chapters", "chapters/chapter_2_app_py.md"),
        ("review-chapters", "reviewed-chapters/chapter_1_readme_md.md"),
        ("review-chapters", "reviewed-chapters/chapter_3_src.md"),
    ]
    assert [r["file"] for r in got if r["event"] == "skip"] == [
        "chapters/chapter_1_readme_md.md",
        "chapters/chapter_3_src.md",
    ]


def test_overwrite_rewrites_existing_files(repo: Path, tmp_path: Path) -> None:
    out, rec = tmp_path / "out", tmp_path / "rec.jsonl"
    assert run(repo, out).returncode == 0
    stale = out / "tutorials" / "tutorial_1_src.md"
    stale.write_text("stale\n")
    assert (
        run(repo, out, "--steps", "generate-tutorials", "--record-file", str(rec)).returncode == 0
    )
    assert stale.read_text() == "stale\n"  # skipped: it exists
    assert written(rec) == []
    res = run(repo, out, "--steps", "generate-tutorials", "--overwrite", "--record-file", str(rec))
    assert res.returncode == 0
    assert MARK in stale.read_text()
    assert written(rec) == [("generate-tutorials", "tutorials/tutorial_1_src.md")]


def test_a_step_needs_the_files_of_earlier_steps(repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = run(repo, out, "--steps", "review-chapters,generate-tutorials")
    assert res.returncode == 1
    assert b"review-chapters needs step3_order.yaml, chapters" in res.stderr
    assert not (out / "reviewed-chapters").exists()


def test_legacy_format_has_json_fields_and_no_marker(repo: Path, tmp_path: Path) -> None:
    (repo / ".fondation-sim.json").write_text(json.dumps({"legacy_format": True}))
    res = run(repo, tmp_path / "out", "--steps", "extract,analyze")
    assert res.returncode == 0
    lines = res.stdout.decode().splitlines()
    assert b"FONDATION_STEP" not in res.stdout
    recs = [json.loads(line) for line in lines]
    assert [(r["step"], r["phase"], r["msg"]) for r in recs if "step" in r] == [
        ("1/2", "Extract", "Extracting core abstractions from codebase"),
        ("2/2", "Analyze", "Analyzing relationships between components"),
    ]


def test_killed_mid_review_then_resumed_reviews_each_chapter_once(
    repo: Path, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    out, rec = tmp_path / "out", tmp_path / "rec.jsonl"
    assert run(repo, out, "--steps", "extract,analyze,order,generate-chapters").returncode == 0
    rest = ("--steps", "review-chapters,generate-tutorials")
    p = start(procs, repo, out, *rest, "--chapter-delay-s", "3", "--record-file", str(rec))
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and not (rec.exists() and written(rec)):
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)  # between two reviewed chapters (3 s apart)
    p.wait(timeout=TIMEOUT)
    assert written(rec) == [("review-chapters", "reviewed-chapters/chapter_1_readme_md.md")]

    env = {**os.environ, "FONDATION_SIM_RECORD": str(rec)}  # the env var works as the flag
    res = subprocess.run(
        cmd(repo, out, *rest), cwd=ROOT, env=env, capture_output=True, timeout=TIMEOUT, check=False
    )
    assert res.returncode == 0, res.stderr
    second = [r for r in records(rec) if r["event"] == "start"][-1]["pid"]
    assert isinstance(second, int)
    assert written(rec, second) == [
        ("review-chapters", "reviewed-chapters/chapter_3_src.md"),
        ("generate-tutorials", "tutorials/tutorial_1_src.md"),
    ]
    full = tmp_path / "full"
    assert run(repo, full).returncode == 0
    assert collect_docs(out, max_doc_bytes=100_000) == collect_docs(full, max_doc_bytes=100_000)


def test_step_names_and_phases_agree_with_the_parser() -> None:
    assert tuple(s[0] for s in STEPS) == STEP_NAMES
    assert tuple(s[1] for s in STEPS) == PHASES


@pytest.mark.parametrize("fmt", [(), ("--json",), ("--legacy-format",)])
def test_the_tracker_reports_global_steps_for_every_format(
    repo: Path, tmp_path: Path, fmt: tuple[str, ...]
) -> None:
    """A resumed run of the last two steps, in each output format the worker may meet."""
    out = tmp_path / "out"
    assert run(repo, out, "--steps", "extract,analyze,order,generate-chapters").returncode == 0
    rest = STEP_NAMES[4:]
    res = run(repo, out, "--steps", ",".join(rest), *fmt)
    assert res.returncode == 0, res.stderr
    tracker = ProgressTracker(0.0, 15.0, plan=StepPlan(rest, floor=5))
    first = tracker.set_phase(JobStatus.ANALYZING, "running", 0.0)
    updates = [first, *tracker.feed_many(res.stdout.decode().splitlines(), 1.0)]
    steps = [(u.current_step, u.total_steps) for u in updates]
    assert steps[0] == (5, 6) and steps[-1] == (6, 6)
    assert steps == sorted(steps)  # never backwards
    assert {u.message for u in updates} >= {"Generating interactive tutorials"}
