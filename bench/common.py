"""Shared helpers for the benchmarks: results, percentiles, processes on 127.0.0.1.

Every benchmark prints `name: value` lines, the ratio against its same-run baseline last, and
returns a `Result`. Nothing asserts absolute times: the machine is shared and noisy.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from tests.support.signing import SECRET, headers_for, start_body
from tests.support.worker import REPO_ROOT, WorkerProcess, base_env, free_port

__all__ = [
    "REPO_ROOT",
    "SECRET",
    "BenchError",
    "FakeConvex",
    "Result",
    "bench_dir",
    "headers_for",
    "machine",
    "percentile",
    "running",
    "start_body",
    "start_worker",
    "wait_for",
]

PY = sys.executable


class BenchError(RuntimeError):
    """Something is broken (not merely slow): the run exits non-zero."""


@dataclass
class Result:
    """One benchmark's numbers; `ratio` is printed last. `goal` is a predicate on the ratio."""

    name: str
    values: dict[str, Any] = field(default_factory=dict)
    ratio_name: str = "ratio"
    ratio: float | None = None
    goal: str = ""
    met: bool | None = None
    notes: list[str] = field(default_factory=list)

    def add(self, key: str, value: Any) -> None:
        self.values[key] = value
        print(f"{self.name}.{key}: {_fmt(value)}", flush=True)

    def set_ratio(self, key: str, value: float, goal: str, met: bool | None) -> None:
        self.ratio_name, self.ratio, self.goal, self.met = key, value, goal, met
        print(f"{self.name}.{key}: {_fmt(value)}", flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"{self.name}.note: {text}", flush=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
    return str(value)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[k]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    git = subprocess.run(["git", "--version"], capture_output=True, text=True, check=False)
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": mem,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "git": git.stdout.strip(),
    }


@contextlib.contextmanager
def bench_dir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"bench-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def wait_for(check: Callable[[], bool], timeout_s: float, what: str, step_s: float = 0.05) -> None:
    """Poll `check` until true, at most `timeout_s`; BenchError otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(step_s)
    raise BenchError(f"timed out after {timeout_s:g}s waiting for {what}")


@contextlib.contextmanager
def start_worker(tmp: Path, *, kill: bool = False, **env: Any) -> Iterator[WorkerProcess]:
    """A real worker process (tests/support/worker.py) with the benchmark's settings."""
    settings = {"LOG_LEVEL": "INFO", "SHUTDOWN_GRACE_S": "8", **env}
    with running(WorkerProcess(base_env(tmp, **settings), tmp / "worker.log"), kill=kill) as w:
        yield w


@contextlib.contextmanager
def running(
    w: WorkerProcess,
    *,
    kill: bool = False,
    ignore: tuple[type[BaseException], ...] = (subprocess.TimeoutExpired,),
) -> Iterator[WorkerProcess]:
    """Start `w` (a failed start is a BenchError), then kill it or stop it, ignoring `ignore`."""
    try:
        w.start()
    except RuntimeError as exc:
        raise BenchError(str(exc)) from None
    try:
        yield w
    finally:
        if kill:
            w.kill()
        else:
            with contextlib.suppress(*ignore):
                w.stop(timeout_s=30)


# One client for the benchmarks' webhooks: `httpx.post` builds a client per call, and with it
# an SSL context (~40 ms of loading CA certificates, seen before every "create" → CLI start
# sample). The real sender, a Convex action's fetch, pays nothing of the kind per job.
_CLIENT = httpx.Client(timeout=10)


def post_job(w: WorkerProcess, job_id: str, url: str, **kw: Any) -> httpx.Response:
    body = start_body(job_id, url, **kw)
    return _CLIENT.post(
        f"{w.url}/v1/webhooks", content=body, headers=headers_for(body, f"{job_id}:1")
    )


def job_status(w: WorkerProcess, job_id: str) -> str:
    r = httpx.get(f"{w.url}/v1/jobs/{job_id}", timeout=10)
    return str(r.json().get("status")) if r.status_code == 200 else "unknown"


# -- a recording fake of the Convex HTTP API --------------------------------------------------


class _ConvexHandler(BaseHTTPRequestHandler):
    server: _ConvexServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms stall

    def log_message(self, format: str, *args: object) -> None:
        return

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = {}
        path = str(doc.get("path", ""))
        args = doc.get("args") or {}
        owner = self.server.owner
        owner.record(path, args)
        value: Any = {"ok": True}
        if path.endswith(":claim") and not owner.claim_ok(str(args.get("jobId", ""))):
            value = {"ok": False, "reason": "bench"}
        body = json.dumps({"status": "success", "value": value}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _ConvexServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: FakeConvex

    def handle_error(self, request: Any, client_address: Any) -> None:
        return  # a worker killed mid-call resets its connections: not news


class FakeConvex:
    """`POST /api/mutation` answering success for every function, recording each call
    (monotonic time, function path, jobId, args). `claim_ok(jobId)` False refuses that
    job's claim, so it ends at once without cloning."""

    def __init__(self, claim_ok: Callable[[str], bool] = lambda job_id: True) -> None:
        self.claim_ok = claim_ok
        self.calls: list[tuple[float, str, str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._httpd = _ConvexServer(("127.0.0.1", 0), _ConvexHandler)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def record(self, path: str, args: dict[str, Any]) -> None:
        with self._lock:
            self.calls.append((time.monotonic(), path, str(args.get("jobId", "")), args))

    def snapshot(self) -> list[tuple[float, str, str, dict[str, Any]]]:
        with self._lock:
            return list(self.calls)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> FakeConvex:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def run_json(argv: list[str], timeout_s: float, env: dict[str, str] | None = None) -> Any:
    """Run a helper process (e.g. the load generator) and parse its last stdout line."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    try:
        out = subprocess.run(
            argv,
            cwd=REPO_ROOT,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{argv[2:4]} ran longer than {timeout_s:g}s") from None
    if out.returncode != 0:
        raise BenchError(f"{' '.join(argv[:4])} failed ({out.returncode}): {out.stderr[-2000:]}")
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    if not lines:
        raise BenchError(f"{argv[2:4]} printed nothing: {out.stderr[-2000:]}")
    return json.loads(lines[-1])


def wait_port(port: int, timeout_s: float = 15.0) -> None:
    def up() -> bool:
        with socket.socket() as s:
            s.settimeout(0.2)
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_for(up, timeout_s, f"127.0.0.1:{port}")


__all__ += ["PY", "free_port", "job_status", "median", "post_job", "run_json", "wait_port"]
