"""The example host app with the Fondation component, under convex-test, served over the Convex
HTTP API on 127.0.0.1.

Starts `deploy/bridge/server.ts` (Node, via tsx) and offers the calls tests need: the host's
functions (`jobs:create` enqueues as the host's server code does), test-only views of the
component's runs and docs, and a switch that makes the bridge unreachable (a TCP proxy in
front of it refuses connections). Settings are the host's `FONDATION_*` environment."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support.signing import SECRET
from tests.support.worker import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"


COMPONENT = DEPLOY / "convex" / "example" / "node_modules" / "@fondation" / "convex-worker"


def node_ready() -> bool:
    """Node, tsx, and the component installed into the example app (convex/pack-example.sh)."""
    return (
        shutil.which("node") is not None
        and (DEPLOY / "node_modules" / ".bin" / "tsx").exists()
        and (COMPONENT / "dist" / "component" / "schema.js").exists()
    )


class ConvexBridge:
    def __init__(self, log_path: Path, **env: Any) -> None:
        self.log_path = log_path
        self.env = {**os.environ, "PORT": "0", **{k: str(v) for k, v in env.items()}}
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        # One pooled client: a fresh httpx client per call costs ~60 ms (TLS context setup),
        # which made polling loops and per-call snapshots the slowest part of the tests.
        self.http = httpx.Client(timeout=30)

    def start(self, timeout_s: float = 60.0) -> ConvexBridge:
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(DEPLOY / "node_modules" / ".bin" / "tsx"), "bridge/server.ts"],
            cwd=DEPLOY,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        log.close()
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        line = b""
        # The first stdout line announces the address; read it with a bounded wait.
        reader = threading.Thread(
            target=lambda: setattr(self, "_first", self.proc.stdout.readline())
        )  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout=max(0.0, deadline - time.monotonic()))
        line = getattr(self, "_first", b"")
        if not line.startswith(b"bridge listening on "):
            self.stop()
            raise RuntimeError(f"bridge did not start: {line!r}\n{self.logs()}")
        self.url = line.decode().split("on ", 1)[1].strip()
        # Drain the rest of stdout so the bridge never blocks on a full pipe.
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()
        return self

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with self.log_path.open("ab") as log:
            for chunk in iter(lambda: self.proc.stdout.read(4096), b""):  # type: ignore[union-attr]
                log.write(chunk)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        drainer = getattr(self, "_drainer", None)
        if drainer is not None:
            drainer.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.http.close()

    def __enter__(self) -> ConvexBridge:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- Convex HTTP API -----------------------------------------------------------------

    def _api(self, kind: str, path: str, args: dict[str, Any]) -> Any:
        r = self.http.post(
            f"{self.url}/api/{kind}",
            json={"path": path, "args": args, "format": "json"},
            timeout=30,
        )
        doc = r.json()
        if doc.get("status") != "success":
            raise RuntimeError(f"{path}: {doc}")
        return doc["value"]

    def mutation(self, path: str, args: dict[str, Any]) -> Any:
        return self._api("mutation", path, args)

    def query(self, path: str, args: dict[str, Any]) -> Any:
        return self._api("query", path, args)

    def run(self, path: str, args: dict[str, Any] | None = None) -> Any:
        r = self.http.post(f"{self.url}/__test/run", json={"path": path, "args": args or {}})
        r.raise_for_status()
        return r.json()

    def call(self, path: str, args: dict[str, Any] | None = None) -> Any:
        """Any host function (internal ones too); its value, or RuntimeError."""
        doc = self.run(path, args)
        if doc.get("status") != "success":
            raise RuntimeError(f"{path}: {doc}")
        return doc["value"]

    def create(self, url: str, **extra: Any) -> str:
        """A host job for `url`, enqueued the way the host's server code does; its run id
        (the `jobId` the worker sees)."""
        ids = self.call(
            "jobs:create", {"userId": "user-1", "repositoryUrl": url, "ref": "main", **extra}
        )
        run_id = ids["runId"]
        assert isinstance(run_id, str)
        return run_id

    def table(self, name: str) -> list[dict[str, Any]]:
        """A table of the host app."""
        r = self.http.get(f"{self.url}/__test/table/{name}")
        r.raise_for_status()
        rows: list[dict[str, Any]] = r.json()
        return rows

    def component_table(self, name: str) -> list[dict[str, Any]]:
        """A table of the component (test-only: nothing exposes these over the API)."""
        r = self.http.get(f"{self.url}/__test/component/{name}")
        r.raise_for_status()
        rows: list[dict[str, Any]] = r.json()
        return rows

    def runs(self) -> list[dict[str, Any]]:
        """The component's runs, each with its lease's `lastSeq`, `leaseUntil` and `sends`."""
        r = self.http.get(f"{self.url}/__test/runs")
        r.raise_for_status()
        rows: list[dict[str, Any]] = r.json()
        return rows

    def docs(self, run_id: str) -> list[dict[str, Any]]:
        """The run's docs in reading order, through the host's `fondation.listDocs`."""
        out: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            page = self.call(
                "jobs:runDocs",
                {"runId": run_id, "paginationOpts": {"numItems": 50, "cursor": cursor}},
            )
            out += page["page"]
            if page["isDone"]:
                return out
            cursor = page["continueCursor"]

    def calls(self) -> list[dict[str, Any]]:
        r = self.http.get(f"{self.url}/__test/calls")
        r.raise_for_status()
        out: list[dict[str, Any]] = r.json()
        return out

    def job(self, run_id: str) -> dict[str, Any]:
        """The run (with its lease counters), or {} when unknown."""
        return next((r for r in self.runs() if r["_id"] == run_id), {})

    def host_job(self, run_id: str) -> dict[str, Any]:
        """The host's own `jobs` row for a run."""
        return next((j for j in self.table("jobs") if j.get("runId") == run_id), {})

    def wait_job(self, job_id: str, statuses: set[str], timeout_s: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            job = self.job(job_id) or {}
            if job.get("status") in statuses:
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} never reached {statuses}: {job}\n{self.logs()[-3000:]}")


