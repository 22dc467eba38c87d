"""Test helpers: bare git repositories with real commits, and a smart-HTTP git server on
127.0.0.1 (``git http-backend`` behind a threaded ``http.server``).

    root = tmp_path / "srv"
    make_repo(root / "demo.git", {"README.md": "# Demo\\n"}, tags={"v1": "release 1"})
    with GitHttpServer(root, require_token="t0k") as srv:
        url = srv.url_for("demo")          # http://127.0.0.1:<port>/demo.git
        ...
        srv.request_count, srv.requests, srv.saw_credentials_in_url

``StallingServer`` accepts connections and never answers (for timeout tests).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import os
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import unquote, urlsplit

__all__ = [
    "GitHttpServer",
    "RecordedRequest",
    "StallingServer",
    "git_env",
    "make_repo",
    "rev_parse",
]

FileContent = str | bytes


def git_env() -> dict[str, str]:
    """A deterministic environment for test-side git: no user/system config, fixed identity."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(
        GIT_CONFIG_GLOBAL="/dev/null",
        GIT_CONFIG_NOSYSTEM="1",
        GIT_AUTHOR_NAME="Test",
        GIT_AUTHOR_EMAIL="test@example.invalid",
        GIT_COMMITTER_NAME="Test",
        GIT_COMMITTER_EMAIL="test@example.invalid",
        GIT_TERMINAL_PROMPT="0",
    )
    return env


def _git(*args: str, cwd: Path) -> str:
    out = subprocess.run(
        ["git", *args], cwd=cwd, env=git_env(), capture_output=True, check=False, timeout=60
    )
    if out.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {out.stderr.decode(errors='replace')}")
    return out.stdout.decode().strip()


def _write(worktree: Path, files: Mapping[str, FileContent]) -> None:
    for name, content in files.items():
        target = worktree / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content, encoding="utf-8")


