"""The board through Starlette's TestClient: templates and their context, login, cookie flags,
forged and expired sessions, CSRF, the login rate limit, actions on the embedded store, and the
gate in front of the JSON job API."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from app.board.auth import COOKIE_NAME, hash_password
from app.clock import FakeClock
from app.config import load_settings
from app.domain import Doc, DocKind, Failure, FailureCode, JobSpec, JobStatus, Progress, Repository
from app.main import create_app
from tests.support.fakes import HeldReporter, public_resolver
from tests.support.signing import SECRET

PASSWORD = "correct horse battery staple"
URL = "https://github.com/owner/repo.git"


def make_client(tmp_path: Path, clock: FakeClock | None = None, **env: str) -> TestClient:
    settings = load_settings(
        {
            "WEBHOOK_SECRETS": SECRET,
            "DATA_DIR": str(tmp_path / "data"),
            "WORK_DIR": str(tmp_path / "work"),
            "SHUTDOWN_GRACE_S": "2",
            "WORKER_ID": "board-test",
            "HOST": "127.0.0.1",
            "BOARD_PASSWORD": PASSWORD,
            **env,
        }
    )
    app = create_app(
        settings,
        environ={},
        clock=clock or FakeClock(),
        resolver=public_resolver,
        reporter=HeldReporter(),
    )
    base = "https://testserver" if settings.host != "127.0.0.1" else "http://testserver"
    return TestClient(app, base_url=base, follow_redirects=False)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def client(tmp_path: Path, clock: FakeClock) -> Iterator[TestClient]:
    with make_client(tmp_path, clock) as c:
        yield c


def login(client: TestClient, password: str = PASSWORD) -> Any:
    return client.post("/board/login", data={"password": password, "next": "/board"})


def store(client: TestClient) -> Any:
    return client.app.state.services.store  # type: ignore[attr-defined]


def seed(client: TestClient, job_id: str, status: str, **kw: Any) -> JobSpec:
    """A job in `status`, written through the store's own runner-facing methods."""
    spec = JobSpec(job_id, 1, "tok", Repository(URL), priority=kw.get("priority", 0))
    s = store(client)
    s.record_start(f"{job_id}:1", "fp-" + job_id, spec)
    run = client.portal.call  # type: ignore[union-attr]
    if status == "accepted":
        return spec
    run(s.claim, spec)
    if status in ("analyzing", "completed", "failed"):
        for seq, step in enumerate((1, 2, 3), start=1):
            update = Progress(seq, JobStatus.ANALYZING, step, 6, f"step {step}", (f"log {step}",))
            run(s.progress, spec, update)
    if status == "completed":
        docs = [Doc("ch1", "Chapter 1", DocKind.CHAPTER, 1, kw.get("content", "# Hello\n"))]
        run(s.put_docs, spec, docs)
        run(s.complete, spec, 1, 1234)
    if status == "failed":
        run(s.fail, spec, Failure(FailureCode.CLI_FAILED, "the CLI exited with code 3", True))
    return spec


def csrf_of(response: Any) -> str:
    m = re.search(r'name="csrf-token" content="([^"]+)"', response.text)
    assert m, response.text[:500]
    return m.group(1)


# -- access --------------------------------------------------------------------------------


def test_board_is_off_without_a_password(tmp_path: Path) -> None:
    with make_client(tmp_path, BOARD_PASSWORD="") as c:
        assert c.get("/board").status_code == 404
        assert c.get("/board/login").status_code == 404
        assert c.post("/board/login", data={"password": ""}).status_code == 404


def test_board_without_session_redirects_to_login(client: TestClient) -> None:
    r = client.get("/board")
    assert r.status_code == 303 and r.headers["location"].startswith("/board/login")
    r = client.get("/board/login")
    assert r.template.name == "login.html"  # type: ignore[attr-defined]
    assert r.context["error"] is None  # type: ignore[attr-defined]


