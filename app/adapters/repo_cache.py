"""A repository cache on the instance's local disk: one bare mirror per repository URL, from
which each job's work tree is made, so a repository cloned before only downloads what changed.

    <root>/mirrors/<key>.git     bare, shallow; <key> = sha256 of the normalized URL
    <root>/locks/<key>.lock      flock: exclusive to fetch or drop, shared to copy out

One clone through the cache (in a clone thread, under git.py's limits: timeout, size watch,
abort, and its hardened environment: no hooks, no symlinks, http(s) only to the server):

    exclusive lock:
      git --git-dir <mirror> fetch --depth 1 --no-tags -- <url> +<ref>:refs/cache/<sha1(ref)>
    shared lock:
      git init <dest>                  (written directly, as is the mirror's init)
      git fetch --depth 1 -- file://<mirror> <commit>
      git checkout --detach --force FETCH_HEAD

The pinned ref keeps the commit as a "have" for the next fetch of the mirror.

Every job fetches from the server with its own token (passed per fetch in the environment by
`git_env`, never written to the mirror's config), so a job never gets from the cache what the
server would not give it, and a moved ref is seen at once. The fetch sends the mirror's commits
as "haves", so the server sends only the objects that changed.

The job's work tree never shares a writable file with the mirror (the CLI is hostile and
writes in its checkout): objects cross by the pack protocol (no hardlinks, no alternates),
where `index-pack` recomputes every object's id, so a tampered mirror cannot change the
content of the commit the job checks out; the work tree's FETCH_HEAD, which names the mirror,
is deleted. Before each fetch the mirror's own config is rewritten and its alternates, grafts
and hooks removed, so nothing a previous job's CLI could have planted there steers git.

The first job on a repository clones directly (`git.clone_sync`, as without the cache) and,
when the clone is at least `min_clone_bytes` on disk, a background thread fills the mirror
afterwards (2 s later, niced): a first job takes today's path, and small repositories, which
clone faster than they copy out of a mirror, never get one.

A mirror that fails in a way that is not the server's answer (git reports a bad object, a
missing object, a broken repository) is dropped and the job falls back to a direct clone
(`git.clone_sync`): the cache never fails a job. The cache is bounded by `max_bytes` (all
mirrors); least recently used mirrors that no job holds are evicted after each clone.

Not defended: the CLI runs as the worker's user, so it can find REPO_CACHE_DIR on disk. It
can damage or delete mirrors (a later job then drops the mirror and clones directly), and
it can read them. It cannot change the content of a commit a later job checks out, with one
exception: racing the mirror's FETCH_HEAD between a job's fetch and its read could point
that job at another commit present in the mirror. Running the CLI as another user closes both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from app.adapters import git
from app.config import Settings

__all__ = ["RepoCache", "cache_key", "normalize_url"]

log = logging.getLogger("fondation.repo_cache")

_LOCK_POLL_S = 0.02
_FILL_NICE = 10
# A shallow fetch of one commit: no tags, no submodules, no commit-graph to write; what
# follows `--` is the source and the refspec.
_FETCH_ONE_COMMIT = (
    "fetch",
    "--quiet",
    "--depth",
    "1",
    "--no-tags",
    "--no-recurse-submodules",
    "--no-write-commit-graph",
    "--",
)
_CONFIG = "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = {bare}\n"
# Files a hostile process could plant in a mirror to steer the next git run in it.
_PLANTABLE = ("objects/info/alternates", "objects/info/http-alternates", "info/grafts", "commondir")


def normalize_url(url: str) -> str:
    """The URL a mirror is keyed by: scheme and host lower-cased, default port, trailing
    slash and `.git` dropped (`https://GitHub.com/a/b.git/` and `https://github.com/a/b` are
    one repository)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    default = {"http": 80, "https": 443}.get(parts.scheme.lower())
    netloc = host if parts.port in (None, default) else f"{host}:{parts.port}"
    path = parts.path.rstrip("/")
    path = path.removesuffix(".git")
    return urlunsplit((parts.scheme.lower(), netloc, path, parts.query, ""))


