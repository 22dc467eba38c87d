"""How an attempt ended, decided in one place from what the phases left behind."""

from __future__ import annotations

from dataclasses import dataclass

from app.domain import Failure, FailureCode
from app.errors import JobFailure
from app.logs import Redactor
from app.pipeline.attempt import StopReason

MAX_MESSAGE_CHARS = 2000


@dataclass(frozen=True, slots=True)
class Outcome:
    """`failure` None: completed with `docs_count` docs. `report` False: nothing more is
    reported (another attempt owns the job)."""

    failure: Failure | None
    docs_count: int = 0
    report: bool = True


def decide_outcome(
    *,
    reason: StopReason | None,
    error: JobFailure | None,
    docs_count: int | None,
    redactor: Redactor,
) -> Outcome:
    """A requested stop decides, whatever the interrupted phase raised; else the failing
    phase's `JobFailure` (its code, message and whether another attempt may help); else the
    upload's count. Nothing else maps failures to codes or retryability."""
    if reason is StopReason.CANCEL:
        return Outcome(Failure(FailureCode.CANCELED, "canceled on request", False))
    if reason is StopReason.SHUTDOWN:
        return Outcome(Failure(FailureCode.INTERRUPTED, "the worker is shutting down", True))
    if reason is StopReason.SUPERSEDED:
        failure = Failure(FailureCode.INTERRUPTED, "superseded by another attempt", True)
        return Outcome(failure, report=False)
    if error is not None:
        message = redactor.scrub(error.message)[:MAX_MESSAGE_CHARS]
        return Outcome(Failure(FailureCode(error.code), message, error.retryable))
    if docs_count is None:
        return Outcome(Failure(FailureCode.INTERNAL, "the job ended without a result", True))
    return Outcome(None, docs_count=docs_count)
