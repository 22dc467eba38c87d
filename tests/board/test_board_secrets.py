"""The board's secrets stay out of the CLI's environment, of `repr` and of scrubbed text."""

from __future__ import annotations

from app.adapters.process import build_env
from app.config import DEFAULT_CLI_ENV, DENIED_ENV_PREFIXES, load_settings
from app.logs import Redactor

SECRETS = {
    "BOARD_PASSWORD": "pw-RECOGNISABLE-1",
    "BOARD_SESSION_SECRET": "sess-RECOGNISABLE-2",
    "BOARD_API_TOKEN": "tok-RECOGNISABLE-3",
    "BOARD_SECRET": "convex-RECOGNISABLE-4",
}


def test_board_variables_never_reach_the_cli_even_when_passed_through() -> None:
    environ = {"PATH": "/usr/bin", **SECRETS}
    env = build_env(environ, allow=(*DEFAULT_CLI_ENV, *SECRETS), deny_prefixes=DENIED_ENV_PREFIXES)
    assert not set(SECRETS) & set(env)


def test_board_secrets_are_hidden_from_repr_and_redacted() -> None:
    settings = load_settings(
        {**SECRETS, "BOARD_PASSWORD_HASH": "pbkdf2_sha256$1$c2FsdA==$aGFzaA=="}
    )
    text = repr(settings)
    assert not [v for v in SECRETS.values() if v in text]
    assert "pbkdf2" not in text
    redactor = Redactor(settings.secret_values())
    line = " ".join(SECRETS.values())
    assert not [v for v in SECRETS.values() if v in redactor.scrub(line)]
