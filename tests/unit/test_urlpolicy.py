"""The repository URL policy against hostile input (CONTRACT §2)."""

from __future__ import annotations

import pytest

from app.errors import UrlPolicyError
from app.urlpolicy import UrlPolicy, check_ref

STRICT = UrlPolicy(allowed_hosts=("github.com", "gitlab.com", "evil.example", "rebind.example"))

# Fake DNS: names an attacker controls resolve wherever they like.
DNS = {
    "github.com": ["140.82.121.4"],
    "gitlab.com": ["172.65.251.78"],
    "evil.example": ["127.0.0.1"],
    "rebind.example": ["140.82.121.4", "10.0.0.5"],
}


async def fake_resolve(host: str, port: int) -> list[str]:
    if host in DNS:
        return DNS[host]
    raise OSError("no such host")


HOSTILE = [
    "file:///etc/passwd",
    "file://github.com/etc/passwd",
    "ext::sh -c touch% /tmp/pwned",
    "ext::ssh -o ProxyCommand=evil github.com",
    "fd::17",
    "ssh://git@github.com/owner/repo.git",
    "git@github.com:owner/repo.git",
    "git://github.com/owner/repo.git",
    "http://github.com/owner/repo.git",  # insecure while ALLOW_INSECURE_GIT is off
    "https://user:pass@github.com/owner/repo.git",
    "https://token@github.com/owner/repo.git",
    "https://github.com@evil.example/owner/repo.git",
    "https://127.0.0.1/owner/repo.git",
    "https://[::1]/owner/repo.git",
    "https://169.254.169.254/latest/meta-data",
    "https://10.0.0.1/owner/repo.git",
    "https://192.168.1.1/owner/repo.git",
    "https://0.0.0.0/owner/repo.git",
    "https://evil.example/owner/repo.git",  # resolves to loopback
    "https://rebind.example/owner/repo.git",  # one of its addresses is private
    "https://bitbucket.org.evil.example/x/y.git",
    "https://notgithub.com/owner/repo.git",
    "https://github.com/",
    "https://github.com",
    "https://github.com/owner/../../repo.git",
    "https://github.com/owner/repo.git?upload-pack=evil",
    "https://github.com/owner/repo.git#frag",
    "https://github.com/owner/repo .git",
    "https://github.com/owner/repo.git\n--upload-pack=x",
    "-uhttps://github.com/owner/repo.git",
    "--upload-pack=touch /tmp/x",
    "",
    "https://" + "a" * 3000 + ".com/x.git",
    "https://github.com:99999/owner/repo.git",
]


@pytest.mark.parametrize("url", HOSTILE)
async def test_hostile_urls_are_refused(url: str) -> None:
    with pytest.raises(UrlPolicyError):
        await STRICT.check(url, fake_resolve)


def test_table_is_large_enough() -> None:
    assert len(HOSTILE) >= 25


@pytest.mark.parametrize(
    "url",
    [
        "https://github.com/owner/repo.git",
        "https://github.com/owner/repo",
        "https://GitHub.com/Owner/Repo.git",
        "https://gitlab.com/group/sub/project.git",
        "https://github.com:443/owner/repo.git",
    ],
)
async def test_ordinary_urls_pass(url: str) -> None:
    target = await STRICT.check(url, fake_resolve)
    assert target.host in ("github.com", "gitlab.com")


async def test_unresolvable_host_is_refused() -> None:
    policy = UrlPolicy(allowed_hosts=("nowhere.example",))
    with pytest.raises(UrlPolicyError, match="does not resolve"):
        await policy.check("https://nowhere.example/a/b.git", fake_resolve)


async def test_ipv4_mapped_ipv6_loopback_is_refused() -> None:
    policy = UrlPolicy(allowed_hosts=("mapped.example",))

    async def resolve(host: str, port: int) -> list[str]:
        return ["::ffff:127.0.0.1"]

    with pytest.raises(UrlPolicyError):
        await policy.check("https://mapped.example/a/b.git", resolve)


async def test_private_networks_and_insecure_allowed_when_configured() -> None:
    policy = UrlPolicy(allowed_hosts=("127.0.0.1",), allow_insecure=True, allow_private=True)
    target = await policy.check("http://127.0.0.1:8123/repo.git", fake_resolve_loopback)
    assert target.port == 8123


async def fake_resolve_loopback(host: str, port: int) -> list[str]:
    return ["127.0.0.1"]


async def test_insecure_still_needs_allowlisted_host() -> None:
    policy = UrlPolicy(allowed_hosts=("github.com",), allow_insecure=True)
    with pytest.raises(UrlPolicyError):
        await policy.check("http://127.0.0.1/repo.git", fake_resolve_loopback)


@pytest.mark.parametrize(
    "ref",
    [
        "-u",
        "--upload-pack=x",
        "main..dev",
        "a b",
        "a~1",
        "a^",
        "a:b",
        "a?",
        "a*",
        "a[",
        "a\\b",
        "@",
        "a@{1}",
        "/main",
        "main/",
        "main.lock",
        ".hidden",
        "a//b",
        "x" * 300,
        "",
        "ma\x00in",
    ],
)
def test_bad_refs_refused(ref: str) -> None:
    with pytest.raises(UrlPolicyError):
        check_ref(ref)


@pytest.mark.parametrize(
    "ref",
    ["main", "release/1.2", "v1.0.0", "feature-x_y", "0123456789abcdef0123456789abcdef01234567"],
)
def test_good_refs_pass(ref: str) -> None:
    assert check_ref(ref) == ref


async def test_resolution_does_not_queue_behind_busy_default_threads() -> None:
    """Clones and file work fill the default executor; the intake's DNS must not wait."""
    import asyncio
    import threading

    from app.urlpolicy import system_resolver

    loop = asyncio.get_running_loop()
    release = threading.Event()
    blockers = [loop.run_in_executor(None, release.wait, 30) for _ in range(64)]
    try:
        addresses = await asyncio.wait_for(system_resolver("localhost", 80), 20)
        assert addresses
        assert not any(b.done() for b in blockers)  # answered while every default thread is busy
    finally:
        release.set()
        await asyncio.gather(*blockers)


@pytest.mark.parametrize(
    "address",
    [
        "64:ff9b::a9fe:a9fe",  # NAT64 (RFC 6052) of 169.254.169.254, the metadata service
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b::a00:5",  # NAT64 of 10.0.0.5
        "64:ff9b:1::a00:5",  # local-use NAT64 prefix (RFC 8215)
        "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
        "::a9fe:a9fe",  # IPv4-compatible (deprecated) form
    ],
)
async def test_ipv6_forms_of_private_ipv4_are_refused(address: str) -> None:
    policy = UrlPolicy(allowed_hosts=("nat64.example",))

    async def resolve(host: str, port: int) -> list[str]:
        return [address]

    with pytest.raises(UrlPolicyError, match="private"):
        await policy.check("https://nat64.example/a/b.git", resolve)


async def test_nat64_of_a_public_address_passes_and_addresses_are_kept() -> None:
    policy = UrlPolicy(allowed_hosts=("nat64.example",))

    async def resolve(host: str, port: int) -> list[str]:
        return ["64:ff9b::8c52:7904", "140.82.121.4"]  # NAT64 of 140.82.121.4, and itself

    target = await policy.check("https://nat64.example/a/b.git", resolve)
    assert target.addresses == ("64:ff9b::8c52:7904", "140.82.121.4")
