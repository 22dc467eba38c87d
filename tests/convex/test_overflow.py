"""Overflow to Serverless Jobs, end to end and offline (issue 14, Must show 1 and 2).

The example host app with the component under convex-test behind the bridge; a warm uvicorn
worker; the loopback fake of the Scaleway APIs, on which `python -m deploy --job-definition`
(the real SDK) makes the job definition, and whose `start` (called by the component's fetch)
launches `fondation-worker run-one` locally with the definition's env, its secret reference
resolved, and the start's overrides. Real git over smart HTTP, the simulator as the CLI."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from scaleway.jobs.v1alpha2 import JobsV1Alpha2API
from scaleway_core.client import Client

from app.run_one import HEADERS_ENV, MESSAGE_ENV, ExitCode
from deploy.__main__ import main as deploy_main
from tests.support.convex_bridge import ConvexBridge, node_ready
from tests.support.fake_scaleway import (
    ACCESS_KEY,
    JOBS_TOKEN,
    PROJECT_ID,
    SECRET_KEY,
    FakeScaleway,
)
from tests.support.gitserver import GitHttpServer, make_repo
from tests.support.jobs import SOURCE, sim, wait_for
from tests.support.signing import SECRET
from tests.support.worker import REPO_ROOT, WorkerProcess, base_env, free_port

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not node_ready(), reason="run `make test` (npm ci, the packed component)"),
]

WEBHOOK_SECRET_ID = "11111111-aaaa-4bbb-8ccc-000000000001"
FINAL = {"completed", "failed", "dead", "canceled"}


@pytest.fixture(scope="module")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitHttpServer]:
    root = tmp_path_factory.mktemp("repos")
    make_repo(root / "quick.git", sim(step_delay_s=0.3))
    make_repo(root / "slow.git", sim(step_delay_s=1.0))
    make_repo(root / "long.git", sim(step_delay_s=4.0))
    make_repo(root / "happy.git", SOURCE)
    with GitHttpServer(root) as server:
        yield server


class Setup:
    def __init__(self, bridge: ConvexBridge, warm: WorkerProcess, fake: FakeScaleway) -> None:
        self.bridge, self.warm, self.fake = bridge, warm, fake

    def leases(self) -> dict[str, dict[str, Any]]:
        return {row["runId"]: row for row in self.bridge.component_table("leases")}

    def run_of(self, run_id: str) -> str:
        """The Serverless Jobs run holding `run_id`'s current attempt."""
        job_run = self.leases()[run_id].get("jobRunId")
        assert isinstance(job_run, str), self.leases()[run_id]
        return job_run

    def logs(self) -> str:
        runs = "\n".join(
            p.read_text(errors="replace")[-2000:]
            for p in sorted(self.fake_log_dir.glob("run-*.log"))
        )
        return (
            f"{self.bridge.logs()[-3000:]}\n--- warm\n{self.warm.logs()[-3000:]}\n--- runs\n{runs}"
        )

    fake_log_dir: Path