# Short leases, claim timeout, sweep and backoff: a killed or failed attempt is retried
# within seconds instead of minutes.
FAST_RETRIES: dict[str, Any] = {
    "FONDATION_LEASE_MS": 3000,
    "FONDATION_CLAIM_TIMEOUT_MS": 5000,
    "FONDATION_SWEEP_INTERVAL_MS": 500,
    "FONDATION_RETRY_BASE_MS": 200,
}


def worker_bridge(log_path: Path, worker_port: int, **env: Any) -> ConvexBridge:
    """A bridge that dispatches to a worker on 127.0.0.1:`worker_port`, signing with the test
    SECRET, with FAST_RETRIES (`env` adds or overrides)."""
    return ConvexBridge(
        log_path,
        FONDATION_WORKER_URL=f"http://127.0.0.1:{worker_port}",
        FONDATION_WEBHOOK_SECRET=SECRET,
        **{**FAST_RETRIES, **env},
    )


class FlakyProxy:
    """A TCP proxy on 127.0.0.1 in front of `target_port`; `down()` makes it refuse new
    connections and cut open ones (Convex unreachable), `up()` restores it.

    `slow` maps a byte marker to a delay: a client→upstream chunk containing the marker (e.g.
    `b"fondation:putDocs"` in a request body) is held that long before it is forwarded."""

    def __init__(self, target_port: int, slow: dict[bytes, float] | None = None) -> None:
        self.target_port = target_port
        self.slow = dict(slow or {})
        self._listener: socket.socket | None = None
        self.port = 0
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.refused = 0

    def start(self) -> FlakyProxy:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(128)
        s.settimeout(0.2)
        self._listener = s
        self.port = int(s.getsockname()[1])
        self._stop.clear()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()
        return self

    def down(self) -> None:
        """Close the listener (new connections are refused) and every open connection."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            for c in self._conns:
                with contextlib.suppress(OSError):
                    c.close()
            self._conns.clear()

    def up(self) -> None:
        self.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                assert self._listener is not None
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b, slow in ((client, upstream, self.slow), (upstream, client, {})):
                threading.Thread(target=self._pipe, args=(a, b, slow), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, slow: dict[bytes, float]) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                for marker, delay_s in slow.items():
                    if marker in data:
                        time.sleep(delay_s)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"
