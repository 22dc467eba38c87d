"""Property-based fuzzing of the webhook endpoint: random headers and bodies never cause a 5xx,
and nothing without a valid signature ever creates a job."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.config import load_settings
from app.main import create_app
from app.signing import sign
from tests.support.fakes import HeldReporter, public_resolver
from tests.support.signing import SECRET, start_body

HEADER_NAMES = [
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "content-type",
    "content-length",
]
header_values = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80),
    st.sampled_from(
        ["application/json", "v1,AAAA", "v1,", "0", "-1", "99999999999999", str(int(time.time()))]
    ),
)
bodies = st.one_of(
    st.binary(max_size=512),
    st.builds(
        lambda d: json.dumps(d).encode(),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=20),
            lambda children: (
                st.lists(children, max_size=4)
                | st.dictionaries(st.text(max_size=10), children, max_size=4)
            ),
            max_leaves=12,
        ),
    ),
    st.just(start_body("fz", "https://github.com/o/r.git")),
)


def test_fuzz_never_5xx_never_job_without_signature(tmp_path: Path) -> None:
    settings_ = load_settings(
        {
            "WEBHOOK_SECRETS": SECRET,
            "DATA_DIR": str(tmp_path / "d"),
            "WORK_DIR": str(tmp_path / "w"),
            "SHUTDOWN_GRACE_S": "1",
            "MAX_CONCURRENT_JOBS": "1000",
            "HOST": "127.0.0.1",  # the job API is open on loopback only
        }
    )
    reporter = HeldReporter()
    app = create_app(settings_, environ={}, resolver=public_resolver, reporter=reporter)
    loop = asyncio.new_event_loop()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://w")
    lifespan = app.router.lifespan_context(app)
    loop.run_until_complete(lifespan.__aenter__())

    @settings(
        max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(
        headers=st.dictionaries(st.sampled_from(HEADER_NAMES), header_values, max_size=5),
        body=bodies,
        sign_it=st.booleans(),
    )
    def check(headers: dict[str, str], body: bytes, sign_it: bool) -> None:
        headers = {k: v for k, v in headers.items() if k != "content-length"}
        signed = False
        if (
            sign_it
            and "webhook-id" in headers
            and headers["webhook-id"].isprintable()
            and headers["webhook-id"]
        ):
            ts = int(time.time())
            headers["webhook-timestamp"] = str(ts)
            headers["webhook-signature"] = sign(SECRET, headers["webhook-id"], ts, body)
            signed = True
        before = len(reporter.calls)
        r = loop.run_until_complete(client.post("/v1/webhooks", content=body, headers=headers))
        assert r.status_code < 500, r.text
        if r.status_code >= 400:
            assert r.headers["content-type"] == "application/problem+json"
            assert set(r.json()) == {"type", "title", "status", "detail"}
        if not signed:
            assert r.status_code in (400, 401, 413), r.status_code
            loop.run_until_complete(asyncio.sleep(0))
            assert len(reporter.calls) == before

    try:
        check()
        jobs = loop.run_until_complete(client.get("/v1/jobs")).json()["jobs"]
        # Only signed, valid job.start bodies can have made a job: the only one is "fz".
        assert {j["jobId"] for j in jobs} <= {"fz"}
    finally:
        reporter.release.set()
        loop.run_until_complete(lifespan.__aexit__(None, None, None))
        loop.run_until_complete(client.aclose())
        loop.close()
