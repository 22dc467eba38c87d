"""One error root for the worker; each subclass carries the data its handler needs."""

from __future__ import annotations


class WorkerError(Exception):
    """Root of every error the worker raises on purpose."""


class ConfigError(WorkerError):
    """An environment variable has a value the worker cannot use."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


class SignatureError(WorkerError):
    """A webhook's signature headers are missing, malformed, stale or do not match."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PayloadError(WorkerError):
    """A webhook body violates the schema; `field` names the offending path."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class UrlPolicyError(PayloadError):
    """A repository URL or ref is not allowed by the policy."""

    def __init__(self, reason: str, field: str = "data.repository.url") -> None:
        super().__init__(field, reason)


class StoreError(WorkerError):
    """The job store could not carry out an operation."""


class CallbackError(StoreError):
    """A callback to the job store failed; `retryable` tells whether trying again may help."""

    def __init__(self, function: str, reason: str, *, retryable: bool) -> None:
        super().__init__(f"{function}: {reason}")
        self.function = function
        self.reason = reason
        self.retryable = retryable


class JobFailure(WorkerError):
    """A job ended in failure with one of the contract's codes."""

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable


class CheckpointError(WorkerError):
    """A checkpoint cannot be used (another commit, a refused file); the job runs in full."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MediaTypeError(WorkerError):
    """A signed message that does not say it is JSON (its `content-type` header)."""

    def __init__(self) -> None:
        super().__init__("Content-Type must be JSON")


class BadJsonError(WorkerError):
    """A signed message whose body is not valid JSON."""

    def __init__(self) -> None:
        super().__init__("the body is not valid JSON")


class LaunchError(WorkerError):
    """A `run-one` launch is missing its message, or the message is malformed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
