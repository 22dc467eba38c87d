"""Resume in the pipeline and the embedded store: the restore_checkpoint phase, the clone
pinned to the checkpoint's commit, the CLI run for the steps left, partial uploads, and the
checkpoint the store keeps and hands to the next attempt's claim (board retries included)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from app import simulator
from app.adapters.sqlite_board import BoardStore
from app.adapters.sqlite_store import SqliteJobStore
from app.checkpoint import plan_resume
from app.clock import FakeClock, SystemClock
from app.collect import partial_doc
from app.config import DEDUPE_MIN_S, load_settings
from app.domain import (
    CallbackAck,
    Checkpoint,
    CheckpointFile,
    ClaimResult,
    Doc,
    DocKind,
    Failure,
    FailureCode,
    JobOptions,
    JobSpec,
    JobStatus,
    PartialDocs,
    Progress,
    Repository,
)
from app.errors import CallbackError
from app.isolation import CliSandbox, RunAs
from app.logs import Redactor
from app.metrics import create_metrics
from app.pipeline import clone, restore, run_cli
from app.pipeline.attempt import Attempt, RunnerDeps, RunState, Workspace
from app.pipeline.partial import PartialUploader
from app.progress import STEP_NAMES, ProgressTracker, StepPlan
from app.urlpolicy import UrlPolicy
from tests.support.gitserver import GitHttpServer, make_repo, rev_parse

SHA = "0123456789abcdef0123456789abcdef01234567"
OTHER = "89abcdef0123456789abcdef0123456789abcdef"
MAX = 100_000


@dataclass
class Reporter:
    """Records partial uploads; `fail_next` makes the next put_docs raise."""

    partial: list[tuple[tuple[str, ...], PartialDocs | None]] = field(default_factory=list)
    progress_reports: list[Progress] = field(default_factory=list)
    fail_next: int = 0
    crash_next: int = 0

    async def claim(self, spec: JobSpec) -> ClaimResult:
        return ClaimResult(ok=True)

    async def progress(self, spec: JobSpec, update: Progress) -> CallbackAck:
        self.progress_reports.append(update)
        return CallbackAck()

    async def put_docs(
        self, spec: JobSpec, docs: Sequence[Doc], partial: PartialDocs | None = None
    ) -> CallbackAck:
        if self.fail_next:
            self.fail_next -= 1
            raise CallbackError("put_docs", "down", retryable=True)
        if self.crash_next:
            self.crash_next -= 1
            raise RuntimeError("a bug in the reporter")
        self.partial.append((tuple(str(d.path) for d in docs), partial))
        return CallbackAck()

    async def complete(self, spec: JobSpec, docs_count: int, duration_ms: int) -> None:
        pass

    async def fail(self, spec: JobSpec, failure: Failure) -> None:
        pass


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "src"
    r.mkdir()
    for name in ("a.py", "b.py", "c.py"):
        (r / name).write_text(f"# {name}\n")
    return r


def attempt_for(
    tmp_path: Path,
    checkpoint: Checkpoint | None = None,
    *,
    steps: tuple[str, ...] = (),
    **env: str,
) -> Attempt:
    settings = load_settings({"DATA_DIR": str(tmp_path), "WORK_DIR": str(tmp_path), **env})
    deps = RunnerDeps(
        settings=settings,
        reporter=Reporter(),
        clock=SystemClock(),
        metrics=create_metrics(),
        environ={"PATH": "/usr/bin:/bin"},
        resolver=_loopback,
        redactor=Redactor(),
        policy=UrlPolicy(allowed_hosts=("127.0.0.1",), allow_insecure=True, allow_private=True),
    )
    spec = JobSpec(
        "j1", 2, "tok", Repository("http://127.0.0.1/r.git", "main"), JobOptions(steps=steps)
    )
    ws = Workspace(tmp_path / "ws")
    ws.create()
    return Attempt(deps, RunState(spec), ws, None, checkpoint=checkpoint)


async def _loopback(host: str, port: int) -> list[str]:
    return ["127.0.0.1"]


def run_sim(repo: Path, out: Path, *steps: str) -> None:
    argv = ["analyze", str(repo), "--output-dir", str(out)]
    assert simulator.main([*argv, "--steps", ",".join(steps)] if steps else argv) == 0


def files_of(out: Path) -> tuple[CheckpointFile, ...]:
    return tuple(
        CheckpointFile(p.relative_to(out).as_posix(), p.read_bytes())
        for p in sorted(out.rglob("*"))
        if p.is_file()
    )


# -- restore_checkpoint ----------------------------------------------------------------


async def test_restore_writes_the_files_back_and_starts_at_the_first_step_left(
    tmp_path: Path, repo: Path
) -> None:
    made = tmp_path / "made"
    run_sim(repo, made, *STEP_NAMES[:4])
    checkpoint = Checkpoint(SHA, files_of(made))
    attempt = attempt_for(tmp_path, checkpoint)
    assert attempt.tracker.current == (5, 6)  # promised while cloning
    out = attempt.workspace.out_dir
    restored = await restore.restore_checkpoint(attempt, restore.RestoreInput(checkpoint, SHA, out))
    assert restored.plan is not None
    assert restored.plan.remaining == ("review-chapters", "generate-tutorials")
    assert files_of(out) == files_of(made)
    assert attempt.tracker.current == (5, 6)


@pytest.mark.parametrize(
    ("commit", "files"),
    [
        (OTHER, (CheckpointFile("step1_abstractions.yaml", b"- a\n"),)),  # another commit
        (SHA, (CheckpointFile("../escape.yaml", b"x"),)),  # a refused name
        (SHA, (CheckpointFile("chapters/chapter_1_a.md", b"x" * (MAX + 1)),)),  # too big
    ],
)
async def test_an_unusable_checkpoint_means_a_full_run_not_a_failure(
    tmp_path: Path, commit: str, files: tuple[CheckpointFile, ...]
) -> None:
    checkpoint = Checkpoint(commit, files, ended=("extract",))
    attempt = attempt_for(tmp_path, checkpoint, MAX_DOC_BYTES=str(MAX))
    out = attempt.workspace.out_dir
    restored = await restore.restore_checkpoint(attempt, restore.RestoreInput(checkpoint, SHA, out))
    assert restored.plan is None and not any(out.iterdir())
    assert attempt.tracker.current == (0, 0)


# -- clone pinned to the checkpoint's commit ----------------------------------------


@pytest.fixture
def git_server(tmp_path: Path) -> Iterator[tuple[Path, GitHttpServer]]:
    root = tmp_path / "repos"
    make_repo(root / "demo.git", {"README.md": "# Demo\n"}, commits=3)
    with GitHttpServer(root) as server:
        yield root, server


async def test_the_clone_takes_the_checkpoints_commit_not_the_branch_tip(
    tmp_path: Path, git_server: tuple[Path, GitHttpServer]
) -> None:
    root, server = git_server
    old = rev_parse(root / "demo.git", "main~2")
    attempt = attempt_for(tmp_path, ALLOWED_GIT_HOSTS="127.0.0.1", ALLOW_INSECURE_GIT="1")
    dest = attempt.workspace.repo_dir
    inp = clone.CloneInput(server.url_for("demo"), "main", dest, pinned=old)
    assert (await clone.clone(attempt, inp)).commit == old


async def test_a_gone_commit_clones_the_ref_instead(
    tmp_path: Path, git_server: tuple[Path, GitHttpServer], caplog: pytest.LogCaptureFixture
) -> None:
    root, server = git_server
    attempt = attempt_for(tmp_path)
    dest = attempt.workspace.repo_dir
    inp = clone.CloneInput(server.url_for("demo"), "main", dest, pinned="ab" * 20)
    result = await clone.clone(attempt, inp)
    assert result.commit == rev_parse(root / "demo.git", "main")
    assert "the checkpoint's commit cannot be cloned" in caplog.text


# -- run_cli for the steps left -------------------------------------------------------


def sim_command(record: Path) -> str:
    return (
        f"{sys.executable} -m app.simulator analyze {{repo_dir}} --output-dir {{output_dir}} "
        f"--record-file {record}"
    )


async def test_the_cli_runs_only_the_steps_left_and_uploads_each_as_it_ends(
    tmp_path: Path, repo: Path
) -> None:
    made = tmp_path / "made"
    run_sim(repo, made, *STEP_NAMES[:3])
    record = tmp_path / "record.jsonl"
    checkpoint = Checkpoint(SHA, files_of(made), ended=STEP_NAMES[:3])
    attempt = attempt_for(tmp_path, checkpoint, FONDATION_COMMAND=sim_command(record))
    out = attempt.workspace.out_dir
    restored = await restore.restore_checkpoint(attempt, restore.RestoreInput(checkpoint, SHA, out))
    inp = run_cli.CliInput(repo, out, SHA, restored.plan)
    await run_cli.run_cli(attempt, inp)
    started = json.loads(record.read_text().splitlines()[0])
    assert started["steps"] == list(STEP_NAMES[3:])
    reporter = attempt.deps.reporter
    assert isinstance(reporter, Reporter)
    ended = [p.ended for _, p in reporter.partial if p is not None and p.ended]
    assert ended == list(STEP_NAMES[3:])
    uploaded = {path for paths, _ in reporter.partial for path in paths}
    assert not uploaded & {f.path for f in checkpoint.files}  # restored files are not re-sent
    assert {p.commit for _, p in reporter.partial if p is not None} == {SHA}
    # global steps only, never below the first step left
    steps = [u.current_step for u in reporter.progress_reports if u.current_step]
    assert steps and min(steps) == 4


async def test_nothing_left_means_no_cli(tmp_path: Path, repo: Path) -> None:
    made = tmp_path / "made"
    run_sim(repo, made, "extract")
    record = tmp_path / "record.jsonl"
    checkpoint = Checkpoint(SHA, files_of(made), ended=("extract",))
    attempt = attempt_for(
        tmp_path, checkpoint, steps=("extract",), FONDATION_COMMAND=sim_command(record)
    )
    plan = plan_resume(checkpoint, clone_commit=SHA, job_steps=("extract",), max_doc_bytes=MAX)
    out = await run_cli.run_cli(attempt, run_cli.CliInput(repo, tmp_path, SHA, plan))
    assert out.lines == 0 and not record.exists()


# -- partial uploads --------------------------------------------------------------------


def partial_uploader(tmp_path: Path) -> tuple[Reporter, Path, PartialUploader]:
    """An attempt's uploader of every step with no settling delay, its fake reporter, and the
    output folder the simulator writes into."""
    attempt = attempt_for(tmp_path)
    reporter = attempt.deps.reporter
    assert isinstance(reporter, Reporter)
    out = attempt.workspace.out_dir
    uploader = PartialUploader(attempt, out, commit=SHA, run_steps=STEP_NAMES, settle_s=0.0)
    return reporter, out, uploader


async def test_a_step_counts_as_ended_only_once_its_upload_succeeded(
    tmp_path: Path, repo: Path
) -> None:
    reporter, out, uploader = partial_uploader(tmp_path)
    run_sim(repo, out, "extract")
    reporter.fail_next = 1
    uploader.steps_reached(2)  # step 1 ended: its upload fails
    await asyncio.sleep(0.3)
    assert uploader.ended == [] and reporter.partial == []
    uploader.tick(0.0)  # the next tick sends the step again, with its files
    await asyncio.sleep(0.3)
    assert uploader.ended == ["extract"]
    assert reporter.partial[0] == (("step1_abstractions.yaml",), PartialDocs(SHA, "extract"))
    run_sim(repo, out, "analyze")
    await uploader.close(5.0)  # a stopped CLI: what changed, no step ended
    assert reporter.partial[-1] == (("step2_relationships.yaml",), PartialDocs(SHA, None))


async def test_an_upload_that_crashes_neither_stops_the_uploads_nor_the_attempt(
    tmp_path: Path, repo: Path
) -> None:
    reporter, out, uploader = partial_uploader(tmp_path)
    run_sim(repo, out, "extract")
    reporter.crash_next = 1
    uploader.steps_reached(2)
    await asyncio.sleep(0.3)
    run_sim(repo, out, "analyze")
    uploader.steps_reached(3)
    await uploader.close(5.0)  # does not raise
    assert uploader.ended == ["analyze"]


def test_partial_docs_are_named_as_the_final_ones() -> None:
    chapter = partial_doc("reviewed-chapters/chapter_2_core.md", b"# Core\nbody\n")
    assert (chapter.slug, chapter.title, chapter.kind, chapter.chapter_index) == (
        "chapter-2-core",
        "Core",
        DocKind.CHAPTER,
        2,
    )
    assert chapter.path == "reviewed-chapters/chapter_2_core.md"
    plan = partial_doc("step3_order.yaml", b"order: []\n")
    assert (plan.slug, plan.title, plan.kind) == ("step3-order", "Chapter order", DocKind.YAML)
    with pytest.raises(ValueError):
        partial_doc("notes/x.md", b"")


def test_replan_and_commit_in_reports() -> None:
    tracker = ProgressTracker(0.0, 10.0, plan=StepPlan(floor=5))
    assert tracker.current == (5, 6)
    tracker.set_commit(SHA)
    assert tracker.set_phase(JobStatus.CLONING, "x", 0.0).commit == SHA
    tracker.replan(StepPlan())
    assert tracker.current == (0, 0)


# -- the embedded store keeps the checkpoint -----------------------------------------


def doc(path: str, content: str = "x") -> Doc:
    return partial_doc(path, content.encode())


def store_at(tmp_path: Path) -> SqliteJobStore:
    return SqliteJobStore(
        tmp_path / "db.sqlite3", clock=FakeClock(), worker_id="w1", dedupe_ttl_s=DEDUPE_MIN_S
    )


def spec(attempt: int) -> JobSpec:
    return JobSpec("j1", attempt, "t" * 40, Repository("https://github.com/o/r.git", "main"))


async def test_the_next_claim_returns_the_checkpoint(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    store.record_start("w1", "f", spec(1))
    assert (await store.claim(spec(1))).checkpoint is None
    await store.progress(spec(1), Progress(1, JobStatus.ANALYZING, 1, 6, "", commit=SHA))
    ok = await store.put_docs(
        spec(1), [doc("step1_abstractions.yaml")], PartialDocs(SHA, "extract")
    )
    assert not ok.stop
    await store.put_docs(spec(1), [doc("chapters/chapter_1_a.md", "draft")], PartialDocs(SHA))
    job = store.get_job("j1")
    assert job is not None and job.commit == SHA
    shown = store.list_partial_docs("j1")
    assert [d.path for d in shown] == ["step1_abstractions.yaml", "chapters/chapter_1_a.md"]
    await store.fail(spec(1), Failure(FailureCode.INTERRUPTED, "down", True))

    store.record_start("w2", "f", spec(2))
    claim = await store.claim(spec(2))
    assert claim.checkpoint is not None
    assert claim.checkpoint.commit == SHA and claim.checkpoint.ended == ("extract",)
    assert {f.path: f.data for f in claim.checkpoint.files} == {
        "step1_abstractions.yaml": b"x",
        "chapters/chapter_1_a.md": b"draft",
    }
    # attempt 1, late, may not write over attempt 2's checkpoint
    await store.put_docs(spec(2), [doc("chapters/chapter_1_a.md", "v2")], PartialDocs(SHA))
    late = await store.put_docs(spec(1), [doc("chapters/chapter_1_a.md")], PartialDocs(SHA))
    assert late.stop
    # a reviewed chapter replaces its draft in what is shown
    await store.put_docs(spec(2), [doc("reviewed-chapters/chapter_1_a.md", "r")], PartialDocs(SHA))
    assert [d.content for d in store.list_partial_docs("j1") if d.kind is DocKind.CHAPTER] == ["r"]
    # another commit: the attempt runs in full, its files replace the old ones
    store.record_start("w3", "f", spec(3))
    await store.claim(spec(3))
    await store.put_docs(spec(3), [doc("step1_abstractions.yaml", "new")], PartialDocs(OTHER))
    cp = store.checkpoint("j1")
    assert cp is not None and cp.commit == OTHER and cp.ended == ()
    assert [f.path for f in cp.files] == ["step1_abstractions.yaml"]
    # complete: the final docs replace the checkpoint
    await store.complete(spec(3), 1, 10)
    assert store.checkpoint("j1") is None and store.list_partial_docs("j1") == []


async def test_a_board_retry_resumes(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    board = BoardStore(store)
    store.record_start("w1", "f", spec(1))
    await store.claim(spec(1))
    await store.put_docs(spec(1), [doc("step1_abstractions.yaml")], PartialDocs(SHA, "extract"))
    await store.fail(spec(1), Failure(FailureCode.CLI_FAILED, "boom", True))
    assert board.add_retry("j1").ok
    retry = board.take_next_pending()
    assert retry is not None and retry.attempt == 2
    claim = await store.claim(retry)
    assert claim.ok and claim.checkpoint is not None and claim.checkpoint.commit == SHA
    # The board shows what the job has so far while the retry runs.
    detail = board.job("j1")
    assert detail is not None and [d.slug for d in detail.docs] == ["step1-abstractions"]


def test_old_databases_get_the_commit_column(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "db.sqlite3"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE jobs (job_id TEXT NOT NULL, attempt INTEGER NOT NULL, status TEXT NOT NULL, "
        "repository_url TEXT NOT NULL, ref TEXT, options TEXT NOT NULL, priority INTEGER NOT NULL,"
        " accepted_by TEXT NOT NULL, claimed_by TEXT, seq INTEGER NOT NULL DEFAULT 0, "
        "current_step INTEGER NOT NULL DEFAULT 0, total_steps INTEGER NOT NULL DEFAULT 0, "
        "message TEXT NOT NULL DEFAULT '', docs_count INTEGER NOT NULL DEFAULT 0, "
        "error_code TEXT, error_message TEXT, retryable INTEGER, duration_ms INTEGER, "
        "created_at REAL NOT NULL, updated_at REAL NOT NULL, PRIMARY KEY (job_id, attempt))"
    )
    db.close()
    store = store_at(tmp_path)
    store.record_start("w1", "f", spec(1))
    view = store.get_job("j1")
    assert view is not None and view.commit is None


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
async def test_restored_files_belong_to_the_cli_user(tmp_path: Path, repo: Path) -> None:
    """With CLI_USER the CLI must read and extend what the checkpoint restored (worker-owned,
    private under the worker's umask 077 otherwise)."""
    made = tmp_path / "made"
    run_sim(repo, made, *STEP_NAMES[:4])
    checkpoint = Checkpoint(SHA, files_of(made))
    attempt = attempt_for(tmp_path, checkpoint)
    ws = attempt.workspace
    await restore.restore_checkpoint(attempt, restore.RestoreInput(checkpoint, SHA, ws.out_dir))
    ws.repo_dir.mkdir()
    CliSandbox(run_as=RunAs(65534, 65534)).prepare(ws.root, ws.repo_dir, ws.out_dir, {})
    owners = {p.lstat().st_uid for p in ws.out_dir.rglob("*")}
    assert owners == {65534}


async def test_the_clone_phase_goes_through_the_repository_cache(
    tmp_path: Path, git_server: tuple[Path, GitHttpServer], caplog: pytest.LogCaptureFixture
) -> None:
    """With CLI_USER the job manager's cache reaches the clone phase: the second clone of a
    repository is made from its ready tree."""
    from dataclasses import replace

    from app.adapters.repo_cache import RepoCache

    root, server = git_server
    caplog.set_level(logging.INFO, logger="fondation.repo_cache")
    settings = load_settings({"DATA_DIR": str(tmp_path), "CLI_USER": "nobody"})
    configured = RepoCache.from_settings(settings)
    assert configured is not None
    cache = replace(configured, min_clone_bytes=0, fill_delay_s=0)  # a tiny repository
    for n in (1, 2):
        attempt = attempt_for(tmp_path / f"a{n}")
        attempt.deps = replace(attempt.deps, repo_cache=cache)
        inp = clone.CloneInput(server.url_for("demo"), "main", attempt.workspace.repo_dir)
        result = await clone.clone(attempt, inp)
        assert result.commit == rev_parse(root / "demo.git", "main")
        await asyncio.to_thread(cache.settle, 30)
    assert "cloned from a ready tree" in caplog.text
