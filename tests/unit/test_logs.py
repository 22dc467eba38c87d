"""JSON log lines and redaction."""

from __future__ import annotations

import io
import json
import logging

from app.logs import REDACTED, JsonFormatter, Redactor


def test_json_lines_carry_extra_fields_and_scrub_secrets() -> None:
    redactor = Redactor(["whsec_supersecretvalue"])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(redactor))
    logger = logging.getLogger("test.logs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("token whsec_supersecretvalue leaked", extra={"job_id": "j1", "attempt": 2})
    finally:
        logger.removeHandler(handler)
    doc = json.loads(stream.getvalue())
    assert doc["job_id"] == "j1" and doc["attempt"] == 2 and doc["level"] == "warning"
    assert "whsec_supersecretvalue" not in stream.getvalue() and REDACTED in doc["msg"]


def test_scrub_lines_only_rewrites_when_a_secret_is_present() -> None:
    r = Redactor(["sk-ant-0123456789"])
    clean = ["a", "b"]
    assert r.scrub_lines(clean) is clean
    assert r.scrub_lines(["x sk-ant-0123456789 y", "z"]) == [f"x {REDACTED} y", "z"]
    r.add("short")  # under 8 characters: never redacted, it would hit ordinary words
    assert r.scrub("short") == "short"
