"""A repository cache on the instance's local disk: one bare mirror per repository URL, from
which each job's work tree is made, so a repository cloned before only downloads what changed.

    <root>/mirrors/<key>.git     bare, shallow; <key> = sha256 of the normalized URL
    <root>/ready/<key>           a checkout made from the mirror, never yet given to a job
    <root>/locks/<key>.lock      flock: exclusive to fetch or drop, shared to copy out

A repeated job takes the repository's ready tree whole (a rename, so one job only) and moves
it to its ref with one fetch from the server (the tree's commit is pinned under a ref, so it
is a "have" and only what changed travels) and a checkout that rewrites only the files that
changed; the tree is then renamed to the job's `repo`. A full checkout costs more than the
fetch (a 2.7 MB tree: 120-210 ms against 60-70 ms on loopback), so a job start pays neither
the copy out of the mirror nor a full checkout. Afterwards, in the background
(`fill_delay_s` later, niced), the mirror is brought to that commit and a new ready tree is
made from it for the next job.

Without a ready tree (a job on the same repository is still using it, or it is being made),
a clone goes through the mirror (in a clone thread, under git.py's limits: timeout, size
watch, abort, and its hardened environment: no hooks, no symlinks, http(s) only to the
server):

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
and makes a ready tree afterwards (2 s later, niced): a first job takes today's path, and
small repositories, which clone faster than they copy out of a mirror, never get one.

Ready trees are written by the worker only, from objects index-pack verified, and kept where
the CLI cannot reach (the cache is on only with CLI_USER); one becomes a job's work tree
exactly as a direct clone would (no token in its config, its FETCH_HEAD deleted).

A mirror that fails in a way that is not the server's answer (git reports a bad object, a
missing object, a broken repository) is dropped and the job falls back to a direct clone
(`git.clone_sync`); a ready tree git cannot use is deleted and the job goes through the
mirror: the cache never fails a job. The cache is bounded by `max_bytes` (mirrors and ready
trees); the least recently used repositories that no job holds are evicted after each clone.
The git steps themselves are in `cache_git`.

Why the cache needs CLI_USER (`from_settings`): a CLI running as the worker's own user could
read every mirror (private repositories included), race a mirror's FETCH_HEAD between a job's
fetch and its read, or write into a ready tree before the next job takes it.
"""

from __future__ import annotations

import contextlib
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

from app.adapters import cache_git, git
from app.config import Settings

__all__ = ["RepoCache", "cache_key", "normalize_url"]

log = logging.getLogger("fondation.repo_cache")

_LOCK_POLL_S = 0.02
_FILL_NICE = 10


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