@contextmanager
def overflow(
    tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    warm_slots: int,
    max_runs: int,
    worker_slots: int | None = None,
) -> Iterator[Setup]:
    """Convex counts `warm_slots` warm slots (the worker has `worker_slots`, by default the
    same); overflow to at most `max_runs` runs."""
    fake = FakeScaleway(run_log_dir=tmp, run_cwd=str(REPO_ROOT), run_data_root=tmp / "runs").start()
    fake.secret_manager[WEBHOOK_SECRET_ID] = SECRET
    warm_port, bridge_port = free_port(), free_port()
    bridge_url = f"http://127.0.0.1:{bridge_port}"
    monkeypatch.setenv("SCW_CONFIG_PATH", str(tmp / "no-scw-config.yaml"))
    # The job definition, as an operator makes it: the real SDK against the fake.
    scw = {
        "SCW_ACCESS_KEY": ACCESS_KEY,
        "SCW_SECRET_KEY": SECRET_KEY,
        "SCW_DEFAULT_PROJECT_ID": PROJECT_ID,
        "SCW_DEFAULT_REGION": "fr-par",
        "SCW_API_URL": fake.url,
        "WEBHOOK_SECRETS": SECRET,
    }
    argv = ["--namespace", "fondation", "--container", "worker"]
    argv += ["--image", "rg.fr-par.scw.cloud/fondation/fondation-worker:1111111"]
    argv += ["--env", f"CONVEX_URL={bridge_url}", "--secret-from-env", "WEBHOOK_SECRETS"]
    argv += ["--wait-timeout-s", "20", "--poll-s", "0.02"]
    argv += ["--job-definition", "fondation-overflow"]
    argv += ["--job-secret-ref", f"WEBHOOK_SECRETS={WEBHOOK_SECRET_ID}"]
    assert deploy_main(argv, env=scw) == 0
    (definition,) = fake.definitions.values()
    # What the image holds, for a local run: the simulator, loopback git, short heartbeats.
    # Not the webhook secret (from the secret reference) nor CONVEX_URL (from the definition).
    image_env = base_env(tmp, HEARTBEAT_S="1", LEASE_S="4", WORKER_ID="overflow-run")
    for name in ("WEBHOOK_SECRETS", "DATA_DIR", "WORK_DIR"):
        image_env.pop(name)
    fake.run_base_env = image_env
    try:
        with ConvexBridge(
            tmp / "bridge.log",
            PORT=bridge_port,
            FONDATION_WORKER_URL=f"http://127.0.0.1:{warm_port}",
            FONDATION_WEBHOOK_SECRET=SECRET,
            FONDATION_MAX_PARALLEL=warm_slots,
            FONDATION_LEASE_MS=4000,
            FONDATION_CLAIM_TIMEOUT_MS=20000,
            FONDATION_SWEEP_INTERVAL_MS=500,
            FONDATION_RETRY_BASE_MS=200,
            FONDATION_SCW_API_URL=fake.url,
            FONDATION_SCW_REGION="fr-par",
            FONDATION_SCW_JOB_DEFINITION_ID=definition["id"],
            FONDATION_SCW_JOBS_TOKEN=JOBS_TOKEN,
            FONDATION_MAX_RUNS=max_runs,
            FONDATION_RUN_CLAIM_TIMEOUT_MS=30000,
        ) as bridge:
            assert bridge.url == bridge_url, bridge.url
            warm_env = base_env(
                tmp / "warm",
                CONVEX_URL=bridge.url,
                HEARTBEAT_S="1",
                LEASE_S="4",
                MAX_CONCURRENT_JOBS=str(worker_slots or warm_slots),
                WORKER_ID="warm-worker",
            )
            (tmp / "warm").mkdir(exist_ok=True)
            warm = WorkerProcess(warm_env, tmp / "warm.log")
            warm.port, warm.url = warm_port, f"http://127.0.0.1:{warm_port}"
            warm.env["PORT"] = str(warm_port)
            warm.start()
            setup = Setup(bridge, warm, fake)
            setup.fake_log_dir = tmp
            try:
                yield setup
            finally:
                warm.stop(timeout_s=30)
    finally:
        fake.stop()


def jobs_api(fake: FakeScaleway) -> JobsV1Alpha2API:
    client = Client(
        access_key=ACCESS_KEY,
        secret_key=JOBS_TOKEN,
        default_project_id=PROJECT_ID,
        default_region="fr-par",
        api_url=fake.url,
    )
    return JobsV1Alpha2API(client)


def wait_final(s: Setup, run_ids: list[str], timeout_s: float) -> dict[str, dict[str, Any]]:
    def done() -> bool:
        return all(s.bridge.job(r).get("status") in FINAL for r in run_ids)

    assert wait_for(done, timeout_s, 0.25), s.logs()
    return {r: s.bridge.job(r) for r in run_ids}


def test_eight_jobs_two_warm_slots_six_runs_all_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, git_server: GitHttpServer
) -> None:
    with overflow(tmp_path, monkeypatch, warm_slots=2, max_runs=6) as s:
        run_ids = [s.bridge.create(git_server.url_for("quick")) for _ in range(8)]
        jobs = wait_final(s, run_ids, timeout_s=240)
        assert {r: j["status"] for r, j in jobs.items()} == dict.fromkeys(run_ids, "completed")
        assert all(j["attempt"] == 1 for j in jobs.values()), jobs
        leases = s.leases()
        runners = sorted(leases[r].get("runner") for r in run_ids)
        assert runners == ["run"] * 6 + ["warm"] * 2
        claimed = sorted(j["claimedBy"] for j in jobs.values())
        assert claimed == ["overflow-run"] * 6 + ["warm-worker"] * 2
        # No duplicate docs: each run has exactly its 7 files, once each.
        for r in run_ids:
            docs = s.bridge.docs(r)
            slugs = [d["slug"] for d in docs]
            assert len(slugs) == len(set(slugs)) == jobs[r]["docsCount"] == 7, (r, slugs)
        # Each run ended on its own with exit 0, and the fake saw six starts.
        assert len(s.fake.starts) == 6
        for record in s.fake.starts:
            proc = s.fake.process(record.run_id)
            assert proc is not None and proc.wait(timeout=30) == ExitCode.COMPLETED

        # Must show 2: what a run's environment holds (as the API keeps it) outlives nothing.
        for record in s.fake.starts:
            assert set(record.env_overrides) == {MESSAGE_ENV, HEADERS_ENV}
            blob = json.dumps(record.env_overrides)
            for secret in (SECRET, SECRET.removeprefix("whsec_"), JOBS_TOKEN, SECRET_KEY):
                assert secret not in blob
            data = json.loads(record.env_overrides[MESSAGE_ENV])["data"]
            assert set(data) <= {
                "jobId",
                "attempt",
                "callbackToken",
                "repository",
                "priority",
                "options",
            }
        # Its only credential died with the attempt: the same overrides, started again, get
        # nothing (the claim is refused; nothing runs, nothing is reported).
        replay = s.fake.starts[0]
        replayed_job = json.loads(replay.env_overrides[MESSAGE_ENV])["data"]["jobId"]
        (rerun,) = (
            jobs_api(s.fake)
            .start_job_definition(
                job_definition_id=replay.definition_id, environment_variables=replay.env_overrides
            )
            .job_runs
        )
        proc = s.fake.process(rerun.id)
        assert proc is not None and proc.wait(timeout=60) == ExitCode.DROPPED
        after = s.bridge.job(replayed_job)
        assert (after["status"], after["attempt"], after["docsCount"]) == ("completed", 1, 7)


