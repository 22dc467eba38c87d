"""A tiny local stand-in for the Scaleway Serverless Containers API v1 and Serverless Jobs API
v1alpha2, for the deploy and overflow tests.

Containers: what `python -m deploy` uses: namespaces list/create/get, containers
list/create/get/update/redeploy. Jobs: job definitions CRUD, their secret references, `start`
(which launches the run *locally* as a subprocess, `fondation-worker run-one` by default, with
the definition's environment, its secret references resolved from `secret_manager`, and the
start's environment overrides; every start's overrides are recorded in `starts`, as Scaleway
keeps them in the run history), job runs get/list, and `stop` (SIGTERM, then SIGKILL after
`stop_grace_s`). `JOBS_TOKEN` stands for an IAM key limited to Serverless Jobs: it is accepted
on the jobs API only. It checks the `X-Auth-Token` header, records every request,
filters lists by *substring* of the name (so callers must compare names exactly), paginates
with a small page size, and moves containers through `creating`/`updating` to `ready` (or
`error` when told) after a few polls. Point the real SDK at it with `SCW_API_URL`.
It refuses (400) what the API refuses and the SDK does not check: a timeout outside
10-3600 s, a probe interval outside 5-120 s, a failure threshold outside 3-50.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

ACCESS_KEY = "SCWFAKEFAKEFAKEFAKE1"
SECRET_KEY = "11111111-2222-4333-8444-555555555555"
PROJECT_ID = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"
ORGANIZATION_ID = PROJECT_ID
REGION = "fr-par"

JOBS_TOKEN = "22222222-3333-4444-8555-666666666666"  # an IAM key limited to Serverless Jobs
_PREFIX = re.compile(r"^/containers/v1/regions/(?P<region>[a-z0-9-]+)(?P<rest>/.*)$")
_JOBS = re.compile(r"^/serverless-jobs/v1alpha2/regions/(?P<region>[a-z0-9-]+)(?P<rest>/.*)$")
_DEFINITION_FIELDS = (
    "name",
    "cpu_limit",
    "memory_limit",
    "local_storage_capacity",
    "image_uri",
    "environment_variables",
    "description",
    "startup_command",
    "args",
    "job_timeout",
    "retry_policy",
)
RUN_COMMAND = (sys.executable, "-m", "app", "run-one")
_CONTAINER_FIELDS = (
    "environment_variables",
    "min_scale",
    "max_scale",
    "memory_limit_bytes",
    "mvcpu_limit",
    "timeout",
    "privacy",
    "description",
    "image",
    "protocol",
    "port",
    "https_connections_only",
    "sandbox",
    "local_storage_limit_bytes",
    "scaling_option",
    "liveness_probe",
    "startup_probe",
    "tags",
    "private_network_id",
    "command",
    "args",
)


def _seconds(value: Any) -> float:
    return float(str(value).rstrip("s"))


def invalid_settings(body: dict[str, Any]) -> str | None:
    """The API's range checks on a create or update body (None when it passes)."""
    timeout = body.get("timeout")
    if timeout is not None and not 10 <= _seconds(timeout) <= 3600:
        return "timeout must be between 10s and 3600s"
    for key in ("liveness_probe", "startup_probe"):
        probe = body.get(key)
        if not probe:
            continue
        if not 5 <= _seconds(probe.get("interval", "10s")) <= 120:
            return f"{key}.interval must be between 5s and 120s"
        if not 3 <= int(probe.get("failure_threshold", 3)) <= 50:
            return f"{key}.failure_threshold must be between 3 and 50"
    return None


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any


@dataclass
class StartRecord:
    """One `start` as the API saw it: the overrides are what the run history keeps."""

    definition_id: str
    run_id: str
    env_overrides: dict[str, str]
    at_monotonic: float


