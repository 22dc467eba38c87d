"""`fondation-worker submit` keeps working when the worker listens beyond loopback and the job
API needs a bearer token (a real worker on 127.0.0.2, which is not a loopback *name* for the
gate, so nothing is exposed beyond this machine)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.submit import SubmitError, SubmitRequest, run_submit
from tests.support.gitserver import GitHttpServer, make_repo
from tests.support.jobs import SOURCE
from tests.support.signing import SECRET
from tests.support.worker import WorkerProcess, base_env

pytestmark = pytest.mark.e2e
TOKEN = "api-token-for-submit-test"


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WorkerProcess, str]]:
    tmp = tmp_path_factory.mktemp("gated")
    make_repo(tmp / "repos" / "happy.git", SOURCE)
    with GitHttpServer(tmp / "repos") as git:
        w = WorkerProcess(base_env(tmp, BOARD_API_TOKEN=TOKEN), tmp / "worker.log")
        w.env["HOST"] = "127.0.0.2"
        w.url = f"http://127.0.0.2:{w.port}"
        w.start()
        try:
            yield w, git.url_for("happy.git")
        finally:
            w.stop(timeout_s=30)


def request(w: WorkerProcess, repo: str, job_id: str, token: str | None) -> SubmitRequest:
    return SubmitRequest(w.url, repo, None, SECRET, job_id, api_token=token)


def test_submit_follows_the_job_with_a_token(worker: tuple[WorkerProcess, str]) -> None:
    w, repo = worker
    out = io.StringIO()
    assert (
        run_submit(request(w, repo, "gated-1", TOKEN), follow_job=True, out=out, timeout_s=60) == 0
    )
    assert "job gated-1 completed" in out.getvalue()


def test_submit_without_the_token_says_what_is_missing(worker: tuple[WorkerProcess, str]) -> None:
    w, repo = worker
    with pytest.raises(SubmitError, match="BOARD_API_TOKEN"):
        run_submit(
            request(w, repo, "gated-2", None), follow_job=True, out=io.StringIO(), timeout_s=30
        )


def test_repr_hides_the_token(tmp_path: Path) -> None:
    assert TOKEN not in repr(SubmitRequest("u", "r", None, SECRET, "j", api_token=TOKEN))
