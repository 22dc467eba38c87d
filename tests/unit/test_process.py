"""The CLI runner: argv/env building and a supervised subprocess (real processes, no shell)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import psutil
import pytest

from app.adapters.process import (
    TRUNCATED_MARK,
    build_argv,
    build_env,
    cli_env_allowlist,
    run_cli,
)
from app.config import DEFAULT_CLI_ENV, DEFAULT_COMMAND, DENIED_ENV_PREFIXES
from app.domain import JobOptions
from app.errors import ConfigError

PY = sys.executable


def py(code: str) -> list[str]:
    return [PY, "-c", code]


async def run(
    code: str,
    tmp_path: Path,
    *,
    timeout_s: float = 30.0,
    term_grace_s: float = 2.0,
    stop: asyncio.Event | None = None,
    lines: list[str] | None = None,
    **kw: int,
):  # type: ignore[no-untyped-def]
    seen = lines if lines is not None else []
    return await run_cli(
        py(code),
        env={"PYTHONUNBUFFERED": "1"},
        cwd=tmp_path,
        timeout_s=timeout_s,
        term_grace_s=term_grace_s,
        on_lines=seen.extend,
        stop=stop or asyncio.Event(),
        **kw,
    )


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def group_members(pgid: int) -> list[int]:
    out = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return out


class PeakRss:
    """Samples this test process's RSS while a run goes on."""

    def __init__(self) -> None:
        self.me = psutil.Process()
        self.base = self.me.memory_info().rss
        self.peak = self.base
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        while True:
            self.peak = max(self.peak, self.me.memory_info().rss)
            await asyncio.sleep(0.02)

    async def __aenter__(self) -> PeakRss:
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        self.peak = max(self.peak, self.me.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.base


# --- build_argv ---------------------------------------------------------------------------


def test_default_command_fills_paths_with_spaces(tmp_path: Path) -> None:
    repo = tmp_path / "my repo"
    out = tmp_path / "out dir"
    argv = build_argv(DEFAULT_COMMAND, repo_dir=repo, output_dir=out, options=JobOptions())
    assert argv == [
        "fondation", "analyze", str(repo), "--output-dir", str(out), "--profile", "production",
    ]  # fmt: skip


def test_options_appended_without_placeholders() -> None:
    argv = build_argv(
        "cli run {repo_dir}",
        repo_dir=Path("/r"),
        output_dir=Path("/o"),
        options=JobOptions(model="m-1", steps=("extract", "analyze")),
    )
    assert argv == ["cli", "run", "/r", "--model", "m-1", "--steps", "extract,analyze"]


def test_options_placeholders_used_in_place_and_dropped_when_unset() -> None:
    tpl = "cli '{repo_dir}' --model {model} --steps={steps} --out {output_dir}"
    argv = build_argv(
        tpl, repo_dir=Path("/r"), output_dir=Path("/o"), options=JobOptions(model="m", steps=("a",))
    )
    assert argv == ["cli", "/r", "--model", "m", "--steps=a", "--out", "/o"]
    argv = build_argv(tpl, repo_dir=Path("/r"), output_dir=Path("/o"), options=JobOptions())
    assert argv == ["cli", "/r", "--out", "/o"]


def test_shell_metacharacters_stay_literal() -> None:
    argv = build_argv(
        "cli {repo_dir}",
        repo_dir=Path("/x; rm -rf $HOME"),
        output_dir=Path("/o"),
        options=JobOptions(),
    )
    assert argv == ["cli", "/x; rm -rf $HOME"]


@pytest.mark.parametrize(
    "template", ["cli {repo_dir} {secret}", "cli {}", "cli 'unbalanced", "", "{repo_dir} x"]
)
def test_bad_templates_raise_config_error(template: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_argv(template, repo_dir=Path("/r"), output_dir=Path("/o"), options=JobOptions())
    assert info.value.name == "FONDATION_COMMAND"


# --- build_env ------------------------------------------------------------------------------


def test_env_allowlist_and_deny_prefixes() -> None:
    environ = {
        "PATH": "/usr/bin",
        "HOME": "/home/w",
        "ANTHROPIC_API_KEY": "sk-ant",
        "WEBHOOK_SECRETS": "whsec_abc",
        "SCW_SECRET_KEY": "scw-secret",
        "CONVEX_URL": "https://x.convex.cloud",
        "RANDOM_THING": "no",
        "EXTRA": "yes",
    }
    allow = cli_env_allowlist(DEFAULT_CLI_ENV, ("EXTRA", "SCW_SECRET_KEY", "WEBHOOK_SECRETS"))
    env = build_env(environ, allow=allow, deny_prefixes=DENIED_ENV_PREFIXES)
    assert env == {
        "PATH": "/usr/bin",
        "HOME": "/home/w",
        "ANTHROPIC_API_KEY": "sk-ant",
        "EXTRA": "yes",
        "PYTHONUNBUFFERED": "1",
    }


async def test_child_sees_only_filtered_env(tmp_path: Path) -> None:
    environ = {"PATH": os.environ.get("PATH", ""), "SCW_SECRET_KEY": "s3cr3t", "OK_VAR": "1"}
    env = build_env(environ, allow=("PATH", "OK_VAR", "SCW_SECRET_KEY"), deny_prefixes=("SCW_",))
    lines: list[str] = []
    result = await run_cli(
        py("import os, json; print(json.dumps(dict(os.environ)))"),
        env=env,
        cwd=tmp_path,
        timeout_s=30,
        term_grace_s=1,
        on_lines=lines.extend,
        stop=asyncio.Event(),
    )
    assert result.exit_code == 0
    seen = json.loads(lines[0])
    assert seen["OK_VAR"] == "1"
    assert seen["PYTHONUNBUFFERED"] == "1"
    assert "SCW_SECRET_KEY" not in seen
    assert "s3cr3t" not in lines[0]


# --- run_cli --------------------------------------------------------------------------------


async def test_exit_zero_and_both_streams(tmp_path: Path) -> None:
    lines: list[str] = []
    code = (
        "import sys\n"
        "print('out 1'); sys.stderr.write('err 1\\n'); print('out 2')\n"
        "sys.stderr.write('err 2 no newline')"
    )
    result = await run(code, tmp_path, lines=lines)
    assert result.exit_code == 0 and result.ok
    assert not (result.timed_out or result.stopped or result.killed)
    assert sorted(lines) == ["err 1", "err 2 no newline", "out 1", "out 2"]
    assert result.lines == 4
    assert set(result.tail) == set(lines)
    assert result.stderr_tail == ("err 1", "err 2 no newline")
    assert result.failure_tail == result.stderr_tail
    assert result.duration_s >= 0


async def test_exit_one_and_tail_bounded(tmp_path: Path) -> None:
    code = "import sys\nfor i in range(100): print('line', i)\nsys.exit(1)"
    result = await run(code, tmp_path, tail_lines=5)
    assert result.exit_code == 1 and not result.ok
    assert result.tail == tuple(f"line {i}" for i in range(95, 100))
    assert result.lines == 100
    assert result.stderr_tail == ()
    assert result.failure_tail == result.tail


async def test_cwd_is_used(tmp_path: Path) -> None:
    lines: list[str] = []
    await run("import os; print(os.getcwd())", tmp_path, lines=lines)
    assert Path(lines[0]).resolve() == tmp_path.resolve()


async def test_non_utf8_bytes_are_replaced(tmp_path: Path) -> None:
    lines: list[str] = []
    code = "import sys; sys.stdout.buffer.write(b'ok \\xff\\xfe caf\\xc3\\xa9\\r\\n\\x80')"
    result = await run(code, tmp_path, lines=lines)
    assert result.exit_code == 0
    assert lines == ["ok \ufffd\ufffd café", "\ufffd"]


async def test_long_lines_truncated_and_marked(tmp_path: Path) -> None:
    lines: list[str] = []
    code = "print('a' * 5000); print('short')"
    result = await run(code, tmp_path, lines=lines, max_line_bytes=100)
    assert result.exit_code == 0
    assert lines == ["a" * 100 + TRUNCATED_MARK, "short"]


async def test_missing_program_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        await run_cli(
            ["/nonexistent/fondation"],
            env={},
            cwd=tmp_path,
            timeout_s=5,
            term_grace_s=1,
            on_lines=lambda _: None,
            stop=asyncio.Event(),
        )


async def test_failing_callback_does_not_break_supervision(tmp_path: Path) -> None:
    def boom(_: str) -> None:
        raise RuntimeError("callback bug")

    result = await run_cli(
        py("print('a'); print('b')"),
        env={},
        cwd=tmp_path,
        timeout_s=10,
        term_grace_s=1,
        on_lines=boom,
        stop=asyncio.Event(),
    )
    assert result.exit_code == 0 and result.lines == 2


async def test_20mb_single_line_keeps_memory_bounded(tmp_path: Path) -> None:
    lines: list[str] = []
    code = (
        "import sys\n"
        "for _ in range(20): sys.stdout.buffer.write(b'x' * 1_000_000)\n"
        "sys.stdout.flush()"
    )
    async with PeakRss() as rss:
        result = await run(code, tmp_path, lines=lines)
    assert result.exit_code == 0
    assert len(lines) == 1
    assert lines[0] == "x" * 65536 + TRUNCATED_MARK
    assert rss.growth < 60 * 1024 * 1024


async def test_100mb_flood_of_lines_keeps_memory_bounded(tmp_path: Path) -> None:
    count = 0

    def on_line(line: str) -> None:
        nonlocal count
        count += 1

    code = (
        "import sys\n"
        "block = (b'y' * 1023 + b'\\n') * 1024\n"
        "for _ in range(100): sys.stdout.buffer.write(block)\n"
    )
    async with PeakRss() as rss:
        result = await run_cli(
            py(code),
            env={},
            cwd=tmp_path,
            timeout_s=90,
            term_grace_s=1,
            on_lines=lambda batch: [on_line(x) for x in batch],
            stop=asyncio.Event(),
        )
    assert result.exit_code == 0
    assert count == result.lines == 100 * 1024
    assert rss.growth < 60 * 1024 * 1024


GRANDCHILD = (
    "import subprocess, sys, time\n"
    "p = subprocess.Popen(['sleep', '60'])\n"
    "print('grandchild', p.pid, flush=True)\n"
    "time.sleep(60)\n"
)


def _pid_from(lines: list[str]) -> int:
    return int(next(line for line in lines if line.startswith("grandchild")).split()[1])


async def test_timeout_kills_the_whole_group(tmp_path: Path) -> None:
    lines: list[str] = []
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    result = await run(GRANDCHILD, tmp_path, timeout_s=1.5, term_grace_s=2, lines=lines)
    assert loop.time() - t0 < 10
    assert result.timed_out and not result.stopped
    assert result.exit_code is not None and result.exit_code != 0
    grandchild = _pid_from(lines)
    await _wait_dead(grandchild)
    assert not alive(grandchild)


async def test_stop_event_kills_the_whole_group(tmp_path: Path) -> None:
    lines: list[str] = []
    stop = asyncio.Event()
    pgid: list[int] = []

    def on_line(line: str) -> None:
        lines.append(line)
        if line.startswith("grandchild"):
            pid = int(line.split()[1])
            pgid.append(os.getpgid(pid))
            stop.set()

    result = await run_cli(
        py(GRANDCHILD),
        env={},
        cwd=tmp_path,
        timeout_s=30,
        term_grace_s=2,
        on_lines=lambda batch: [on_line(x) for x in batch],
        stop=stop,
    )
    assert result.stopped and not result.timed_out and not result.killed
    assert result.duration_s < 10
    grandchild = _pid_from(lines)
    await _wait_dead(grandchild)
    assert not alive(grandchild)
    assert pgid and group_members(pgid[0]) == []
    assert pgid[0] != os.getpgid(0)


async def test_leftover_grandchild_killed_after_normal_exit(tmp_path: Path) -> None:
    lines: list[str] = []
    code = (
        "import subprocess\n"
        "p = subprocess.Popen(['sleep', '60'], stdout=subprocess.DEVNULL,"
        " stderr=subprocess.DEVNULL)\n"
        "print('grandchild', p.pid, flush=True)\n"
    )
    result = await run(code, tmp_path, lines=lines)
    assert result.exit_code == 0
    grandchild = _pid_from(lines)
    await _wait_dead(grandchild)
    assert not alive(grandchild)


async def test_sigterm_ignored_gets_sigkill_after_grace(tmp_path: Path) -> None:
    stop = asyncio.Event()

    def on_line(line: str) -> None:
        if line == "ready":
            stop.set()

    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    result = await run_cli(
        py(code),
        env={},
        cwd=tmp_path,
        timeout_s=30,
        term_grace_s=0.5,
        on_lines=lambda batch: [on_line(x) for x in batch],
        stop=stop,
    )
    elapsed = loop.time() - t0
    assert result.stopped and result.killed
    assert result.exit_code == -9
    assert 0.4 < elapsed < 10


async def test_cancelling_run_cli_reaps_the_group(tmp_path: Path) -> None:
    lines: list[str] = []
    started = asyncio.Event()

    def on_line(line: str) -> None:
        lines.append(line)
        started.set()

    task = asyncio.create_task(
        run_cli(
            py(GRANDCHILD),
            env={},
            cwd=tmp_path,
            timeout_s=60,
            term_grace_s=1,
            on_lines=lambda batch: [on_line(x) for x in batch],
            stop=asyncio.Event(),
        )
    )
    await asyncio.wait_for(started.wait(), 20)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    grandchild = _pid_from(lines)
    await _wait_dead(grandchild)
    assert not alive(grandchild)


async def _wait_dead(pid: int, within_s: float = 5.0) -> None:
    """A SIGKILLed orphan is reparented and reaped by init; give that a bounded moment."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while alive(pid) and loop.time() < deadline:
        await asyncio.sleep(0.05)


# A daemon the usual way: fork, setsid, cwd /, fork again; the middle process exits at once, so
# the daemon is orphaned before anyone can see it. It keeps the CLI's stdout and stderr open.
DAEMON = (
    "import os, signal, sys, time\n"
    "r, w = os.pipe()\n"
    "if os.fork() == 0:\n"
    "    os.setsid(); os.chdir('/')\n"
    "    if os.fork() == 0:\n"
    "        signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "        time.sleep(300)\n"
    "        os._exit(0)\n"
    "    os._exit(0)\n"
    "time.sleep(0.2)\n"
    "print('ready', flush=True)\n"
)


def _descendant_daemons(before: set[int]) -> list[int]:
    """Processes started during the test, with cwd /, running the DAEMON code."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            if (
                p.pid not in before
                and p.info["cwd"] == "/"
                and os.getsid(p.pid) != os.getsid(0)
                and p.info["cmdline"][:2] == [PY, "-c"]
                and "os.setsid()" in p.info["cmdline"][2]
            ):
                found.append(p.pid)
        except (psutil.Error, ProcessLookupError, TypeError, IndexError):
            continue
    return found


@pytest.mark.timeout(60)
async def test_setsid_daemon_ends_with_the_cli_and_leaves_no_zombie(tmp_path: Path) -> None:
    """The old supervisor missed it (another session) and then waited forever for the pipes
    it held; now the shim keeps it in the tree and ends it with the CLI."""
    before = {p.pid for p in psutil.process_iter()}
    result = await asyncio.wait_for(run(DAEMON, tmp_path), 30)
    assert result.exit_code == 0
    await asyncio.sleep(0.3)
    left = _descendant_daemons(before)
    assert left == []
    me = psutil.Process()
    assert [c.pid for c in me.children() if c.status() == psutil.STATUS_ZOMBIE] == []


@pytest.mark.timeout(60)
async def test_stop_ends_a_setsid_daemon_that_ignores_sigterm(tmp_path: Path) -> None:
    stop = asyncio.Event()
    before = {p.pid for p in psutil.process_iter()}
    code = DAEMON + "import time\ntime.sleep(300)\n"
    lines: list[str] = []
    task = asyncio.create_task(run(code, tmp_path, stop=stop, term_grace_s=0.5, lines=lines))
    for _ in range(200):
        if "ready" in lines:
            break
        await asyncio.sleep(0.05)
    running = _descendant_daemons(before)
    assert len(running) == 1, "the daemon should be running, in a session of its own"
    stop.set()
    result = await asyncio.wait_for(task, 30)
    assert result.stopped
    await asyncio.sleep(0.3)
    assert not alive(running[0])


async def test_cli_exit_status_and_signal_pass_through_the_shim(tmp_path: Path) -> None:
    assert (await run("import sys; sys.exit(7)", tmp_path)).exit_code == 7
    code = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    assert (await run(code, tmp_path)).exit_code == -signal.SIGSEGV


async def test_the_cli_starts_with_default_signals_and_no_inherited_descriptors(
    tmp_path: Path,
) -> None:
    """The shim ignores TERM and INT and Python ignores PIPE and XFSZ; none of that reaches
    the CLI (a shell here: a Python CLI would set its own), and no descriptor of the shim or
    the worker beyond 0-2 stays open in it."""
    lines: list[str] = []
    held = os.open(tmp_path, os.O_RDONLY)
    os.set_inheritable(held, True)  # even a descriptor the worker left inheritable
    try:
        result = await run_cli(
            ["/bin/sh", "-c", "grep SigIgn /proc/$$/status; ls /proc/$$/fd"],
            env={"PATH": os.environ["PATH"]},
            cwd=tmp_path,
            timeout_s=30,
            term_grace_s=2,
            on_lines=lines.extend,
            stop=asyncio.Event(),
        )
    finally:
        os.close(held)
    assert result.exit_code == 0, lines
    ignored = int(next(line for line in lines if line.startswith("SigIgn:")).split()[1], 16)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ):
        assert not ignored & (1 << (signum - 1)), (signum, hex(ignored))
    fds = sorted(int(line) for line in lines if line.strip().isdigit())
    assert fds == [0, 1, 2], lines
