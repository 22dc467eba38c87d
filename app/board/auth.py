"""Who may see the board and the job API: the password, the session cookie, CSRF tokens,
the login rate limit, and the gate in front of `GET /v1/jobs…`.

The session is a cookie signed with itsdangerous (`URLSafeTimedSerializer`): it carries a
random session id and expires after `BOARD_SESSION_TTL_S`. A CSRF token is the session id
signed under another salt, so it is valid only with its own session and only as long as it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import sys
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from itsdangerous import BadSignature, TimestampSigner, URLSafeTimedSerializer

from app.clock import Clock
from app.config import Settings
from app.errors import ConfigError

COOKIE_NAME = "fw_board"
SESSION_SALT = "fondation.board.session"
CSRF_SALT = "fondation.board.csrf"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


def hash_password(password: str, salt: bytes | None = None) -> str:
    """A `BOARD_PASSWORD_HASH` value: `scrypt$N$r$p$salt$hash` (base64 salt and hash)."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32
    )
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


class PasswordCheck:
    """Compares a submitted password with `BOARD_PASSWORD` or `BOARD_PASSWORD_HASH` (scrypt or
    `pbkdf2_sha256$iterations$salt$hash`), in constant time."""

    def __init__(self, *, plain: str | None, hashed: str | None) -> None:
        self._plain = plain
        self._hashed = _parse_hash(hashed) if hashed else None

    def __call__(self, candidate: str) -> bool:
        if self._hashed is not None:
            algo, params, salt, expected = self._hashed
            if algo == "scrypt":
                n, r, p = params
                got = hashlib.scrypt(
                    candidate.encode(), salt=salt, n=n, r=r, p=p, dklen=len(expected)
                )
            else:
                got = hashlib.pbkdf2_hmac("sha256", candidate.encode(), salt, params[0])
            return hmac.compare_digest(got, expected)
        if self._plain is not None:
            return hmac.compare_digest(candidate.encode(), self._plain.encode())
        return False


def _parse_hash(raw: str) -> tuple[str, tuple[int, ...], bytes, bytes]:
    parts = raw.split("$")
    try:
        if parts[0] == "scrypt" and len(parts) == 6:
            params = (int(parts[1]), int(parts[2]), int(parts[3]))
            return "scrypt", params, base64.b64decode(parts[4]), base64.b64decode(parts[5])
        if parts[0] == "pbkdf2_sha256" and len(parts) == 4:
            return (
                "pbkdf2",
                (int(parts[1]),),
                base64.b64decode(parts[2]),
                base64.b64decode(parts[3]),
            )
    except ValueError:
        pass
    raise ConfigError(
        "BOARD_PASSWORD_HASH", "expected scrypt$N$r$p$salt$hash or pbkdf2_sha256$iter$salt$hash"
    )


@dataclass(frozen=True, slots=True)
class Session:
    sid: str


class Sessions:
    """Signs and reads the session cookie and the CSRF tokens bound to it."""

    def __init__(self, secret: str, ttl_s: int, clock: Clock) -> None:
        self.ttl_s = ttl_s

        class ClockSigner(TimestampSigner):
            """Signs and checks ages on the injected clock, so expiry is testable."""

            def get_timestamp(self) -> int:
                return int(clock.now())

        self._session = URLSafeTimedSerializer(secret, salt=SESSION_SALT, signer=ClockSigner)
        self._csrf = URLSafeTimedSerializer(secret, salt=CSRF_SALT, signer=ClockSigner)

    def new_cookie(self) -> str:
        return self._session.dumps({"sid": secrets.token_urlsafe(18)})

    def read(self, cookie: str | None) -> Session | None:
        """The session of a cookie that is genuine and not expired, else None."""
        data = self._loads(self._session, cookie)
        if not isinstance(data, dict) or not isinstance(data.get("sid"), str):
            return None
        return Session(sid=data["sid"])

    def csrf_token(self, session: Session) -> str:
        return self._csrf.dumps(session.sid)

    def check_csrf(self, session: Session, token: str | None) -> bool:
        sid = self._loads(self._csrf, token)
        return isinstance(sid, str) and hmac.compare_digest(sid, session.sid)

    def _loads(self, serializer: URLSafeTimedSerializer, raw: str | None) -> Any:
        if not raw or len(raw) > 4096:
            return None
        try:
            return serializer.loads(raw, max_age=self.ttl_s)
        except BadSignature:  # forged, tampered or expired (SignatureExpired)
            return None