def test_wrong_password_is_refused(client: TestClient) -> None:
    r = login(client, "wrong")
    assert r.status_code == 401
    assert r.template.name == "login.html"  # type: ignore[attr-defined]
    assert r.context["error"] == "Wrong password."  # type: ignore[attr-defined]
    assert COOKIE_NAME not in r.cookies
    assert client.get("/board").status_code == 303


def test_login_sets_a_signed_httponly_lax_expiring_cookie(client: TestClient) -> None:
    r = login(client)
    assert r.status_code == 303 and r.headers["location"] == "/board"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE_NAME}=")
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Max-Age=28800" in cookie
    assert "Secure" not in cookie  # loopback development
    assert PASSWORD not in cookie
    assert client.get("/board").status_code == 200


def test_cookie_is_secure_beyond_loopback(tmp_path: Path) -> None:
    with make_client(tmp_path, HOST="0.0.0.0") as c:
        cookie = login(c).headers["set-cookie"]
        assert "Secure" in cookie and "HttpOnly" in cookie


def test_hashed_password(tmp_path: Path) -> None:
    hashed = hash_password("s3cret")
    with make_client(tmp_path, BOARD_PASSWORD="", BOARD_PASSWORD_HASH=hashed) as c:
        assert login(c, "nope").status_code == 401
        assert login(c, "s3cret").status_code == 303


def test_forged_cookie_is_refused(client: TestClient) -> None:
    login(client)
    genuine = client.cookies[COOKIE_NAME]
    payload, _, _sig = genuine.rpartition(".")
    for forged in (payload + ".AAAAAAAAAAAAAAAAAAAAAAAAAAA", "eyJzaWQiOiJ4In0.forged.sig"):
        client.cookies.clear()
        client.cookies.set(COOKIE_NAME, forged)
        assert client.get("/board").status_code == 303
    client.cookies.clear()
    client.cookies.set(COOKIE_NAME, genuine)
    assert client.get("/board").status_code == 200


def test_cookie_from_another_secret_is_refused(tmp_path: Path) -> None:
    with make_client(tmp_path / "a", BOARD_SESSION_SECRET="one") as a:
        login(a)
        cookie = a.cookies[COOKIE_NAME]
    with make_client(tmp_path / "b", BOARD_SESSION_SECRET="two") as b:
        b.cookies.set(COOKIE_NAME, cookie)
        assert b.get("/board").status_code == 303


def test_expired_cookie_is_refused(client: TestClient, clock: FakeClock) -> None:
    login(client)
    assert client.get("/board").status_code == 200
    clock.advance(8 * 3600 + 5)  # the session TTL
    assert client.get("/board").status_code == 303


def test_failed_logins_are_rate_limited(client: TestClient, clock: FakeClock) -> None:
    for _ in range(5):
        assert login(client, "wrong").status_code == 401
    r = login(client)  # even the right password, while limited
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    assert COOKIE_NAME not in r.cookies
    clock.advance(301)
    assert login(client).status_code == 303


def test_board_sends_security_headers(client: TestClient) -> None:
    login(client)
    r = client.get("/board")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["cache-control"] == "no-store"


# -- pages ---------------------------------------------------------------------------------


def test_board_template_and_context(client: TestClient) -> None:
    seed(client, "done-1", "completed")
    seed(client, "bad-1", "failed")
    seed(client, "run-1", "analyzing")
    login(client)
    r = client.get("/board")
    assert r.status_code == 200
    assert r.template.name == "board.html"  # type: ignore[attr-defined]
    snap = r.context["snap"]  # type: ignore[attr-defined]
    assert dict(snap.counts) == {"analyzing": 1, "completed": 1, "failed": 1}
    assert [j.job_id for j in snap.running] == ["run-1"]
    assert snap.running[0].current_step == 3 and snap.running[0].percent == 50
    assert snap.running[0].runner == "warm board-test"
    assert {j.job_id for j in snap.recent} == {"done-1", "bad-1"}
    bad = next(j for j in snap.recent if j.job_id == "bad-1")
    assert (bad.error_code, bad.can_retry) == ("cli_failed", True)
    assert "the CLI exited with code 3" in r.text and "cli_failed" in r.text
    assert r.context["csrf"]  # type: ignore[attr-defined]


