"""app/adapters/proctree.py: stat parsing, the reaper's rule (orphans only, never a status
someone else waits for), and a job's tree followed across `setsid`."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest

from app.adapters.proctree import JobProcesses, Reaper, parse_stat, read_proc

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")


def test_stat_line_with_spaces_and_parentheses_in_the_name() -> None:
    line = "42 (a (b) c) S 1 40 39 0 -1 4194304 98 0 0 0 0 0 0 0 20 0 1 0 39480 3133440 354"
    info = parse_stat(42, line)
    assert info is not None
    assert (info.pid, info.ppid, info.pgid, info.sid, info.state, info.start_ticks) == (
        42, 1, 40, 39, "S", 39480,
    )  # fmt: skip
    assert parse_stat(1, "garbage") is None


def test_reaper_leaves_statuses_of_processes_the_worker_started() -> None:
    """Zombie children started by this process, in its session or in a new one, are not the
    reaper's: Popen.wait() still returns their real status (a blanket waitpid(-1) makes it 0)."""
    mine = subprocess.Popen(["sh", "-c", "exit 7"])
    own_session = subprocess.Popen(["sh", "-c", "exit 9"], start_new_session=True)
    for proc in (mine, own_session):
        while (info := read_proc(proc.pid)) is not None and not info.zombie:
            pass
    assert Reaper().reap() == 0
    assert (mine.wait(timeout=5), own_session.wait(timeout=5)) == (7, 9)


async def test_asyncio_child_status_survives_a_busy_reaper() -> None:
    reaper = Reaper()
    proc = await asyncio.create_subprocess_exec("sh", "-c", "sleep 0.2; exit 5")
    for _ in range(40):
        reaper.reap()
        await asyncio.sleep(0.01)
    assert await proc.wait() == 5


# Run in a child process: it makes itself a subreaper, which this test runner must not become.
SUBREAPER = textwrap.dedent(
    """
    import asyncio, os, subprocess, sys, time
    from app.adapters.proctree import JobProcesses, Reaper, children_of, read_proc
    from app.isolation import harden_process

    assert harden_process().subreaper
    reaper = Reaper()

    def zombies():
        return [p for p in children_of(os.getpid()) if (i := read_proc(p)) and i.zombie]

    # 1. An orphan in its dead parent's session: reaped by the session rule.
    subprocess.run(["sh", "-c", "sleep 0.2 & exit 0"], start_new_session=True, check=True)
    # 2. A double-forked daemon in a session of its own, seen by a job's scan first.
    leader = subprocess.Popen(
        [sys.executable, "-c",
         "import os, time\\n"
         "if os.fork() == 0:\\n"
         "    os.setsid()\\n"
         "    if os.fork() == 0: time.sleep(1.0); os._exit(0)\\n"
         "    time.sleep(0.6); os._exit(0)\\n"
         "time.sleep(0.8)\\n"],
        start_new_session=True,
    )
    time.sleep(0.4)
    tree = JobProcesses(leader.pid, reaper=reaper)
    members = {i.pid for i in tree.scan()}
    leader.wait()
    # 3. A child of ours that nobody reaps yet: never the reaper's.
    direct = subprocess.Popen(["sh", "-c", "exit 3"], start_new_session=True)
    time.sleep(1.2)
    before = len(zombies())
    reaped = reaper.reap()
    after = zombies()
    print(len(members), before, reaped, after == [direct.pid], direct.wait())
    """
)


def test_subreaper_reaps_orphans_and_only_orphans() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SUBREAPER], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    members, before, reaped, only_direct_left, direct_status = out.stdout.split()
    assert int(members) >= 3  # leader, middle, daemon
    assert (int(before), int(reaped)) == (4, 3)  # three orphans + our own `exit 3`
    assert (only_direct_left, direct_status) == ("True", "3")


async def test_end_kills_every_member_and_reports_how_many() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import subprocess, time; subprocess.Popen(['sleep', '30']);"
        " time.sleep(30)", start_new_session=True,
    )  # fmt: skip
    tree = JobProcesses(proc.pid)
    for _ in range(100):
        if len(tree.scan()) >= 2:
            break
        await asyncio.sleep(0.02)
    sleeper = next(i.pid for i in tree.scan() if i.pid != proc.pid)
    assert await tree.end() == 2
    assert await proc.wait() == -9
    assert read_proc(sleeper) is None or read_proc(sleeper).zombie  # type: ignore[union-attr]
