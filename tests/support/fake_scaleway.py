"""A tiny local stand-in for the Scaleway Serverless Containers API v1, for the deploy tests.

Only what `python -m deploy` uses: namespaces list/create/get, containers
list/create/get/update/redeploy. It checks the `X-Auth-Token` header, records every request,
filters lists by *substring* of the name (so callers must compare names exactly), paginates
with a small page size, and moves containers through `creating`/`updating` to `ready` (or
`error` when told) after a few polls. Point the real SDK at it with `SCW_API_URL`.
It refuses (400) what the API refuses and the SDK does not check: a timeout outside
10-3600 s, a probe interval outside 5-120 s, a failure threshold outside 3-50.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

ACCESS_KEY = "SCWFAKEFAKEFAKEFAKE1"
SECRET_KEY = "11111111-2222-4333-8444-555555555555"
PROJECT_ID = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"
ORGANIZATION_ID = PROJECT_ID
REGION = "fr-par"

_PREFIX = re.compile(r"^/containers/v1/regions/(?P<region>[a-z0-9-]+)(?P<rest>/.*)$")
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
class FakeScaleway:
    """State and knobs of the fake API; `url` is set once `start()` returns."""

    page_size: int = 1
    polls_until_done: int = 2
    fail_with: str | None = None  # next rollouts end in `error` with this message
    namespaces: dict[str, dict[str, Any]] = field(default_factory=dict)
    containers: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    url: str = ""
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
                data = json.dumps(payload).encode()
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
            if token != SECRET_KEY:
                return 401, {"message": "authentication is denied", "type": "denied_authentication"}
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
