"""The repository cache against a real smart-HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import subprocess
from pathlib import Path

import pytest

from app.adapters.git import CloneResult, clone, remove_tree
from app.adapters.repo_cache import RepoCache, cache_key, normalize_url
from app.config import load_settings
from app.errors import JobFailure
from tests.support.gitserver import GitHttpServer, git_env, make_repo, rev_parse

TOKEN = "ghs_CacheTokenValue1234567890abcdef"
LIMIT = 50 * 1024 * 1024


def _commit(bare: Path, files: dict[str, str], message: str) -> str:
    """Add one commit on main of the bare repository `bare`; return its id."""
    work = bare.parent / f"{bare.name}-work"
    env = git_env()
    if not work.exists():
        subprocess.run(["git", "clone", "-q", str(bare), str(work)], env=env, check=True)
    subprocess.run(["git", "pull", "-q"], cwd=work, env=env, check=True)
    for name, text in files.items():
        (work / name).write_text(text)
    subprocess.run(["git", "add", "-A"], cwd=work, env=env, check=True)
    subprocess.run(["git", "commit", "-q", "-m", message], cwd=work, env=env, check=True)
    subprocess.run(["git", "push", "-q", "origin", "HEAD:main"], cwd=work, env=env, check=True)
    return rev_parse(bare, "main")


async def _clone(
    cache: RepoCache, url: str, ref: str | None, dest: Path, token: str | None = None
) -> CloneResult:
    """One job's clone, then (as a test) wait for a mirror filled in the background."""
    result = await clone(url, ref, dest, token=token, timeout_s=30, max_bytes=LIMIT, cache=cache)
    await asyncio.to_thread(cache.settle, 30)
    return result


def test_normalized_url_keys_one_repository_per_spelling() -> None:
    assert normalize_url("https://GitHub.com:443/a/b.git/") == "https://github.com/a/b"
    assert cache_key("https://github.com/a/b") == cache_key("https://GITHUB.com/a/b.git")
    assert cache_key("https://github.com/a/b") != cache_key("https://github.com/a/c")
    assert cache_key("http://h:8080/a") != cache_key("http://h:8081/a")


def test_off_with_one_setting(tmp_path: Path) -> None:
    on = load_settings({"DATA_DIR": str(tmp_path), "CLI_USER": "nobody"})
    cache = RepoCache.from_settings(on)
    assert cache is not None and cache.root == tmp_path / "repo-cache"
    off = {"REPO_CACHE_MAX_BYTES": "0", "CLI_USER": "nobody"}
    assert RepoCache.from_settings(load_settings(off)) is None


def test_off_while_the_cli_runs_as_the_workers_user(tmp_path: Path) -> None:
    """Mirrors outlive their jobs (private repositories too): a CLI of the worker's uid could
    read every one of them, so the cache needs CLI_USER."""
    assert RepoCache.from_settings(load_settings({"DATA_DIR": str(tmp_path)})) is None


