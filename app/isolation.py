"""Keeping the CLI away from the worker's secrets: process hardening at startup, a separate
user for the CLI where the worker can switch to one, and a gate that keeps token-holding
clones and same-user CLI runs apart.

The CLI is an LLM agent running on an untrusted repository; it must not read the worker's
environment or memory (webhook secrets, Scaleway and Cockpit keys), its store, or the clone
token of another job. Three layers, each for a case the others leave open:

* `harden_process`: the worker is made non-dumpable (`PR_SET_DUMPABLE` 0), so a process of the
  same uid cannot open `/proc/<worker>/environ` or `mem` (root with CAP_SYS_PTRACE still can,
  hence the second layer), and a child subreaper (`PR_SET_CHILD_SUBREAPER`), so a daemonising
  descendant of a CLI is reparented to the worker, which can end it (`app.adapters.proctree`).
* `CLI_USER`: when the worker runs as root or holds CAP_SETUID/CAP_SETGID, the CLI runs as that
  unprivileged user, with its own HOME, write access to its output directory only, read access
  to the checkout, and a umask of 077 for everything the worker writes itself.
* `CloneGate`: git is dumpable after exec, and the clone token reaches it in its environment
  (`app.adapters.git._git_env`). When the CLI runs as the worker's own uid, a clone holding a
  token waits until no CLI runs, and no CLI starts while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import pwd
import stat
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from app.adapters.process import RunAs
from app.config import Settings
from app.errors import ConfigError

__all__ = [
    "CliSandbox",
    "CloneGate",
    "Hardening",
    "can_switch_user",
    "harden_process",
    "resolve_cli_user",
    "secure_startup",
]

log = logging.getLogger("fondation.isolation")
T = TypeVar("T")

PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
_CAP_SETGID = 6
_CAP_SETUID = 7


@dataclass(frozen=True, slots=True)
class Hardening:
    """What `harden_process` managed to turn on (False: unsupported here, and logged)."""

    non_dumpable: bool
    subreaper: bool


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def harden_process(platform: str = sys.platform) -> Hardening:
    """Make this process non-dumpable and a child subreaper (Linux only; elsewhere, or where
    the kernel refuses, log why and carry on: the worker still runs, less isolated)."""
    if not platform.startswith("linux"):
        log.warning(
            "process hardening skipped: PR_SET_DUMPABLE and PR_SET_CHILD_SUBREAPER are Linux-only;"
            " the CLI can read this process's environment and its orphans are not reaped here",
            extra={"platform": platform},
        )
        return Hardening(non_dumpable=False, subreaper=False)
    done: dict[str, bool] = {}
    for name, option in (
        ("non_dumpable", PR_SET_DUMPABLE),
        ("subreaper", PR_SET_CHILD_SUBREAPER),
    ):
        try:
            _prctl(option, 0 if option == PR_SET_DUMPABLE else 1)
            done[name] = True
        except OSError as exc:
            log.warning("prctl refused", extra={"setting": name, "error": str(exc)})
            done[name] = False
    hardening = Hardening(**done)
    log.info(
        "process hardened",
        extra={"non_dumpable": hardening.non_dumpable, "subreaper": hardening.subreaper},
    )
    return hardening


def _effective_caps(status_path: Path = Path("/proc/self/status")) -> int:
    try:
        for line in status_path.read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def can_switch_user() -> bool:
    """True when this process may run a child as another uid/gid: root, or both capabilities."""
    if os.geteuid() == 0:
        return True
    caps = _effective_caps()
    return bool(caps & (1 << _CAP_SETUID)) and bool(caps & (1 << _CAP_SETGID))


def resolve_cli_user(spec: str) -> RunAs:
    """`CLI_USER` as a user name or `uid[:gid]`; root (uid or gid 0) is refused."""
    name, _, group = spec.partition(":")
    try:
        if name.isdigit():
            uid = int(name)
            gid = int(group) if group else pwd.getpwuid(uid).pw_gid
        else:
            entry = pwd.getpwnam(name)
            uid, gid = entry.pw_uid, int(group) if group else entry.pw_gid
    except (KeyError, ValueError):
        raise ConfigError("CLI_USER", f"no such user {spec!r}; give a name or uid:gid") from None
    if uid == 0 or gid == 0:
        raise ConfigError("CLI_USER", "the CLI must not run as root")
    return RunAs(uid=uid, gid=gid)


class CloneGate:
    """Token-holding clones and CLI runs never overlap; CLIs overlap each other, and so do
    clones. A waiting clone stops new CLIs from starting (a stream of CLI runs cannot starve
    it). Release is synchronous, so it is safe in a `finally` under cancellation."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.clis = 0
        self.clones = 0
        self._clones_waiting = 0
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _until(self, ready: Callable[[], bool]) -> None:
        while not ready():
            await self._changed.wait()

    @contextlib.asynccontextmanager
    async def cli(self) -> AsyncIterator[None]:
        """Held for the whole CLI run, its descendants' end included."""
        if not self.enabled:
            yield
            return
        await self._until(lambda: self.clones == 0 and self._clones_waiting == 0)
        self.clis += 1
        try:
            yield
        finally:
            self.clis -= 1
            self._notify()

    @contextlib.asynccontextmanager
    async def clone(self, *, holds_token: bool) -> AsyncIterator[None]:
        """Held for the whole clone when it carries a token; free otherwise."""
        if not (self.enabled and holds_token):
            yield
            return
        self._clones_waiting += 1
        try:
            await self._until(lambda: self.clis == 0)
        finally:
            self._clones_waiting -= 1
            self._notify()
        self.clones += 1
        try:
            yield
        finally:
            self.clones -= 1
            self._notify()


