"""`python -m deploy --job-definition`: the Serverless Jobs definition next to the container, through
the real SDK (`scaleway.jobs.v1alpha2`) against the loopback fake; and the fake's `start` and
`stop`, which launch and stop `fondation-worker run-one` locally."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from scaleway.jobs.v1alpha2 import JobsV1Alpha2API
from scaleway.jobs.v1alpha2.types import JobRun, JobRunState
from scaleway_core.client import Client

from app.run_one import HEADERS_ENV, MESSAGE_ENV, ExitCode
from deploy.__main__ import main
from tests.support.fake_scaleway import (
    ACCESS_KEY,
    JOBS_TOKEN,
    PROJECT_ID,
    SECRET_KEY,
    FakeScaleway,
    use_fake_scaleway,
)
from tests.support.gitserver import GitHttpServer, make_repo
from tests.support.jobs import SOURCE, sim, wait_for
from tests.support.signing import SECRET, headers_for, start_body
from tests.support.worker import REPO_ROOT, base_env

IMAGE_V1 = "rg.fr-par.scw.cloud/fondation/fondation-worker:1111111"
IMAGE_V2 = "rg.fr-par.scw.cloud/fondation/fondation-worker:2222222"
WEBHOOK_SECRET_ID = "11111111-aaaa-4bbb-8ccc-000000000001"
ANTHROPIC_SECRET_ID = "11111111-aaaa-4bbb-8ccc-000000000002"
CONTAINER_SECRET = "sk-ant-container-only-value"
JOBS = "/serverless-jobs/v1alpha2/regions/fr-par"


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeScaleway]:
    server = FakeScaleway(run_log_dir=tmp_path, run_cwd=str(REPO_ROOT)).start()
    use_fake_scaleway(monkeypatch, server, tmp_path, SECRET)
    try:
        yield server
    finally:
        server.stop()


REFS = (f"WEBHOOK_SECRETS={WEBHOOK_SECRET_ID}", f"ANTHROPIC_API_KEY={ANTHROPIC_SECRET_ID}:3")


def args(image: str = IMAGE_V1, *, refs: tuple[str, ...] = REFS, convex: bool = True) -> list[str]:
    argv = ["--namespace", "fondation", "--container", "worker", "--image", image]
    if convex:
        argv += ["--env", "CONVEX_URL=https://happy-otter-123.convex.cloud"]
    argv += ["--env", "MAX_CONCURRENT_JOBS=2", "--secret-from-env", "WEBHOOK_SECRETS"]
    argv += ["--secret", f"ANTHROPIC_API_KEY={CONTAINER_SECRET}"]
    argv += ["--wait-timeout-s", "20", "--poll-s", "0.02", "--job-definition", "fondation-overflow"]
    for ref in refs:
        argv += ["--job-secret-ref", ref]
    return argv


def definition(fake: FakeScaleway) -> dict[str, object]:
    (only,) = fake.definitions.values()
    return only


def test_create_makes_the_job_definition_from_the_container_settings(
    fake: FakeScaleway, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args()) == 0
    out = capsys.readouterr().out
    d = definition(fake)
    assert f"created: job definition fondation-overflow ({IMAGE_V1})" in out
    assert f"job definition id: {d['id']}" in out
    assert d["image_uri"] == IMAGE_V1
    (container,) = fake.containers.values()
    assert d["cpu_limit"] == container["mvcpu_limit"] == 1120
    assert d["memory_limit"] * 1024 * 1024 == container["memory_limit_bytes"]
    assert d["local_storage_capacity"] * 1024 * 1024 == container["local_storage_limit_bytes"]
    assert d["startup_command"] == ["/usr/bin/tini", "--"]
    assert d["args"] == ["fondation-worker", "run-one"]
    assert d["job_timeout"] == "5400s"
    assert d["retry_policy"] == {"max_retries": 0}  # Convex owns retries
    # Plain env only: the container's secret values never reach the readable definition.
    assert d["environment_variables"] == {
        "WEBHOOK_TOLERANCE_S": "900",
        "CONVEX_URL": "https://happy-otter-123.convex.cloud",
        "MAX_CONCURRENT_JOBS": "2",
    }
    blob = json.dumps([r.body for r in fake.requests if r.path.startswith(JOBS)])
    assert SECRET not in blob and CONTAINER_SECRET not in blob
    refs = sorted(
        (r["env_var"]["name"], r["secret_manager_id"], r["secret_manager_version"])
        for r in fake.secret_refs.values()
    )
    assert refs == [
        ("ANTHROPIC_API_KEY", ANTHROPIC_SECRET_ID, "3"),
        ("WEBHOOK_SECRETS", WEBHOOK_SECRET_ID, "latest"),
    ]


def test_second_run_is_unchanged_and_writes_nothing(
    fake: FakeScaleway, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args()) == 0
    before = len(fake.requests)
    assert main(args()) == 0
    out = capsys.readouterr().out
    assert "unchanged: job definition 'fondation-overflow'" in out
    writes = [r for r in fake.requests[before:] if r.method != "GET"]
    assert writes == [], writes


def test_new_image_updates_the_definition_in_place(fake: FakeScaleway) -> None:
    assert main(args()) == 0
    first_id = definition(fake)["id"]
    assert main(args(IMAGE_V2)) == 0
    d = definition(fake)
    assert d["id"] == first_id and d["image_uri"] == IMAGE_V2
    assert len(fake.calls("PATCH", r"/job-definitions/")) == 1


def test_secret_refs_follow_the_flags(
    fake: FakeScaleway, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args()) == 0
    capsys.readouterr()
    assert main(args(refs=(f"WEBHOOK_SECRETS={WEBHOOK_SECRET_ID}:2",))) == 0
    captured = capsys.readouterr()
    assert "updated: job definition" in captured.out
    refs = [(r["env_var"]["name"], r["secret_manager_version"]) for r in fake.secret_refs.values()]
    assert refs == [("WEBHOOK_SECRETS", "2")]
    assert "the container gets ANTHROPIC_API_KEY as a secret but runs will not" in captured.err


def test_without_the_webhook_secret_ref_nothing_is_sent(
    fake: FakeScaleway, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args(refs=())) == 2
    assert "--job-secret-ref WEBHOOK_SECRETS=" in capsys.readouterr().err
    assert fake.requests == []


def test_two_definitions_with_the_name_is_an_error(
    fake: FakeScaleway, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.add_definition({"name": "fondation-overflow", "image_uri": "x", "cpu_limit": 1})
    fake.add_definition({"name": "fondation-overflow", "image_uri": "y", "cpu_limit": 1})
    assert main(args()) == 1
    assert "several job definitions are named 'fondation-overflow'" in capsys.readouterr().err


def test_dry_run_prints_the_container_and_the_job_definition_requests(
    fake: FakeScaleway, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("SCW_ACCESS_KEY")
    monkeypatch.delenv("SCW_SECRET_KEY")
    assert main([*args(), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert fake.requests == []
    assert SECRET not in out and CONTAINER_SECRET not in out
    plan = json.loads(out)
    container = {(r["method"], r["path"]) for r in plan["requests"]}
    assert ("POST", "/containers/v1/regions/fr-par/containers") in container
    jobs = {(r["method"], r["path"]): r for r in plan["job_definition"]["requests"]}
    create = jobs[("POST", f"{JOBS}/job-definitions")]["body"]
    assert create["image_uri"] == IMAGE_V1 and create["args"] == ["fondation-worker", "run-one"]
    assert create["retry_policy"] == {"max_retries": 0}
    assert ("PATCH", f"{JOBS}/job-definitions/<job definition id>") in jobs
    secrets = jobs[("POST", f"{JOBS}/secrets")]["body"]["secrets"]
    assert {s["env_var_name"] for s in secrets} == {"WEBHOOK_SECRETS", "ANTHROPIC_API_KEY"}
    assert all("when" in r for r in plan["job_definition"]["requests"])


# -- the fake's start and stop launch and stop run-one --------------------------------------


@pytest.fixture(scope="module")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitHttpServer]:
    root = tmp_path_factory.mktemp("repos")
    make_repo(root / "happy.git", SOURCE)
    make_repo(root / "slow.git", sim(step_delay_s=1.0))
    with GitHttpServer(root) as server:
        yield server


def _jobs_api(fake: FakeScaleway, token: str) -> JobsV1Alpha2API:
    client = Client(
        access_key=ACCESS_KEY,
        secret_key=token,
        default_project_id=PROJECT_ID,
        default_region="fr-par",
        api_url=fake.url,
    )
    return JobsV1Alpha2API(client)


def _deployed(fake: FakeScaleway, tmp_path: Path) -> str:
    """The definition as `python -m deploy` makes it, runnable here: embedded store (no
    CONVEX_URL), loopback git, simulator CLI; the webhook secret from the fake Secret Manager."""
    env = base_env(tmp_path)
    del env["WEBHOOK_SECRETS"]  # it must come from the secret reference
    fake.run_base_env = env
    fake.secret_manager[WEBHOOK_SECRET_ID] = SECRET
    assert main(args(convex=False)) == 0
    return str(definition(fake)["id"])


def _message(job_id: str, url: str) -> dict[str, str]:
    body = start_body(job_id, url)
    return {MESSAGE_ENV: body.decode(), HEADERS_ENV: json.dumps(headers_for(body, f"{job_id}:1"))}


def _status(tmp: Path, job_id: str) -> str | None:
    db_path = tmp / "data" / "jobs.sqlite3"
    if not db_path.exists():
        return None
    db = sqlite3.connect(db_path, timeout=5)
    try:
        row = db.execute("SELECT status FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    except sqlite3.OperationalError:  # the run has not created its tables yet
        return None
    finally:
        db.close()
    return None if row is None else str(row[0])


def _wait_state(api: JobsV1Alpha2API, run_id: str, states: set[JobRunState]) -> JobRun:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        run = api.get_job_run(job_run_id=run_id)
        if run.state in states:
            return run
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} never reached {states}")


def test_start_launches_run_one_with_the_overrides_and_the_secret_ref(
    fake: FakeScaleway, tmp_path: Path, git_server: GitHttpServer
) -> None:
    definition_id = _deployed(fake, tmp_path)
    api = _jobs_api(fake, JOBS_TOKEN)  # a key limited to Serverless Jobs is enough to start
    started = api.start_job_definition(
        job_definition_id=definition_id,
        environment_variables=_message("happy", git_server.url_for("happy")),
    )
    (run,) = started.job_runs
    done = _wait_state(api, run.id, {JobRunState.SUCCEEDED, JobRunState.FAILED})
    assert done.exit_code == ExitCode.COMPLETED, (tmp_path / f"run-{run.id}.log").read_text()
    (record,) = fake.starts
    assert set(record.env_overrides) == {MESSAGE_ENV, HEADERS_ENV}
    assert fake.run_env(run.id)["WEBHOOK_SECRETS"] == SECRET  # from the secret reference
    assert SECRET not in json.dumps(done.environment_variables)  # what the API shows of a run


def test_stop_ends_the_run_interrupted(
    fake: FakeScaleway, tmp_path: Path, git_server: GitHttpServer
) -> None:
    definition_id = _deployed(fake, tmp_path)
    api = _jobs_api(fake, SECRET_KEY)
    (run,) = api.start_job_definition(
        job_definition_id=definition_id,
        environment_variables=_message("slow", git_server.url_for("slow")),
    ).job_runs
    assert wait_for(lambda: _status(tmp_path, "slow") == "analyzing", 60, 0.1)
    api.stop_job_run(job_run_id=run.id)
    done = _wait_state(api, run.id, {JobRunState.INTERRUPTED})
    assert done.exit_code == ExitCode.INTERRUPTED
