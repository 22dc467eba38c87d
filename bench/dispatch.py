"""Dispatch latency: from the host's enqueue (`jobs:create` of the example host app, which calls
`fondation.enqueue`) to the CLI process starting.

Both designs run against the same convex-test bridge (`deploy/bridge/server.ts`, one Node
process serving the example host app with the component) and a real worker whose
FONDATION_COMMAND is `bench/stamp.sh FILE` in front of `bench/paced_cli.py`: as the CLI
process begins, a shell appends the time and its output directory (which names the job) to
FILE. The benchmark takes
`time.time()` just before the enqueue. A small repository is cloned from a git server on
127.0.0.1 in both designs, so the clone is in both numbers.

* push (this design): the bridge has FONDATION_WORKER_URL; the enqueue kicks the component's
  loop, which schedules the signed webhook at once; the worker (CONVEX_URL = the bridge) acks,
  claims through the host's `fondation:claim`, clones, starts the CLI.
* poll (the seed's design, simulated): the bridge has no worker URL, so nothing is pushed; a
  poller thread reads the runs every 5 s (`GET /__test/runs`, pending or dispatched runs it has
  not started yet) and starts each one on an embedded worker with a signed
  `job.start` (no claim round trip to the bridge: a few ms in favour of the poller).

Also reported: create → the worker's `job claimed` log line (the dispatch alone, without
clone and CLI start, which both designs pay alike).

Jobs are created one at a time, each after the previous CLI started plus a random pause
(uniform in 0..5 s for the poller, so creations fall at random phases of its interval).
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    PY,
    REPO_ROOT,
    SECRET,
    BenchError,
    Result,
    bench_dir,
    free_port,
    headers_for,
    median,
    running,
    start_body,
    wait_for,
)
from tests.support.convex_bridge import ConvexBridge, node_ready
from tests.support.gitserver import GitHttpServer, make_repo
from tests.support.worker import WorkerProcess, base_env

GOAL = 20.0
POLL_INTERVAL_S = 5.0
PACED = REPO_ROOT / "bench" / "paced_cli.py"
STAMP = REPO_ROOT / "bench" / "stamp.sh"


def _command(stamp: Path, python: str = PY) -> str:
    """The benchmarks' CLI: `bench/stamp.sh` stamps as the CLI process begins (a shell, ~1 ms),
    then runs the paced CLI, which writes the course."""
    return (
        f"/bin/sh {STAMP} {stamp} {{output_dir}} "
        f"{python} {PACED} --lines 0 --seconds 0 -- "
        "analyze {repo_dir} --output-dir {output_dir}"
    )


def _stamps(stamp: Path) -> dict[str, float]:
    """job id → unix time its CLI started (the workspace is `<jobId>-<attempt>-<hex>`)."""
    out: dict[str, float] = {}
    if not stamp.exists():
        return out
    for line in stamp.read_text().splitlines():
        at, _, out_dir = line.partition(" ")
        job_id = Path(out_dir).parent.name.rsplit("-", 2)[0]
        out.setdefault(job_id, float(at))
    return out


def _claimed(log: Path) -> dict[str, float]:
    """job id → unix time of the worker's `job claimed` log line (ms precision)."""
    return _logged(log, "job claimed", lambda doc: str(doc["job_id"]))


def _received(log: Path) -> dict[str, float]:
    """job id → unix time of the worker's `webhook` log line for its `job.start`."""
    return _logged(log, "webhook", lambda doc: str(doc["webhook_id"]).rsplit(":", 1)[0])