def test_board_paginates_finished_jobs(client: TestClient, clock: FakeClock) -> None:
    for i in range(45):
        seed(client, f"done-{i:02d}", "completed")
        clock.advance(1)
    login(client)
    pages = [client.get(f"/board?page={n}").context["snap"] for n in (1, 2, 3)]  # type: ignore[attr-defined]
    assert [len(p.recent) for p in pages] == [20, 20, 5]
    assert [p.has_next for p in pages] == [True, True, False]
    ids = [j.job_id for p in pages for j in p.recent]
    assert ids == [f"done-{i:02d}" for i in reversed(range(45))]  # newest first, no overlap


def test_job_page_shows_attempts_steps_logs_and_docs(client: TestClient, clock: FakeClock) -> None:
    seed(client, "done-1", "completed")
    login(client)
    r = client.get("/board/jobs/done-1")
    assert r.template.name == "job.html"  # type: ignore[attr-defined]
    detail = r.context["detail"]  # type: ignore[attr-defined]
    assert [a.attempt for a in detail.attempts] == [1]
    assert [s.step for s in detail.steps] == [1, 2, 3]
    assert detail.logs == ("log 1", "log 2", "log 3")
    assert [d.slug for d in detail.docs] == ["ch1"]
    assert client.get("/board/jobs/nope").status_code == 404


def test_doc_reader_escapes_hostile_markdown(client: TestClient) -> None:
    hostile = (
        "# Title\n\n<script>alert(1)</script>\n\n<img src=x onerror=alert(2)>\n\n"
        "[click](javascript:alert(3))\n\n**bold**\n"
    )
    seed(client, "doc-1", "completed", content=hostile)
    login(client)
    r = client.get("/board/jobs/doc-1/docs/ch1")
    assert r.status_code == 200 and r.template.name == "doc.html"  # type: ignore[attr-defined]
    assert "<h1>Title</h1>" in r.text and "<strong>bold</strong>" in r.text
    assert "<script>alert" not in r.text and "<img" not in r.text
    assert "&lt;script&gt;" in r.text
    assert 'href="javascript:' not in r.text


# -- actions -------------------------------------------------------------------------------


def test_retry_needs_a_valid_csrf_token_and_then_queues_attempt_2(client: TestClient) -> None:
    seed(client, "bad-1", "failed")
    login(client)
    token = csrf_of(client.get("/board"))
    for forged in ("", "nonsense", token[:-2] + "xx"):
        r = client.post("/board/jobs/bad-1/retry", data={"csrf": forged})
        assert r.status_code == 403
    assert store(client).get_job("bad-1").attempt == 1
    r = client.post("/board/jobs/bad-1/retry", data={"csrf": token, "back": "/board"})
    assert r.status_code == 303
    job = store(client).get_job("bad-1")
    # Attempt 2 is queued; with a free slot the dispatcher starts it at once.
    assert job.attempt == 2 and str(job.status) in {"pending", "accepted", "claimed"}
    page = client.get("/board")
    assert "attempt 2 queued" in page.text
    # The job counts once, by its latest attempt: the failed attempt 1 is not a failed job.
    counts = dict(page.context["snap"].counts)  # type: ignore[attr-defined]
    assert "failed" not in counts and sum(counts.values()) == 1


def test_csrf_token_of_another_session_is_refused(client: TestClient, tmp_path: Path) -> None:
    seed(client, "bad-1", "failed")
    login(client)
    token = csrf_of(client.get("/board"))
    client.cookies.clear()
    login(client)  # a new session
    assert client.post("/board/jobs/bad-1/retry", data={"csrf": token}).status_code == 403
    assert store(client).get_job("bad-1").attempt == 1


