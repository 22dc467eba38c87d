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


def open_message(
    verifier: Verifier, headers: Mapping[str, str], body: bytes, *, now_s: float
) -> Envelope:
    """The verified, parsed message. Raises, in this order: `SignatureError`,
    `MediaTypeError`, `BadJsonError`, `PayloadError`. `headers` must look names up without
    regard to case (Starlette's `Headers`, or a dict with lower-case keys)."""
    webhook_id = verifier.verify(headers, body, now_s=now_s)
    if not is_json(headers.get("content-type")):
        raise MediaTypeError
    try:
        doc = decode_json(body)
    except ValueError:
        raise BadJsonError from None
    return parse_envelope(webhook_id, doc, body)
