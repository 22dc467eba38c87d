"""The git steps of the repository cache (app/adapters/repo_cache.py decides which to take):
fetch a ref into a bare mirror, copy a work tree out of a mirror, make a ready tree, and move
a ready tree to a job's ref. Every run goes through git.py's helpers (hardened environment,
limits, size watch, abort). Each step raises `git.CloneFailed` for the server's answer (auth,
missing ref, size, timeout) and `Broken` when the cache's own copy failed."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
from pathlib import Path

from app.adapters import git

__all__ = ["READY_PIN", "Broken", "make_ready", "move_ready", "update_mirror", "work_tree"]

# Pins a ready tree's commit, so that the job's fetch sends it as a "have".
READY_PIN = "refs/fondation/base"
_CONFIG = "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = {bare}\n"
# Files a hostile process could plant in a mirror to steer the next git run in it.
_PLANTABLE = ("objects/info/alternates", "objects/info/http-alternates", "info/grafts", "commondir")
_RACY_MARGIN_S = 0.02  # file times come from the kernel's coarse clock, a tick behind


class Broken(Exception):
    """The cache's own copy (a mirror or a ready tree) failed, not the server: drop it and
    take another way."""


def update_mirror(
    mirror: Path,
    url: str,
    ref: str | None,
    token: str | None,
    addresses: tuple[str, ...],
    limits: git.Limits,
) -> tuple[str, int]:
    """Fetch `ref` into the mirror (created if missing); return its commit and the bytes
    the mirror grew by."""
    fresh = not mirror.is_dir() or mirror.is_symlink()
    if fresh:
        git.remove_tree(mirror)
        mirror.parent.mkdir(parents=True, exist_ok=True)
        init(mirror, bare=True)
    else:
        sanitize(mirror)
    # The size watch covers what this fetch adds, not what earlier jobs left; measured as
    # the watch measures (disk blocks and entries), in one walk of the mirror.
    before, entries = git.disk_usage(mirror) if mirror.is_dir() else (0, 0)
    fetch_limits = dataclasses.replace(
        limits,
        dest=mirror,
        max_bytes=before + limits.max_bytes,
        max_entries=limits.max_entries + entries,
    )
    target = "HEAD" if ref is None else ref
    # Pinned under a ref of its own: the commit stays a "have" for the next fetch.
    pin = f"refs/cache/{hashlib.sha1(target.encode()).hexdigest()}"  # noqa: S324 - a name
    try:
        run(
            [
                f"--git-dir={mirror}",
                *git.FETCH_ONE_COMMIT,
                url,
                f"+{target}:{pin}",
            ],
            token,
            mirror,
            fetch_limits,
            url=url,
            addresses=addresses,
        )
        commit = (mirror / "FETCH_HEAD").read_text(encoding="ascii").split("\t", 1)[0]
        if not git.SHA.fullmatch(commit):
            raise Broken("the mirror's FETCH_HEAD holds no commit")
        if git.SHA.fullmatch(target) and commit.lower() != target.lower():
            raise git.CloneFailed(f"ref {target!r} not found")
    except git.CloneFailed as failed:
        if fresh:
            git.remove_tree(mirror)  # no empty mirror for a URL that did not clone
        if not fresh and suspect(failed):
            raise Broken(failed.message) from None
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise Broken(f"{type(exc).__name__} reading the mirror") from None
    return commit, git.disk_usage(mirror)[0] - before


def work_tree(mirror: Path, commit: str, dest: Path, limits: git.Limits) -> str:
    """Make `dest` a checkout of `commit` (a commit or an annotated tag) with its own
    objects, verified by index-pack; return the commit checked out."""
    local = (
        ("protocol.file.allow", "always"),  # the mirror only, by its path; never the job's URL
        ("uploadpack.allowAnySHA1InWant", "true"),
    )
    try:
        init(dest / ".git", bare=False)
        run(
            [
                *git.FETCH_ONE_COMMIT,
                mirror.as_uri(),
                commit,
            ],
            None,
            dest,
            limits,
            local,
        )
        # The same census as a direct clone's before anything is checked out: a tiny pack
        # can describe a huge tree.
        git.tree_census(git.git_env(None, mirror.as_uri()), dest, limits, "FETCH_HEAD")
        # FETCH_HEAD, not `commit`: an annotated tag's id peels to its commit here.
        run(["checkout", "-q", "--detach", "--force", "FETCH_HEAD", "--"], None, dest, limits)
    except git.CloneFailed as failed:
        if suspect(failed):
            raise Broken(failed.message) from None
        raise
    with contextlib.suppress(FileNotFoundError):
        (dest / ".git" / "FETCH_HEAD").unlink()  # it names the mirror
    head = (dest / ".git" / "HEAD").read_text(encoding="ascii").strip()
    if not git.SHA.fullmatch(head):
        raise Broken("the checkout did not leave a detached HEAD")
    return head


def make_ready(tree: Path, commit: str, limits: git.Limits) -> None:
    """Make a work tree of `commit` (from `work_tree`) a ready tree: its index trusted, its
    commit pinned. Reads nothing of the mirror: run it without the mirror's lock."""
    # The checkout wrote the files and the index within one second, and git compares whole
    # seconds (built without USE_NSEC, as Debian's is): it cannot trust the index's stat data
    # ("racily clean"), and the taking job's checkout would re-read and hash every file
    # (bench: 25-40 ms of a 2.7 MB tree's; ~5 ms once trusted). Refreshed in the next second,
    # the index is trusted.
    time.sleep(1.0 - time.time() % 1.0 + _RACY_MARGIN_S)
    run(["update-index", "-q", "--refresh"], None, tree, limits)
    # Pinned, so that the taking job's fetch sends it as a "have".
    pin = tree / ".git" / READY_PIN
    pin.parent.mkdir(parents=True, exist_ok=True)
    pin.write_text(f"{commit}\n", encoding="ascii")


