"""A real worker process (`python -m app serve`) on 127.0.0.1 for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support.signing import SECRET

REPO_ROOT = Path(__file__).resolve().parents[2]
SIMULATOR = f"{sys.executable} -m app.simulator analyze {{repo_dir}} --output-dir {{output_dir}}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(tmp: Path, **overrides: Any) -> dict[str, str]:
    """Environment for a test worker: loopback git allowed, simulator as the CLI."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp),
        "WEBHOOK_SECRETS": SECRET,
        "DATA_DIR": str(tmp / "data"),
        "WORK_DIR": str(tmp / "work"),
        "ALLOWED_GIT_HOSTS": "127.0.0.1,localhost",
        "ALLOW_INSECURE_GIT": "1",
        "ALLOW_PRIVATE_NETWORKS": "1",
        "FONDATION_COMMAND": SIMULATOR,
        "SHUTDOWN_GRACE_S": "8",
        "HEARTBEAT_S": "2",
        "PROGRESS_MIN_INTERVAL_S": "0.2",
        "CLONE_TIMEOUT_S": "30",
        "WORKER_ID": "test-worker",
        "LOG_LEVEL": "INFO",
        "PYTHONPATH": str(REPO_ROOT),
    }
    env.update({k: str(v) for k, v in overrides.items()})
    return env


class WorkerProcess:
    """Start, talk to and stop a worker; its JSON logs go to `log_path`."""

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        popen_kw: dict[str, Any] | None = None,
        python: str = sys.executable,
    ) -> None:
        self.popen_kw = popen_kw or {}  # e.g. user=... to run the worker unprivileged
        self.python = python
        self.port = free_port()
        self.env = {**env, "PORT": str(self.port), "HOST": "127.0.0.1"}
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.argv = [python, "-m", "app", "serve"]  # a benchmark may start a variant

    def start(self, timeout_s: float = 20.0) -> WorkerProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            **self.popen_kw,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"worker did not become healthy:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def wait_status(
        self, job_id: str, statuses: set[str], timeout_s: float = 30.0
    ) -> dict[str, Any]:
        """Poll GET /v1/jobs/{id} until its status is one of `statuses` (bounded)."""
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            r = httpx.get(f"{self.url}/v1/jobs/{job_id}", timeout=5.0)
            if r.status_code == 200:
                last = r.json()
                if last["status"] in statuses:
                    return last
            time.sleep(0.1)
        raise AssertionError(
            f"job {job_id} never reached {statuses}; last: {last}\n{self.logs()[-4000:]}"
        )
