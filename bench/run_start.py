"""Start latency of an overflow run, launched locally: from the `start` call on the loopback fake
of the Serverless Jobs API (through the real SDK) to the run's `claim` reaching Convex (a
recording fake of the Convex HTTP API that refuses the claim, so each run ends right after).

What this covers: process spawn, interpreter and imports, settings, verifying the signed
message, opening the local store, the claim's HTTP call. What it does not: Scaleway's queueing,
placement and image pull (not measurable here; docs/SCALING.md). Baseline in the same run: the
spawn of a bare `python -c pass`, so the ratio says what `run-one` adds to an interpreter start.

    python -m bench.run_start [--runs N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time

from scaleway.jobs.v1alpha2 import JobsV1Alpha2API
from scaleway_core.client import Client

from app.run_one import HEADERS_ENV, MESSAGE_ENV
from bench.common import PY, REPO_ROOT, FakeConvex, bench_dir, median, percentile
from tests.support.fake_scaleway import ACCESS_KEY, JOBS_TOKEN, PROJECT_ID, FakeScaleway
from tests.support.signing import SECRET, headers_for, start_body
from tests.support.worker import base_env


def _bare_spawn_s() -> float:
    t0 = time.monotonic()
    subprocess.run([PY, "-c", "pass"], check=True)
    return time.monotonic() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    runs = parser.parse_args().runs
    latencies: list[float] = []
    with bench_dir("run-start") as tmp, FakeConvex(claim_ok=lambda job_id: False) as convex:
        fake = FakeScaleway(run_log_dir=tmp, run_cwd=str(REPO_ROOT)).start()
        try:
            fake.run_base_env = base_env(tmp, CONVEX_URL=convex.url, WEBHOOK_SECRETS=SECRET)
            definition = fake.add_definition(
                {"name": "bench", "image_uri": "local", "cpu_limit": 1120, "memory_limit": 2048}
            )
            api = JobsV1Alpha2API(
                Client(
                    access_key=ACCESS_KEY,
                    secret_key=JOBS_TOKEN,
                    default_project_id=PROJECT_ID,
                    default_region="fr-par",
                    api_url=fake.url,
                )
            )
            for i in range(runs):
                job_id = f"start-{i}"
                body = start_body(job_id, "https://github.com/octocat/Hello-World")
                env = {
                    MESSAGE_ENV: body.decode(),
                    HEADERS_ENV: json.dumps(headers_for(body, f"{job_id}:1")),
                }
                t0 = time.monotonic()
                (run,) = api.start_job_definition(
                    job_definition_id=definition["id"], environment_variables=env
                ).job_runs
                deadline = t0 + 60
                claim_at = None
                while claim_at is None and time.monotonic() < deadline:
                    claim_at = next(
                        (t for t, path, jid, _ in convex.snapshot() if jid == job_id), None
                    )
                    time.sleep(0.002)
                if claim_at is None:
                    raise SystemExit(f"run {run.id} never claimed; see {tmp}")
                latencies.append(claim_at - t0)
                proc = fake.process(run.id)
                assert proc is not None
                proc.wait(timeout=30)
        finally:
            fake.stop()
    baseline = median([_bare_spawn_s() for _ in range(runs)])
    out = {
        "runs": runs,
        "start_to_claim_median_s": round(median(latencies), 3),
        "start_to_claim_p90_s": round(percentile(latencies, 90), 3),
        "bare_python_spawn_median_s": round(baseline, 3),
        "ratio_to_bare_spawn": round(median(latencies) / baseline, 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
