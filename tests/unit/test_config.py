"""Settings from the environment: defaults, parsing, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import DEFAULT_COMMAND, load_settings
from app.errors import ConfigError


def test_defaults_follow_the_contract() -> None:
    s = load_settings({})
    assert s.webhook_tolerance_s == 300 and s.max_body_bytes == 65536
    assert s.max_concurrent_jobs == 2 and s.job_timeout_s == 3600 and s.heartbeat_s == 15
    assert s.shutdown_grace_s == 20 and s.port == 8080 and s.progress_min_interval_s == 1
    assert s.allowed_git_hosts == ("github.com", "gitlab.com", "bitbucket.org")
    assert s.fondation_command == DEFAULT_COMMAND and s.embedded
    assert s.dedupe_ttl_s >= 72 * 3600


def test_relative_dirs_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings({"DATA_DIR": "data"})
    assert s.data_dir == tmp_path / "data" and s.work_dir == tmp_path / "data" / "work"
    assert s.work_dir.is_absolute()


def test_dedupe_window_never_below_72_hours() -> None:
    assert load_settings({"DEDUPE_TTL_S": "60"}).dedupe_ttl_s == 72 * 3600


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"MAX_CONCURRENT_JOBS": "two"}, "MAX_CONCURRENT_JOBS"),
        ({"MAX_CONCURRENT_JOBS": "0"}, "MAX_CONCURRENT_JOBS"),
        ({"ALLOW_INSECURE_GIT": "maybe"}, "ALLOW_INSECURE_GIT"),
        ({"WEBHOOK_SECRETS": "plain-secret"}, "WEBHOOK_SECRETS"),
        ({"CONVEX_URL": "ftp://x"}, "CONVEX_URL"),
        ({"COCKPIT_METRICS_URL": "https://x/otlp/v1/metrics"}, "COCKPIT_METRICS_URL"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert info.value.name == name


def test_secrets_do_not_show_in_repr() -> None:
    s = load_settings(
        {
            "WEBHOOK_SECRETS": "whsec_c2VjcmV0LXZhbHVlLWhlcmU=",
            "COCKPIT_TOKEN": "tok-123456789",
            "COCKPIT_METRICS_URL": "https://x",
        }
    )
    assert "whsec_" not in repr(s) and "tok-123456789" not in repr(s)
    assert set(s.secret_values()) == {"whsec_c2VjcmV0LXZhbHVlLWhlcmU=", "tok-123456789"}


def test_embedded_mode_listens_on_loopback_unless_told_otherwise() -> None:
    # The embedded job API serves every job and its docs without authentication: only an
    # explicit HOST exposes it. Convex mode is the deployed container, reached from outside.
    assert load_settings({}).host == "127.0.0.1"
    assert load_settings({"HOST": "0.0.0.0"}).host == "0.0.0.0"
    convex = {"CONVEX_URL": "https://happy-otter-123.convex.cloud"}
    assert load_settings(convex).host == "0.0.0.0"
    assert load_settings({**convex, "HOST": "127.0.0.1"}).host == "127.0.0.1"


def test_make_run_listens_where_it_says() -> None:
    makefile = (Path(__file__).parents[2] / "Makefile").read_text()
    run = makefile.split("\nrun:", 1)[1].split("\n\n", 1)[0]
    assert 'export HOST="$${HOST:-127.0.0.1}"' in run
    assert "http://$${HOST}:$${PORT:-8080}" in run