def move_ready(
    tree: Path,
    url: str,
    ref: str | None,
    token: str | None,
    addresses: tuple[str, ...],
    limits: git.Limits,
) -> str:
    """Fetch `ref` from the server into a taken ready tree and check it out; return the
    commit. Raises `git.CloneFailed` for the server's answer, `Broken` for the tree's."""
    tree_limits = dataclasses.replace(limits, dest=tree)
    target = "HEAD" if ref is None else ref
    try:
        run(
            [
                "fetch",
                # a process on the job's path, for a repository used once
                "--no-auto-maintenance",
                *git.FETCH_ONE_COMMIT[1:],
                url,
                f"+{target}:{READY_PIN}",
            ],
            token,
            tree,
            tree_limits,
            url=url,
            addresses=addresses,
        )
        git_dir = tree / ".git"
        commit = (git_dir / "FETCH_HEAD").read_text(encoding="ascii").split("\t", 1)[0]
        if not git.SHA.fullmatch(commit):
            raise Broken("the ready tree's FETCH_HEAD holds no commit")
        if git.SHA.fullmatch(target) and commit.lower() != target.lower():
            raise git.CloneFailed(f"ref {target!r} not found")
        git.tree_census(git.git_env(None, url), tree, tree_limits, "FETCH_HEAD")
        # Only the files that differ from the tree's commit are written.
        run(
            ["checkout", "-q", "--detach", "--force", "FETCH_HEAD", "--"],
            None,
            tree,
            tree_limits,
        )
        (git_dir / "FETCH_HEAD").unlink()  # it names the server
        head = (git_dir / "HEAD").read_text(encoding="ascii").strip()
    except git.CloneFailed as failed:
        if suspect(failed):
            raise Broken(failed.message) from None
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise Broken(f"{type(exc).__name__} reading the ready tree") from None
    if not git.SHA.fullmatch(head):
        raise Broken("the checkout did not leave a detached HEAD")
    return head


def run(
    args: list[str],
    token: str | None,
    cwd: Path,
    limits: git.Limits,
    extra: tuple[tuple[str, str], ...] = (),
    *,
    url: str | None = None,
    addresses: tuple[str, ...] = (),
) -> None:
    # The token header is scoped to the repository's origin, and git connects only to
    # the addresses the URL policy checked (both as for a direct clone).
    env = git.git_env(token, url or cwd.as_uri())
    if url is not None:
        git.pin_addresses(env, url, addresses)
    if extra:
        count = int(env["GIT_CONFIG_COUNT"])
        for i, (key, value) in enumerate(extra, start=count):
            env[f"GIT_CONFIG_KEY_{i}"] = key
            env[f"GIT_CONFIG_VALUE_{i}"] = value
        env["GIT_CONFIG_COUNT"] = str(count + len(extra))
        env["GIT_ALLOW_PROTOCOL"] = "file"
    git.run_git(args, env, cwd, limits)


def sanitize(mirror: Path) -> None:
    """Undo what a hostile process could have planted in the mirror since its last use."""
    (mirror / "config").write_text(_CONFIG.format(bare="true"), encoding="ascii")
    for name in _PLANTABLE:
        git.remove_tree(mirror / name)
    git.remove_tree(mirror / "hooks")


def init(git_dir: Path, *, bare: bool) -> None:
    """What `git init --template=` writes, without starting a process (~40 ms each under
    load, on a path every job takes)."""
    for sub in ("objects/info", "objects/pack", "refs/heads", "refs/tags"):
        (git_dir / sub).mkdir(parents=True, exist_ok=True)
    (git_dir / "HEAD").write_text("ref: refs/heads/main\n", encoding="ascii")
    (git_dir / "config").write_text(_CONFIG.format(bare=str(bare).lower()), encoding="ascii")


def suspect(failed: git.CloneFailed) -> bool:
    """True when git failed in a way that is not the server's answer (auth, missing ref,
    size, timeout): a damaged mirror is the likely cause."""
    return failed.message.startswith("git failed")