async def test_first_clone_is_direct_and_fills_the_mirror_after(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fondation.repo_cache")
    root = tmp_path / "srv"
    bare = make_repo(root / "demo.git", {"README.md": "# Demo\n"})
    cache = RepoCache(tmp_path / "cache", LIMIT, min_clone_bytes=0, fill_delay_s=0)
    with GitHttpServer(root) as server:
        url = server.url_for("demo")
        result = await clone(
            url, "main", tmp_path / "a", token=None, timeout_s=30, max_bytes=LIMIT, cache=cache
        )
        assert result.commit == rev_parse(bare, "main")
        assert (tmp_path / "a" / ".git" / "shallow").exists()  # git.py's own clone
        await asyncio.to_thread(cache.settle, 30)
    assert (cache.mirror_path(url) / "shallow").read_text().split() == [result.commit]
    assert [r.getMessage() for r in caplog.records] == ["repository cache filled"]


async def test_a_small_repository_gets_no_mirror(tmp_path: Path) -> None:
    root = tmp_path / "srv"
    make_repo(root / "small.git", {"README.md": "# s\n"})
    make_repo(root / "big.git", {"blob.bin": os.urandom(600_000)})
    cache = RepoCache(tmp_path / "cache", LIMIT, min_clone_bytes=500_000, fill_delay_s=0)
    with GitHttpServer(root) as server:
        for name in ("small", "big"):
            for attempt in range(2):
                await _clone(cache, server.url_for(name), None, tmp_path / f"{name}{attempt}")
        assert not cache.mirror_path(server.url_for("small")).exists()
        assert cache.mirror_path(server.url_for("big")).is_dir()


async def test_two_concurrent_jobs_on_one_repository_with_different_refs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fondation.repo_cache")
    root = tmp_path / "srv"
    bare = make_repo(
        root / "demo.git",
        {"README.md": "# Demo\n"},
        commits=3,
        branches={"feature/x": {"feature.txt": "feature\n"}},
        tags={"v1": "release 1"},
    )
    cache = RepoCache(tmp_path / "cache", LIMIT, min_clone_bytes=0, fill_delay_s=0)
    with GitHttpServer(root) as server:
        url = server.url_for("demo")
        await _clone(cache, url, None, tmp_path / "warm")  # the mirror exists: a real race
        refs: list[str | None] = ["main", "feature/x", "v1", None]
        results = await asyncio.gather(
            *(_clone(cache, url, ref, tmp_path / f"job{i}") for i, ref in enumerate(refs))
        )
    assert [r.commit for r in results] == [
        rev_parse(bare, "main"),
        rev_parse(bare, "feature/x"),
        rev_parse(bare, "v1^{commit}"),
        rev_parse(bare, "main"),
    ]
    assert (tmp_path / "job1" / "feature.txt").read_text() == "feature\n"
    assert not (tmp_path / "job0" / "feature.txt").exists()
    assert [p.name for p in (cache.root / "mirrors").iterdir()] == [f"{cache_key(url)}.git"]
    assert "dropped a" not in caplog.text  # no job fell back to a direct clone
    # One job took the ready tree (a rename: never two), the others went through the mirror.
    assert caplog.text.count("cloned from a ready tree") == 1
    assert caplog.text.count("cloned through the repository cache") == 3


async def test_eviction_keeps_the_cache_under_its_size_bound(tmp_path: Path) -> None:
    root = tmp_path / "srv"
    for name in ("a", "b", "c"):
        make_repo(root / f"{name}.git", {"blob.bin": os.urandom(300_000).hex()})
    probe = RepoCache(tmp_path / "probe", LIMIT, min_clone_bytes=0, fill_delay_s=0)
    with GitHttpServer(root) as server:
        await _clone(probe, server.url_for("a"), None, tmp_path / "probe-wt")
        one = probe.size()
        # Room for two mirrors, not three.
        cache = RepoCache(tmp_path / "cache", int(one * 2.5), min_clone_bytes=0, fill_delay_s=0)
        await _clone(cache, server.url_for("a"), None, tmp_path / "a1")
        await _clone(cache, server.url_for("b"), None, tmp_path / "b1")
        await _clone(cache, server.url_for("a"), None, tmp_path / "a2")  # a is now the newest
        await _clone(cache, server.url_for("c"), None, tmp_path / "c1")
        kept = {p.name for p in (cache.root / "mirrors").iterdir()}
        assert kept == {f"{cache_key(server.url_for(n))}.git" for n in ("a", "c")}
        ready = {p.name for p in (cache.root / "ready").iterdir()}
        assert ready == {cache_key(server.url_for(n)) for n in ("a", "c")}
        assert cache.size() <= cache.max_bytes
        # A mirror larger than the whole bound is used once, then dropped.
        tiny = RepoCache(tmp_path / "tiny", 1000, min_clone_bytes=0, fill_delay_s=0)
        result = await _clone(tiny, server.url_for("b"), None, tmp_path / "b2")
    assert (tmp_path / "b2" / "blob.bin").stat().st_size == 600_000
    assert result.commit
    assert tiny.size() == 0
    assert not any((tiny.root / "ready").iterdir())


@pytest.mark.parametrize("way", ["mirror", "ready tree"])
@pytest.mark.parametrize("damage", ["truncate packs", "garbage config", "not a repository"])
async def test_a_corrupt_mirror_is_dropped_and_never_fails_the_job(
    tmp_path: Path, damage: str, way: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The job goes through the damaged mirror (no ready tree), or takes the ready tree and
    the damage is found when the mirror is brought up to date behind it."""
    caplog.set_level(logging.INFO, logger="fondation.repo_cache")
    root = tmp_path / "srv"
    bare = make_repo(root / "demo.git", {"README.md": "# Demo\n", "src/a.py": "a = 1\n"})
    cache = RepoCache(tmp_path / "cache", LIMIT, min_clone_bytes=0, fill_delay_s=0)
    with GitHttpServer(root) as server:
        url = server.url_for("demo")
        await _clone(cache, url, "main", tmp_path / "a")
        if way == "mirror":
            remove_tree(cache.ready_path(url))
        _damage(cache.mirror_path(url), damage)
        head = _commit(bare, {"README.md": "# Demo 2\n"}, "second")
        result = await _clone(cache, url, "main", tmp_path / "b")
        assert result.commit == head
        assert ("cloned from a ready tree" in caplog.text) is (way == "ready tree")
        # A config is rewritten before each fetch; broken objects drop the mirror.
        assert ("dropped a mirror" in caplog.text) is (damage != "garbage config")
        assert (tmp_path / "b" / "README.md").read_text() == "# Demo 2\n"
        assert (tmp_path / "b" / "src" / "a.py").read_text() == "a = 1\n"
        # The next job builds a healthy mirror again and uses it.
        again = await _clone(cache, url, "main", tmp_path / "c")
    assert again.commit == head
    assert head in (cache.mirror_path(url) / "shallow").read_text().split()


def _damage(repo: Path, damage: str) -> None:
    if damage == "truncate packs":
        for path in (repo / "objects").rglob("*"):
            if path.is_file():
                path.chmod(0o644)
                path.write_bytes(path.read_bytes()[:20])
    elif damage == "garbage config":
        (repo / "config").write_text("[core\n\tbare = maybe\n[[[")
    else:
        for child in repo.iterdir():
            if child.is_dir():
                subprocess.run(["rm", "-rf", str(child)], check=True)


@pytest.mark.parametrize("way", ["ready tree", "mirror"])
async def test_a_repeated_job_fetches_only_what_changed(
    tmp_path: Path, way: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The second job on a repository takes its ready tree, or (none there: another job holds
    it) goes through the mirror; either way only the new commit's objects travel, and the work
    tree shares nothing with the cache."""
    caplog.set_level(logging.INFO, logger="fondation.repo_cache")
    root = tmp_path / "srv"
    big = os.urandom(100_000).hex()
    bare = make_repo(root / "demo.git", {"README.md": "# Demo\n", "big.txt": big})
    cache = RepoCache(tmp_path / "cache", LIMIT, min_clone_bytes=0, fill_delay_s=0)
    with GitHttpServer(root) as server:
        url = server.url_for("demo")
        first = await _clone(cache, url, "main", tmp_path / "a")
        ready = cache.ready_path(url)
        assert (ready / ".git" / "HEAD").read_text().strip() == first.commit
        if way == "mirror":
            remove_tree(ready)
        head = _commit(bare, {"README.md": "# Demo 2\n"}, "second")
        sent = server.bytes_sent
        second = await clone(
            url, "main", tmp_path / "b", token=None, timeout_s=30, max_bytes=LIMIT, cache=cache
        )
        job_bytes = server.bytes_sent - sent
        await asyncio.to_thread(cache.settle, 30)
    assert ("cloned from a ready tree" in caplog.text) is (way == "ready tree")
    assert second.commit == head
    assert (tmp_path / "b" / "README.md").read_text() == "# Demo 2\n"
    assert (tmp_path / "b" / "big.txt").read_text() == big
    # The 200 kB file was in the cache already: only the new commit's objects travelled.
    assert job_bytes < 20_000, job_bytes
    # The work tree shares nothing with the cache: own objects, no link back to it.
    git_dir = tmp_path / "b" / ".git"
    assert not (git_dir / "FETCH_HEAD").exists()
    assert not (git_dir / "objects" / "info" / "alternates").exists()
    assert str(cache.root) not in (git_dir / "config").read_text()
    for path in (git_dir / "objects").rglob("*"):
        if path.is_file():
            assert path.stat().st_nlink == 1, path
    # Behind the job: the mirror holds its commit, and a new ready tree was made from it.
    assert head in (cache.mirror_path(url) / "shallow").read_text().split()
    assert (ready / ".git" / "HEAD").read_text().strip() == head
    assert not [p for p in ready.parent.iterdir() if p.name.startswith(".")]


async def test_a_ready_trees_index_is_trusted_so_a_checkout_reads_no_file(
    tmp_path: Path,
) -> None:
    """Git compares whole seconds: files written in the index's second are "racily clean", and
    the job's checkout would hash each of them. The ready tree's index is written later."""
    root = tmp_path / "srv"
    make_repo(root / "demo.git", {f"f{i}.txt": f"{i}\n" for i in range(20)})
    cache = RepoCache(tmp_path / "cache", LIMIT, min_clone_bytes=0, fill_delay_s=0)
    with GitHttpServer(root) as server:
        url = server.url_for("demo")
        await _clone(cache, url, "main", tmp_path / "a")
    ready = cache.ready_path(url)
    index_s = int((ready / ".git" / "index").stat().st_mtime)
    for i in range(20):
        assert int((ready / f"f{i}.txt").stat().st_mtime) < index_s


async def test_a_damaged_ready_tree_falls_back_to_the_mirror(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fondation.repo_cache")
    root = tmp_path / "srv"
    bare = make_repo(root / "demo.git", {"README.md": "# Demo\n", "src/a.py": "a = 1\n"})
    cache = RepoCache(tmp_path / "cache", LIMIT, min_clone_bytes=0, fill_delay_s=0)
    with GitHttpServer(root) as server:
        url = server.url_for("demo")
        await _clone(cache, url, "main", tmp_path / "a")
        _damage(cache.ready_path(url) / ".git", "truncate packs")
        head = _commit(bare, {"README.md": "# Demo 2\n"}, "second")
        result = await _clone(cache, url, "main", tmp_path / "b")
    assert "dropped a ready tree" in caplog.text
    assert "cloned through the repository cache" in caplog.text
    assert result.commit == head
    assert (tmp_path / "b" / "README.md").read_text() == "# Demo 2\n"
    assert (tmp_path / "b" / "src" / "a.py").read_text() == "a = 1\n"


def test_a_ready_tree_whose_mirror_is_gone_is_evicted(tmp_path: Path) -> None:
    """A mirror evicted while its ready tree was being made leaves that tree behind: no job
    would take it (a repository without a mirror is cloned directly), so eviction drops it."""
    cache = RepoCache(tmp_path / "cache", LIMIT)
    kept, orphan = "a" * 32, "b" * 32
    (cache.root / "mirrors" / f"{kept}.git").mkdir(parents=True)
    for key in (kept, orphan):
        (cache.root / "ready" / key / ".git").mkdir(parents=True)
    cache.evict()
    assert [p.name for p in (cache.root / "ready").iterdir()] == [kept]


def test_a_stopped_workers_half_made_trees_are_swept_at_start(tmp_path: Path) -> None:
    settings = load_settings({"DATA_DIR": str(tmp_path), "CLI_USER": "nobody"})
    ready = settings.repo_cache_dir / "ready"
    for name in (".build-1a2b", ".taken-3c4d", "0123abcd"):
        (ready / name / ".git").mkdir(parents=True)
    RepoCache.from_settings(settings)
    assert [p.name for p in ready.iterdir()] == ["0123abcd"]


async def test_token_reaches_the_server_but_never_the_mirror(tmp_path: Path) -> None:
    root = tmp_path / "srv"
    make_repo(root / "private.git", {"README.md": "# Private\n"})
    cache = RepoCache(tmp_path / "cache", LIMIT, min_clone_bytes=0, fill_delay_s=0)
    basic = base64.b64encode(f"x-access-token:{TOKEN}".encode())
    with GitHttpServer(root, require_token=TOKEN) as server:
        url = server.url_for("private")
        await _clone(cache, url, "main", tmp_path / "a", token=TOKEN)
        assert (tmp_path / "a" / "README.md").read_text() == "# Private\n"
        for path in cache.root.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert TOKEN.encode() not in data and basic not in data, path
        assert "extraheader" not in (cache.mirror_path(url) / "config").read_text().lower()
        assert not server.saw_credentials_in_url
        # Another job without the token gets nothing from what the first one cached.
        with pytest.raises(JobFailure) as err:
            await _clone(cache, url, "main", tmp_path / "b", token=None)
        assert "authentication failed" in err.value.message
        assert not (tmp_path / "b" / "README.md").exists()
        with pytest.raises(JobFailure):
            await _clone(cache, url, "main", tmp_path / "c", token="wrong-token")


async def test_what_a_cli_plants_in_the_mirror_does_not_steer_the_next_clone(
    tmp_path: Path,
) -> None:
    root = tmp_path / "srv"
    make_repo(root / "demo.git", {"README.md": "# Demo\n"})
    make_repo(root / "other.git", {"SECRET.md": "other tenant\n"})
    cache = RepoCache(tmp_path / "cache", LIMIT, min_clone_bytes=0, fill_delay_s=0)
    marker = tmp_path / "hook-ran"
    with GitHttpServer(root) as server:
        url = server.url_for("demo")
        await _clone(cache, url, "main", tmp_path / "a")
        await _clone(cache, server.url_for("other"), "main", tmp_path / "o")
        mirror = cache.mirror_path(url)
        other = cache.mirror_path(server.url_for("other"))
        # What a hostile CLI could write: hooks, a config that runs commands, alternates
        # into another tenant's mirror.
        (mirror / "hooks").mkdir(exist_ok=True)
        for hook in ("reference-transaction", "post-checkout", "pre-auto-gc"):
            (mirror / "hooks" / hook).write_text(f"#!/bin/sh\ntouch {marker}\n")
            (mirror / "hooks" / hook).chmod(0o755)
        (mirror / "config").write_text(
            f"[core]\n\tbare = true\n\thooksPath = {mirror / 'hooks'}\n"
            f"\tfsmonitor = touch {marker}\n[include]\n\tpath = /etc/passwd\n"
        )
        (mirror / "objects" / "info").mkdir(parents=True, exist_ok=True)
        (mirror / "objects" / "info" / "alternates").write_text(f"{other / 'objects'}\n")
        result = await _clone(cache, url, "main", tmp_path / "b")
    assert result.commit
    assert not marker.exists()
    assert "hooksPath" not in (mirror / "config").read_text()
    assert not (mirror / "objects" / "info" / "alternates").exists()
    assert not (tmp_path / "b" / "SECRET.md").exists()
