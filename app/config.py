"""Settings read once from an environment mapping (injected, never `os.environ` directly)."""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from app.errors import ConfigError

DEFAULT_COMMAND = "fondation analyze {repo_dir} --output-dir {output_dir} --profile production"
SIMULATOR_COMMAND = (
    "fondation-simulator analyze {repo_dir} --output-dir {output_dir} --profile production"
)
DEDUPE_MIN_S = 72 * 3600
DEFAULT_GIT_HOSTS: tuple[str, ...] = ("github.com", "gitlab.com", "bitbucket.org")

# Names the CLI may inherit from the worker's environment. Everything else is withheld;
# DENIED_ENV wins over both this list and CLI_ENV_PASSTHROUGH.
DEFAULT_CLI_ENV = (
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "VIRTUAL_ENV",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
    "ANTHROPIC_MODEL",
    "CLAUDE_CODE_USE_BEDROCK",
    "CLAUDE_CODE_USE_VERTEX",
)
DENIED_ENV_PREFIXES = ("SCW_", "WEBHOOK_", "CONVEX_", "COCKPIT_", "OTEL_EXPORTER_", "BOARD_")
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the worker reads from its environment, with the contract's defaults."""

    webhook_secrets: tuple[str, ...] = field(default=(), repr=False)
    webhook_tolerance_s: int = 300
    max_body_bytes: int = 65536
    max_concurrent_jobs: int = 2
    allowed_git_hosts: tuple[str, ...] = DEFAULT_GIT_HOSTS
    allow_insecure_git: bool = False
    allow_private_networks: bool = False
    dedupe_ttl_s: int = DEDUPE_MIN_S
    job_retention_s: float = 7 * 24 * 3600.0
    data_dir: Path = Path("var")
    work_dir: Path = Path("var/work")
    convex_url: str | None = None
    fondation_command: str = DEFAULT_COMMAND
    job_timeout_s: float = 3600.0
    heartbeat_s: float = 15.0
    progress_min_interval_s: float = 1.0
    shutdown_grace_s: float = 20.0
    clone_timeout_s: float = 600.0
    clone_max_bytes: int = 2 * 1024**3
    clone_max_files: int = 200_000
    max_doc_bytes: int = 800_000
    retry_after_s: int = 5
    max_event_streams: int = 32
    worker_id: str = "worker"
    host: str = "127.0.0.1"  # see load_settings: all interfaces only when asked, or with Convex
    port: int = 8080
    log_level: str = "INFO"
    cli_env_passthrough: tuple[str, ...] = ()
    cli_user: str | None = None  # run the CLI as this user (name or uid:gid); see app/isolation
    log_tail_lines: int = 40
    cockpit_metrics_url: str | None = None
    cockpit_token: str | None = field(default=None, repr=False)
    metrics_push_interval_s: float = 60.0
    lease_s: float = 60.0
    # The operator board (app/board): off unless a password (plain or hashed) is set.
    board_password: str | None = field(default=None, repr=False)
    board_password_hash: str | None = field(default=None, repr=False)
    board_session_secret: str | None = field(default=None, repr=False)
    board_session_ttl_s: int = 8 * 3600
    board_api_token: str | None = field(default=None, repr=False)
    board_secret: str | None = field(default=None, repr=False)  # shared with Convex
    board_secure_cookie: bool | None = None  # None: Secure unless on loopback

    @property
    def on_loopback(self) -> bool:
        """True when the worker listens on loopback only (local development)."""
        return self.host.lower().strip("[]") in LOOPBACK_HOSTS

    repo_cache_dir: Path = Path("var/repo-cache")
    repo_cache_max_bytes: int = 1024**3

    @property
    def embedded(self) -> bool:
        """True when no Convex deployment is configured: jobs live in the local SQLite store."""
        return self.convex_url is None

    @property
    def db_path(self) -> Path:
        return self.data_dir / "jobs.sqlite3"

    def secret_values(self) -> tuple[str, ...]:
        """Every secret the worker holds, for redaction checks."""
        optional = (
            self.cockpit_token,
            self.board_password,
            self.board_session_secret,
            self.board_api_token,
            self.board_secret,
        )
        return (*self.webhook_secrets, *(value for value in optional if value))


def _get(env: Mapping[str, str], name: str, default: T, parse: Callable[[str], T]) -> T:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return parse(raw.strip())
    except (ValueError, TypeError) as exc:
        raise ConfigError(name, f"cannot parse {raw!r}: {exc}") from None


