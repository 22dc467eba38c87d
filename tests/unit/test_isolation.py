"""app/isolation.py: the clone gate, CLI_USER resolution, the CLI's workspace, hardening."""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from app.adapters.process import RunAs
from app.config import Settings, load_settings
from app.errors import ConfigError
from app.isolation import (
    CliSandbox,
    CloneGate,
    harden_process,
    prepare_worker_dirs,
    resolve_cli_user,
)

# -- the clone gate ---------------------------------------------------------------------------


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_token_clone_waits_for_running_cli_then_runs() -> None:
    gate = CloneGate()
    order: list[str] = []
    cli_done = asyncio.Event()

    async def cli() -> None:
        async with gate.cli():
            order.append("cli start")
            await cli_done.wait()
            order.append("cli end")

    async def clone() -> None:
        async with gate.clone(holds_token=True):
            order.append("clone")

    runner = asyncio.create_task(cli())
    await _settle()
    cloner = asyncio.create_task(clone())
    await _settle()
    assert order == ["cli start"]  # the clone holding a token waits
    cli_done.set()
    await asyncio.gather(runner, cloner)
    assert order == ["cli start", "cli end", "clone"]


async def test_cli_waits_for_running_token_clone() -> None:
    gate = CloneGate()
    order: list[str] = []
    clone_done = asyncio.Event()

    async def clone() -> None:
        async with gate.clone(holds_token=True):
            order.append("clone start")
            await clone_done.wait()
            order.append("clone end")

    async def cli() -> None:
        async with gate.cli():
            order.append("cli")

    cloner = asyncio.create_task(clone())
    await _settle()
    runner = asyncio.create_task(cli())
    await _settle()
    assert order == ["clone start"]
    clone_done.set()
    await asyncio.gather(cloner, runner)
    assert order == ["clone start", "clone end", "cli"]


async def test_waiting_clone_holds_back_new_clis_not_running_ones() -> None:
    gate = CloneGate()
    first_done = asyncio.Event()
    order: list[str] = []

    async def cli(name: str, done: asyncio.Event | None = None) -> None:
        async with gate.cli():
            order.append(name)
            if done is not None:
                await done.wait()

    async def clone() -> None:
        async with gate.clone(holds_token=True):
            order.append("clone")

    first = asyncio.create_task(cli("cli 1", first_done))
    await _settle()
    cloner = asyncio.create_task(clone())
    await _settle()
    second = asyncio.create_task(cli("cli 2"))
    await _settle()
    assert order == ["cli 1"]  # cli 2 does not overtake the waiting clone
    first_done.set()
    await asyncio.gather(first, cloner, second)
    assert order == ["cli 1", "clone", "cli 2"]


async def test_clis_overlap_and_tokenless_clones_never_wait() -> None:
    gate = CloneGate()
    async with gate.cli(), gate.cli():
        assert gate.clis == 2
        async with gate.clone(holds_token=False):
            pass  # no token: nothing for a CLI to read


async def test_disabled_gate_never_waits() -> None:
    gate = CloneGate(enabled=False)  # the CLI runs as another uid
    async with gate.cli():
        await asyncio.wait_for(_enter_clone(gate), 1.0)


async def _enter_clone(gate: CloneGate) -> None:
    async with gate.clone(holds_token=True):
        pass


async def test_cancelled_waiting_clone_leaves_the_gate_usable() -> None:
    gate = CloneGate()
    release = asyncio.Event()

    async def cli() -> None:
        async with gate.cli():
            await release.wait()

    runner = asyncio.create_task(cli())
    await _settle()
    cloner = asyncio.create_task(_enter_clone(gate))
    await _settle()
    cloner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cloner
    # No clone waits any more: a new CLI starts at once.
    async with asyncio.timeout(1.0), gate.cli():
        pass
    release.set()
    await runner
    assert (gate.clis, gate.clones) == (0, 0)


async def test_sandbox_clone_takes_a_factory_so_a_stop_leaves_nothing_unawaited() -> None:
    sandbox = CliSandbox()
    release = asyncio.Event()
    started: list[str] = []

    async def hold() -> None:
        async with sandbox.cli_slot():
            await release.wait()

    async def fake_clone() -> str:
        started.append("clone")
        return "sha"

    runner = asyncio.create_task(hold())
    await _settle()
    waiting = asyncio.create_task(sandbox.clone(fake_clone, holds_token=True))
    await _settle()
    waiting.cancel()  # a stop while waiting at the gate
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert started == []  # the clone coroutine was never created: no "never awaited" warning
    release.set()
    await runner
    assert await sandbox.clone(fake_clone, holds_token=True) == "sha"


# -- CLI_USER ---------------------------------------------------------------------------------


def test_cli_user_by_name_or_ids_and_never_root() -> None:
    nobody = pwd.getpwnam("nobody")
    assert resolve_cli_user("nobody") == RunAs(nobody.pw_uid, nobody.pw_gid)
    assert resolve_cli_user("1234:5678") == RunAs(1234, 5678)
    assert resolve_cli_user(f"{nobody.pw_uid}") == RunAs(nobody.pw_uid, nobody.pw_gid)
    for bad in ("root", "0", "1234:0", "no-such-user-here"):
        with pytest.raises(ConfigError) as exc:
            resolve_cli_user(bad)
        assert exc.value.name == "CLI_USER"


