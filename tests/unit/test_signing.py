"""The Standard Webhooks verifier against the official package and the shared vectors."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from app.errors import SignatureError
from app.signing import Verifier, sign, signed_headers

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "signatures.json").read_text())
SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
NEW_SECRET = "whsec_" + base64.b64encode(b"fedcba9876543210fedcba9876543210").decode()
NOW = 1_800_000_000
BODY = b'{"type":"job.start","data":{}}'


def headers(msg_id: str, ts: int, sig: str) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": sig}


@pytest.mark.parametrize("vec", VECTORS["valid"], ids=lambda v: v["name"])
def test_shared_vectors_verify(vec: dict) -> None:
    body = vec["body"].encode()
    assert sign(vec["secret"], vec["id"], vec["timestamp"], body) == vec["signature"]
    v = Verifier.from_secrets([vec["secret"]])
    assert (
        v.verify(
            headers(vec["id"], vec["timestamp"], vec["signature"]), body, now_s=vec["timestamp"]
        )
        == vec["id"]
    )


@pytest.mark.parametrize("vec", VECTORS["invalid"], ids=lambda v: v["name"])
def test_shared_invalid_vectors_fail(vec: dict) -> None:
    v = Verifier.from_secrets([vec["secret"]])
    with pytest.raises(SignatureError):
        v.verify(
            headers(vec["id"], vec["timestamp"], vec["signature"]),
            vec["body"].encode(),
            now_s=vec["timestamp"],
        )


def test_official_library_signature_verifies_with_ours() -> None:
    now = datetime.now(tz=UTC)
    sig = Webhook(SECRET).sign("job-1:1", now, BODY.decode())
    v = Verifier.from_secrets([SECRET])
    assert (
        v.verify(headers("job-1:1", int(now.timestamp()), sig), BODY, now_s=now.timestamp())
        == "job-1:1"
    )


def test_our_signature_verifies_with_official_library() -> None:
    now = datetime.now(tz=UTC)
    h = signed_headers(SECRET, "job-1:1", int(now.timestamp()), BODY)
    assert Webhook(SECRET).verify(BODY, h) == json.loads(BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(NEW_SECRET).verify(BODY, h)


def test_rotation_any_secret_verifies() -> None:
    v = Verifier.from_secrets([SECRET, NEW_SECRET])
    for secret in (SECRET, NEW_SECRET):
        h = signed_headers(secret, "a:1", NOW, BODY)
        assert v.verify(h, BODY, now_s=NOW) == "a:1"
    # A header carrying several signatures passes if any one matches.
    both = f"{sign(NEW_SECRET, 'a:1', NOW, BODY)} {sign(SECRET, 'a:1', NOW, BODY)}"
    assert Verifier.from_secrets([SECRET]).verify(headers("a:1", NOW, both), BODY, now_s=NOW)
    with pytest.raises(SignatureError):
        Verifier.from_secrets([NEW_SECRET]).verify(
            signed_headers(SECRET, "a:1", NOW, BODY), BODY, now_s=NOW
        )


@pytest.mark.parametrize("delta", [-300, 0, 300])
def test_tolerance_edges_accepted(delta: int) -> None:
    v = Verifier.from_secrets([SECRET], tolerance_s=300)
    ts = NOW + delta
    assert v.verify(signed_headers(SECRET, "a:1", ts, BODY), BODY, now_s=NOW)


@pytest.mark.parametrize("delta", [-301, 301, -10_000])
def test_tolerance_edges_refused(delta: int) -> None:
    v = Verifier.from_secrets([SECRET], tolerance_s=300)
    ts = NOW + delta
    with pytest.raises(SignatureError):
        v.verify(signed_headers(SECRET, "a:1", ts, BODY), BODY, now_s=NOW)


GOOD = sign(SECRET, "a:1", NOW, BODY)
MALFORMED = {
    "no headers": {},
    "no id": {"webhook-timestamp": str(NOW), "webhook-signature": GOOD},
    "no timestamp": {"webhook-id": "a:1", "webhook-signature": GOOD},
    "no signature": {"webhook-id": "a:1", "webhook-timestamp": str(NOW)},
    "empty signature": headers("a:1", NOW, ""),
    "timestamp not a number": {
        "webhook-id": "a:1",
        "webhook-timestamp": "soon",
        "webhook-signature": GOOD,
    },
    "timestamp float": {
        "webhook-id": "a:1",
        "webhook-timestamp": f"{NOW}.5",
        "webhook-signature": GOOD,
    },
    "timestamp negative": {
        "webhook-id": "a:1",
        "webhook-timestamp": "-1",
        "webhook-signature": GOOD,
    },
    "timestamp huge": {
        "webhook-id": "a:1",
        "webhook-timestamp": "9" * 40,
        "webhook-signature": GOOD,
    },
    "signature without version": headers("a:1", NOW, GOOD.split(",", 1)[1]),
    "signature wrong version": headers("a:1", NOW, GOOD.replace("v1,", "v2,")),
    "signature not base64": headers("a:1", NOW, "v1,!!!not-base64!!!"),
    "signature truncated": headers("a:1", NOW, GOOD[:-8]),
    "signature empty value": headers("a:1", NOW, "v1,"),
    "signature only commas": headers("a:1", NOW, ",,,"),
    "id too long": headers("x" * 300, NOW, GOOD),
    "id with control chars": headers("a:1\n", NOW, GOOD),
    "signature header huge": headers("a:1", NOW, "v1,AAAA " * 2000),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_headers_raise_signature_error(name: str) -> None:
    v = Verifier.from_secrets([SECRET])
    with pytest.raises(SignatureError):
        v.verify(MALFORMED[name], BODY, now_s=NOW)


def test_no_secret_configured_never_verifies() -> None:
    with pytest.raises(SignatureError):
        Verifier.from_secrets([]).verify(signed_headers(SECRET, "a:1", NOW, BODY), BODY, now_s=NOW)