@dataclass
class FakeRun:
    data: dict[str, Any]
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class FakeScaleway:
    """State and knobs of the fake API; `url` is set once `start()` returns."""

    page_size: int = 1
    polls_until_done: int = 2
    fail_with: str | None = None  # next rollouts end in `error` with this message
    namespaces: dict[str, dict[str, Any]] = field(default_factory=dict)
    containers: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    url: str = ""
    # Jobs: runs launch `run_command` in `run_cwd` with `run_base_env` (what the image would
    # hold) + the definition's env + resolved secret refs + the start's overrides.
    definitions: dict[str, dict[str, Any]] = field(default_factory=dict)
    secret_refs: dict[str, dict[str, Any]] = field(default_factory=dict)
    secret_manager: dict[str, str] = field(default_factory=dict)  # secret id -> value
    runs: dict[str, FakeRun] = field(default_factory=dict)
    starts: list[StartRecord] = field(default_factory=list)
    run_command: tuple[str, ...] = RUN_COMMAND
    run_base_env: dict[str, str] = field(default_factory=dict)
    run_cwd: str | None = None
    run_log_dir: Path | None = None
    # When set, each run gets its own DATA_DIR and WORK_DIR under it, as each real run has
    # its own ephemeral disk.
    run_data_root: Path | None = None
    stop_grace_s: float = 10.0
    on_start: Callable[[StartRecord], None] | None = None
    _pending: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FakeScaleway:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                status, payload = fake.handle(
                    self.command, self.path, raw, self.headers.get("X-Auth-Token")
                )
                data = b"" if status == 204 else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        for run in list(self.runs.values()):
            if run.proc is not None and run.proc.poll() is None:
                os.killpg(run.proc.pid, signal.SIGKILL)
                run.proc.wait(timeout=10)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # --- seeding and inspection --------------------------------------------------------------

    def add_namespace(self, name: str) -> dict[str, Any]:
        ns: dict[str, Any] = {
            "id": str(uuid.uuid4()),
            "name": name,
            "organization_id": ORGANIZATION_ID,
            "project_id": PROJECT_ID,
            "description": "",
            "status": "ready",
            "environment_variables": {},
            "secret_environment_variables": {},
            "tags": [],
            "region": REGION,
            "error_message": None,
        }
        self.namespaces[str(ns["id"])] = ns
        return ns

    def add_container(self, namespace_id: str, body: dict[str, Any]) -> dict[str, Any]:
        cid = str(uuid.uuid4())
        c: dict[str, Any] = {
            "id": cid,
            "namespace_id": namespace_id,
            "name": body["name"],
            "description": "",
            "status": "ready",
            "environment_variables": {},
            "secret_environment_variables": {},
            "min_scale": 0,
            "max_scale": 5,
            "memory_limit_bytes": 256 * 1024 * 1024,
            "mvcpu_limit": 140,
            "local_storage_limit_bytes": 1000 * 1024 * 1024,
            "privacy": "public",
            "image": "",
            "protocol": "http1",
            "port": 8080,
            "https_connections_only": False,
            "sandbox": "v2",
            "tags": [],
            "command": [],
            "args": [],
            "timeout": "300s",
            "public_endpoint": f"{body['name']}-{cid[:8]}.functions.fnc.fr-par.scw.cloud",
            "region": REGION,
            "error_message": None,
        }
        self._apply(c, body)
        self.containers[cid] = c
        return c

    def calls(self, method: str, pattern: str = "") -> list[Recorded]:
        return [r for r in self.requests if r.method == method and re.search(pattern, r.path)]

    # --- the API -----------------------------------------------------------------------------

    def _apply(self, c: dict[str, Any], body: dict[str, Any]) -> None:
        if "https_connection_only" in body:  # the v1 update spelling
            body = {**body, "https_connections_only": body["https_connection_only"]}
        for key in _CONTAINER_FIELDS:
            if key in body:
                c[key] = body[key]
        secrets = body.get("secret_environment_variables")
        if secrets:
            # The real API never returns secret values; it answers with a hash.
            c["secret_environment_variables"] = {
                k: "$argon2id$fake$" + str(abs(hash(v)))[:10] for k, v in secrets.items()
            }

    def _rollout(self, c: dict[str, Any], status: str) -> None:
        c["status"] = status
        c["error_message"] = None
        self._pending[c["id"]] = self.polls_until_done

    def _advance(self, c: dict[str, Any]) -> None:
        left = self._pending.get(c["id"])
        if left is None:
            return
        if left > 1:
            self._pending[c["id"]] = left - 1
            return
        del self._pending[c["id"]]
        if self.fail_with is not None:
            c["status"] = "error"
            c["error_message"] = self.fail_with
        else:
            c["status"] = "ready"

    def _page(self, items: list[dict[str, Any]], q: dict[str, list[str]], key: str) -> Any:
        page = int(q.get("page", ["1"])[0])
        size = int(q.get("page_size", [str(self.page_size)])[0])
        chunk = items[(page - 1) * size : page * size]
        return {key: chunk, "total_count": len(items)}

    def handle(self, method: str, raw_path: str, raw: bytes, token: str | None) -> tuple[int, Any]:
        parts = urlsplit(raw_path)
        query = parse_qs(parts.query)
        body = json.loads(raw) if raw else None
        with self._lock:
            self.requests.append(Recorded(method, parts.path, query, body))
            jobs = _JOBS.match(parts.path)
            if token != SECRET_KEY and not (jobs is not None and token == JOBS_TOKEN):
                return 401, {"message": "authentication is denied", "type": "denied_authentication"}
            if jobs is not None:
                return self._jobs_route(method, jobs.group("rest"), query, body or {})
            m = _PREFIX.match(parts.path)
            if m is None:
                return 404, {"message": "resource is not found", "type": "not_found"}
            return self._route(method, m.group("rest"), query, body or {})

    def _route(
        self, method: str, rest: str, q: dict[str, list[str]], body: dict[str, Any]
    ) -> tuple[int, Any]:
        name = q.get("name", [""])[0]
        if rest == "/namespaces" and method == "GET":
            items = [n for n in self.namespaces.values() if name in n["name"]]
            return 200, self._page(items, q, "namespaces")
        if rest == "/namespaces" and method == "POST":
            if body.get("project_id") != PROJECT_ID:
                return 400, {"message": "invalid project_id", "type": "invalid_arguments"}
            ns = self.add_namespace(body["name"])
            ns["status"] = "creating"
            return 200, ns
        if m := re.fullmatch(r"/namespaces/([^/]+)", rest):
            found_ns = self.namespaces.get(m.group(1))
            if found_ns is None or method != "GET":
                return 404, {"message": "namespace not found", "type": "not_found"}
            found_ns["status"] = "ready"
            return 200, found_ns
        if rest == "/containers" and method == "GET":
            nsid = q.get("namespace_id", [""])[0]
            items = [
                c
                for c in self.containers.values()
                if name in c["name"] and (not nsid or c["namespace_id"] == nsid)
            ]
            return 200, self._page(items, q, "containers")
        if rest == "/containers" and method == "POST":
            if body.get("namespace_id") not in self.namespaces:
                return 404, {"message": "namespace not found", "type": "not_found"}
            if not body.get("image") or not body.get("name"):
                return 400, {"message": "image and name are required", "type": "invalid"}
            if problem := invalid_settings(body):
                return 400, {"message": problem, "type": "invalid_arguments"}
            c = self.add_container(body["namespace_id"], body)
            self._rollout(c, "creating")
            return 200, c
        if m := re.fullmatch(r"/containers/([^/]+)(/redeploy)?", rest):
            found = self.containers.get(m.group(1))
            if found is None:
                return 404, {"message": "container not found", "type": "not_found"}
            c = found
            if m.group(2) and method == "POST":
                if c["status"] not in ("ready", "error"):
                    return 409, {"message": "resource is in a transient state"}
                self._rollout(c, "updating")
                return 200, c
            if method == "PATCH":
                if c["status"] not in ("ready", "error"):
                    return 409, {"message": "resource is in a transient state"}
                if problem := invalid_settings(body):
                    return 400, {"message": problem, "type": "invalid_arguments"}
                self._apply(c, body)
                self._rollout(c, "updating")
                return 200, c
            if method == "GET":
                self._advance(c)
                return 200, c
        return 404, {"message": f"no route for {method} {rest}", "type": "not_found"}

    # --- Serverless Jobs ---------------------------------------------------------------------

    def add_definition(self, body: dict[str, Any]) -> dict[str, Any]:
        now = _now_iso()
        d: dict[str, Any] = {
            "id": str(uuid.uuid4()),
            "name": body.get("name") or "job-fake",
            "project_id": PROJECT_ID,
            "cpu_limit": 0,
            "memory_limit": 0,
            "local_storage_capacity": 0,
            "image_uri": "",
            "environment_variables": {},
            "description": "",
            "startup_command": [],
            "args": [],
            "job_timeout": None,
            "retry_policy": {"max_retries": 0},
            "region": REGION,
            "created_at": now,
            "updated_at": now,
            "command": "",
            "cron_schedule": None,
        }
        for key in _DEFINITION_FIELDS:
            if key in body and body[key] is not None:
                d[key] = body[key]
        self.definitions[d["id"]] = d
        return d

    def run_env(self, run_id: str) -> dict[str, str]:
        """The environment the run's process was started with (for checks)."""
        return dict(self.runs[run_id].data["_env"])

    def process(self, run_id: str) -> subprocess.Popen[bytes] | None:
        return self.runs[run_id].proc

    def kill_run(self, run_id: str) -> None:
        """SIGKILL the run's process and every descendant (the CLI has its own process
        group), as a lost node ends a whole container."""
        import psutil

        proc = self.runs[run_id].proc
        if proc is None or proc.poll() is not None:
            return
        try:
            family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()

    def _secret_env(self, definition_id: str) -> dict[str, str]:
        out = {}
        for ref in self.secret_refs.values():
            if ref["job_definition_id"] == definition_id and ref.get("env_var"):
                out[ref["env_var"]["name"]] = self.secret_manager.get(ref["secret_manager_id"], "")
        return out

    def _launch(self, d: dict[str, Any], overrides: dict[str, str]) -> FakeRun:
        run_id = str(uuid.uuid4())
        env = {
            **self.run_base_env,
            **d["environment_variables"],
            **self._secret_env(d["id"]),
            **overrides,
        }
        if self.run_data_root is not None:
            env["DATA_DIR"] = str(self.run_data_root / run_id / "data")
            env["WORK_DIR"] = str(self.run_data_root / run_id / "work")
        now = _now_iso()
        data: dict[str, Any] = {
            "id": run_id,
            "job_definition_id": d["id"],
            "state": "running",
            "cpu_limit": d["cpu_limit"],
            "memory_limit": d["memory_limit"],
            "local_storage_capacity": d["local_storage_capacity"],
            # What Scaleway shows of a run: the definition's env and the overrides (not the
            # secret references' values).
            "environment_variables": {**d["environment_variables"], **overrides},
            "startup_command": d["startup_command"],
            "args": d["args"],
            "region": REGION,
            "created_at": now,
            "updated_at": now,
            "started_at": now,
            "terminated_at": None,
            "exit_code": None,
            "error_message": None,
            "reason": "unknown_reason",
            "attempts": 1,
            "_env": env,
        }
        log_path = (self.run_log_dir or Path("/tmp")) / f"run-{run_id}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                list(self.run_command),
                env=env,
                cwd=self.run_cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        run = FakeRun(data=data, proc=proc)
        self.runs[run_id] = run
        return run

    def _refresh(self, run: FakeRun) -> None:
        if run.proc is None or run.data["state"] not in ("running", "interrupting"):
            return
        code = run.proc.poll()
        if code is None:
            return
        run.data["exit_code"] = code
        run.data["terminated_at"] = _now_iso()
        if run.data["state"] == "interrupting":
            run.data["state"] = "interrupted"
        else:
            run.data["state"] = "succeeded" if code == 0 else "failed"

    def _public_run(self, run: FakeRun) -> dict[str, Any]:
        self._refresh(run)
        return {k: v for k, v in run.data.items() if not k.startswith("_")}

    def _stop_run(self, run: FakeRun) -> None:
        proc = run.proc
        if proc is None or proc.poll() is not None:
            return
        run.data["state"] = "interrupting"
        os.killpg(proc.pid, signal.SIGTERM)

        def reaper() -> None:
            try:
                proc.wait(timeout=self.stop_grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

        threading.Thread(target=reaper, daemon=True).start()

    def _jobs_route(
        self, method: str, rest: str, q: dict[str, list[str]], body: dict[str, Any]
    ) -> tuple[int, Any]:
        not_found = 404, {"message": "resource is not found", "type": "not_found"}
        if rest == "/job-definitions" and method == "GET":
            items = [
                d
                for d in self.definitions.values()
                if q.get("project_id", [PROJECT_ID])[0] == d["project_id"]
            ]
            return 200, self._page(items, q, "job_definitions")
        if rest == "/job-definitions" and method == "POST":
            if body.get("project_id") != PROJECT_ID:
                return 400, {"message": "invalid project_id", "type": "invalid_arguments"}
            if not body.get("image_uri") or not body.get("cpu_limit"):
                return 400, {"message": "image_uri and cpu_limit are required", "type": "invalid"}
            return 200, self.add_definition(body)
        if m := re.fullmatch(r"/job-definitions/([^/]+)(/start)?", rest):
            d = self.definitions.get(m.group(1))
            if d is None:
                return not_found
            if m.group(2) and method == "POST":
                overrides = {
                    str(k): str(v) for k, v in (body.get("environment_variables") or {}).items()
                }
                run = self._launch(d, overrides)
                record = StartRecord(d["id"], run.data["id"], overrides, time.monotonic())
                self.starts.append(record)
                if self.on_start is not None:
                    self.on_start(record)
                return 200, {"job_runs": [self._public_run(run)]}
            if method == "GET":
                return 200, d
            if method == "PATCH":
                for key in _DEFINITION_FIELDS:
                    if key in body and body[key] is not None:
                        d[key] = body[key]
                d["updated_at"] = _now_iso()
                return 200, d
            if method == "DELETE":
                del self.definitions[d["id"]]
                return 204, None
        if rest == "/secrets" and method == "GET":
            did = q.get("job_definition_id", [""])[0]
            items = [r for r in self.secret_refs.values() if r["job_definition_id"] == did]
            return 200, {"secrets": items, "total_count": len(items)}
        if rest == "/secrets" and method == "POST":
            did = body.get("job_definition_id")
            if did not in self.definitions:
                return not_found
            created = []
            for cfg in body.get("secrets") or []:
                if not cfg.get("env_var_name") and not cfg.get("path"):
                    return 400, {"message": "env_var_name or path is required", "type": "invalid"}
                ref = {
                    "secret_id": str(uuid.uuid4()),
                    "job_definition_id": did,
                    "secret_manager_id": cfg["secret_manager_id"],
                    "secret_manager_version": cfg["secret_manager_version"],
                    "env_var": {"name": cfg["env_var_name"]} if cfg.get("env_var_name") else None,
                    "file": {"path": cfg["path"]} if cfg.get("path") else None,
                }
                self.secret_refs[ref["secret_id"]] = ref
                created.append(ref)
            return 200, {"secrets": created}
        if m := re.fullmatch(r"/secrets/([^/]+)", rest):
            ref = self.secret_refs.get(m.group(1))
            if ref is None:
                return not_found
            if method == "DELETE":
                del self.secret_refs[ref["secret_id"]]
                return 204, None
            if method == "GET":
                return 200, ref
        if rest == "/job-runs" and method == "GET":
            did = q.get("job_definition_id", [""])[0]
            items = [
                self._public_run(r)
                for r in self.runs.values()
                if not did or r.data["job_definition_id"] == did
            ]
            return 200, self._page(items, q, "job_runs")
        if m := re.fullmatch(r"/job-runs/([^/]+)(/stop)?", rest):
            run = self.runs.get(m.group(1))
            if run is None:
                return not_found
            if m.group(2) and method == "POST":
                self._stop_run(run)
                return 200, self._public_run(run)
            if method == "GET":
                return 200, self._public_run(run)
        return 404, {"message": f"no route for {method} {rest}", "type": "not_found"}


def _now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def redacted_env(env: Mapping[str, str], secrets: Mapping[str, str]) -> dict[str, str]:
    """`env` with every value that contains one of `secrets` replaced (for assertion messages)."""
    return {
        k: ("<secret>" if any(s and s in v for s in secrets.values()) else v)
        for k, v in env.items()
    }


def use_fake_scaleway(
    monkeypatch: pytest.MonkeyPatch, server: FakeScaleway, config_dir: Path, webhook_secrets: str
) -> None:
    """Point the SDK (through `SCW_*`) and the deploy CLI at `server`, with fake credentials.

    Every inherited `SCW_*` variable is dropped and the config file path leads nowhere, so
    nothing from the machine's own Scaleway profile can leak into a test.
    """
    for var in list(os.environ):
        if var.startswith("SCW_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("SCW_CONFIG_PATH", str(config_dir / "no-config.yaml"))
    monkeypatch.setenv("SCW_ACCESS_KEY", ACCESS_KEY)
    monkeypatch.setenv("SCW_SECRET_KEY", SECRET_KEY)
    monkeypatch.setenv("SCW_DEFAULT_PROJECT_ID", PROJECT_ID)
    monkeypatch.setenv("SCW_DEFAULT_REGION", REGION)
    monkeypatch.setenv("SCW_API_URL", server.url)
    monkeypatch.setenv("WEBHOOK_SECRETS", webhook_secrets)