@dataclass(frozen=True)
class CliSandbox:
    """How this worker isolates its CLI runs: the user they run as (None: the worker's own)
    and the clone gate, which is open when the CLI runs as another user."""

    run_as: RunAs | None = None
    gate: CloneGate = field(default_factory=CloneGate)

    @classmethod
    def from_settings(cls, settings: Settings) -> CliSandbox:
        run_as = resolve_cli_user(settings.cli_user) if settings.cli_user else None
        return cls(run_as=run_as, gate=CloneGate(enabled=run_as is None))

    async def clone(self, start: Callable[[], Awaitable[T]], *, holds_token: bool) -> T:
        """Run the clone `start()` returns once the gate lets it (a factory, so that a stop
        while waiting leaves no coroutine un-awaited)."""
        async with self.gate.clone(holds_token=holds_token):
            return await start()

    def cli_slot(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self.gate.cli()

    def prepare(
        self, workspace: Path, repo_dir: Path, out_dir: Path, env: Mapping[str, str]
    ) -> dict[str, str]:
        """Set the workspace up for the CLI and return its environment. As another user: the
        checkout readable (not writable), the output directory and a HOME (also TMPDIR) of
        its own, nothing else of the workspace listable."""
        if self.run_as is None:
            return dict(env)
        uid, gid = self.run_as.uid, self.run_as.gid
        home = workspace / "home"
        tmp = home / "tmp"
        home.mkdir(mode=0o700, exist_ok=True)
        tmp.mkdir(mode=0o700, exist_ok=True)
        for path in (out_dir, home, tmp):
            os.chown(path, uid, gid)
            path.chmod(0o700)
        # A resumed attempt's restored checkpoint (written by the worker, checked, no links):
        # the CLI reads those files and writes next to them.
        for dirpath, dirnames, filenames in os.walk(out_dir):
            for name in (*dirnames, *filenames):
                os.lchown(os.path.join(dirpath, name), uid, gid)
        workspace.chmod(0o711)
        _readable_tree(repo_dir)
        return {**env, "HOME": str(home), "TMPDIR": str(tmp)}


def _readable_tree(root: Path) -> None:
    """Give others read access to the checkout (search on directories); symlinks untouched.
    The worker's umask is 077 when the CLI is another user, so git wrote it private."""
    if not root.is_dir():
        return
    root.chmod(stat.S_IMODE(root.stat().st_mode) | 0o755)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                continue
            extra = 0o555 if stat.S_ISDIR(st.st_mode) or st.st_mode & 0o100 else 0o444
            os.chmod(path, stat.S_IMODE(st.st_mode) | extra)


def secure_startup(settings: Settings) -> Hardening:
    """Everything the worker does once before serving: harden the process and, with
    `CLI_USER`, check the switch is possible and make the worker's files private. Raises
    `ConfigError` when `CLI_USER` is set but cannot be honoured (never a silent fallback)."""
    hardening = harden_process()
    if settings.cli_user:
        run_as = resolve_cli_user(settings.cli_user)
        if not can_switch_user():
            raise ConfigError(
                "CLI_USER", "the worker can switch users only as root or with CAP_SETUID+SETGID"
            )
        prepare_worker_dirs(settings, run_as)
    elif os.geteuid() == 0:
        log.warning(
            "the CLI runs as root, like the worker: set CLI_USER to an unprivileged user so that"
            " it cannot read the worker's memory, environment or files"
        )
    return hardening


def prepare_worker_dirs(settings: Settings, run_as: RunAs) -> None:
    """At startup, with a CLI user: a private umask for everything the worker writes, the
    store's existing files made private, and the way down to WORK_DIR searchable (not
    listable) by others. Raises `ConfigError` when an ancestor the worker does not own
    blocks the CLI user."""
    os.umask(0o077)
    data_dir, work_dir = settings.data_dir, settings.work_dir
    for path in (data_dir, work_dir):
        path.mkdir(parents=True, exist_ok=True)
    with os.scandir(data_dir) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                os.chmod(entry.path, 0o600)
    ours = {work_dir, *(p for p in work_dir.parents if p == data_dir or data_dir in p.parents)}
    for path in (work_dir, *work_dir.parents):
        st = path.stat()
        if path in ours:
            path.chmod((stat.S_IMODE(st.st_mode) & ~0o066) | 0o711)
        elif not st.st_mode & 0o001:
            raise ConfigError(
                "WORK_DIR",
                f"{path} is not searchable by others, so CLI_USER cannot reach the workspace",
            )
    log.info("CLI runs as another user", extra={"uid": run_as.uid, "gid": run_as.gid})
