"""Resume end to end in embedded mode (issue 12): a real uvicorn worker, a real git repository
over smart HTTP on 127.0.0.1, the simulator as the CLI recording what it runs.

Each test runs attempt 1 on one worker process and attempt 2 on the next one (same data
directory), as after a deploy; the second attempt arrives as Convex would send it, a
`job.start` webhook with `attempt: 2`. Failures that must not repeat come from the repository's
`.fondation-sim.json` and are switched off for the second worker (`--fail-at-step 0`)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.simulator import STEP_NAMES
from tests.support.gitserver import GitHttpServer, git_env, make_repo, rev_parse, serve_new_root
from tests.support.jobs import wait_for
from tests.support.signing import headers_for, start_body
from tests.support.worker import SIMULATOR, WorkerProcess, base_env

pytestmark = pytest.mark.e2e

# Seven top-level entries: seven chapters, four of them reviewed (the simulator reviews the
# odd-numbered ones), so step 5 can be stopped between two reviews.
FILES = {f"{name}.py": f"def {name}():\n    return {i}\n" for i, name in enumerate("abcdefg")}
NO_FAILURE = f"{SIMULATOR} --fail-at-step 0"


@pytest.fixture
def repos(tmp_path: Path) -> Iterator[tuple[Path, GitHttpServer]]:
    with serve_new_root(tmp_path / "repos") as served:
        yield served


def make(root: Path, name: str, record: Path, files: dict[str, str] = FILES, **sw: Any) -> Path:
    config = {"record_file": str(record), **sw}
    return make_repo(root / f"{name}.git", {**files, ".fondation-sim.json": json.dumps(config)})


def worker(tmp: Path, name: str, command: str = SIMULATOR) -> WorkerProcess:
    env = base_env(tmp, FONDATION_COMMAND=command, MAX_CONCURRENT_JOBS="2")
    return WorkerProcess(env, tmp / f"{name}.log").start()


def start(w: WorkerProcess, job_id: str, url: str, attempt: int = 1) -> None:
    body = start_body(job_id, url, attempt=attempt, ref="main")
    r = httpx.post(
        f"{w.url}/v1/webhooks",
        content=body,
        headers=headers_for(body, f"{job_id}:{attempt}"),
        timeout=10,
    )
    assert r.status_code == 202, r.text


def runs(record: Path) -> list[list[dict[str, Any]]]:
    """The simulator's record, one list of events per CLI run."""
    out: list[list[dict[str, Any]]] = []
    if not record.exists():
        return out
    for line in record.read_text().splitlines():
        event = json.loads(line)
        if event["event"] == "start":
            out.append([])
        out[-1].append(event)
    return out


def written(run: list[dict[str, Any]], step: str) -> list[str]:
    return [e["file"] for e in run if e["event"] == "chapter" and e["step"] == step]


def get(w: WorkerProcess, path: str) -> dict[str, Any]:
    r = httpx.get(f"{w.url}{path}", timeout=10)
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


