"""A hostile CLI's output (issue 11): a real worker runs a small CLI that exits 0 after
leaving a FIFO, a hard link to a file outside its output directory, or a secret of the worker
in a chapter. None of them may wedge a slot or reach the uploaded docs."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support.gitserver import GitHttpServer, make_repo
from tests.support.jobs import SOURCE, submit
from tests.support.signing import SECRET
from tests.support.worker import WorkerProcess, base_env

pytestmark = pytest.mark.e2e

HOSTILE_CLI = """\
import os, sys
from pathlib import Path

repo, out = Path(sys.argv[1]), Path(sys.argv[2])
mode, _, arg = (repo / "HOSTILE").read_text().strip().partition(":")
(out / "chapters").mkdir(parents=True, exist_ok=True)
(out / "chapters" / "chapter_1_intro.md").write_text("# Intro\\nhello\\n")
if mode == "fifo":
    os.mkfifo(out / "step1_abstractions.yaml")
elif mode == "hardlink":
    os.link(repo / "README.md", out / "chapters" / "chapter_2_leak.md")
elif mode == "secret":
    (out / "chapters" / "chapter_2_leak.md").write_text("# Leak\\nfound " + arg + "\\n")
print("[FONDATION_STEP_1/1] done", flush=True)
"""


@pytest.fixture(scope="module")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitHttpServer]:
    root = tmp_path_factory.mktemp("repos")
    for mode in ("fifo", "hardlink", f"secret:{SECRET}", "plain"):
        name = mode.partition(":")[0]
        make_repo(root / f"{name}.git", {**SOURCE, "HOSTILE": mode + "\n"})
    with GitHttpServer(root) as server:
        yield server


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    tmp = tmp_path_factory.mktemp("hostile")
    script = tmp / "hostile_cli.py"
    script.write_text(HOSTILE_CLI)
    env = base_env(
        tmp,
        MAX_CONCURRENT_JOBS="1",
        FONDATION_COMMAND=f"{sys.executable} {script} {{repo_dir}} {{output_dir}}",
    )
    w = WorkerProcess(env, tmp / "worker.log").start()
    yield w
    w.stop(timeout_s=30)


def test_fifo_in_the_output_fails_the_job_and_frees_the_slot(
    worker: WorkerProcess, git_server: GitHttpServer
) -> None:
    t0 = time.monotonic()
    submit(worker, "fifo", git_server.url_for("fifo"))
    job = worker.wait_status("fifo", {"failed", "completed"}, timeout_s=30)
    took_s = time.monotonic() - t0
    assert job["status"] == "failed" and job["error"]["code"] == "output_invalid", job
    assert "regular file" in job["error"]["message"]
    # One slot: the next job runs, so the FIFO did not keep it.
    submit(worker, "after-fifo", git_server.url_for("plain"))
    assert worker.wait_status("after-fifo", {"completed", "failed"}, 30)["status"] == "completed"
    print(f"[hostile] FIFO output -> failed/output_invalid in {took_s:.2f} s; slot free")


def test_hard_link_out_of_the_output_is_refused(
    worker: WorkerProcess, git_server: GitHttpServer
) -> None:
    submit(worker, "hardlink", git_server.url_for("hardlink"))
    job = worker.wait_status("hardlink", {"failed", "completed"}, timeout_s=30)
    assert job["status"] == "failed" and job["error"]["code"] == "output_invalid", job
    assert "link" in job["error"]["message"]


def test_a_secret_written_into_a_chapter_is_redacted_before_upload(
    worker: WorkerProcess, git_server: GitHttpServer
) -> None:
    submit(worker, "secret", git_server.url_for("secret"))
    job = worker.wait_status("secret", {"failed", "completed"}, timeout_s=30)
    assert job["status"] == "completed", job
    docs = httpx.get(f"{worker.url}/v1/jobs/secret/docs", timeout=10).json()["docs"]
    leak = next(d for d in docs if d["title"] == "Leak")
    assert SECRET not in leak["content"] and "found " in leak["content"], leak["content"]