@dataclass(frozen=True, slots=True)
class RepoCache:
    root: Path
    max_bytes: int
    # Below this size on disk (work tree + .git) a direct clone is cheaper than fetching into
    # a mirror and copying from it, so no mirror is kept (bench.start: a 2-file repository
    # took 330 ms direct against 500 ms through an up-to-date mirror; a 2.7 MB work tree
    # 1220 ms against 530 ms; on a real network the crossover is lower still).
    min_clone_bytes: int = 1024**2
    # The background fill waits this long (and runs niced): see `_in_background`.
    fill_delay_s: float = 2.0
    # Background work (mirrors filled, ready trees made); `settle` waits for it.
    _warming: set[threading.Thread] = field(
        default_factory=set, init=False, repr=False, compare=False
    )
    # Keys with background work queued or running: one at a time per repository.
    _busy: set[str] = field(default_factory=set, init=False, repr=False, compare=False)
    _busy_lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )

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
        cache = cls(settings.repo_cache_dir, settings.repo_cache_max_bytes)
        cache.sweep()
        return cache

    def mirror_path(self, url: str) -> Path:
        return self.root / "mirrors" / f"{cache_key(url)}.git"

    def ready_path(self, url: str) -> Path:
        return self.root / "ready" / cache_key(url)

    def sweep(self) -> None:
        """Remove what a worker stopped half-way left: ready trees being made or taken, trees
        being discarded."""
        with contextlib.suppress(OSError):
            for path in (*(self.root / "ready").glob(".*"), *(self.root / "mirrors").glob(".*")):
                git.remove_tree(path)

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
        later = _Later(url, ref, token, timeout_s, max_bytes, max_entries, addresses)
        if not mirror.is_dir():
            # First job on this repository: today's direct clone, so it is never slower
            # than without the cache (going through a new mirror costs one more local copy);
            # the mirror is filled from the server once the job has its work tree.
            result = git.clone_sync(
                url, ref, dest, token, timeout_s, max_bytes, max_entries, addresses, abort
            )
            if result.bytes_on_disk >= self.min_clone_bytes:
                self._in_background(key, later, None)
            return result
        ready = self._take_ready(url)
        if ready is not None:
            try:
                commit = cache_git.move_ready(ready, url, ref, token, addresses, limits)
                os.rename(ready, dest)  # dest is empty: replaced
            except (cache_git.Broken, OSError) as unusable:
                # The tree, not the server, failed (or dest is on another filesystem): the
                # mirror's way below.
                log.warning(
                    "repository cache dropped a ready tree",
                    extra={"error": git.scrub(str(unusable), limits.secrets)[:300]},
                )
                git.remove_tree(ready)
            except BaseException:
                git.remove_tree(ready)
                raise
            else:
                with contextlib.suppress(OSError):
                    os.utime(mirror)  # the LRU clock
                # The job fetched into the tree, not the mirror: bring the mirror to that
                # commit, then make the next ready tree from it.
                self._in_background(key, later, None)
                duration_s = time.monotonic() - started
                log.info(
                    "cloned from a ready tree",
                    extra={"duration_s": round(duration_s, 3)},
                )
                return git.CloneResult(
                    commit=commit, bytes_on_disk=git.disk_usage(dest)[0], duration_s=duration_s
                )
        try:
            with self._locked(key, fcntl.LOCK_EX, limits):
                commit, fetched = cache_git.update_mirror(
                    mirror, url, ref, token, addresses, limits
                )
            fetched_at = time.monotonic()
            with self._locked(key, fcntl.LOCK_SH, limits):
                commit = cache_git.work_tree(mirror, commit, dest, limits)
        except (cache_git.Broken, OSError) as broken:
            # The cache's own failure (a damaged mirror, its disk): never the job's.
            log.warning(
                "repository cache dropped a mirror",
                extra={"error": git.scrub(str(broken), limits.secrets)[:300]},
            )
            self._drop(key, mirror, limits)
            git.remove_tree(dest)
            remaining_s = max(0.1, limits.deadline - time.monotonic())
            return git.clone_sync(
                url, ref, dest, token, remaining_s, max_bytes, max_entries, addresses, abort
            )
        with contextlib.suppress(OSError):
            os.utime(mirror)  # the LRU clock
        self.evict()
        self._in_background(key, later, commit)  # a ready tree for the next job
        log.info(
            "cloned through the repository cache",
            extra={
                "fetched_bytes": fetched,
                "fetch_s": round(fetched_at - started, 3),
                "duration_s": round(time.monotonic() - started, 3),
            },
        )
        return git.CloneResult(
            commit=commit,
            bytes_on_disk=git.disk_usage(dest)[0],
            duration_s=time.monotonic() - started,
        )

    def _in_background(self, key: str, later: _Later, commit: str | None) -> None:
        """After a clone, in a niced thread `fill_delay_s` later: unless the mirror already
        holds the job's `commit`, fetch the job's ref into it (creating it); then make a ready
        tree from the mirror if the repository has none. At most one thread per repository."""
        with self._busy_lock:
            if key in self._busy:
                return
            self._busy.add(key)

        def work() -> None:
            # Background work: it must not delay the job that just cloned. bench.start
            # measured a first job's CLI starting 1.4-1.5x later while the fill ran beside
            # it on 2 cores; so it waits for the CLI to be started and runs niced (a
            # thread's nice value on Linux, inherited by the git processes it starts).
            with contextlib.suppress(OSError, AttributeError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _FILL_NICE)
            time.sleep(self.fill_delay_s)
            try:
                self._refill(key, later, commit)
            except (cache_git.Broken, OSError) as broken:
                # The mirror failed, not the server: drop it, so that no job goes through it.
                log.warning(
                    "repository cache dropped a mirror",
                    extra={"error": git.scrub(str(broken), git.secret_values(later.token))[:300]},
                )
                with contextlib.suppress(git.CloneFailed, OSError):
                    self._drop(key, self.mirror_path(later.url), later.limits(self.root))
            except git.CloneFailed as exc:
                # The job already has its work tree; the next one will try again.
                log.info("repository cache not filled", extra={"error": exc.message[:300]})
            finally:
                with self._busy_lock:
                    self._busy.discard(key)
                self._warming.discard(thread)

        # A daemon thread: at exit, a half-filled mirror is dropped by the next `update_mirror`,
        # a half-made ready tree by `sweep`.
        thread = threading.Thread(target=work, name="repo-cache-fill", daemon=True)
        self._warming.add(thread)
        thread.start()

    def _drop(self, key: str, mirror: Path, limits: git.Limits) -> None:
        """Drop a broken mirror, once no job copies from it (raises `git.CloneFailed` when
        `limits` end the wait)."""
        with self._locked(key, fcntl.LOCK_EX, limits):
            _discard(mirror)

    def _refill(self, key: str, later: _Later, commit: str | None) -> None:
        started = time.monotonic()
        mirror = self.mirror_path(later.url)
        limits = later.limits(mirror)
        fetched = 0
        if commit is None:
            with self._locked(key, fcntl.LOCK_EX, limits):
                commit, fetched = cache_git.update_mirror(
                    mirror, later.url, later.ref, later.token, later.addresses, limits
                )
        made = False
        ready = self.ready_path(later.url)
        if not ready.exists():
            building = ready.with_name(f".build-{secrets.token_hex(4)}")
            try:
                with self._locked(key, fcntl.LOCK_SH, limits):
                    if not mirror.is_dir():
                        return  # evicted meanwhile: the cache has no room for it
                    building.parent.mkdir(parents=True, exist_ok=True)
                    commit = cache_git.work_tree(mirror, commit, building, later.limits(building))
                # Up to a second: not under the lock, which a job's fetch may be waiting for.
                cache_git.make_ready(building, commit, later.limits(building))
                with contextlib.suppress(OSError):  # a ready tree exists already: keep it
                    os.rename(building, ready)
                    made = True
            finally:
                git.remove_tree(building)
        self.evict()
        log.info(
            "repository cache filled",
            extra={
                "fetched_bytes": fetched,
                "ready_tree": made,
                "duration_s": round(time.monotonic() - started, 3),
            },
        )

    def settle(self, timeout_s: float) -> None:
        """Wait (bounded) for mirrors being filled in the background."""
        deadline = time.monotonic() + timeout_s
        for thread in list(self._warming):
            thread.join(max(0.0, deadline - time.monotonic()))

    def _take_ready(self, url: str) -> Path | None:
        """The repository's ready tree, renamed so that no other job can take it; None when
        there is none."""
        ready = self.ready_path(url)
        taken = ready.with_name(f".taken-{secrets.token_hex(4)}")
        try:
            os.rename(ready, taken)
        except OSError:
            return None
        return taken

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
        return git.dir_size(self.root / "mirrors") + git.dir_size(self.root / "ready")

    def evict(self) -> list[Path]:
        """Drop least recently used repositories (mirror and ready tree) that no job holds
        until the cache fits, and ready trees whose mirror was evicted while they were made."""
        mirrors = self.root / "mirrors"
        with contextlib.suppress(OSError):
            for ready in (self.root / "ready").glob("[!.]*"):
                if not (mirrors / f"{ready.name}.git").exists():
                    _discard(ready)  # unless a job took it just now
        entries: list[tuple[float, int, Path]] = []
        with contextlib.suppress(OSError):
            for path in mirrors.glob("*.git"):
                ready = self.root / "ready" / path.name.removesuffix(".git")
                with contextlib.suppress(OSError):
                    size = git.dir_size(path) + git.dir_size(ready)
                    entries.append((path.lstat().st_mtime, size, path))
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
            if not _discard(mirror):
                return False
            # Its ready tree too, unless a job took it a moment ago (then it is the job's).
            _discard(self.root / "ready" / mirror.name.removesuffix(".git"))
            return True
        finally:
            os.close(fd)


def _discard(path: Path) -> bool:
    """Remove a mirror or a tree: renamed first (False if it is gone), so that a crash half-way
    leaves nothing half-removed under a live name."""
    trash = path.with_name(f".trash-{secrets.token_hex(4)}")
    try:
        path.rename(trash)
    except OSError:
        return False
    git.remove_tree(trash)
    return True


@dataclass(frozen=True, slots=True)
class _Later:
    """What background work after a clone needs of that clone."""

    url: str
    ref: str | None
    token: str | None
    timeout_s: float
    max_bytes: int
    max_entries: int
    addresses: tuple[str, ...]

    def limits(self, dest: Path) -> git.Limits:
        return git.Limits.start(
            dest,
            time.monotonic(),
            self.timeout_s,
            self.max_bytes,
            self.max_entries,
            threading.Event(),
            self.token,
            self.ref or "HEAD",
        )