def make_repo(
    path: Path,
    files: Mapping[str, FileContent],
    *,
    commits: int = 1,
    branches: Mapping[str, Mapping[str, FileContent]] | None = None,
    tags: Mapping[str, str | None] | None = None,
    default_branch: str = "main",
) -> Path:
    """Create a bare repository at `path` (conventionally `<root>/<name>.git`).

    The default branch gets `files` in its first commit, then `commits - 1` more commits that
    each rewrite `HISTORY.txt`. Each entry of `branches` forks from the default branch's tip
    and adds its files in one commit. `tags` maps a name to an annotation message (annotated
    tag) or None (lightweight tag), all on the default branch's tip. The bare repo allows
    fetching any SHA (`uploadpack.allowAnySHA1InWant`) and refuses pushes over HTTP.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mkrepo-") as tmp:
        work = Path(tmp)
        _git("init", "-q", "-b", default_branch, str(work), cwd=work)
        _write(work, files)
        _git("add", "-A", cwd=work)
        _git("commit", "-q", "--allow-empty", "-m", "initial", cwd=work)
        for i in range(1, commits):
            (work / "HISTORY.txt").write_text(f"commit {i}\n", encoding="utf-8")
            _git("add", "-A", cwd=work)
            _git("commit", "-q", "-m", f"commit {i}", cwd=work)
        for name, message in (tags or {}).items():
            if message is None:
                _git("tag", name, cwd=work)
            else:
                _git("tag", "-a", name, "-m", message, cwd=work)
        for branch, branch_files in (branches or {}).items():
            _git("checkout", "-q", "-b", branch, default_branch, cwd=work)
            _write(work, branch_files)
            _git("add", "-A", cwd=work)
            _git("commit", "-q", "--allow-empty", "-m", f"on {branch}", cwd=work)
        _git("checkout", "-q", default_branch, cwd=work)
        _git("clone", "-q", "--bare", str(work), str(path), cwd=work)
    _git("config", "uploadpack.allowAnySHA1InWant", "true", cwd=path)
    _git("config", "uploadpack.allowReachableSHA1InWant", "true", cwd=path)
    _git("config", "http.receivepack", "false", cwd=path)
    for branch in branches or {}:  # `clone --bare` keeps every local branch as refs/heads/*
        _git("rev-parse", "--verify", f"refs/heads/{branch}", cwd=path)
    return path


def rev_parse(repo: Path, rev: str) -> str:
    """The commit a revision of `repo` names (tags are peeled)."""
    return _git("rev-parse", "--verify", f"{rev}^{{commit}}", cwd=repo)


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    authorization: str | None
    content_encoding: str | None


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    # Headers and body are two writes: without TCP_NODELAY, Nagle holds the second until the
    # client's delayed ACK (~40 ms per request; a fetch is three requests).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:
        return  # keep test output quiet

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
            self.server.owner._sent(len(body))

    def _serve(self) -> None:
        srv = self.server.owner
        auth = self.headers.get("Authorization")
        split = urlsplit(self.path)
        srv._record(
            RecordedRequest(self.command, self.path, auth, self.headers.get("Content-Encoding"))
        )
        body = self._read_body()
        for prefix, location in srv.redirects.items():
            if split.path.startswith(prefix):
                self._send(302, [("Location", location)], b"moved\n")
                return
        if srv.require_token is not None and not srv.authorized(auth):
            self._send(401, [("WWW-Authenticate", 'Basic realm="git"')], b"unauthorized\n")
            return
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": str(srv.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": "/dev/null",
            "REQUEST_METHOD": self.command,
            "PATH_INFO": unquote(split.path),
            "QUERY_STRING": split.query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": self.client_address[0],
            "SERVER_PROTOCOL": "HTTP/1.1",
        }
        if self.headers.get("Content-Encoding"):
            env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
        if self.headers.get("Git-Protocol"):
            env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
        try:
            out = subprocess.run(
                ["git", "http-backend"],
                input=body,
                env=env,
                capture_output=True,
                check=False,
                timeout=60,
            ).stdout
        except subprocess.TimeoutExpired:
            self._send(504, [], b"backend timeout\n")
            return
        head, sep, payload = out.partition(b"\r\n\r\n")
        if not sep:
            head, sep, payload = out.partition(b"\n\n")
        status = 200
        headers: list[tuple[str, str]] = []
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.strip().split()[0])
            elif name:
                headers.append((name.strip(), value.strip()))
        self._send(status, headers, payload)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: GitHttpServer


class GitHttpServer:
    """Serves every bare repo under `root` over smart HTTP on 127.0.0.1:<ephemeral> (or the
    given `host` and `port`).

    `require_token`: answer 401 unless the Authorization header carries the token (as a
    Bearer value or in the password of Basic credentials). `redirects`: URL path prefix →
    Location, answered with 302 before anything else. Every request is recorded in
    `requests`; `saw_credentials_in_url` is True if any request path held the token or
    userinfo-looking text.
    """

    # Fault tests subclass the server with their own request handler (or server class).
    handler_class: type[BaseHTTPRequestHandler] = _Handler
    server_class: type[_Server] = _Server

    def __init__(
        self,
        root: Path,
        *,
        require_token: str | None = None,
        redirects: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.root = root
        self.host = host
        self._bind_port = port
        self.require_token = require_token
        self.redirects = dict(redirects or {})
        self.requests: list[RecordedRequest] = []
        self.bytes_sent = 0  # response bodies, all requests (what clients fetched)
        self._lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        httpd = self.server_class((self.host, self._bind_port), self.handler_class)
        httpd.owner = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- addresses ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url_for(self, name: str) -> str:
        """URL of the bare repo `<root>/<name>.git` (`name` may already end with .git)."""
        name = name if name.endswith(".git") else f"{name}.git"
        return f"{self.base_url}/{name}"

    # -- observations ------------------------------------------------------------------------

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _sent(self, n: int) -> None:
        with self._lock:
            self.bytes_sent += n

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)

    def paths(self) -> list[str]:
        with self._lock:
            return [r.path for r in self.requests]

    @property
    def saw_credentials_in_url(self) -> bool:
        with self._lock:
            paths = [r.path for r in self.requests]
        token = self.require_token
        return any("@" in p or (token is not None and token in p) for p in paths)

    def authorized(self, header: str | None) -> bool:
        if header is None or self.require_token is None:
            return False
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            return value.strip() == self.require_token
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode()
            except (ValueError, UnicodeDecodeError):
                return False
            return decoded.partition(":")[2] == self.require_token
        return False


class StallingServer:
    """Accepts TCP connections on 127.0.0.1 and never answers; `url_for` like GitHttpServer."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.1)
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self.accepted = 0

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            self._conns.append(conn)
            self.accepted += 1

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def url_for(self, name: str) -> str:
        return f"{self.base_url}/{name if name.endswith('.git') else name + '.git'}"

    def __enter__(self) -> StallingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in self._conns:
            conn.close()
        self._sock.close()


def gzip_body(data: bytes) -> bytes:
    """Helper for tests that post gzip-encoded bodies to the server by hand."""
    return gzip.compress(data)


@contextlib.contextmanager
def serve_new_root(root: Path) -> Iterator[tuple[Path, GitHttpServer]]:
    """Create the empty folder `root` and serve it: tests add repositories as they go."""
    root.mkdir()
    with GitHttpServer(root) as server:
        yield root, server
