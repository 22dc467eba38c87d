"""Opening a signed message: verify the signature, check the media type, decode, parse.

One function shared by the webhook route and `fondation-worker run-one`, so a message handed
to a Serverless Jobs run is checked exactly as one posted to the warm container. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping

from app.errors import BadJsonError, MediaTypeError
from app.payload import Envelope, decode_json, parse_envelope
from app.signing import Verifier


def is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def verify_message(
    verifier: Verifier, headers: Mapping[str, str], body: bytes, *, now_s: float
) -> str:
    """The verified `webhook-id`. Raises `SignatureError`, then `MediaTypeError`. `headers`
    must look names up without regard to case (Starlette's `Headers`, or lower-case keys)."""
    webhook_id = verifier.verify(headers, body, now_s=now_s)
    if not is_json(headers.get("content-type")):
        raise MediaTypeError
    return webhook_id


def parse_message(webhook_id: str, body: bytes) -> Envelope:
    """The parsed message of a verified body. Raises `BadJsonError`, then `PayloadError`."""
    try:
        doc = decode_json(body)
    except ValueError:
        raise BadJsonError from None
    return parse_envelope(webhook_id, doc, body)


def open_message(
    verifier: Verifier, headers: Mapping[str, str], body: bytes, *, now_s: float
) -> Envelope:
    """Both steps: the verified, parsed message (the webhook route looks duplicates up in
    between)."""
    return parse_message(verify_message(verifier, headers, body, now_s=now_s), body)
