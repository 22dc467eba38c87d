"""Standard Webhooks signatures (https://www.standardwebhooks.com/): pure functions, no I/O.

signature = "v1," + base64(HMAC-SHA256(key, f"{id}.{timestamp}.".encode() + raw_body)),
where key is the base64 part of a `whsec_` secret. Several secrets verify (rotation).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from app.errors import SignatureError

SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret
MAX_ID_CHARS = 256
MAX_SIGNATURES = 16  # bounds the work one request can cause
MAX_SIGNATURE_HEADER_CHARS = 4096


def decode_secret(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret."""
    raw = secret.removeprefix(SECRET_PREFIX)
    try:
        # Padding is optional in the wild; b64decode ignores surplus padding.
        key = base64.b64decode(raw + "==", validate=False)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"secret is not base64: {exc}") from None
    if not key:
        raise SignatureError("secret is empty")
    return key


def _digest(key: bytes, msg_id: str, timestamp_s: int, body: bytes) -> bytes:
    mac = hmac.new(key, f"{msg_id}.{timestamp_s}.".encode(), hashlib.sha256)
    mac.update(body)
    return mac.digest()


def sign(secret: str, msg_id: str, timestamp_s: int, body: bytes) -> str:
    """The `webhook-signature` header value for one secret."""
    digest = _digest(decode_secret(secret), msg_id, timestamp_s, body)
    return "v1," + base64.b64encode(digest).decode("ascii")


def signed_headers(secret: str, msg_id: str, timestamp_s: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers for a body."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp_s),
        "webhook-signature": sign(secret, msg_id, timestamp_s, body),
    }


def _candidates(header: str) -> list[bytes]:
    """The decodable v1 signatures in a header; other versions and junk are skipped."""
    out: list[bytes] = []
    for part in header.split(" ")[:MAX_SIGNATURES]:
        version, sep, value = part.partition(",")
        if not sep or version != "v1":
            continue
        try:
            out.append(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            continue
    return out


@dataclass(frozen=True)
class Verifier:
    """Verifies webhook headers against any of several secrets."""

    keys: tuple[bytes, ...] = field(repr=False)
    tolerance_s: int = 300

    @classmethod
    def from_secrets(cls, secrets: Iterable[str], tolerance_s: int = 300) -> Verifier:
        keys = tuple(decode_secret(s) for s in secrets)
        return cls(keys=keys, tolerance_s=tolerance_s)

    def verify(self, headers: Mapping[str, str], body: bytes, *, now_s: float) -> str:
        """Return the verified `webhook-id`, or raise `SignatureError` saying why not."""
        msg_id = headers.get("webhook-id")
        timestamp = headers.get("webhook-timestamp")
        signature = headers.get("webhook-signature")
        if not msg_id or not timestamp or not signature:
            raise SignatureError("missing webhook-id, webhook-timestamp or webhook-signature")
        if len(msg_id) > MAX_ID_CHARS or not msg_id.isprintable():
            raise SignatureError("malformed webhook-id")
        if len(signature) > MAX_SIGNATURE_HEADER_CHARS:
            raise SignatureError("webhook-signature header too long")
        if not (timestamp.isascii() and timestamp.isdigit()) or len(timestamp) > 12:
            raise SignatureError("webhook-timestamp is not integer Unix seconds")
        timestamp_s = int(timestamp)
        if timestamp_s < now_s - self.tolerance_s:
            raise SignatureError("webhook-timestamp too old")
        if timestamp_s > now_s + self.tolerance_s:
            raise SignatureError("webhook-timestamp too far in the future")
        candidates = _candidates(signature)
        if not candidates or not self.keys:
            raise SignatureError("no valid v1 signature")
        matched = False
        # Compare every pair so timing does not reveal which secret or position matched.
        for key in self.keys:
            expected = _digest(key, msg_id, timestamp_s, body)
            for candidate in candidates:
                matched |= hmac.compare_digest(expected, candidate)
        if not matched:
            raise SignatureError("no matching signature")
        return msg_id
