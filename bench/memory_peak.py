"""Peak memory of the worker's process tree (worker + git + simulator CLI) during real jobs,
for sizing the container's memory limit (docs/DEPLOY.md, "Memory").

    .venv/bin/python -m bench.memory_peak [JOBS=2] [FILES=4000]

A real worker (MAX_CONCURRENT_JOBS=JOBS) runs JOBS jobs at once on a repository whose HEAD has
FILES files of 16 KiB (served over smart HTTP on loopback), through clone, the simulator CLI
(0.5 s per step, one 700 kB chapter) and collection. Every 20 ms the RSS of the worker and
of each descendant is read and summed; the peak of that sum is reported. Summing RSS counts
nothing as shared: sandbox v2 has no copy-on-write between forked processes, so that is what
the container is charged. Not part of `python -m bench` (a report, no ratio).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

from bench.common import BenchError, bench_dir, job_status, post_job, start_worker, wait_for
from tests.support.gitserver import GitHttpServer, git_env

MiB = 1024 * 1024


def build_repo(path: Path, files: int, file_kib: int, sim: dict[str, object]) -> int:
    """A bare repo whose HEAD has `files` incompressible-ish text files of `file_kib` KiB."""
    env = git_env()
    subprocess.run(["git", "init", "-q", "--bare", str(path)], check=True, env=env)
    parts = [b"commit refs/heads/main\nmark :1\n"]
    parts.append(b"committer B <b@example.invalid> 1700000000 +0000\n")
    msg = b"big tree\n"
    parts.append(f"data {len(msg)}\n".encode() + msg)
    total = 0
    for i in range(files):
        line_count = file_kib * 1024 // 65
        seed = f"file {i}"
        text = "".join(
            hashlib.sha256(f"{seed}{k}".encode()).hexdigest() + "\n" for k in range(line_count)
        ).encode()
        total += len(text)
        parts.append(f"M 644 inline src/d{i % 40:02d}/file_{i:05d}.py\n".encode())
        parts.append(f"data {len(text)}\n".encode() + text + b"\n")
    simj = json.dumps(sim).encode()
    parts.append(b"M 644 inline .fondation-sim.json\n")
    parts.append(f"data {len(simj)}\n".encode() + simj + b"\n")
    subprocess.run(
        ["git", "fast-import", "--quiet"], input=b"".join(parts), cwd=path, check=True, env=env
    )
    for args in (["symbolic-ref", "HEAD", "refs/heads/main"], ["repack", "-adq"]):
        subprocess.run(["git", *args], cwd=path, check=True, env=env)
    return total


class Sampler(threading.Thread):
    def __init__(self, root: psutil.Process) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.stop = threading.Event()
        self.peak = 0
        self.peak_worker = 0
        self.peak_procs: Counter[str] = Counter()
        self.by_name_peak: dict[str, int] = {}
        self.samples = 0

    def run(self) -> None:
        while not self.stop.is_set():
            total = 0
            names: Counter[str] = Counter()
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    name = "worker" if p.pid == self.root.pid else p.name()
                except psutil.NoSuchProcess:
                    continue
                total += rss
                names[name] += 1
                self.by_name_peak[name] = max(self.by_name_peak.get(name, 0), rss)
                if p.pid == self.root.pid:
                    self.peak_worker = max(self.peak_worker, rss)
            self.samples += 1
            if total > self.peak:
                self.peak, self.peak_procs = total, names
            time.sleep(0.02)


def main() -> None:
    jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    files = int(sys.argv[2]) if len(sys.argv) > 2 else 4000
    sim: dict[str, object] = {"step_delay_s": 0.5, "huge_doc_bytes": 700_000}
    with bench_dir("mempeak") as tmp:
        size = build_repo(tmp / "repos" / "big.git", files, 16, sim)
        (tmp / "w").mkdir()
        with (
            GitHttpServer(tmp / "repos") as git,
            start_worker(
                tmp / "w",
                MAX_CONCURRENT_JOBS=str(jobs),
                CLONE_TIMEOUT_S="600",
                PROGRESS_MIN_INTERVAL_S="1",
                HEARTBEAT_S="15",
            ) as w,
        ):
            root = psutil.Process(w.proc.pid)  # type: ignore[union-attr]
            s = Sampler(root)
            s.start()
            time.sleep(0.5)
            idle = root.memory_info().rss
            ids = [f"peak-{i}" for i in range(jobs)]
            t0 = time.monotonic()
            for j in ids:
                r = post_job(w, j, git.url_for("big"))
                if r.status_code != 202:
                    raise BenchError(f"job refused: {r.status_code} {r.text}")
            wait_for(
                lambda: all(job_status(w, j) in ("completed", "failed") for j in ids), 600, "jobs"
            )
            took = time.monotonic() - t0
            statuses = {j: job_status(w, j) for j in ids}
            time.sleep(0.3)
            s.stop.set()
            s.join()
    report = {
        "jobs": jobs,
        "repo_head_mib": round(size / MiB, 1),
        "files": files,
        "statuses": statuses,
        "seconds": round(took, 1),
        "samples": s.samples,
        "worker_idle_rss_mib": round(idle / MiB, 1),
        "worker_peak_rss_mib": round(s.peak_worker / MiB, 1),
        "tree_peak_rss_sum_mib": round(s.peak / MiB, 1),
        "processes_at_peak": dict(s.peak_procs),
        "peak_rss_by_program_mib": {
            k: round(v / MiB, 1) for k, v in sorted(s.by_name_peak.items())
        },
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
