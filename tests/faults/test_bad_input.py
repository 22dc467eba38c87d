"""Bad input against a real worker process: slow-loris bodies, oversized bodies (declared and
chunked), property-based fuzzing over HTTP, the repository URL policy with names that resolve
to loopback, and redirects to a private address."""

from __future__ import annotations

import contextlib
import json
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.gitserver import GitHttpServer, make_repo
from tests.support.jobs import job, post_start, processes_under, sim, submit, wait_for
from tests.support.signing import OTHER_SECRET, headers_for, start_body
from tests.support.worker import WorkerProcess, base_env

pytestmark = pytest.mark.faults

BODY_TIMEOUT_S = 10.0  # app.routes.BODY_READ_TIMEOUT_S, the contract's "not sent within 10 s"
MAX_BODY = 65536
FIGURES: dict[str, object] = {}


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad-repos")
    make_repo(root / "happy.git", sim())
    return root


@pytest.fixture(scope="module")
def git_server(repos: Path) -> Iterator[GitHttpServer]:
    with GitHttpServer(repos) as server:
        yield server


@pytest.fixture(scope="module")
def worker(
    tmp_path_factory: pytest.TempPathFactory, git_server: GitHttpServer
) -> Iterator[WorkerProcess]:
    tmp = tmp_path_factory.mktemp("bad-input")
    w = WorkerProcess(base_env(tmp, MAX_CONCURRENT_JOBS="4"), tmp / "worker.log").start()
    yield w
    w.stop(timeout_s=30)


def _head(w: WorkerProcess, extra: str = "", length: int | None = 1000) -> bytes:
    framing = f"Content-Length: {length}\r\n" if length is not None else ""
    return (
        "POST /v1/webhooks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"webhook-id: loris:1\r\nwebhook-timestamp: {int(time.time())}\r\n"
        f"webhook-signature: v1,AAAA\r\n{framing}{extra}\r\n"
    ).encode()