class LoginLimiter:
    """At most `max_failures` failed logins per client in `window_s`; bounded memory."""

    def __init__(
        self, clock: Clock, max_failures: int = 5, window_s: float = 300.0, max_clients: int = 4096
    ) -> None:
        self._clock = clock
        self._max = max_failures
        self._window_s = window_s
        self._max_clients = max_clients
        self._failures: OrderedDict[str, list[float]] = OrderedDict()

    def retry_after_s(self, client: str) -> int:
        """Seconds until `client` may try again; 0 when it may now."""
        recent = self._recent(client)
        if len(recent) < self._max:
            return 0
        return max(1, int(recent[0] + self._window_s - self._clock.now()) + 1)

    def failed(self, client: str) -> None:
        recent = self._recent(client)
        recent.append(self._clock.now())
        self._failures[client] = recent
        self._failures.move_to_end(client)
        while len(self._failures) > self._max_clients:
            self._failures.popitem(last=False)

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)

    def _recent(self, client: str) -> list[float]:
        horizon = self._clock.now() - self._window_s
        return [t for t in self._failures.get(client, []) if t > horizon]


@dataclass(frozen=True)
class BoardAccess:
    """Everything the board and the API gate need to decide who is in."""

    password: PasswordCheck
    sessions: Sessions
    limiter: LoginLimiter
    secure_cookie: bool
    api_token: str | None
    api_open: bool  # loopback development default: the job API needs no credentials

    def session_of(self, cookies: dict[str, str]) -> Session | None:
        return self.sessions.read(cookies.get(COOKIE_NAME))

    def bearer_ok(self, authorization: str | None) -> bool:
        if not self.api_token or not authorization:
            return False
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(token.strip().encode(), self.api_token.encode())


def board_enabled(settings: Settings) -> bool:
    return bool(settings.board_password or settings.board_password_hash)


def build_access(settings: Settings, clock: Clock) -> BoardAccess:
    secret = settings.board_session_secret or secrets.token_urlsafe(32)  # sessions end on restart
    secure = settings.board_secure_cookie
    return BoardAccess(
        password=PasswordCheck(plain=settings.board_password, hashed=settings.board_password_hash),
        sessions=Sessions(secret, settings.board_session_ttl_s, clock),
        limiter=LoginLimiter(clock),
        secure_cookie=(not settings.on_loopback) if secure is None else secure,
        api_token=settings.board_api_token,
        api_open=settings.on_loopback,
    )


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_GATED_PREFIX = "/v1/jobs"
_DENIED = (
    b'{"type":"urn:fondation:problem:unauthorized","title":"Unauthorized","status":401,'
    b'"detail":"the job API needs a bearer token or a board session when the worker listens '
    b'beyond loopback"}'
)


class ApiGate:
    """ASGI middleware: `GET /v1/jobs…` (and its event streams) need the board session or
    `Authorization: Bearer BOARD_API_TOKEN`, unless the worker listens on loopback only."""

    def __init__(self, app: ASGIApp, access: BoardAccess | None) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(_GATED_PREFIX):
            await self.app(scope, receive, send)
            return
        if self.access is None or self.access.api_open or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/problem+json"),
                    (b"www-authenticate", b'Bearer realm="fondation-worker"'),
                    (b"content-length", str(len(_DENIED)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": _DENIED})

    def _allowed(self, scope: Scope) -> bool:
        assert self.access is not None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.access.bearer_ok(headers.get("authorization")):
            return True
        cookies = _parse_cookies(headers.get("cookie", ""))
        return self.access.session_of(cookies) is not None


def _parse_cookies(header: str) -> dict[str, str]:
    from starlette.requests import cookie_parser

    return cookie_parser(header)


def main() -> int:
    """`python -m app.board.auth`: read a password on stdin, print a BOARD_PASSWORD_HASH."""
    password = sys.stdin.readline().rstrip("\n")
    if not password:
        print("usage: echo -n PASSWORD | python -m app.board.auth", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


if __name__ == "__main__":
    sys.exit(main())