def _bool(raw: str) -> bool:
    low = raw.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def _csv(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _positive(parse: Callable[[str], T]) -> Callable[[str], T]:
    def inner(raw: str) -> T:
        value = parse(raw)
        if value <= 0:  # type: ignore[operator]
            raise ValueError("must be positive")
        return value

    return inner


def _default_host(convex_url: str | None) -> str:
    """Loopback in embedded mode: its job API serves every job and doc without
    authentication, so listening wider takes an explicit `HOST`. With Convex the worker is
    the deployed container, reached through its public endpoint."""
    return "127.0.0.1" if convex_url is None else "0.0.0.0"  # noqa: S104


def _not_negative(parse: Callable[[str], T]) -> Callable[[str], T]:
    def inner(raw: str) -> T:
        value = parse(raw)
        if value < 0:  # type: ignore[operator]
            raise ValueError("must not be negative")
        return value

    return inner


def load_settings(env: Mapping[str, str]) -> Settings:
    """Build `Settings` from an environment mapping; raises `ConfigError` on a bad value."""
    # Absolute at once: git and the CLI run in other working directories.
    data_dir = _get(env, "DATA_DIR", Path("var"), Path).absolute()
    secrets: tuple[str, ...] = _get(env, "WEBHOOK_SECRETS", (), _csv)
    for secret in secrets:
        if not secret.startswith("whsec_"):
            raise ConfigError("WEBHOOK_SECRETS", "each secret must start with 'whsec_'")
    convex_url = _get(env, "CONVEX_URL", None, lambda s: s.rstrip("/"))
    if convex_url is not None and not convex_url.startswith(("https://", "http://")):
        raise ConfigError("CONVEX_URL", "must be an http(s) URL")
    settings = Settings(
        webhook_secrets=secrets,
        webhook_tolerance_s=_get(env, "WEBHOOK_TOLERANCE_S", 300, _positive(int)),
        max_body_bytes=_get(env, "MAX_BODY_BYTES", 65536, _positive(int)),
        max_concurrent_jobs=_get(env, "MAX_CONCURRENT_JOBS", 2, _positive(int)),
        allowed_git_hosts=tuple(
            h.lower() for h in _get(env, "ALLOWED_GIT_HOSTS", DEFAULT_GIT_HOSTS, _csv)
        ),
        allow_insecure_git=_get(env, "ALLOW_INSECURE_GIT", False, _bool),
        allow_private_networks=_get(env, "ALLOW_PRIVATE_NETWORKS", False, _bool),
        dedupe_ttl_s=max(DEDUPE_MIN_S, _get(env, "DEDUPE_TTL_S", DEDUPE_MIN_S, _positive(int))),
        job_retention_s=_get(env, "JOB_RETENTION_S", 7 * 24 * 3600.0, _positive(float)),
        data_dir=data_dir,
        work_dir=_get(env, "WORK_DIR", data_dir / "work", Path).absolute(),
        convex_url=convex_url,
        fondation_command=_get(env, "FONDATION_COMMAND", DEFAULT_COMMAND, str),
        job_timeout_s=_get(env, "JOB_TIMEOUT_S", 3600.0, _positive(float)),
        heartbeat_s=_get(env, "HEARTBEAT_S", 15.0, _positive(float)),
        progress_min_interval_s=_get(env, "PROGRESS_MIN_INTERVAL_S", 1.0, _positive(float)),
        shutdown_grace_s=_get(env, "SHUTDOWN_GRACE_S", 20.0, _positive(float)),
        clone_timeout_s=_get(env, "CLONE_TIMEOUT_S", 600.0, _positive(float)),
        clone_max_bytes=_get(env, "CLONE_MAX_BYTES", 2 * 1024**3, _positive(int)),
        clone_max_files=_get(env, "CLONE_MAX_FILES", 200_000, _positive(int)),
        max_doc_bytes=_get(env, "MAX_DOC_BYTES", 800_000, _positive(int)),
        retry_after_s=_get(env, "RETRY_AFTER_S", 5, _positive(int)),
        max_event_streams=_get(env, "MAX_EVENT_STREAMS", 32, _positive(int)),
        worker_id=_get(env, "WORKER_ID", socket.gethostname(), str),
        host=_get(env, "HOST", _default_host(convex_url), str),
        port=_get(env, "PORT", 8080, _positive(int)),
        log_level=_get(env, "LOG_LEVEL", "INFO", str.upper),
        cli_env_passthrough=_get(env, "CLI_ENV_PASSTHROUGH", (), _csv),
        cli_user=_get(env, "CLI_USER", None, str),
        cockpit_metrics_url=_get(env, "COCKPIT_METRICS_URL", None, str),
        cockpit_token=_get(env, "COCKPIT_TOKEN", None, str),
        metrics_push_interval_s=_get(env, "METRICS_PUSH_INTERVAL_S", 60.0, _positive(float)),
        lease_s=_get(env, "LEASE_S", 60.0, _positive(float)),
        board_password=_get(env, "BOARD_PASSWORD", None, str),
        board_password_hash=_get(env, "BOARD_PASSWORD_HASH", None, str),
        board_session_secret=_get(env, "BOARD_SESSION_SECRET", None, str),
        board_session_ttl_s=_get(env, "BOARD_SESSION_TTL_S", 8 * 3600, _positive(int)),
        board_api_token=_get(env, "BOARD_API_TOKEN", None, str),
        board_secret=_get(env, "BOARD_SECRET", None, str),
        board_secure_cookie=_get(env, "BOARD_SECURE_COOKIE", None, _bool),
        repo_cache_dir=_get(env, "REPO_CACHE_DIR", data_dir / "repo-cache", Path).absolute(),
        repo_cache_max_bytes=_get(env, "REPO_CACHE_MAX_BYTES", 1024**3, _not_negative(int)),
    )
    if (settings.cockpit_metrics_url is None) != (settings.cockpit_token is None):
        raise ConfigError("COCKPIT_METRICS_URL", "set together with COCKPIT_TOKEN, or neither")
    return settings
