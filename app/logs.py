"""JSON log lines on stdout (Cockpit ships stdout to Loki), with secrets scrubbed."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

# Attributes every LogRecord has; anything else passed via `extra=` becomes a JSON field.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's ANSI-coloured copy of msg
}
REDACTED = "[redacted]"


class Redactor:
    """Replaces known secret values in text. Secrets are added as they become known
    (webhook secrets at start, callback and clone tokens per job)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: set[str] = set()
        for s in secrets:
            self.add(s)

    def add(self, secret: str | None) -> None:
        # Very short values would redact ordinary words; real secrets are long.
        if secret and len(secret) >= 8:
            self._secrets.add(secret)

    def discard(self, secret: str | None) -> None:
        if secret:
            self._secrets.discard(secret)

    def scrub_lines(self, lines: list[str]) -> list[str]:
        """`scrub` for a batch: one search per secret over the whole batch, and the lines are
        returned as they are when none holds a secret (the common case)."""
        joined = "\n".join(lines)
        if not any(secret in joined for secret in self._secrets):
            return lines
        return [self.scrub(line) for line in lines]

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, msg and the `extra` fields."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self._redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return self._redactor.scrub(json.dumps(doc, default=str, ensure_ascii=False))


def configure_logging(level: str, redactor: Redactor, stream: TextIO | None = None) -> None:
    """Route the worker's and uvicorn's loggers to JSON lines on stdout."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter(redactor))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    # Access logs duplicate our own webhook log line, and httpx logs every callback at INFO
    # (with its URL); our own callback lines say what matters. Keep both at warning.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
