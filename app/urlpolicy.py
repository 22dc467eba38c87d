"""Which repository URLs and refs a job may name (CONTRACT §2). Pure except for the injected
resolver, so the same rules run at intake and again right before cloning (DNS can change)."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from urllib.parse import urlsplit

from app.errors import UrlPolicyError

MAX_URL_CHARS = 2048
MAX_REF_CHARS = 255
_SHA_RE = re.compile(r"^[0-9a-fA-F]{7,64}$")
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//")
_HOST_RE = re.compile(r"^[a-z0-9.-]+$|^\[[0-9a-f:.]+\]$")

Resolver = Callable[[str, int], Awaitable[list[str]]]

# IPv6 prefixes that carry an IPv4 address in their low 32 bits: a translator on the path
# would deliver to that IPv4 address, so it is the one to judge.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052 well-known prefix
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215, operator-local
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated, still routed by some stacks


# Resolution gets its own threads: the default executor also runs git clones and file work,
# and a webhook's ack must not queue behind a slow clone for a thread.
_DNS_EXECUTOR = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dns")


async def system_resolver(host: str, port: int) -> list[str]:
    """Resolve with the OS resolver without blocking the event loop."""
    loop = asyncio.get_running_loop()
    infos = await loop.run_in_executor(
        _DNS_EXECUTOR, partial(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    )
    return sorted({str(info[4][0]) for info in infos})


@dataclass(frozen=True, slots=True)
class RepoTarget:
    """A syntactically allowed repository URL, split for the address check."""

    url: str
    host: str
    port: int
    addresses: tuple[str, ...] = ()
    """The addresses that passed the check (after `check`), for the clone to connect to
    (pinned: a second lookup by git could answer otherwise)."""


@dataclass(frozen=True, slots=True)
class UrlPolicy:
    allowed_hosts: tuple[str, ...]
    allow_insecure: bool = False
    allow_private: bool = False

    def check_url(self, url: str) -> RepoTarget:
        """Syntactic checks: scheme, credentials, host allowlist. Raises `UrlPolicyError`."""
        if not isinstance(url, str) or not url:
            raise UrlPolicyError("repository URL is empty")
        if len(url) > MAX_URL_CHARS:
            raise UrlPolicyError("repository URL is too long")
        if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
            raise UrlPolicyError("repository URL contains whitespace or control characters")
        if "::" in url.split("/", 1)[0]:
            raise UrlPolicyError("git transport syntax (ext::, fd::) is not allowed")
        try:
            parts = urlsplit(url)
            port_or_none = parts.port
        except ValueError as exc:
            raise UrlPolicyError(f"repository URL cannot be parsed: {exc}") from None
        schemes = ("https", "http") if self.allow_insecure else ("https",)
        if parts.scheme.lower() not in schemes:
            allowed = " or ".join(f"{s}://" for s in schemes)
            raise UrlPolicyError(f"repository URL must start with {allowed}")
        if parts.username is not None or parts.password is not None or "@" in parts.netloc:
            raise UrlPolicyError("credentials in the repository URL are not allowed")
        host = (parts.hostname or "").lower().rstrip(".")
        if not host or not _HOST_RE.match(host if ":" not in host else f"[{host}]"):
            raise UrlPolicyError("repository URL has no valid host")
        if host not in self.allowed_hosts:
            raise UrlPolicyError(f"host {host!r} is not in ALLOWED_GIT_HOSTS")
        if parts.query or parts.fragment:
            raise UrlPolicyError("repository URL must not have a query or fragment")
        if not parts.path or parts.path == "/" or ".." in parts.path.split("/"):
            raise UrlPolicyError("repository URL must name a repository path")
        port = port_or_none or (443 if parts.scheme.lower() == "https" else 80)
        return RepoTarget(url=url, host=host, port=port)

    def check_addresses(self, host: str, addresses: Iterable[str]) -> None:
        """Refuse hosts that resolve to non-public addresses unless private networks are
        allowed. Every address must pass: an attacker controls which one git picks."""
        found = list(addresses)
        if not found:
            raise UrlPolicyError(f"host {host!r} does not resolve")
        if self.allow_private:
            return
        for raw in found:
            if not _is_public(ipaddress.ip_address(raw.split("%", 1)[0])):
                raise UrlPolicyError(
                    f"host {host!r} resolves to a private, loopback or link-local address"
                )

    async def check(self, url: str, resolve: Resolver) -> RepoTarget:
        """Full check: syntax, then every resolved address."""
        target = self.check_url(url)
        try:
            addresses = await resolve(target.host, target.port)
        except (OSError, UnicodeError) as exc:
            raise UrlPolicyError(f"host {target.host!r} does not resolve: {exc}") from None
        self.check_addresses(target.host, addresses)
        pinned = tuple(dict.fromkeys(a.split("%", 1)[0] for a in addresses))
        return dataclasses.replace(target, addresses=pinned)


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Globally reachable unicast, judged on the IPv4 address an IPv6 form carries."""
    if not ip.is_global or ip.is_multicast:
        return False
    if isinstance(ip, ipaddress.IPv4Address):
        return True
    if ip in _NAT64_LOCAL:
        return False  # the operator's own translator: where it leads is not ours to know
    embedded: ipaddress.IPv4Address | None = None
    if ip.ipv4_mapped is not None:
        embedded = ip.ipv4_mapped
    elif ip in _NAT64 or ip in _IPV4_COMPATIBLE:
        embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    elif ip.sixtofour is not None:
        embedded = ip.sixtofour
    elif ip.teredo is not None:
        embedded = ip.teredo[1]
    return embedded is None or _is_public(embedded)


def check_ref(ref: str | None) -> str | None:
    """A branch, tag or commit name that git cannot mistake for an option or a path trick."""
    if ref is None:
        return None
    field = "data.repository.ref"
    if not isinstance(ref, str) or not ref:
        raise UrlPolicyError("ref must be a non-empty string", field)
    if len(ref) > MAX_REF_CHARS:
        raise UrlPolicyError("ref is too long", field)
    if ref.startswith("-"):
        raise UrlPolicyError("ref must not start with '-'", field)
    if _SHA_RE.match(ref):
        return ref
    if (
        _REF_FORBIDDEN.search(ref)
        or ref.startswith(("/", "."))
        or ref.endswith(("/", ".", ".lock"))
        or "/." in ref
        or ref == "@"
    ):
        raise UrlPolicyError(f"ref {ref!r} is not a valid git ref name", field)
    return ref