def test_killed_run_is_redispatched_and_cancel_stops_a_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, git_server: GitHttpServer
) -> None:
    with overflow(tmp_path, monkeypatch, warm_slots=1, max_runs=3) as s:
        busy = s.bridge.create(git_server.url_for("long"))  # holds the one warm slot
        s.bridge.wait_job(busy, {"analyzing"}, timeout_s=60)
        killed = s.bridge.create(git_server.url_for("slow"))
        canceled = s.bridge.create(git_server.url_for("long"))
        for r in (killed, canceled):
            s.bridge.wait_job(r, {"analyzing"}, timeout_s=90)
            assert s.leases()[r]["runner"] == "run"

        # A run lost mid-job (its whole process tree SIGKILLed): the lease runs out, the
        # sweeper re-dispatches, the next attempt completes.
        first_run = s.run_of(killed)
        s.fake.kill_run(first_run)
        job = s.bridge.wait_job(killed, FINAL, timeout_s=120)
        assert job["status"] == "completed", s.logs()
        assert job["attempt"] == 2 and job["lastError"]["code"] == "lease_expired"
        assert len({d["slug"] for d in s.bridge.docs(killed)}) == job["docsCount"] == 7

        # Cancel of a job in a run stops the run (the Jobs API's stop) and its process.
        held_by = s.run_of(canceled)
        host_id = s.bridge.host_job(canceled)["_id"]
        out = s.bridge.call("jobs:cancelFor", {"userId": "user-1", "jobId": host_id})
        assert out == {"ok": True, "status": "canceled"}
        proc = s.fake.process(held_by)
        assert proc is not None
        code = proc.wait(timeout=30)
        assert code in (ExitCode.CANCELED, ExitCode.INTERRUPTED), code
        stops = [r.path.split("/")[-2] for r in s.fake.calls("POST", r"/job-runs/.+/stop$")]
        # The sweeper stopped the lost run too (a silent run may still be billed).
        assert stops == [first_run, held_by]
        assert s.bridge.job(canceled)["status"] == "canceled"
        # The warm job was never disturbed.
        assert s.bridge.wait_job(busy, FINAL, timeout_s=120)["status"] == "completed"
        assert os.path.exists(tmp_path / "runs")


def test_a_503_from_the_warm_worker_overflows_the_same_attempt_to_a_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, git_server: GitHttpServer
) -> None:
    # Convex believes in 2 warm slots; the worker has 1, so the second job gets 503 no-slot.
    with overflow(tmp_path, monkeypatch, warm_slots=2, max_runs=2, worker_slots=1) as s:
        run_ids = [s.bridge.create(git_server.url_for("slow")) for _ in range(2)]
        jobs = wait_final(s, run_ids, timeout_s=120)
        assert [j["status"] for j in jobs.values()] == ["completed", "completed"]
        assert all(j["attempt"] == 1 for j in jobs.values())  # the 503 spent no attempt
        leases = s.leases()
        assert sorted(leases[r]["runner"] for r in run_ids) == ["run", "warm"]
        assert sorted(j["claimedBy"] for j in jobs.values()) == ["overflow-run", "warm-worker"]
        assert len(s.fake.starts) == 1
        assert "no-slot" in s.warm.logs() and '"http_status": 503' in s.warm.logs()
