"""The CLI's first process: a child subreaper that keeps every descendant of the job under it.

Run by `app.adapters.process.run_cli` as `python -I -S cli_shim.py [--uid U --gid G] -- argv`
(standard library only, so it starts in ~20 ms with no site packages). Why a shim and not the
worker alone: a daemon that double-forks and calls `setsid()` is orphaned within microseconds;
reparented to the worker it is indistinguishable from a process the worker started itself.
Reparented to this shim (`PR_SET_CHILD_SUBREAPER`), it stays a descendant of the job's leader,
so the worker's scans see it, and when the CLI exits the shim ends every process left under it,
reaps them all (every child of the shim belongs to the job, so `waitpid(-1)` is safe here),
and exits with the CLI's status (re-raising the signal that killed it).

SIGTERM and SIGINT are ignored by the shim itself: they reach the CLI through the process
group, and the shim's job is to outlive the CLI long enough to clean up. SIGKILL still works.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
_ROUNDS = 500
_PAUSE_S = 0.005


def _children() -> list[int]:
    me = os.getpid()
    found: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{me}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{me}/task/{tid}/children") as f:
                found.extend(int(p) for p in f.read().split())
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
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
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
    prctl = getattr(ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True), "prctl", None)
    if prctl is None or prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        # Not Linux, or a sandbox without it: descendants that daemonise may escape the job.
        print("cli_shim: PR_SET_CHILD_SUBREAPER unavailable", file=sys.stderr)
    try:
        proc = subprocess.Popen(
            argv,
            user=uid,
            group=gid,
            extra_groups=[] if uid is not None else None,
            # The CLI gets default signal dispositions back (the shim ignores TERM and INT).
            restore_signals=True,
            preexec_fn=_default_signals,
        )
    except OSError as exc:
        print(f"cli_shim: cannot start {argv[0]}: {exc.strerror or exc}", file=sys.stderr)
        return 127
    # Wait for any child: orphans that die while the CLI runs are reaped at once (every child
    # here is the job's), and the CLI's own status ends the loop.
    while True:
        pid, status = os.wait()
        if pid == proc.pid:
            code = proc.returncode = os.waitstatus_to_exitcode(status)
            break
    end_descendants()
    if code < 0:  # killed by a signal: die by the same one, so the worker sees it
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


def _default_signals() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