def test_action_without_session_changes_nothing(client: TestClient) -> None:
    seed(client, "bad-1", "failed")
    assert client.post("/board/jobs/bad-1/retry", data={"csrf": "x"}).status_code == 401
    assert store(client).get_job("bad-1").attempt == 1


def test_cancel_and_priority_of_a_pending_job(tmp_path: Path) -> None:
    # One slot, held by a running job: retried jobs stay pending.
    with make_client(tmp_path, MAX_CONCURRENT_JOBS="1") as client:
        login(client)
        token = csrf_of(client.get("/board"))
        seed(client, "a", "failed")
        seed(client, "b", "failed")
        hold = JobSpec("hold", 1, "tok", Repository(URL))
        store(client).record_start("hold:1", "fp-hold", hold)
        manager = client.app.state.services.manager  # type: ignore[attr-defined]

        async def start_hold() -> None:
            manager.start(hold)  # HeldReporter: the claim waits, the slot stays taken

        client.portal.call(start_hold)  # type: ignore[union-attr]
        for job_id in ("a", "b"):
            client.post(f"/board/jobs/{job_id}/retry", data={"csrf": token})
        snap = client.get("/board").context["snap"]  # type: ignore[attr-defined]
        assert [j.job_id for j in snap.pending] == ["a", "b"]  # same priority: oldest first
        r = client.post("/board/jobs/b/priority", data={"csrf": token, "priority": "5"})
        assert r.status_code == 303
        snap = client.get("/board").context["snap"]  # type: ignore[attr-defined]
        assert [(j.job_id, j.priority) for j in snap.pending] == [("b", 5), ("a", 0)]
        bad = client.post("/board/jobs/a/priority", data={"csrf": token, "priority": "high"})
        assert bad.status_code == 303 and "refused" in client.get("/board").text
        client.post("/board/jobs/a/cancel", data={"csrf": token})
        assert str(store(client).get_job("a").status) == "canceled"
        snap = client.get("/board").context["snap"]  # type: ignore[attr-defined]
        assert [j.job_id for j in snap.pending] == ["b"]


# -- the JSON job API gate -----------------------------------------------------------------


def test_job_api_is_open_on_loopback(client: TestClient) -> None:
    assert client.get("/v1/jobs").status_code == 200


def test_job_api_needs_a_token_or_session_beyond_loopback(tmp_path: Path) -> None:
    with make_client(tmp_path, HOST="0.0.0.0", BOARD_API_TOKEN="api-token-1") as c:
        seed(c, "j1", "completed")
        for path in ("/v1/jobs", "/v1/jobs/j1", "/v1/jobs/j1/docs", "/v1/jobs/j1/events"):
            r = c.get(path)
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"].startswith("Bearer")
        assert c.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = c.get("/v1/jobs", headers={"Authorization": "Bearer api-token-1"})
        assert ok.status_code == 200 and ok.json()["jobs"][0]["jobId"] == "j1"
        login(c)
        assert c.get("/v1/jobs/j1").status_code == 200  # the board session is enough
        assert c.get("/healthz").status_code == 200  # probes stay open


def test_a_failing_store_is_a_503_with_retry_after_not_a_500(client: TestClient) -> None:
    """A full disk behind the board answers like the webhook does (issue 11 item 4)."""
    import sqlite3

    assert login(client).status_code == 303
    s = store(client)
    real = s._db

    class Full:
        def execute(self, sql: str, *args: object) -> object:
            raise sqlite3.OperationalError("database or disk is full")

        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

    s._db = Full()
    try:
        r = client.get("/board")
    finally:
        s._db = real
    assert r.status_code == 503, r.text
    assert "retry-after" in r.headers
    assert "store-unavailable" in r.text
