"""Job start with the repository cache: webhook → CLI start, worker side, embedded mode.

Three ways to start the same jobs, in one run, against repositories served over smart HTTP
on 127.0.0.1 (`tests.support.gitserver`). Every worker runs as the cache needs it in
production: as root with `CLI_USER=nobody` (the cache is off without CLI_USER), so the
benchmark needs root. The CLI is `bench/stamp.sh` in front of `bench/paced_cli.py`: the stamp
(`time.time()` and the job's output directory, appended to a file) is taken by a shell as the
CLI process begins, so it measures the worker's path to the CLI, not an interpreter's imports.

* poll: the seed's design, simulated like `bench.dispatch` does: "create" appends the job to
  a pending list after a random pause (uniform 0..5 s, so creations fall at random phases);
  a poller thread takes the list every 5 s and sends each job's signed `job.start`. The
  worker has no cache (today's shallow clone).
* push, today: "create" sends the signed `job.start` at once; worker without cache.
  Both push workers run at once and their samples alternate (today, cache, today, ...).
* push, cache: the same, on a worker with the repository cache. "first" jobs each use a
  repository the cache has never seen (copies of the same repository under other names;
  after each, the benchmark waits for the mirror and ready tree the cache makes in the
  background, so no sample runs against that work; `small` is below the cache's size
  threshold and is cloned directly every time, which this row checks); "repeated" jobs use
  one repository, moved by one commit before each job (a course regenerated after a push),
  each after the previous job's background work has ended (regenerations are minutes
  apart); "back to back" jobs follow each other at once, so the ready tree is still being
  made and they go through the mirror.

Latency = the stamp minus the unix time taken just before "create". The Convex leg of the
real system (create → scheduled webhook → claim through Convex) is not in these numbers; it
is the same for every push row (`bench.dispatch` measures it: create → claimed).

Two repositories: `small` (2 files, the one `bench.dispatch` clones) and `medium` (~3 MB
work tree of 240 files, 30 commits).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import sysconfig
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import (
    REPO_ROOT,
    BenchError,
    Result,
    bench_dir,
    median,
    post_job,
    running,
    wait_for,
)
from bench.dispatch import POLL_INTERVAL_S, _command, _stamps
from tests.support.gitserver import GitHttpServer, git_env, make_repo
from tests.support.worker import WorkerProcess, base_env

GOAL = 20.0


def medium_files() -> dict[str, str | bytes]:
    rng = random.Random(11)
    files: dict[str, str | bytes] = {}
    for i in range(200):  # source-like text, compressible
        lines = [f"def f{i}_{k}(x):\n    return x * {rng.randint(0, 10**6)}\n" for k in range(200)]
        files[f"src/pkg{i % 10}/mod{i:03d}.py"] = "".join(lines)
    for i in range(40):  # assets, incompressible
        files[f"assets/a{i:02d}.bin"] = rng.randbytes(30_000)
    return files


def move_by_one_commit(bare: Path, n: int) -> None:
    """Add one commit on main of the bare repository (through a work clone, pushed by path)."""
    work = bare.with_name(bare.name + "-work")
    env = git_env()
    if not work.exists():
        subprocess.run(["git", "clone", "-q", str(bare), str(work)], env=env, check=True)
    (work / "CHANGES.md").write_text(f"change {n}\n")
    for args in (["add", "-A"], ["commit", "-q", "-m", f"change {n}"], ["push", "-q"]):
        subprocess.run(["git", *args], cwd=work, env=env, check=True, timeout=60)


SYSTEM_PYTHON = "/usr/bin/python3"  # the CLI runs as nobody, who cannot reach a venv under /root


def open_to_the_cli_user(tmp: Path, stamp: Path) -> None:
    """The CLI runs as nobody: the way down to the work directory searchable, the stamp file
    writable."""
    for path in (tmp, *tmp.parents):
        if path == Path("/tmp") or path == path.parent:
            break
        path.chmod(path.stat().st_mode | 0o711)
    stamp.touch()
    stamp.chmod(0o666)


@contextlib.contextmanager
def worker(tmp: Path, stamp: Path, *, cached: bool) -> Iterator[WorkerProcess]:
    if os.geteuid() != 0:
        raise BenchError("needs root: the cache is on only with CLI_USER (the CLI as nobody)")
    open_to_the_cli_user(tmp, stamp)
    site = sysconfig.get_paths()["purelib"]  # the CLI's simulator imports yaml
    env = base_env(
        tmp,
        LOG_LEVEL="INFO",
        MAX_CONCURRENT_JOBS="4",
        CLI_USER="nobody",
        FONDATION_COMMAND=_command(stamp, SYSTEM_PYTHON),
        PYTHONPATH=f"{REPO_ROOT}:{site}",
        CLI_ENV_PASSTHROUGH="PYTHONPATH",
        REPO_CACHE_DIR=str(tmp / "repo-cache"),
        REPO_CACHE_MAX_BYTES=str(2 * 1024**3 if cached else 0),
    )
    w = WorkerProcess(env, tmp / "worker.log")
    with running(w, ignore=(Exception,)):
        yield w


class _Jobs:
    """Sequential jobs on one worker; returns create → CLI start latencies (s)."""

    def __init__(self, w: WorkerProcess, stamp: Path, prefix: str) -> None:
        self.w, self.stamp, self.prefix, self.n = w, stamp, prefix, 0
        self.pushed: list[str] = []

    def push(self, url: str) -> float:
        self.n += 1
        job_id = f"{self.prefix}{self.n}"
        self.pushed.append(job_id)
        t0 = time.time()
        r = post_job(self.w, job_id, url, ref="main")
        if r.status_code != 202:
            raise BenchError(f"job.start answered {r.status_code}: {r.text[:200]}")
        return self._wait(job_id, t0)

    def _wait(self, job_id: str, t0: float) -> float:
        wait_for(lambda: job_id in _stamps(self.stamp), 60, f"the CLI of job {job_id}")
        status = self.w.wait_status(job_id, {"completed", "failed"}, timeout_s=60)["status"]
        if status != "completed":
            raise BenchError(f"job {job_id} {status}:\n{self.w.logs()[-3000:]}")
        return _stamps(self.stamp)[job_id] - t0


class _Poller(_Jobs):
    """The seed's design: every POLL_INTERVAL_S, start every pending job."""

    def __init__(self, w: WorkerProcess, stamp: Path, prefix: str) -> None:
        super().__init__(w, stamp, prefix)
        self.pending: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.wait(POLL_INTERVAL_S):
            with self.lock:
                batch, self.pending = self.pending, []
            for job_id, url in batch:
                r = post_job(self.w, job_id, url, ref="main")
                if r.status_code != 202:
                    self.errors.append(f"{r.status_code} {r.text[:200]}")

    def create(self, url: str, rng: random.Random) -> float:
        time.sleep(rng.uniform(0.0, POLL_INTERVAL_S))
        self.n += 1
        job_id = f"{self.prefix}{self.n}"
        t0 = time.time()
        with self.lock:
            self.pending.append((job_id, url))
        return self._wait(job_id, t0)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=15)
        if self.errors:
            raise BenchError(f"poller errors: {self.errors[:3]}")