def sse_events(w: WorkerProcess, job_id: str) -> list[dict[str, Any]]:
    """Every event of the job's SSE stream, read to its end (the job is final)."""
    out: list[dict[str, Any]] = []
    with httpx.stream("GET", f"{w.url}/v1/jobs/{job_id}/events", timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                out.append(json.loads(line[5:]))
    return out


def progress_steps(w: WorkerProcess, job_id: str, attempt: int) -> list[int]:
    """`currentStep` of every progress report of one attempt, in order."""
    return [
        ev["currentStep"]
        for ev in sse_events(w, job_id)
        if ev["type"] == "progress" and ev["attempt"] == attempt
    ]


def uninterrupted(w: WorkerProcess, job_id: str, url: str) -> list[dict[str, Any]]:
    start(w, job_id, url)
    assert w.wait_status(job_id, {"completed", "failed"}, timeout_s=90)["status"] == "completed"
    docs: list[dict[str, Any]] = get(w, f"/v1/jobs/{job_id}/docs")["docs"]
    return docs


def push_commit(bare: Path, files: dict[str, str]) -> str:
    """Move `main` of `bare` one commit forward (the old commit stays fetchable)."""
    with tempfile.TemporaryDirectory(prefix="push-") as tmp:
        work = Path(tmp) / "w"
        env = git_env()
        subprocess.run(["git", "clone", "-q", str(bare), str(work)], env=env, check=True)
        for name, text in files.items():
            (work / name).write_text(text)
        subprocess.run(["git", "add", "-A"], cwd=work, env=env, check=True)
        subprocess.run(["git", "commit", "-q", "-m", "moved"], cwd=work, env=env, check=True)
        subprocess.run(["git", "push", "-q", "origin", "main"], cwd=work, env=env, check=True)
    return rev_parse(bare, "main")


def test_sigterm_in_step_5_resumes_with_the_steps_left(
    tmp_path: Path, repos: tuple[Path, GitHttpServer]
) -> None:
    """SIGTERM (a deploy) during step 5: attempt 1 is `interrupted`; attempt 2 runs only
    review-chapters,generate-tutorials, reviews no chapter twice, and ends with the docs of
    an uninterrupted run. Partial docs show up while attempt 1 runs (GET docs and SSE)."""
    root, server = repos
    record = tmp_path / "record.jsonl"
    bare = make(root, "term", record, chapter_delay_s=0.4)
    url = server.url_for("term")
    first = worker(tmp_path, "first")
    try:
        start(first, "term", url)
        # Step 4 runs (seven chapters, 0.4 s each): step 1's YAML is already visible.
        assert wait_for(lambda: any(written(r, "generate-chapters") for r in runs(record)), 30)
        during = get(first, "/v1/jobs/term/docs")
        still_in_step_4 = not any(
            e["event"] == "step" and e["step"] == "review-chapters" for e in runs(record)[0]
        )
        assert still_in_step_4 and during["partial"] is True
        assert "step1_abstractions.yaml" in {d["path"] for d in during["docs"]}
        assert wait_for(lambda: len(written(runs(record)[0], "review-chapters")) >= 1, 30)
        first.signal(signal.SIGTERM)
        assert first.wait(30) == 0
    finally:
        first.kill()
    reviewed_before = written(runs(record)[0], "review-chapters")
    assert 1 <= len(reviewed_before) < 4  # stopped between two reviews

    second = worker(tmp_path, "second")
    try:
        job = get(second, "/v1/jobs/term")
        assert (job["attempt"], job["status"], job["error"]["code"]) == (1, "failed", "interrupted")
        kept = {d["path"] for d in get(second, "/v1/jobs/term/docs")["docs"]}
        assert {f"reviewed-chapters/{f.split('/')[-1]}" for f in reviewed_before} <= kept

        start(second, "term", url, attempt=2)
        done = second.wait_status("term", {"completed", "failed"}, timeout_s=60)
        assert done["status"] == "completed", done
        assert done["commit"] == rev_parse(bare, "main")
        resumed = runs(record)[1]
        assert resumed[0]["steps"] == ["review-chapters", "generate-tutorials"]
        assert not set(written(resumed, "review-chapters")) & set(reviewed_before)
        assert {e["file"] for e in resumed if e["event"] == "skip"} >= set(reviewed_before)
        steps = progress_steps(second, "term", 2)
        assert steps and min(steps) == 5 and steps == sorted(steps)  # never below step 5
        # The event stream told of step 1's YAML before attempt 1 reached step 5.
        evs = sse_events(second, "term")
        first_yaml = next(
            i
            for i, ev in enumerate(evs)
            if ev["type"] == "docs" and "step1_abstractions.yaml" in ev["paths"]
        )
        at_5 = next(i for i, ev in enumerate(evs) if ev.get("currentStep") == 5)
        assert evs[first_yaml]["partial"] is True and first_yaml < at_5
        final = get(second, "/v1/jobs/term/docs")
        assert final["partial"] is False
        assert final["docs"] == uninterrupted(second, "term-full", url)
    finally:
        second.stop()


def test_cli_failed_at_step_3_resumes_at_step_3(
    tmp_path: Path, repos: tuple[Path, GitHttpServer]
) -> None:
    root, server = repos
    record = tmp_path / "record.jsonl"
    make(root, "fail3", record, fail_at_step=3)
    url = server.url_for("fail3")
    first = worker(tmp_path, "first")
    try:
        start(first, "fail3", url)
        job = first.wait_status("fail3", {"failed", "completed"}, timeout_s=60)
        assert job["error"]["code"] == "cli_failed" and job["error"]["retryable"] is True
    finally:
        first.stop()
    second = worker(tmp_path, "second", NO_FAILURE)
    try:
        start(second, "fail3", url, attempt=2)
        done = second.wait_status("fail3", {"completed", "failed"}, timeout_s=60)
        assert done["status"] == "completed", done
        assert runs(record)[1][0]["steps"] == list(STEP_NAMES[2:])
        steps = progress_steps(second, "fail3", 2)
        assert steps and min(steps) == 3 and steps == sorted(steps)
        assert done["docsCount"] == len(uninterrupted(second, "fail3-full", url))
    finally:
        second.stop()


def _fail_at_step_5(tmp_path: Path, url: str, job_id: str) -> None:
    first = worker(tmp_path, "first")
    try:
        start(first, job_id, url)
        job = first.wait_status(job_id, {"failed", "completed"}, timeout_s=60)
        assert job["error"]["code"] == "cli_failed"
    finally:
        first.stop()


def test_a_moved_branch_resumes_on_the_checkpoints_commit(
    tmp_path: Path, repos: tuple[Path, GitHttpServer]
) -> None:
    """The branch moved between the attempts: attempt 2 clones the checkpoint's commit, not
    the branch's new tip, and its course is the old commit's (seven chapters, not eight)."""
    root, server = repos
    record = tmp_path / "record.jsonl"
    bare = make(root, "moved", record, fail_at_step=5)
    old = rev_parse(bare, "main")
    url = server.url_for("moved")
    _fail_at_step_5(tmp_path, url, "moved")
    new = push_commit(bare, {"h.py": "def h():\n    return 8\n"})
    assert new != old
    second = worker(tmp_path, "second", NO_FAILURE)
    try:
        start(second, "moved", url, attempt=2)
        done = second.wait_status("moved", {"completed", "failed"}, timeout_s=60)
        assert done["status"] == "completed", done
        assert done["commit"] == old
        assert runs(record)[1][0]["steps"] == ["review-chapters", "generate-tutorials"]
        docs = get(second, "/v1/jobs/moved/docs")["docs"]
        assert len([d for d in docs if d["kind"] == "chapter"]) == len(FILES)
        assert "resuming from the checkpoint" in second.logs()
    finally:
        second.stop()


def test_a_vanished_commit_means_a_full_run(
    tmp_path: Path, repos: tuple[Path, GitHttpServer]
) -> None:
    """The checkpoint's commit is gone (history rewritten): attempt 2 clones the branch and
    runs every step, with no `--steps`; the job records the new commit."""
    root, server = repos
    record = tmp_path / "record.jsonl"
    bare = make(root, "gone", record, fail_at_step=5)
    old = rev_parse(bare, "main")
    url = server.url_for("gone")
    _fail_at_step_5(tmp_path, url, "gone")
    shutil.rmtree(bare)
    make(root, "gone", record, {**FILES, "h.py": "rewritten\n"}, fail_at_step=5)
    new = rev_parse(bare, "main")
    assert new != old
    second = worker(tmp_path, "second", NO_FAILURE)
    try:
        start(second, "gone", url, attempt=2)
        done = second.wait_status("gone", {"completed", "failed"}, timeout_s=60)
        assert done["status"] == "completed", done
        assert done["commit"] == new
        assert runs(record)[1][0]["steps"] == list(STEP_NAMES)
        assert "the checkpoint's commit cannot be cloned" in second.logs()
        docs = get(second, "/v1/jobs/gone/docs")["docs"]
        assert len([d for d in docs if d["kind"] == "chapter"]) == len(FILES) + 1
    finally:
        second.stop()


def test_sigkill_in_step_5_keeps_the_chapters_reviewed_before_it(
    tmp_path: Path, repos: tuple[Path, GitHttpServer]
) -> None:
    """SIGKILL: nothing is flushed at the end, so what survives is what was uploaded while
    step 5 ran: files unchanged for 2 s, seen on a heartbeat tick (about 2.5 s after they are
    written). Killed once every review so far is kept, attempt 2 reviews none of them again."""
    root, server = repos
    record = tmp_path / "record.jsonl"
    # Three chapters, reviews of 1 and 3, 4 s apart: the kill lands between the two.
    make(root, "kill", record, dict(list(FILES.items())[:3]), chapter_delay_s=4.0)
    url = server.url_for("kill")
    first = worker(tmp_path, "first")
    kept: set[str] = set()
    try:
        start(first, "kill", url)

        def every_review_kept() -> bool:
            docs = get(first, "/v1/jobs/kill/docs")["docs"]
            kept.clear()
            kept.update(d["path"] for d in docs if d["path"].startswith("reviewed-chapters/"))
            reviewed = set(written(runs(record)[0], "review-chapters")) if runs(record) else set()
            return bool(reviewed) and reviewed <= kept

        assert wait_for(every_review_kept, 90, interval_s=0.2)
        first.kill()
    finally:
        first.kill()
    reviewed_before = set(written(runs(record)[0], "review-chapters"))
    second = worker(tmp_path, "second")
    try:
        start(second, "kill", url, attempt=2)
        done = second.wait_status("kill", {"completed", "failed"}, timeout_s=60)
        assert done["status"] == "completed", done
        resumed = runs(record)[1]
        assert resumed[0]["steps"] == ["review-chapters", "generate-tutorials"]
        again = set(written(resumed, "review-chapters"))
        print(
            f"FIGURES embedded sigkill in step 5: reviewed before the kill {len(reviewed_before)}, "
            f"kept in the checkpoint {len(kept)}, reviewed again {len(again & reviewed_before)}"
        )
        assert reviewed_before and not again & reviewed_before
        assert again  # the review left to do was done
    finally:
        second.stop()
