"""The CLI's first process: a child subreaper that keeps every descendant of the job under it.

Run by `app.adapters.process.run_cli` as `python -I -S cli_shim.py [--uid U --gid G] -- argv`
(standard library only, no site packages). It is on every job's path to the CLI, so it
imports little: `subprocess`, `ctypes.util` (whose `find_library` runs `ldconfig`), `typing`,
`contextlib` and `signal`'s enums made the CLI start ~50 ms after the shim did; with
`os.fork`, libc through `CDLL(None)` and `_signal`, ~20 ms (python alone starts in ~11 ms).

Why a shim and not the worker alone: a daemon that double-forks and calls `setsid()` is
orphaned within microseconds; reparented to the worker it is indistinguishable from a process
the worker started itself.
Reparented to this shim (`PR_SET_CHILD_SUBREAPER`), it stays a descendant of the job's leader,
so the worker's scans see it, and when the CLI exits the shim ends every process left under it,
reaps them all (every child of the shim belongs to the job, so `waitpid(-1)` is safe here),
and exits with the CLI's status (re-raising the signal that killed it).

SIGTERM and SIGINT are ignored by the shim itself: they reach the CLI through the process
group, and the shim's job is to outlive the CLI long enough to clean up. SIGKILL still works.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

TYPE_CHECKING = False  # not `typing`'s: importing typing costs ~15 ms here
if TYPE_CHECKING:
    import signal
else:  # `signal` wraps its C module in enums (~6 ms of imports); the shim needs none of them
    import _signal as signal

PR_SET_CHILD_SUBREAPER = 36
_ROUNDS = 500
_PAUSE_S = 0.005


def _children() -> list[int]:
    me = os.getpid()
    found: list[int] = []
    try:
        tids = os.listdir(f"/proc/{me}/task")
    except OSError:
        return found
    for tid in tids:
        try:
            with open(f"/proc/{me}/task/{tid}/children") as f:
                found.extend(int(p) for p in f.read().split())
        except OSError:
            pass
    return found


def _reap_all() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def end_descendants() -> None:
    """SIGKILL every child, reap, repeat: orphans of the killed come back to this subreaper."""
    for _ in range(_ROUNDS):
        _reap_all()
        kids = _children()
        if not kids:
            return
        for pid in kids:
            try:  # noqa: SIM105 - not contextlib: its import is start time
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(_PAUSE_S)


def main(args: list[str]) -> int:
    uid = gid = None
    while args and args[0] != "--":
        flag, value, *args = args
        if flag == "--uid":
            uid = int(value)
        elif flag == "--gid":
            gid = int(value)
        else:
            print(f"cli_shim: unknown option {flag}", file=sys.stderr)
            return 2
    argv = args[1:]
    if not argv:
        print("cli_shim: no command", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # libc through the process's own symbols (python links it): no `find_library`.
    prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
    if prctl is None or prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        # Not Linux, or a sandbox without it: descendants that daemonise may escape the job.
        print("cli_shim: PR_SET_CHILD_SUBREAPER unavailable", file=sys.stderr)
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        _exec_cli(argv, uid, gid)  # never returns
    # Wait for any child: orphans that die while the CLI runs are reaped at once (every child
    # here is the job's), and the CLI's own status ends the loop.
    while True:
        pid, status = os.wait()
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            break
    end_descendants()
    if code < 0:  # killed by a signal: die by the same one, so the worker sees it
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


def _exec_cli(argv: list[str], uid: int | None, gid: int | None) -> None:
    """In the forked child: drop to the CLI's user (no supplementary groups), give back the
    default signal dispositions (the shim ignores TERM and INT, Python ignores PIPE and XFSZ),
    close every descriptor but 0-2, and exec; 127 when that cannot be done."""
    try:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(signum, signal.SIG_DFL)
        if gid is not None:
            os.setgroups([])
            os.setgid(gid)
        if uid is not None:
            if gid is None:
                os.setgroups([])
            os.setuid(uid)
        os.closerange(3, 65536)
        os.execvp(argv[0], argv)  # noqa: S606 - argv as given, no shell
    except OSError as exc:
        os.write(2, f"cli_shim: cannot start {argv[0]}: {exc.strerror or exc}\n".encode())
    finally:
        os._exit(127)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