class Loris(threading.Thread):
    """One slow-loris connection, until the server answers or closes (or `limit_s` passes).

    `body`/`chunked`: headers at once, then the body one byte every `gap_s`; `head`: the
    request line, then one header line every `gap_s`, never the blank line; `silent`: connect
    and send nothing. Records the seconds from the first byte (connect for `silent`) to the
    answer or close, and the answer's status line (empty when closed without one)."""

    def __init__(self, w: WorkerProcess, mode: str = "body", gap_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.w, self.mode, self.gap_s = w, mode, gap_s
        self.status_line = b""
        self.closed = False
        self.elapsed_s = -1.0

    def run(self) -> None:
        limit_s = BODY_TIMEOUT_S + 8
        drip = {"body": b"{", "chunked": b"1\r\n{\r\n", "head": b"X-Drip: a\r\n", "silent": b""}
        with socket.create_connection(("127.0.0.1", self.w.port), timeout=limit_s) as s:
            if self.mode == "chunked":
                s.sendall(_head(self.w, "Transfer-Encoding: chunked\r\n", None))
            elif self.mode == "body":
                s.sendall(_head(self.w))
            elif self.mode == "head":
                s.sendall(b"POST /v1/webhooks HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            t0 = time.monotonic()
            s.settimeout(self.gap_s)
            answer = b""
            while time.monotonic() - t0 < limit_s:
                try:
                    answer = s.recv(4096)
                    self.closed = answer == b""
                    break  # an answer, or b"" when the server closed
                except TimeoutError:
                    pass
                except ConnectionResetError:
                    self.closed = True
                    break
                try:
                    s.sendall(drip[self.mode])
                except OSError:
                    self.closed = True
                    break
            self.elapsed_s = time.monotonic() - t0
            self.status_line = answer.split(b"\r\n", 1)[0]


@pytest.mark.timeout(90)
def test_slow_loris_gets_408_and_many_do_not_block_a_webhook(
    worker: WorkerProcess, git_server: GitHttpServer
) -> None:
    modes = ["body"] * 4 + ["chunked", "head", "silent"]
    lorises = [Loris(worker, modes[i % len(modes)]) for i in range(70)]
    for lo in lorises:
        lo.start()
    time.sleep(2.0)  # every loris is mid-body now
    # A normal webhook and the probes are answered at once meanwhile.
    t0 = time.monotonic()
    submit(worker, "amid-loris", git_server.url_for("happy"))
    ack_s = time.monotonic() - t0
    t0 = time.monotonic()
    assert httpx.get(f"{worker.url}/healthz", timeout=5).status_code == 200
    health_s = time.monotonic() - t0
    assert ack_s < 1.0 and health_s < 1.0, (ack_s, health_s)
    assert worker.wait_status("amid-loris", {"completed"}, timeout_s=60)["status"] == "completed"
    for lo in lorises:
        lo.join(timeout=BODY_TIMEOUT_S + 15)
        assert not lo.is_alive()
    bodies = [lo for lo in lorises if lo.mode in ("body", "chunked")]
    heads = [lo for lo in lorises if lo.mode in ("head", "silent")]
    statuses = {lo.status_line for lo in bodies}
    assert statuses == {b"HTTP/1.1 408 Request Timeout"}, statuses
    # A head that never completes: the connection is closed (HEAD_READ_TIMEOUT_S, 10 s).
    assert all(lo.closed and not lo.status_line for lo in heads), [
        (lo.mode, lo.status_line, lo.elapsed_s) for lo in heads
    ]
    for group, name in ((bodies, "408"), (heads, "close")):
        times = sorted(lo.elapsed_s for lo in group)
        # At 10 s from the connection's first byte; never before, and not much later.
        assert times[0] >= BODY_TIMEOUT_S - 0.5 and times[-1] <= BODY_TIMEOUT_S + 2.0, times
        FIGURES[f"loris_{len(group)}_time_to_{name}_s"] = (round(times[0], 2), round(times[-1], 2))
    FIGURES["webhook_ack_amid_70_loris_s"] = round(ack_s, 3)
    FIGURES["healthz_amid_70_loris_s"] = round(health_s, 3)
    # No job, no delivery from any of them.
    assert {j["jobId"] for j in httpx.get(f"{worker.url}/v1/jobs").json()["jobs"]} >= {"amid-loris"}
    assert "loris" not in _delivery_ids(worker)
    print(f"\nFIGURES loris: {FIGURES}")


def _delivery_ids(w: WorkerProcess) -> set[str]:
    db = sqlite3.connect(f"file:{Path(w.env['DATA_DIR']) / 'jobs.sqlite3'}?mode=ro", uri=True)
    try:
        tables = {r[0] for r in db.execute("select name from sqlite_master where type='table'")}
        ids: set[str] = set()
        for table in tables:
            cols = [r[1] for r in db.execute(f"pragma table_info({table})")]
            for col in ("webhook_id", "delivery_id"):
                if col in cols:
                    ids |= {r[0] for r in db.execute(f"select {col} from {table}")}
        return ids
    finally:
        db.close()


def _state(w: WorkerProcess) -> tuple[object, ...]:
    """Everything a webhook could change: every table's row count and the jobs list."""
    db = sqlite3.connect(f"file:{Path(w.env['DATA_DIR']) / 'jobs.sqlite3'}?mode=ro", uri=True)
    try:
        tables = sorted(
            r[0] for r in db.execute("select name from sqlite_master where type='table'")
        )
        counts = tuple((t, db.execute(f"select count(*) from {t}").fetchone()[0]) for t in tables)
    finally:
        db.close()
    jobs = httpx.get(f"{w.url}/v1/jobs", timeout=5).json()["jobs"]
    return counts, tuple(sorted((j["jobId"], j["status"]) for j in jobs))


def _raw(w: WorkerProcess, data: bytes, timeout_s: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", w.port), timeout=timeout_s) as s:
        s.sendall(data)
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while len(out) < 65536:
                piece = s.recv(65536)
                if not piece:
                    break
                out += piece
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def test_oversized_bodies_declared_and_chunked(worker: WorkerProcess) -> None:
    # Declared far over the limit, nothing sent: answered from the headers alone.
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", worker.port), timeout=10) as s:
        s.sendall(_head(worker, length=4 * 1024**3))
        answer = s.recv(4096)
    FIGURES["declared_4GiB_to_413_s"] = round(time.monotonic() - t0, 3)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"application/problem+json" in answer
    # Chunked and endless: 413 once past the limit; the server stops reading.
    with socket.create_connection(("127.0.0.1", worker.port), timeout=10) as s:
        s.sendall(_head(worker, "Transfer-Encoding: chunked\r\n", None))
        s.settimeout(0.01)
        chunk = b"2000\r\n" + b"x" * 0x2000 + b"\r\n"
        sent, answer, t0 = 0, b"", time.monotonic()
        while time.monotonic() - t0 < 10 and not answer:
            try:
                s.sendall(chunk)
                sent += 0x2000
            except OSError:
                break
            with contextlib.suppress(TimeoutError):
                answer = s.recv(4096)
        if not answer:
            s.settimeout(5)
            answer = s.recv(4096)
    FIGURES["chunked_bytes_sent_before_413"] = sent
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # The boundary: exactly MAX_BODY_BYTES is read (and judged on its signature), one more not.
    for size, expected in ((MAX_BODY, 401), (MAX_BODY + 1, 413)):
        body = b"{" + b" " * (size - 2) + b"}"
        h = headers_for(body, "edge:1", secret=OTHER_SECRET)
        assert httpx.post(f"{worker.url}/v1/webhooks", content=body, headers=h).status_code == (
            expected
        )

        def gen(data: bytes = body) -> Iterator[bytes]:
            for i in range(0, len(data), 1000):
                yield data[i : i + 1000]

        r = httpx.post(f"{worker.url}/v1/webhooks", content=gen(), headers=h, timeout=10)
        assert r.status_code == expected, (size, r.status_code)
    # Content-Length that is not a number.
    assert _raw(
        worker, _head(worker, length=None)[:-2] + b"Content-Length: 1e3\r\n\r\n"
    ).startswith(b"HTTP/1.1 400")
    print(f"\nFIGURES oversized: {FIGURES}")


# -- fuzz over real HTTP -------------------------------------------------------------------

HEADER_NAMES = ["webhook-id", "webhook-timestamp", "webhook-signature", "content-type"]
printable = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60)
header_value = printable.map(str.strip)  # h11 refuses to send padded values itself


@st.composite
def unsigned_requests(draw: st.DrawFn, url: str) -> tuple[dict[str, str], bytes]:
    """Requests that must never be accepted: no signature, a signature by another secret,
    a valid signature over another body or id, or a timestamp outside the tolerance."""
    job_id = draw(st.from_regex(r"[a-z][a-z0-9]{0,12}", fullmatch=True))
    body = draw(
        st.one_of(
            st.just(start_body(job_id, url)),
            st.binary(max_size=300),
            st.builds(lambda s: s.encode(), printable),
        )
    )
    kind = draw(st.sampled_from(["none", "other-secret", "other-body", "old", "future", "junk"]))
    msg_id = f"{job_id}:1"
    now = int(time.time())
    if kind == "none":
        headers: dict[str, str] = {"content-type": "application/json", "webhook-id": msg_id}
    elif kind == "other-secret":
        headers = headers_for(body, msg_id, secret=OTHER_SECRET)
    elif kind == "other-body":
        headers = headers_for(body + b" ", msg_id)
    elif kind == "old":
        headers = headers_for(body, msg_id, ts=now - 301 - draw(st.integers(0, 10**6)))
    elif kind == "future":
        headers = headers_for(body, msg_id, ts=now + 301 + draw(st.integers(0, 10**6)))
    else:
        headers = headers_for(body, msg_id)
        name = draw(st.sampled_from(HEADER_NAMES))
        headers[name] = draw(header_value)
        if name == "content-type":  # a bad content type alone leaves the signature valid
            headers["webhook-signature"] = "v1," + draw(header_value)
    extra = draw(st.dictionaries(st.sampled_from(["x-a", "accept", "user-agent"]), header_value))
    return {**headers, **extra}, body


@pytest.mark.timeout(150)
def test_fuzz_real_server_no_5xx_no_state_change_without_signature(
    worker: WorkerProcess, git_server: GitHttpServer
) -> None:
    url = git_server.url_for("happy")
    before = _state(worker)
    seen: dict[int, int] = {}
    with httpx.Client(base_url=worker.url, timeout=10) as client:

        @settings(
            max_examples=250,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(req=unsigned_requests(url))
        def check(req: tuple[dict[str, str], bytes]) -> None:
            headers, body = req
            r = client.post("/v1/webhooks", content=body, headers=headers)
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            assert r.status_code < 500, r.text
            assert r.status_code in (400, 401, 413), (r.status_code, r.text)
            assert r.headers["content-type"] == "application/problem+json"
            assert set(r.json()) == {"type", "title", "status", "detail"}

        check()

        # Raw HTTP garbage: the server answers 4xx or closes, never 5xx, and stays up.
        @settings(max_examples=120, deadline=None, database=None)
        @given(
            line=st.sampled_from(
                [b"POST /v1/webhooks HTTP/1.1", b"POST /v1/webhooks HTTP/1.0", b"GET / HTTP/9"]
            ),
            fields=st.lists(
                st.tuples(
                    st.sampled_from(
                        [
                            b"Content-Length",
                            b"Transfer-Encoding",
                            b"Content-Type",
                            b"Host",
                            b"webhook-id",
                            b"webhook-signature",
                            b"X\x00Y",
                            b" bad",
                        ]
                    ),
                    st.binary(max_size=30),
                ),
                max_size=6,
            ),
            body=st.binary(max_size=200),
        )
        def check_raw(line: bytes, fields: list[tuple[bytes, bytes]], body: bytes) -> None:
            head = line + b"\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in fields)
            answer = _raw(worker, head + b"\r\n" + body, timeout_s=BODY_TIMEOUT_S + 3)
            status = answer[9:12]
            if status:
                assert not status.startswith(b"5"), answer[:300]
                seen[int(status)] = seen.get(int(status), 0) + 1

        check_raw()

        # Signed, but the envelope mutated at one place: answered 4xx, never 5xx. The URL's
        # host is not allowed, so even a still-valid start records nothing.
        json_values = st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | printable,
            lambda c: st.lists(c, max_size=3) | st.dictionaries(printable, c, max_size=3),
            max_leaves=6,
        )
        paths = st.sampled_from(
            [
                ("type",),
                ("data",),
                ("data", "jobId"),
                ("data", "attempt"),
                ("data", "callbackToken"),
                ("data", "repository"),
                ("data", "repository", "url"),
                ("data", "repository", "ref"),
                ("data", "options"),
                ("data", "priority"),
                ("data", "options", "model"),
                ("data", "options", "steps"),
                ("extra",),
            ]
        )

        @settings(max_examples=150, deadline=None, database=None)
        @given(path=paths, value=json_values, n=st.integers(0, 10**6))
        def check_signed(path: tuple[str, ...], value: object, n: int) -> None:
            doc = json.loads(start_body(f"sg{n}", "https://example.org/o/r.git"))
            doc["data"]["options"] = {"model": "claude-sonnet-4-20250514"}
            node = doc
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
            body = json.dumps(doc).encode()
            r = client.post("/v1/webhooks", content=body, headers=headers_for(body, f"sg{n}:1"))
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            assert r.status_code in (400, 404, 422), (r.status_code, r.text, path, value)
            assert r.headers["content-type"] == "application/problem+json"

        check_signed()
    assert httpx.get(f"{worker.url}/healthz").status_code == 200
    assert _state(worker) == before
    # The oracle works: the same kind of request, correctly signed, does change the state.
    submit(worker, "fuzzcontrol", url)
    worker.wait_status("fuzzcontrol", {"completed"}, timeout_s=60)
    assert _state(worker) != before
    FIGURES["fuzz_statuses"] = dict(sorted(seen.items()))
    print(f"\nFIGURES fuzz: {FIGURES}")


# -- repository URL policy ----------------------------------------------------------------


@pytest.fixture(scope="module")
def strict_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    tmp = tmp_path_factory.mktemp("strict")
    env = base_env(tmp, ALLOW_PRIVATE_NETWORKS="0", ALLOWED_GIT_HOSTS="127.0.0.1,localhost")
    w = WorkerProcess(env, tmp / "worker.log").start()
    yield w
    w.stop(timeout_s=30)


def test_loopback_names_refused_without_private_networks(
    strict_worker: WorkerProcess, git_server: GitHttpServer
) -> None:
    port = git_server.port
    before = git_server.request_count
    for i, url in enumerate(
        (
            f"http://localhost:{port}/happy.git",
            f"http://LOCALHOST.:{port}/happy.git",
            f"http://127.0.0.1:{port}/happy.git",
            f"http://127.1:{port}/happy.git",
            f"http://[::1]:{port}/happy.git",
            f"http://2130706433:{port}/happy.git",
            f"http://0x7f000001:{port}/happy.git",
        )
    ):
        r = post_start(strict_worker, f"lo{i}", url)
        assert r.status_code == 422, (url, r.status_code, r.text)
        assert r.headers["content-type"] == "application/problem+json"
        assert httpx.get(f"{strict_worker.url}/v1/jobs/lo{i}").status_code == 404
    for host in ("localhost", "127.0.0.1"):  # in ALLOWED_GIT_HOSTS: refused for the address
        r = post_start(strict_worker, "lo-x", f"http://{host}:{port}/happy.git")
        assert "loopback" in r.json()["detail"], r.text
    assert git_server.request_count == before  # nothing was fetched


@pytest.mark.timeout(90)
def test_redirect_to_a_private_address_is_not_followed(worker: WorkerProcess, repos: Path) -> None:
    with GitHttpServer(repos) as inner:
        target = f"{inner.base_url}/happy.git/info/refs?service=git-upload-pack"
        meta = "http://169.254.169.254/latest/meta-data/"
        with GitHttpServer(repos, redirects={"/moved.git": target, "/meta.git": meta}) as outer:
            submit(worker, "redir", outer.url_for("moved"))
            submit(worker, "redir-meta", outer.url_for("meta"))
            for job_id in ("redir", "redir-meta"):
                done = worker.wait_status(job_id, {"failed", "completed"}, timeout_s=60)
                assert done["status"] == "failed" and done["error"]["code"] == "clone_failed", done
            assert outer.request_count >= 2
            assert inner.request_count == 0, inner.paths()
            FIGURES["redirect_error"] = job(worker, "redir")["error"]["message"][:200]
    assert not processes_under(worker.env["WORK_DIR"])
    assert wait_for(lambda: not list(Path(worker.env["WORK_DIR"]).iterdir()), 5)
    print(f"\nFIGURES redirect: {FIGURES}")
