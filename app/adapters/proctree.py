"""Every process of a job, found through /proc, ended together, and reaped without stealing.

A process group is not enough to end a CLI: any descendant can `setsid()` into a session of
its own (a daemonising grandchild with cwd `/`), and killing the group misses it. So a job's
processes are followed by ancestry. `JobProcesses.scan` reads `/proc/*/stat` and keeps every
process whose parent is a member (pid and start time recorded, so a reused pid is never taken
for a member). Because the worker is a child subreaper (`app.isolation.harden_process`), a
member whose parent dies is reparented to the worker instead of init: such an orphan is still
found, as a child of the worker that is either already recorded or sits in a session one of the
job's live members belongs to. The CLI's supervisor scans every `SCAN_INTERVAL_S` while the CLI
runs, and `end` (SIGKILL, scan again, until nothing is left) when it stops.

Why /proc and not a cgroup: a cgroup per job would be exact, but it needs a writable,
delegated cgroup v2 hierarchy, which a Serverless Container does not offer; /proc works
wherever the worker runs. The gap: a descendant that is born, calls `setsid()` and loses its
parent all within one scan interval is not seen (docs/SECURITY.md).

Reaping. Orphans reparented to the worker must be reaped by the worker, but asyncio's child
watcher and `subprocess.Popen` call `waitpid(pid)` for their own children: a blanket
`waitpid(-1)` would steal those statuses (Popen then reports exit 0 for a failed git). `reap`
therefore reaps only zombie children of the worker that the worker did not start itself:
members recorded as descendants (never a job's leader), or processes in a session that is
neither their own nor the worker's (every process the worker starts either keeps the worker's
session or leads a new one, `start_new_session`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SCAN_INTERVAL_S", "JobProcesses", "ProcInfo", "Reaper", "reap_forever", "snapshot"]

_log = logging.getLogger(__name__)
_PROC = Path("/proc")
SCAN_INTERVAL_S = 0.25
REAP_INTERVAL_S = 1.0
_END_ROUNDS = 200  # SIGKILL-and-rescan rounds before giving up on a fork storm
_END_PAUSE_S = 0.01


@dataclass(frozen=True, slots=True)
class ProcInfo:
    """One line of `/proc/<pid>/stat`: what ancestry tracking needs."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str
    start_ticks: int

    @property
    def zombie(self) -> bool:
        return self.state in ("Z", "X")


def parse_stat(pid: int, text: str) -> ProcInfo | None:
    """Parse a stat line; the command name may hold spaces and parentheses."""
    close = text.rfind(")")
    if close < 0:
        return None
    fields = text[close + 2 :].split()
    try:
        return ProcInfo(
            pid=pid,
            ppid=int(fields[1]),
            pgid=int(fields[2]),
            sid=int(fields[3]),
            state=fields[0],
            start_ticks=int(fields[19]),
        )
    except (IndexError, ValueError):
        return None


def read_proc(pid: int) -> ProcInfo | None:
    # os.open/os.read: a scan reads every process's stat, and this is 4x faster than pathlib.
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
        try:
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
    except OSError:
        return None
    return parse_stat(pid, data.decode("ascii", errors="replace"))


def snapshot() -> dict[int, ProcInfo]:
    """Every process visible in /proc right now (those that vanish meanwhile are skipped)."""
    procs: dict[int, ProcInfo] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return procs
    for name in names:
        if name.isdigit():
            info = read_proc(int(name))
            if info is not None:
                procs[info.pid] = info
    return procs


def children_of(pid: int) -> list[int]:
    """The direct children of process `pid` (all its threads), from /proc/.../children."""
    found: list[int] = []
    try:
        tids = os.listdir(_PROC / str(pid) / "task")
    except OSError:
        return found
    for tid in tids:
        try:
            text = (_PROC / str(pid) / "task" / tid / "children").read_text()
        except OSError:
            continue
        found.extend(int(part) for part in text.split())
    return found


def _signal(info: ProcInfo, sig: signal.Signals) -> None:
    """Signal exactly the process `info` describes: through a pidfd checked against the start
    time where the kernel offers one, so a pid reused meanwhile is never hit."""
    try:
        fd = os.pidfd_open(info.pid)
    except ProcessLookupError:
        return
    except (OSError, AttributeError):  # no pidfd (not Linux, old kernel, some sandboxes)
        now = read_proc(info.pid)
        if now is not None and now.start_ticks == info.start_ticks:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(info.pid, sig)
        return
    try:
        now = read_proc(info.pid)
        if now is not None and now.start_ticks == info.start_ticks:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                signal.pidfd_send_signal(fd, sig)
    finally:
        os.close(fd)