def test_settings_read_cli_user_and_the_sandbox_follows_it(tmp_path: Path) -> None:
    settings = load_settings({"DATA_DIR": str(tmp_path), "CLI_USER": "nobody"})
    assert settings.cli_user == "nobody"
    sandbox = CliSandbox.from_settings(settings)
    assert sandbox.run_as is not None and not sandbox.gate.enabled
    same_uid = CliSandbox.from_settings(Settings())
    assert same_uid.run_as is None and same_uid.gate.enabled


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_prepare_gives_the_cli_its_output_and_home_and_a_read_only_checkout(
    tmp_path: Path,
) -> None:
    run_as = RunAs(65534, 65534)
    workspace = tmp_path / "ws"
    repo, out = workspace / "repo", workspace / "out"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "a.py").write_text("x = 1\n")
    (repo / "run.sh").write_text("#!/bin/sh\n")
    for path, mode in ((repo, 0o700), (repo / "src", 0o700)):
        path.chmod(mode)
    (repo / "src" / "a.py").chmod(0o600)
    (repo / "run.sh").chmod(0o700)
    out.mkdir()
    env = CliSandbox(run_as=run_as).prepare(workspace, repo, out, {"HOME": "/root", "A": "1"})
    home = workspace / "home"
    assert env == {"HOME": str(home), "TMPDIR": str(home / "tmp"), "A": "1"}
    for path in (out, home, home / "tmp"):
        st = path.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o700)
    assert stat.S_IMODE(workspace.stat().st_mode) == 0o711
    assert stat.S_IMODE((repo / "src").stat().st_mode) & 0o005 == 0o005
    assert stat.S_IMODE((repo / "src" / "a.py").stat().st_mode) & 0o077 == 0o044  # not 0o066
    assert stat.S_IMODE((repo / "run.sh").stat().st_mode) & 0o005 == 0o005
    assert (repo / "src" / "a.py").stat().st_uid == os.getuid()  # read-only for the CLI user
    # Without a CLI user the environment passes through, nothing is touched.
    assert CliSandbox().prepare(workspace, repo, out, {"HOME": "/h"}) == {"HOME": "/h"}


def test_worker_dirs_private_and_the_way_to_work_dir_searchable() -> None:
    # In a child process: prepare_worker_dirs sets the umask of the process that calls it.
    # Under /tmp itself: pytest's base temp dir is 0700, which the check rightly refuses.
    base = Path(tempfile.mkdtemp(prefix="fw-isolation-unit-"))
    base.chmod(0o755)
    try:
        _check_worker_dirs(base / "data")
    finally:
        shutil.rmtree(base)


def _check_worker_dirs(data: Path) -> None:
    data.mkdir()
    (data / "jobs.sqlite3").write_text("rows")
    (data / "jobs.sqlite3").chmod(0o644)
    code = (
        "import sys; from pathlib import Path; from app.config import Settings;"
        "from app.adapters.process import RunAs; from app.isolation import prepare_worker_dirs;"
        f"d = Path({str(data)!r}); s = Settings(data_dir=d, work_dir=d / 'work');"
        "prepare_worker_dirs(s, RunAs(65534, 65534));"
        "open(d / 'new.txt', 'w').close()"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    assert stat.S_IMODE((data / "jobs.sqlite3").stat().st_mode) == 0o600
    assert stat.S_IMODE((data / "new.txt").stat().st_mode) == 0o600  # umask 077
    assert stat.S_IMODE(data.stat().st_mode) == 0o711
    assert stat.S_IMODE((data / "work").stat().st_mode) == 0o711


def test_worker_dirs_refuse_an_ancestor_the_cli_user_cannot_search(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    settings = Settings(data_dir=closed / "data", work_dir=closed / "data" / "work")
    umask = os.umask(0o022)
    try:
        with pytest.raises(ConfigError) as exc:
            prepare_worker_dirs(settings, RunAs(65534, 65534))
    finally:
        os.umask(umask)
    assert exc.value.name == "WORK_DIR" and str(closed) in str(exc.value)


# -- hardening ---------------------------------------------------------------------------------


def test_hardening_elsewhere_than_linux_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fondation.isolation"):
        hardening = harden_process(platform="darwin")
    assert (hardening.non_dumpable, hardening.subreaper) == (False, False)
    assert "Linux-only" in caplog.text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux-only")
def test_hardening_sets_both_flags_in_a_child_process() -> None:
    code = (
        "import ctypes, ctypes.util; from app.isolation import harden_process;"
        "h = harden_process(); libc = ctypes.CDLL(ctypes.util.find_library('c'));"
        "print(h.non_dumpable, h.subreaper, libc.prctl(3, 0, 0, 0, 0))"  # PR_GET_DUMPABLE
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=30
    )
    assert out.stdout.split() == ["True", "True", "0"]