def _count(log: Path, message: str) -> int:
    return log.read_text(errors="replace").count(f'"msg": "{message}"')


def _cache_lines(log: Path, message: str) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if f'"msg": "{message}"' in line:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def measure_repo(
    res: Result,
    tmp: Path,
    server: GitHttpServer,
    name: str,
    counts: tuple[int, int, int],
    *,
    cached_size: bool,
) -> dict[str, float]:
    """`cached_size`: the repository is above `RepoCache.min_clone_bytes`, so it gets a mirror
    (checked); below, the cache clones it directly every time (also checked)."""
    n, n_first, n_poll = counts
    root = server.root
    for i in range(n_first):  # repositories the cache has never seen
        shutil.copytree(root / f"{name}.git", root / f"{name}-first{i}.git")
    url = server.url_for(name)
    rng = random.Random(7)
    rows: dict[str, list[float]] = {"push_today": [], "push_cache_first": []}
    rows["push_cache_repeated"] = []
    for side in ("a", "b"):
        (tmp / side).mkdir(parents=True)
    log = tmp / "b" / "worker.log"
    fills = 0
    # Both workers at once, their samples alternating: the machine's drift hits both alike.
    with (
        worker(tmp / "a", tmp / "a" / "stamps.txt", cached=False) as wa,
        worker(tmp / "b", tmp / "b" / "stamps.txt", cached=True) as wb,
    ):
        today = _Jobs(wa, tmp / "a" / "stamps.txt", f"{name}-today-")
        cache = _Jobs(wb, tmp / "b" / "stamps.txt", f"{name}-cache-")

        def filled() -> None:
            # A first job's mirror fills in the background: wait, so that the next sample is
            # not measured against that fetch (a first job alone is the question). `small`
            # and the warm-up repository are below the cache's size threshold.
            nonlocal fills
            if cached_size:
                fills += 1
                wait_for(lambda: _count(log, "repository cache filled") >= fills, 60, "a mirror")

        def moved() -> str:
            move_by_one_commit(root / f"{name}.git", len(today.pushed) + len(cache.pushed))
            return url

        today.push(server.url_for("warmup"))  # imports, first SQLite writes
        cache.push(server.url_for("warmup"))
        for i in range(n_first):
            rows["push_today"].append(today.push(moved()))
            rows["push_cache_first"].append(cache.push(server.url_for(f"{name}-first{i}")))
            filled()
        cache.push(url)  # the repository is now cached (when above the threshold)
        filled()
        for _ in range(n):
            rows["push_today"].append(today.push(moved()))
            rows["push_cache_repeated"].append(cache.push(moved()))
            filled()  # the mirror brought up to date, the next ready tree made
        ready_lines = _cache_lines(log, "cloned from a ready tree")
        if cached_size and len(ready_lines) != n:
            raise BenchError(f"{name}: {len(ready_lines)} of {n} repeated jobs took a ready tree")
        if cached_size:
            rows["push_cache_back_to_back"] = [cache.push(moved()) for _ in range(max(1, n // 2))]
        cache_lines = _cache_lines(log, "cloned through the repository cache")
        poller = _Poller(wa, tmp / "a" / "stamps.txt", f"{name}-poll-")
        try:
            rows["poll"] = [poller.create(url, rng) for _ in range(n_poll)]
        finally:
            poller.close()
    mirrors = list((tmp / "b" / "repo-cache" / "mirrors").glob("*.git"))
    if len(mirrors) != (1 + n_first if cached_size else 0):
        raise BenchError(f"{name}: {len(mirrors)} mirrors, cached_size={cached_size}")
    out = {key: median(values) for key, values in rows.items()}
    for key, value in out.items():
        res.add(f"{name}.{key}_median_ms", value * 1000)
    res.add(f"{name}.samples", {k: len(v) for k, v in rows.items()})
    if ready_lines:
        res.add(
            f"{name}.repeated_clone_from_ready_tree_median_ms",
            median([float(c["duration_s"]) for c in ready_lines]) * 1000,
        )
    if cache_lines:
        res.add(
            f"{name}.back_to_back_mirror_fetch_median_ms",
            median([float(c["fetch_s"]) for c in cache_lines]) * 1000,
        )
        res.add(
            f"{name}.back_to_back_clone_through_mirror_median_ms",
            median([float(c["duration_s"]) for c in cache_lines]) * 1000,
        )
    res.add(f"{name}.ratio_poll_over_cache_repeated", out["poll"] / out["push_cache_repeated"])
    res.add(f"{name}.ratio_poll_over_push_today", out["poll"] / out["push_today"])
    res.add(f"{name}.ratio_cache_first_over_today", out["push_cache_first"] / out["push_today"])
    return out


def run(smoke: bool) -> list[Result]:
    n, n_first, n_poll = (1, 1, 1) if smoke else (8, 6, 10)
    res = Result("start")
    with bench_dir("start") as tmp:
        root = tmp / "repos"
        make_repo(root / "warmup.git", {"README.md": "# w\n"})
        make_repo(root / "small.git", {"README.md": "# s\n", "src/a.py": "a = 1\n"})
        make_repo(root / "medium.git", medium_files(), commits=30)
        res.add("medium_work_tree_bytes", sum(len(v) for v in medium_files().values()))
        with GitHttpServer(root) as server:
            counts = (n, n_first, n_poll)
            if not smoke:  # the smoke run checks the cached path only
                measure_repo(res, tmp / "small", server, "small", counts, cached_size=False)
            medium = measure_repo(res, tmp / "medium", server, "medium", counts, cached_size=True)
    ratio = medium["poll"] / medium["push_cache_repeated"]
    res.set_ratio("medium_ratio_poll_over_cache_repeated", ratio, f">= {GOAL:g}", ratio >= GOAL)
    return [res]


if __name__ == "__main__":
    os.chdir(REPO_ROOT)
    run(smoke=False)
