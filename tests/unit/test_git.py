"""The git adapter against a real smart-HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.adapters.git import _git_env, _pin_addresses, clone, disk_usage, remove_tree, scrub
from app.errors import JobFailure
from tests.support.gitserver import (
    GitHttpServer,
    StallingServer,
    git_env,
    make_repo,
    rev_parse,
)

TOKEN = "ghs_S3cretTokenValue1234567890abcd"
LIMIT = 50 * 1024 * 1024


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("srv")
    make_repo(
        root / "demo.git",
        {"README.md": "# Demo\n", "src/app.py": "print('hi')\n"},
        commits=3,
        branches={"feature/x": {"feature.txt": "feature\n"}},
        tags={"v1.0": "release 1.0", "light": None},
    )
    make_repo(root / "big.git", {"blob.bin": os.urandom(3 * 1024 * 1024)})
    make_repo(
        root / "weird.git",
        {"README.md": "x\n"},
        default_branch="trunk",
    )
    return root


@pytest.fixture(scope="module")
def server(root: Path) -> Iterator[GitHttpServer]:
    with GitHttpServer(root, redirects={"/moved.git": "/demo.git"}) as srv:
        yield srv


async def test_clone_default_branch(server: GitHttpServer, root: Path, tmp_path: Path) -> None:
    dest = tmp_path / "w" / "repo"
    result = await clone(
        server.url_for("demo"), None, dest, token=None, timeout_s=30, max_bytes=LIMIT
    )
    assert result.commit == rev_parse(root / "demo.git", "main")
    assert (dest / "README.md").read_text() == "# Demo\n"
    assert (dest / "HISTORY.txt").read_text() == "commit 2\n"
    assert result.bytes_on_disk > 0 and result.duration_s >= 0
    shallow = (dest / ".git" / "shallow").read_text().split()
    assert shallow == [result.commit]  # depth 1


async def test_clone_default_branch_not_named_main(
    server: GitHttpServer, root: Path, tmp_path: Path
) -> None:
    result = await clone(
        server.url_for("weird"), None, tmp_path / "r", token=None, timeout_s=30, max_bytes=LIMIT
    )
    assert result.commit == rev_parse(root / "weird.git", "trunk")


@pytest.mark.parametrize("ref", ["main", "feature/x", "v1.0", "light"])
async def test_clone_branch_or_tag(
    server: GitHttpServer, root: Path, tmp_path: Path, ref: str
) -> None:
    dest = tmp_path / "r"
    result = await clone(
        server.url_for("demo"), ref, dest, token=None, timeout_s=30, max_bytes=LIMIT
    )
    assert result.commit == rev_parse(root / "demo.git", ref)
    assert (dest / "feature.txt").exists() == (ref == "feature/x")


async def test_clone_commit_sha(server: GitHttpServer, root: Path, tmp_path: Path) -> None:
    sha = rev_parse(root / "demo.git", "main~1")
    dest = tmp_path / "r"
    result = await clone(
        server.url_for("demo"), sha, dest, token=None, timeout_s=30, max_bytes=LIMIT
    )
    assert result.commit == sha
    assert (dest / "HISTORY.txt").read_text() == "commit 1\n"


async def test_missing_ref_is_clone_failed(server: GitHttpServer, tmp_path: Path) -> None:
    with pytest.raises(JobFailure) as info:
        await clone(
            server.url_for("demo"),
            "nope",
            tmp_path / "r",
            token=None,
            timeout_s=30,
            max_bytes=LIMIT,
        )
    assert info.value.code == "clone_failed"
    assert info.value.message == "ref 'nope' not found"
    assert not info.value.retryable


async def test_missing_sha_is_clone_failed(server: GitHttpServer, tmp_path: Path) -> None:
    with pytest.raises(JobFailure) as info:
        await clone(
            server.url_for("demo"), "ab" * 20, tmp_path / "r", token=None, timeout_s=30,
            max_bytes=LIMIT,
        )  # fmt: skip
    assert info.value.code == "clone_failed"
    assert "not found" in info.value.message


async def test_missing_repository(server: GitHttpServer, tmp_path: Path) -> None:
    with pytest.raises(JobFailure) as info:
        await clone(
            server.url_for("absent"), None, tmp_path / "r", token=None, timeout_s=30,
            max_bytes=LIMIT,
        )  # fmt: skip
    assert info.value.code == "clone_failed"
    assert "not found" in info.value.message or "not accessible" in info.value.message


@pytest.mark.parametrize("ref", ["-oops", "--upload-pack=touch /tmp/x", "a..b", "a b", "x:y", ""])
async def test_option_like_or_bad_refs_refused(
    server: GitHttpServer, tmp_path: Path, ref: str
) -> None:
    before = server.request_count
    with pytest.raises(JobFailure) as info:
        await clone(
            server.url_for("demo"), ref, tmp_path / "r", token=None, timeout_s=30, max_bytes=LIMIT
        )
    assert info.value.code == "clone_failed"
    assert server.request_count == before  # refused before any network access


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc",
        "ext::sh -c touch% /tmp/pwned",
        "ssh://git@github.com/o/r.git",
        "http://user:pw@127.0.0.1:1/r.git",
        "-u/r.git",
    ],
)
async def test_bad_urls_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(JobFailure) as info:
        await clone(url, None, tmp_path / "r", token=None, timeout_s=30, max_bytes=LIMIT)
    assert info.value.code == "clone_failed"
    assert "pw" not in info.value.message


async def test_token_required_and_sent_as_header(
    root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with GitHttpServer(root, require_token=TOKEN) as srv:
        url = srv.url_for("demo")
        with pytest.raises(JobFailure) as info:
            await clone(url, None, tmp_path / "a", token=None, timeout_s=30, max_bytes=LIMIT)
        assert "authentication" in info.value.message
        with pytest.raises(JobFailure) as info:
            await clone(url, None, tmp_path / "b", token="wrong", timeout_s=30, max_bytes=LIMIT)
        assert "wrong" not in info.value.message
        result = await clone(
            url, "main", tmp_path / "c", token=TOKEN, timeout_s=30, max_bytes=LIMIT
        )
        assert result.commit == rev_parse(root / "demo.git", "main")
        assert not srv.saw_credentials_in_url
        assert all(TOKEN not in r.path for r in srv.requests)
        assert any(r.authorization and srv.authorized(r.authorization) for r in srv.requests)
    assert "@" not in url
    basic = base64.b64encode(f"x-access-token:{TOKEN}".encode()).decode()
    for record in caplog.records:
        assert TOKEN not in record.getMessage() and basic not in record.getMessage()
    git_config = (tmp_path / "c" / ".git" / "config").read_text()
    assert TOKEN not in git_config and basic not in git_config  # not persisted in the checkout


def test_token_header_is_scoped_to_the_repository_origin() -> None:
    """The Authorization header is configured for the repository's own scheme, host and port
    only, never as a global `http.extraHeader` that git would send to any host."""
    env = _git_env(TOKEN, "https://GitHub.com:8443/owner/repo.git")
    pairs = {
        env[f"GIT_CONFIG_KEY_{i}"]: env[f"GIT_CONFIG_VALUE_{i}"]
        for i in range(int(env["GIT_CONFIG_COUNT"]))
    }
    headers = {k: v for k, v in pairs.items() if k.lower().endswith("extraheader")}
    assert list(headers) == ["http.https://github.com:8443/.extraHeader"]
    assert headers["http.https://github.com:8443/.extraHeader"].startswith("Authorization: Basic ")
    assert "http.extraHeader" not in pairs
    no_token = _git_env(None, "https://github.com/owner/repo.git")
    assert not any(v.startswith("Authorization") for v in no_token.values())


async def test_token_scrubbed_from_errors(root: Path, tmp_path: Path) -> None:
    # The server wants a different token: the failure message must not echo ours.
    with (
        GitHttpServer(root, require_token="other-token-value") as srv,
        pytest.raises(JobFailure) as info,
    ):
        await clone(
            srv.url_for("demo"),
            None,
            tmp_path / "r",
            token=TOKEN,
            timeout_s=30,
            max_bytes=LIMIT,
        )
    basic = base64.b64encode(f"x-access-token:{TOKEN}".encode()).decode()
    assert TOKEN not in str(info.value) and basic not in str(info.value)


def test_scrub() -> None:
    basic = base64.b64encode(f"x-access-token:{TOKEN}".encode()).decode()
    text = f"fatal: https://x-access-token:{TOKEN}@h/r.git Authorization: Basic {basic}"
    out = scrub(text, (TOKEN, basic))
    assert TOKEN not in out and basic not in out


async def test_timeout_against_stalling_server(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    with StallingServer() as stall:
        t0 = loop.time()
        with pytest.raises(JobFailure) as info:
            await clone(
                stall.url_for("demo"),
                None,
                tmp_path / "r",
                token=None,
                timeout_s=1,
                max_bytes=LIMIT,
            )
        elapsed = loop.time() - t0
    assert info.value.code == "clone_failed"
    assert info.value.message == "clone timed out after 1 s"
    assert info.value.retryable
    assert elapsed < 5


async def test_size_limit(server: GitHttpServer, tmp_path: Path) -> None:
    with pytest.raises(JobFailure) as info:
        await clone(
            server.url_for("big"), None, tmp_path / "r", token=None, timeout_s=30,
            max_bytes=100 * 1024,
        )  # fmt: skip
    assert info.value.code == "clone_failed"
    assert "size limit" in info.value.message
    assert not info.value.retryable


async def test_size_limit_after_checkout(root: Path, tmp_path: Path) -> None:
    # 4 MB of zeros packs into a few KB: the fetch passes, the checkout must not.
    make_repo(root / "bomb.git", {"zeros.bin": b"\0" * 4 * 1024 * 1024})
    with GitHttpServer(root) as srv, pytest.raises(JobFailure) as info:
        await clone(
            srv.url_for("bomb"), None, tmp_path / "r", token=None, timeout_s=30,
            max_bytes=512 * 1024,
        )  # fmt: skip
    assert "size limit" in info.value.message


async def test_redirect_not_followed(server: GitHttpServer, tmp_path: Path) -> None:
    before = len(server.paths())
    with pytest.raises(JobFailure) as info:
        await clone(
            server.url_for("moved"), None, tmp_path / "r", token=None, timeout_s=30, max_bytes=LIMIT
        )
    assert info.value.code == "clone_failed"
    assert "redirect" in info.value.message
    after = server.paths()[before:]
    assert after and all(p.startswith("/moved.git") for p in after)


async def test_event_loop_not_blocked(server: GitHttpServer, tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = loop.time()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = loop.time()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    try:
        await clone(
            server.url_for("big"), None, tmp_path / "r", token=None, timeout_s=30, max_bytes=LIMIT
        )
    finally:
        done.set()
        await asyncio.wait_for(tick, 5)
    assert len(gaps) >= 5
    assert max(gaps) < 0.25


async def test_cancel_kills_git_promptly(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    with StallingServer() as stall:
        task = asyncio.create_task(
            clone(
                stall.url_for("demo"),
                None,
                tmp_path / "r",
                token=None,
                timeout_s=60,
                max_bytes=LIMIT,
            )
        )
        await asyncio.sleep(0.5)
        t0 = loop.time()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        assert loop.time() - t0 < 5


async def test_dest_must_be_empty(server: GitHttpServer, tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "x").write_text("x")
    with pytest.raises(JobFailure):
        await clone(
            server.url_for("demo"), None, tmp_path / "r", token=None, timeout_s=30, max_bytes=LIMIT
        )


async def test_remove_tree_handles_read_only(server: GitHttpServer, tmp_path: Path) -> None:
    dest = tmp_path / "r"
    await clone(server.url_for("demo"), None, dest, token=None, timeout_s=30, max_bytes=LIMIT)
    ro_dir = dest / "src"
    (ro_dir / "app.py").chmod(stat.S_IRUSR)
    ro_dir.chmod(stat.S_IRUSR | stat.S_IXUSR)
    remove_tree(dest)
    assert not dest.exists()
    remove_tree(dest)  # missing is fine


# -- hostile trees (issue 11 item 3) ---------------------------------------------------------


def _tree_bomb(path: Path, width: int) -> Path:
    """A bare repository whose one commit checks out `width` x `width` directories, each
    holding one small file, from a pack of four objects: identical trees are stored once."""
    work = path.parent / f"{path.name}-build"
    env = git_env()

    def run(*args: str, stdin: str | None = None) -> str:
        out = subprocess.run(
            ["git", *args], cwd=work, env=env, input=stdin, capture_output=True, text=True,
            check=True, timeout=60,
        )  # fmt: skip
        return out.stdout.strip()

    work.mkdir(parents=True)
    run("init", "-q", "-b", "main", ".")
    blob = run("hash-object", "-w", "--stdin", stdin="x" * 100)
    leaf = run("mktree", stdin=f"100644 blob {blob}\tf\n")
    mid = run("mktree", stdin="".join(f"040000 tree {leaf}\td{i:03}\n" for i in range(width)))
    top = run("mktree", stdin="".join(f"040000 tree {mid}\td{i:03}\n" for i in range(width)))
    commit = run("commit-tree", top, "-m", "bomb")
    run("update-ref", "refs/heads/main", commit)
    run("clone", "-q", "--bare", ".", str(path))
    return path


def _worktree_entries(dest: Path) -> list[str]:
    return [p.name for p in dest.iterdir() if p.name != ".git"] if dest.exists() else []


async def test_tree_bomb_refused_before_checkout(root: Path, tmp_path: Path) -> None:
    # 1.2 MB of file bytes but 100 x 100 directories: on disk ~80 MB of blocks and 20,000
    # inodes. The byte limit used to count file bytes only and let it through.
    bomb = _tree_bomb(root / "treebomb.git", 100)
    pack_bytes = sum(f.stat().st_size for f in (bomb / "objects").rglob("*") if f.is_file())
    dest = tmp_path / "r"
    with GitHttpServer(root) as srv, pytest.raises(JobFailure) as info:
        await clone(
            srv.url_for("treebomb"), None, dest, token=None, timeout_s=60,
            max_bytes=8 * 1024 * 1024,
        )  # fmt: skip
    usage, inodes = disk_usage(dest)
    print(f"FIGURES tree bomb: objects {pack_bytes} B; refused: {info.value.message!r}; "
          f"dest {usage} B in {inodes} entries")  # fmt: skip
    assert info.value.code == "clone_failed" and not info.value.retryable
    assert "size limit" in info.value.message
    assert _worktree_entries(dest) == []  # refused before anything was checked out
    assert usage < 1024 * 1024


async def test_too_many_entries_refused_before_checkout(root: Path, tmp_path: Path) -> None:
    _tree_bomb(root / "wide.git", 40)  # 40 + 1,600 directories, 1,600 files
    dest = tmp_path / "r"
    with GitHttpServer(root) as srv:
        with pytest.raises(JobFailure) as info:
            await clone(
                srv.url_for("wide"), None, dest, token=None, timeout_s=60, max_bytes=LIMIT,
                max_entries=1000,
            )  # fmt: skip
        assert "1000 files and directories" in info.value.message
        assert _worktree_entries(dest) == []
        ok = await clone(
            srv.url_for("wide"), None, tmp_path / "ok", token=None, timeout_s=60,
            max_bytes=LIMIT, max_entries=4000,
        )  # fmt: skip
    assert ok.bytes_on_disk >= 1640 * 4096 * 0.5  # directories' blocks are counted


def test_disk_usage_counts_blocks_and_inodes(tmp_path: Path) -> None:
    for i in range(50):
        (tmp_path / f"d{i}").mkdir()
        (tmp_path / f"d{i}" / "f").write_bytes(b"x")
    usage, inodes = disk_usage(tmp_path)
    assert inodes == 100
    assert usage > 50 * 1  # more than the 50 file bytes: blocks of files and directories
    assert usage >= 50 * 512


LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    "size 12345\n"
)


async def test_lfs_tracked_files_stay_pointers(root: Path, tmp_path: Path) -> None:
    # The image has no git-lfs: no LFS filter may be configured, or git fails on the first
    # LFS-tracked file. Nothing is downloaded; the pointer text is what the CLI reads.
    make_repo(
        root / "tracked.git",
        {
            ".gitattributes": "*.bin filter=lfs diff=lfs merge=lfs -text\n",
            "model.bin": LFS_POINTER,
            "README.md": "# uses LFS\n",
        },
    )
    dest = tmp_path / "r"
    with GitHttpServer(root) as srv:
        before = srv.request_count
        result = await clone(
            srv.url_for("tracked"), None, dest, token=None, timeout_s=30, max_bytes=LIMIT
        )
        paths = srv.paths()[before:]
    assert result.commit == rev_parse(root / "tracked.git", "main")
    assert (dest / "model.bin").read_text() == LFS_POINTER
    assert not any("/info/lfs" in p for p in paths)  # no LFS batch API call


def test_pinned_addresses_become_one_curlopt_resolve_entry() -> None:
    env = _git_env(None, "https://git.example/o/r.git")
    count = int(env["GIT_CONFIG_COUNT"])
    _pin_addresses(env, "https://git.example/o/r.git", ("140.82.121.4", "2001:db8::1"))
    assert env["GIT_CONFIG_COUNT"] == str(count + 1)
    assert env[f"GIT_CONFIG_KEY_{count}"] == "http.curloptResolve"
    assert env[f"GIT_CONFIG_VALUE_{count}"] == "git.example:443:140.82.121.4,[2001:db8::1]"
    literal = _git_env(None, "http://127.0.0.1:8080/r.git")
    _pin_addresses(literal, "http://127.0.0.1:8080/r.git", ("127.0.0.1",))
    assert literal == _git_env(
        None, "http://127.0.0.1:8080/r.git"
    )  # an address literal is not looked up: nothing to pin