def cache_key(url: str) -> str:
    return hashlib.sha256(normalize_url(url).encode()).hexdigest()[:32]


class _Broken(Exception):
    """The mirror, not the server, failed: drop it and clone directly."""


@dataclass(frozen=True, slots=True)
class RepoCache:
    root: Path
    max_bytes: int
    # Below this size on disk (work tree + .git) a direct clone is cheaper than fetching into
    # a mirror and copying from it, so no mirror is kept (bench.start: a 2-file repository
    # took 330 ms direct against 500 ms through an up-to-date mirror; a 2.7 MB work tree
    # 1220 ms against 530 ms; on a real network the crossover is lower still).
    min_clone_bytes: int = 1024**2
    # The background fill waits this long (and runs niced): see `_warm_later`.
    fill_delay_s: float = 2.0
    # Mirrors being filled after a first clone (see `clone_sync`); `settle` waits for them.
    _warming: set[threading.Thread] = field(default_factory=set, repr=False, compare=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> RepoCache | None:
        """The configured cache, or None when it is off: REPO_CACHE_MAX_BYTES=0, or the CLI
        runs as the worker's own user (no CLI_USER). Mirrors outlive their jobs, private
        repositories included; a CLI of the worker's uid could read every mirror, and race
        the mirror's FETCH_HEAD. With CLI_USER the cache directory is the worker's alone."""
        if settings.repo_cache_max_bytes <= 0:
            return None
        if settings.cli_user is None:
            log.info("repository cache off: CLI_USER is not set (see docs/SECURITY.md)")
            return None
        return cls(settings.repo_cache_dir, settings.repo_cache_max_bytes)

    def mirror_path(self, url: str) -> Path:
        return self.root / "mirrors" / f"{cache_key(url)}.git"

    # -- one clone (runs in git.py's clone thread) -------------------------------------

    def clone_sync(
        self,
        url: str,
        ref: str | None,
        dest: Path,
        token: str | None,
        timeout_s: float,
        max_bytes: int,
        max_entries: int,
        addresses: tuple[str, ...],
        abort: threading.Event,
    ) -> git.CloneResult:
        """Clone `ref` of `url` into `dest` through the mirror; same contract as
        `git.clone_sync` (raises `git.CloneFailed`)."""
        started = time.monotonic()
        limits = git.Limits.start(
            dest, started, timeout_s, max_bytes, max_entries, abort, token, ref or "HEAD"
        )
        git.empty_dest(dest)
        key = cache_key(url)
        mirror = self.mirror_path(url)
        if not mirror.is_dir():
            # First job on this repository: today's direct clone, so it is never slower
            # than without the cache (going through a new mirror costs one more local copy);
            # the mirror is filled from the server once the job has its work tree.
            result = git.clone_sync(
                url, ref, dest, token, timeout_s, max_bytes, max_entries, addresses, abort
            )
            if result.bytes_on_disk >= self.min_clone_bytes:
                self._warm_later(url, ref, token, timeout_s, max_bytes, max_entries, addresses)
            return result
        try:
            with self._locked(key, fcntl.LOCK_EX, limits):
                commit, fetched = self._update(mirror, url, ref, token, addresses, limits)
            fetched_at = time.monotonic()
            with self._locked(key, fcntl.LOCK_SH, limits):
                commit = self._work_tree(mirror, commit, dest, limits)
        except (_Broken, OSError) as broken:
            # The cache's own failure (a damaged mirror, its disk): never the job's.
            log.warning(
                "repository cache dropped a mirror",
                extra={"error": git.scrub(str(broken), limits.secrets)[:300]},
            )
            with self._locked(key, fcntl.LOCK_EX, limits):
                git.remove_tree(mirror)
            git.remove_tree(dest)
            remaining_s = max(0.1, limits.deadline - time.monotonic())
            return git.clone_sync(
                url, ref, dest, token, remaining_s, max_bytes, max_entries, addresses, abort
            )
        with contextlib.suppress(OSError):
            os.utime(mirror)  # the LRU clock
        self.evict()
        log.info(
            "cloned through the repository cache",
            extra={
                "fetched_bytes": fetched,
                "fetch_s": round(fetched_at - started, 3),
                "duration_s": round(time.monotonic() - started, 3),
            },
        )
        return git.CloneResult(
            commit=commit, bytes_on_disk=git.dir_size(dest), duration_s=time.monotonic() - started
        )

    def _warm_later(
        self,
        url: str,
        ref: str | None,
        token: str | None,
        timeout_s: float,
        max_bytes: int,
        max_entries: int,
        addresses: tuple[str, ...],
    ) -> None:
        def warm() -> None:
            # Background work: it must not delay the job that just cloned. bench.start
            # measured a first job's CLI starting 1.4-1.5x later while the fill ran beside
            # it on 2 cores; so the fill waits for the CLI to be started and runs niced (a
            # thread's nice value on Linux, inherited by the git processes it starts).
            with contextlib.suppress(OSError, AttributeError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _FILL_NICE)
            time.sleep(self.fill_delay_s)
            try:
                key = cache_key(url)
                limits = git.Limits.start(
                    self.mirror_path(url),
                    time.monotonic(),
                    timeout_s,
                    max_bytes,
                    max_entries,
                    threading.Event(),
                    token,
                    ref or "HEAD",
                )
                started = time.monotonic()
                with self._locked(key, fcntl.LOCK_EX, limits):
                    if limits.dest.is_dir():
                        return  # another job filled it meanwhile
                    _, fetched = self._update(limits.dest, url, ref, token, addresses, limits)
                self.evict()
                log.info(
                    "repository cache filled",
                    extra={
                        "fetched_bytes": fetched,
                        "duration_s": round(time.monotonic() - started, 3),
                    },
                )
            except (git.CloneFailed, _Broken, OSError) as exc:
                # The job already has its work tree; the next one will try again.
                log.info("repository cache not filled", extra={"error": type(exc).__name__})
            finally:
                self._warming.discard(thread)

        # A daemon thread: at exit, a half-filled mirror is dropped by the next `_update`.
        thread = threading.Thread(target=warm, name="repo-cache-warm", daemon=True)
        self._warming.add(thread)
        thread.start()

    def settle(self, timeout_s: float) -> None:
        """Wait (bounded) for mirrors being filled in the background."""
        deadline = time.monotonic() + timeout_s
        for thread in list(self._warming):
            thread.join(max(0.0, deadline - time.monotonic()))

    def _update(
        self,
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
            _init(mirror, bare=True)
        else:
            self._sanitize(mirror)
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
            self._git(
                [
                    f"--git-dir={mirror}",
                    *_FETCH_ONE_COMMIT,
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
                raise _Broken("the mirror's FETCH_HEAD holds no commit")
            if git.SHA.fullmatch(target) and commit.lower() != target.lower():
                raise git.CloneFailed(f"ref {target!r} not found")
        except git.CloneFailed as failed:
            if fresh:
                git.remove_tree(mirror)  # no empty mirror for a URL that did not clone
            if not fresh and _suspect(failed):
                raise _Broken(failed.message) from None
            raise
        except (OSError, UnicodeDecodeError) as exc:
            raise _Broken(f"{type(exc).__name__} reading the mirror") from None
        return commit, git.disk_usage(mirror)[0] - before

    def _work_tree(self, mirror: Path, commit: str, dest: Path, limits: git.Limits) -> str:
        """Make `dest` a checkout of `commit` (a commit or an annotated tag) with its own
        objects, verified by index-pack; return the commit checked out."""
        local = (
            ("protocol.file.allow", "always"),  # the mirror only, by its path; never the job's URL
            ("uploadpack.allowAnySHA1InWant", "true"),
        )
        try:
            _init(dest / ".git", bare=False)
            self._git(
                [
                    *_FETCH_ONE_COMMIT,
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
            self._git(
                ["checkout", "-q", "--detach", "--force", "FETCH_HEAD", "--"], None, dest, limits
            )
        except git.CloneFailed as failed:
            if _suspect(failed):
                raise _Broken(failed.message) from None
            raise
        with contextlib.suppress(FileNotFoundError):
            (dest / ".git" / "FETCH_HEAD").unlink()  # it names the mirror
        head = (dest / ".git" / "HEAD").read_text(encoding="ascii").strip()
        if not git.SHA.fullmatch(head):
            raise _Broken("the checkout did not leave a detached HEAD")
        return head

    @staticmethod
    def _git(
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

    @staticmethod
    def _sanitize(mirror: Path) -> None:
        """Undo what a hostile process could have planted in the mirror since its last use."""
        (mirror / "config").write_text(_CONFIG.format(bare="true"), encoding="ascii")
        for name in _PLANTABLE:
            git.remove_tree(mirror / name)
        git.remove_tree(mirror / "hooks")

    # -- locks and eviction ------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, key: str, mode: int, limits: git.Limits) -> Iterator[None]:
        """Hold the mirror's lock (polled, so the clone's deadline and abort still apply)."""
        locks = self.root / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        fd = os.open(locks / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                if limits.abort.is_set():
                    raise git.CloneFailed("clone canceled", retryable=True) from None
                if time.monotonic() > limits.deadline:
                    raise git.CloneFailed(
                        f"clone timed out after {limits.timeout_s:g} s", retryable=True
                    ) from None
                time.sleep(_LOCK_POLL_S)
            yield
        finally:
            os.close(fd)  # also releases the lock

    def size(self) -> int:
        return git.dir_size(self.root / "mirrors")

    def evict(self) -> list[Path]:
        """Drop least recently used mirrors that no job holds until the cache fits."""
        mirrors = self.root / "mirrors"
        entries: list[tuple[float, int, Path]] = []
        with contextlib.suppress(OSError):
            for path in mirrors.glob("*.git"):
                with contextlib.suppress(OSError):
                    entries.append((path.lstat().st_mtime, git.dir_size(path), path))
        total = sum(size for _, size, _ in entries)
        dropped: list[Path] = []
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if self._drop_if_idle(path):
                total -= size
                dropped.append(path)
        return dropped

    def _drop_if_idle(self, mirror: Path) -> bool:
        locks = self.root / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        fd = os.open(locks / f"{mirror.name.removesuffix('.git')}.lock", os.O_RDWR | os.O_CREAT)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False  # a job is fetching or copying from it
            # Renamed first, so a crash half-way leaves no half mirror under a live key.
            trash = mirror.with_name(f".trash-{secrets.token_hex(4)}")
            try:
                mirror.rename(trash)
            except OSError:
                return False
            git.remove_tree(trash)
            return True
        finally:
            os.close(fd)


def _init(git_dir: Path, *, bare: bool) -> None:
    """What `git init --template=` writes, without starting a process (~40 ms each under
    load, on a path every job takes)."""
    for sub in ("objects/info", "objects/pack", "refs/heads", "refs/tags"):
        (git_dir / sub).mkdir(parents=True, exist_ok=True)
    (git_dir / "HEAD").write_text("ref: refs/heads/main\n", encoding="ascii")
    (git_dir / "config").write_text(_CONFIG.format(bare=str(bare).lower()), encoding="ascii")


def _suspect(failed: git.CloneFailed) -> bool:
    """True when git failed in a way that is not the server's answer (auth, missing ref,
    size, timeout): a damaged mirror is the likely cause."""
    return failed.message.startswith("git failed")