def _logged(log: Path, message: str, job_of: Callable[[dict[str, Any]], str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        if f'"msg": "{message}"' not in line:
            continue
        with contextlib.suppress(ValueError, KeyError):
            doc = json.loads(line)
            at = datetime.fromisoformat(doc["time"].replace("Z", "+00:00")).timestamp()
            out.setdefault(job_of(doc), at)
    return out


@contextlib.contextmanager
def _worker(tmp: Path, port: int, **env: str) -> Iterator[WorkerProcess]:
    w = WorkerProcess(base_env(tmp, LOG_LEVEL="INFO", **env), tmp / "worker.log")
    w.port, w.url = port, f"http://127.0.0.1:{port}"
    w.env["PORT"] = str(port)
    with running(w, ignore=(Exception,)):
        yield w


def _measure(
    bridge: ConvexBridge, repo_url: str, stamp: Path, samples: int, pause_s: float
) -> dict[str, float]:
    """job id → unix time of its `create` call."""
    created: dict[str, float] = {}
    rng = random.Random(7)
    for _ in range(samples):
        t0 = time.time()
        job_id = bridge.create(repo_url)
        created[job_id] = t0
        wait_for(lambda j=job_id: j in _stamps(stamp), 30, f"the CLI of job {job_id}")
        time.sleep(rng.uniform(0.0, pause_s))
    return created


def _latencies(created: dict[str, float], reached: dict[str, float]) -> list[float]:
    missing = set(created) - set(reached)
    if missing:
        raise BenchError(f"no time recorded for jobs {sorted(missing)[:3]}")
    return [reached[j] - t0 for j, t0 in created.items()]


class Poller:
    """The seed's design: every POLL_INTERVAL_S, read the pending jobs and start them."""

    def __init__(self, bridge: ConvexBridge, worker: WorkerProcess) -> None:
        self.bridge, self.worker = bridge, worker
        self.started: set[str] = set()
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop.wait(POLL_INTERVAL_S):
            try:
                for job in self.bridge.runs():
                    job_id = str(job["_id"])
                    if job_id in self.started or job["status"] not in ("pending", "dispatched"):
                        continue
                    self.started.add(job_id)
                    body = start_body(job_id, job["repositoryUrl"], ref=job.get("ref"))
                    r = httpx.post(
                        f"{self.worker.url}/v1/webhooks",
                        content=body,
                        headers=headers_for(body, f"{job_id}:1"),
                        timeout=10,
                    )
                    if r.status_code != 202:
                        self.errors.append(f"{r.status_code} {r.text[:200]}")
            except (httpx.HTTPError, KeyError) as exc:
                self.errors.append(repr(exc))

    def __enter__(self) -> Poller:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=15)


def run(smoke: bool) -> list[Result]:
    res = Result("dispatch")
    if not node_ready():
        res.note("NOT RUN: node, deploy/node_modules or the packed component missing (make test)")
        return [res]
    push_n, poll_n = (4, 3) if smoke else (20, 12)
    with bench_dir("dispatch") as tmp:
        make_repo(tmp / "repos" / "small.git", {"README.md": "# s\n", "src/a.py": "a = 1\n"})
        with GitHttpServer(tmp / "repos") as git:
            url = git.url_for("small")
            # push
            (tmp / "push").mkdir()
            stamp = tmp / "push" / "stamps.txt"
            port = free_port()
            bridge_env = {
                "FONDATION_WORKER_URL": f"http://127.0.0.1:{port}",
                "FONDATION_WEBHOOK_SECRET": SECRET,
                "FONDATION_MAX_PARALLEL": "4",
            }
            with (
                ConvexBridge(tmp / "push" / "bridge.log", **bridge_env) as bridge,
                _worker(
                    tmp / "push",
                    port,
                    CONVEX_URL=bridge.url,
                    MAX_CONCURRENT_JOBS="4",
                    FONDATION_COMMAND=_command(stamp),
                ),
            ):
                bridge.create(url)
                wait_for(lambda: len(_stamps(stamp)) >= 1, 30, "the warm-up job's CLI")
                created = _measure(bridge, url, stamp, push_n, 1.0)
                push = _latencies(created, _stamps(stamp))
                push_claim = _latencies(created, _claimed(tmp / "push" / "worker.log"))
                # What a fetch started at the webhook could hide behind: the claim's round
                # trip through the host (ack → `job claimed`).
                received = _received(tmp / "push" / "worker.log")
                claim_trip = [
                    at - received[job]
                    for job, at in _claimed(tmp / "push" / "worker.log").items()
                    if job in received and job in created
                ]
            # poll
            (tmp / "poll").mkdir()
            stamp = tmp / "poll" / "stamps.txt"
            with (
                ConvexBridge(tmp / "poll" / "bridge.log", FONDATION_MAX_PARALLEL="100") as bridge,
                _worker(
                    tmp / "poll",
                    free_port(),
                    MAX_CONCURRENT_JOBS="4",
                    FONDATION_COMMAND=_command(stamp),
                ) as w,
                Poller(bridge, w) as poller,
            ):
                created = _measure(bridge, url, stamp, poll_n, POLL_INTERVAL_S)
                poll = _latencies(created, _stamps(stamp))
                poll_claim = _latencies(created, _claimed(tmp / "poll" / "worker.log"))
                if poller.errors:
                    raise BenchError(f"poller errors: {poller.errors[:3]}")
    res.add("push_samples", len(push))
    res.add("push_median_ms", median(push) * 1000)
    res.add("push_max_ms", max(push) * 1000)
    res.add("poll_samples", len(poll))
    res.add("poll_interval_s", POLL_INTERVAL_S)
    res.add("poll_median_ms", median(poll) * 1000)
    res.add("poll_max_ms", max(poll) * 1000)
    res.add("push_median_to_claim_ms", median(push_claim) * 1000)
    res.add("push_median_webhook_to_claim_ms", median(claim_trip) * 1000)
    res.add("poll_median_to_claim_ms", median(poll_claim) * 1000)
    res.add("ratio_to_claim_poll_over_push", median(poll_claim) / median(push_claim))
    ratio = median(poll) / median(push)
    res.set_ratio("ratio_poll_median_over_push_median", ratio, f">= {GOAL:g}", ratio >= GOAL)
    return [res]