class Reaper:
    """Reaps the worker's orphaned descendants, never a child the worker started itself.

    One per worker process (`REAPER`). Jobs record the descendants they see with `adopt`, so a
    descendant that left the job's session is still known to be reapable."""

    def __init__(self, pid: int | None = None) -> None:
        self._pid = pid
        self._adopted: dict[int, int] = {}  # pid -> start ticks

    @property
    def pid(self) -> int:
        return self._pid if self._pid is not None else os.getpid()

    def adopt(self, members: Iterable[ProcInfo]) -> None:
        for info in members:
            self._adopted[info.pid] = info.start_ticks

    def _is_orphan(self, info: ProcInfo, worker_sid: int) -> bool:
        if self._adopted.get(info.pid) == info.start_ticks:
            return True
        return info.sid not in (info.pid, worker_sid)

    def reap(self) -> int:
        """Reap every zombie child of the worker that is an orphan; returns how many."""
        me = self.pid
        try:
            worker_sid = os.getsid(me)
        except OSError:
            return 0
        reaped = 0
        for pid in children_of(me):
            info = read_proc(pid)
            if info is None or not info.zombie or not self._is_orphan(info, worker_sid):
                continue
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = 0
            if done:
                reaped += 1
            self._adopted.pop(pid, None)
        # Forget adopted pids that are gone (reaped by someone else, or never ours).
        for pid in [p for p in self._adopted if not (_PROC / str(p)).exists()]:
            del self._adopted[pid]
        return reaped


REAPER = Reaper()


async def reap_forever(interval_s: float = REAP_INTERVAL_S, reaper: Reaper = REAPER) -> None:
    """Reap orphans every `interval_s` for the worker's lifetime (a few small /proc reads)."""
    while True:
        try:
            reaper.reap()
        except Exception:  # the reaper must never take the worker down
            _log.exception("reaping orphaned processes failed")
        await asyncio.sleep(interval_s)


class JobProcesses:
    """The processes of one job: the leader the worker started, and every descendant seen.

    `scan` updates the members from /proc; `signal` sends a signal to every live member;
    `end` kills them all until none is left and reaps the orphans among them."""

    def __init__(self, leader: int, *, reaper: Reaper = REAPER) -> None:
        self.leader = leader
        self._reaper = reaper
        self._members: dict[int, int] = {}  # pid -> start ticks; the leader included
        info = read_proc(leader)
        if info is not None:
            self._members[leader] = info.start_ticks

    def scan(self, procs: dict[int, ProcInfo] | None = None) -> list[ProcInfo]:
        """Members present in `procs` (a fresh snapshot by default), zombies included."""
        procs = snapshot() if procs is None else procs
        members = {
            pid: procs[pid]
            for pid, ticks in self._members.items()
            if pid in procs and procs[pid].start_ticks == ticks
        }
        children: dict[int, list[ProcInfo]] = {}
        for info in procs.values():
            children.setdefault(info.ppid, []).append(info)
        # Orphans reparented to the worker still sit in a session a member belongs to.
        sessions = {info.sid for info in members.values()}
        for info in children.get(self._reaper.pid, ()):
            if info.pid not in members and info.sid in sessions and info.pid != info.sid:
                members[info.pid] = info
        stack = list(members.values())
        while stack:
            for child in children.get(stack.pop().pid, ()):
                if child.pid not in members:
                    members[child.pid] = child
                    stack.append(child)
        self._members = {pid: info.start_ticks for pid, info in members.items()}
        self._reaper.adopt(info for info in members.values() if info.pid != self.leader)
        return list(members.values())

    def signal(self, sig: signal.Signals) -> int:
        """Send `sig` to every live member; returns how many were signalled."""
        live = [info for info in self.scan() if not info.zombie]
        for info in live:
            _signal(info, sig)
        return len(live)

    async def end(self) -> int:
        """SIGKILL every member, rescan, repeat until none is alive; reap the orphans. Returns
        how many processes were killed (0: the job had already ended cleanly)."""
        killed = 0
        for _ in range(_END_ROUNDS):
            live = [info for info in self.scan() if not info.zombie]
            if not live:
                break
            for info in live:
                _signal(info, signal.SIGKILL)
            killed += len(live)
            await asyncio.sleep(_END_PAUSE_S)  # let the kernel deliver and reparent
        else:
            _log.error("job processes still alive after %d kill rounds", _END_ROUNDS)
        # A killed child of a killed parent reaches the worker only once its parent is gone:
        # reap in rounds until no member but the leader (asyncio's to reap) is left.
        for _ in range(_END_ROUNDS):
            self._reaper.reap()
            if not [info for info in self.scan() if info.pid != self.leader]:
                break
            await asyncio.sleep(_END_PAUSE_S)
        return killed
