"""Running the Fondation CLI: argv from the command template, a filtered environment, and a
supervised subprocess in its own process group with bounded-memory line reading.

Nothing here uses a shell. The CLI's whole process group is stopped on timeout or on request
(SIGTERM, a grace period, then SIGKILL), and once the leader exits every descendant it left is
killed too, also one that left the group with `setsid()` (`app.adapters.proctree` follows them
by ancestry), so a job never leaves stray processes or zombies behind. The CLI can run as
another user (`RunAs`) when the worker may switch to one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import shlex
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from app.adapters.proctree import REAPER, SCAN_INTERVAL_S, JobProcesses
from app.domain import JobOptions
from app.errors import ConfigError

__all__ = [
    "TRUNCATED_MARK",
    "CliResult",
    "RunAs",
    "build_argv",
    "build_env",
    "cli_env_allowlist",
    "run_cli",
]

_log = logging.getLogger(__name__)

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_KNOWN = frozenset({"repo_dir", "output_dir", "model", "steps"})
TRUNCATED_MARK = " …[truncated]"
_CHUNK = 65536
_COALESCE_S = 0.01  # at most ~100 wake-ups per second per stream for a chatty CLI
_DRAIN_AFTER_EXIT_S = 5.0
# The CLI's first process (see app/adapters/cli_shim.py): isolated mode, no site packages.
_SHIM = (sys.executable, "-I", "-S", str(Path(__file__).with_name("cli_shim.py")))


def build_argv(
    template: str, *, repo_dir: Path, output_dir: Path, options: JobOptions
) -> list[str]:
    """Split `template` with shell rules and fill `{repo_dir}`, `{output_dir}`, `{model}`,
    `{steps}` inside each argument (a value with spaces stays one argument).

    Without a `{model}` placeholder a set model is appended as `--model <model>`; likewise
    `--steps a,b` for `{steps}`. Where the template does hold `{model}`/`{steps}` but the job
    has no such option, the argument holding it is dropped, and so is the option flag just
    before it (`--model {model}` disappears as a whole). Unknown placeholders and unbalanced
    quotes raise `ConfigError("FONDATION_COMMAND", ...)`.
    """
    try:
        parts = shlex.split(template)
    except ValueError as exc:
        raise ConfigError("FONDATION_COMMAND", f"cannot split command: {exc}") from None
    if not parts:
        raise ConfigError("FONDATION_COMMAND", "empty command")
    used: set[str] = set()
    for part in parts:
        for name in _PLACEHOLDER.findall(part):
            if name not in _KNOWN:
                raise ConfigError("FONDATION_COMMAND", f"unknown placeholder {{{name}}}")
            used.add(name)
    if _PLACEHOLDER.search(parts[0]):
        raise ConfigError("FONDATION_COMMAND", "the program name cannot be a placeholder")

    values: dict[str, str | None] = {
        "repo_dir": str(repo_dir),
        "output_dir": str(output_dir),
        "model": options.model,
        "steps": ",".join(options.steps) if options.steps else None,
    }
    argv: list[str] = []
    for part in parts:
        names = _PLACEHOLDER.findall(part)
        if any(values[name] is None for name in names):
            # An optional value the job does not set: drop the argument, and its flag.
            flag = argv[-1] if len(argv) > 1 else ""
            if _PLACEHOLDER.fullmatch(part) and flag.startswith("-") and "=" not in flag:
                argv.pop()
            continue
        argv.append(_PLACEHOLDER.sub(lambda m: values[m.group(1)] or "", part))
    if options.model is not None and "model" not in used:
        argv += ["--model", options.model]
    if options.steps and "steps" not in used:
        argv += ["--steps", ",".join(options.steps)]
    return argv


def cli_env_allowlist(default: Sequence[str], passthrough: Sequence[str]) -> tuple[str, ...]:
    """The names the CLI may inherit: the defaults plus `CLI_ENV_PASSTHROUGH`, deduplicated."""
    return tuple(dict.fromkeys([*default, *passthrough]))


def build_env(
    environ: Mapping[str, str], *, allow: Sequence[str], deny_prefixes: Sequence[str]
) -> dict[str, str]:
    """The CLI's environment: only allowlisted names present in `environ`; a name starting with
    any deny prefix (compared case-insensitively) is withheld even if allowlisted.
    `PYTHONUNBUFFERED=1` is always set so progress lines arrive as they are printed."""
    denied = tuple(p.upper() for p in deny_prefixes)
    env: dict[str, str] = {}
    for name in allow:
        if name.upper().startswith(denied) or name not in environ:
            continue
        env[name] = environ[name]
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass(frozen=True, slots=True)
class RunAs:
    """The unprivileged user and group the CLI runs as (no supplementary groups)."""

    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class CliResult:
    """How a CLI run ended.

    `exit_code` is the process's return code (negative: killed by that signal), None only if
    it could not be known. `killed` means SIGKILL was needed after the SIGTERM grace.
    `tail` holds the last lines of stdout and stderr interleaved as they arrived;
    `stderr_tail` the last stderr lines alone (the better failure report when non-empty).
    `lines` counts every line seen on both streams.
    """

    exit_code: int | None
    timed_out: bool
    stopped: bool
    killed: bool
    tail: tuple[str, ...]
    duration_s: float
    lines: int
    stderr_tail: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.stopped

    @property
    def failure_tail(self) -> tuple[str, ...]:
        """stderr's tail if the CLI wrote anything there, else the combined tail."""
        return self.stderr_tail or self.tail


class _Lines:
    """Shared line accounting for both streams; lines go to the callback a chunk at a time."""

    def __init__(self, on_lines: Callable[[list[str]], None], tail_lines: int) -> None:
        self.on_lines = on_lines
        self.tail: deque[str] = deque(maxlen=max(tail_lines, 0))
        self.stderr_tail: deque[str] = deque(maxlen=max(tail_lines, 0))
        self.count = 0
        self._callback_failed = False

    def emit(self, raws: list[tuple[bytes, bool]], is_stderr: bool) -> None:
        """Decode a batch of (line bytes, truncated) and hand it on in one call."""
        if not raws:
            return
        texts = []
        for raw, truncated in raws:
            text = raw.removesuffix(b"\r").decode("utf-8", errors="replace")
            texts.append(text + TRUNCATED_MARK if truncated else text)
        self.count += len(texts)
        self.tail.extend(texts)  # deques keep only the newest `maxlen`
        if is_stderr:
            self.stderr_tail.extend(texts)
        try:
            self.on_lines(texts)
        except Exception:
            if not self._callback_failed:  # log once, keep the process supervised
                self._callback_failed = True
                _log.exception("on_lines callback failed; further failures are not logged")


async def _read_lines(
    stream: asyncio.StreamReader, sink: _Lines, *, is_stderr: bool, max_line_bytes: int
) -> None:
    """Read `stream` in chunks and emit its lines a chunk at a time; memory stays under
    max_line_bytes + one chunk.

    A CLI that flushes every line would otherwise wake the event loop once per line, and one
    that floods would take a whole core from the webhook acks. After every read we wait
    `_COALESCE_S`: the pipe fills meanwhile, the next read takes many lines at once, and a
    flooding CLI is held back by the pipe's backpressure (at most one chunk per stream per
    wait, ~6 MB/s) instead of by the worker's CPU."""
    buf = bytearray()
    truncated = False

    def add(piece: bytes) -> None:
        nonlocal truncated
        room = max_line_bytes - len(buf)
        if len(piece) > room:
            truncated = True
            piece = piece[: max(room, 0)]
        buf.extend(piece)

    while True:
        chunk = await stream.read(_CHUNK)
        if not chunk:
            break
        pieces = chunk.split(b"\n")
        batch: list[tuple[bytes, bool]] = []
        for piece in pieces[:-1]:
            if buf or truncated:
                add(piece)
                batch.append((bytes(buf), truncated))
                buf.clear()
                truncated = False
            elif len(piece) > max_line_bytes:
                batch.append((piece[:max_line_bytes], True))
            else:
                batch.append((piece, False))
        add(pieces[-1])
        sink.emit(batch, is_stderr)
        await asyncio.sleep(_COALESCE_S)
    if buf or truncated:
        sink.emit([(bytes(buf), truncated)], is_stderr)


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _follow(tree: JobProcesses, proc: asyncio.subprocess.Process) -> None:
    """Record the CLI's descendants while it runs, so one that leaves the group is known, and
    reap those that die as orphans of the worker. Once the leader has exited, end everything
    it left: asyncio's `wait()` returns only when the pipes close, and a descendant holding
    stdout (a daemon in a session of its own) would otherwise hold it, and the job, forever."""
    while True:
        await asyncio.sleep(SCAN_INTERVAL_S)
        if proc.returncode is None:
            tree.scan()
        else:
            _killpg(tree.leader, signal.SIGKILL)
            await tree.end()
        REAPER.reap()


async def run_cli(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    timeout_s: float,
    term_grace_s: float,
    on_lines: Callable[[list[str]], None],
    stop: asyncio.Event,
    tail_lines: int = 40,
    max_line_bytes: int = 65536,
    run_as: RunAs | None = None,
) -> CliResult:
    """Run `argv` without a shell in its own process group and supervise it, under
    `cli_shim`, a child subreaper that keeps every descendant in the job's process tree.

    stdout and stderr are read concurrently; every line (decoded as UTF-8 with replacement,
    cut at `max_line_bytes` and marked with `TRUNCATED_MARK`) goes to `on_lines`, a batch per
    read, which runs on the event loop and must not block. The run ends when the process exits, when
    `timeout_s` passes (`timed_out`), or when `stop` is set (`stopped`); in the last two
    cases the group gets SIGTERM, then SIGKILL after `term_grace_s`. Whatever happens, the
    group is SIGKILLed once the leader has exited, and the leader is always reaped, also when
    this coroutine is cancelled. Raises `OSError` if the program cannot be started.
    """
    if not argv:
        raise ValueError("empty argv")
    program = shutil.which(argv[0], path=env.get("PATH", os.defpath))
    if program is None:  # the shim could only exit 127
        raise FileNotFoundError(errno.ENOENT, "cannot start the CLI", argv[0])
    started = time.monotonic()
    user = [] if run_as is None else ["--uid", str(run_as.uid), "--gid", str(run_as.gid)]
    proc = await asyncio.create_subprocess_exec(
        *_SHIM,
        *user,
        "--",
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env),
        cwd=str(cwd),
        start_new_session=True,
    )
    pgid = proc.pid  # start_new_session: the child leads its own session and group
    tree = JobProcesses(proc.pid)
    follower = asyncio.ensure_future(_follow(tree, proc))
    sink = _Lines(on_lines, tail_lines)
    assert proc.stdout is not None and proc.stderr is not None
    readers = asyncio.gather(
        _read_lines(proc.stdout, sink, is_stderr=False, max_line_bytes=max_line_bytes),
        _read_lines(proc.stderr, sink, is_stderr=True, max_line_bytes=max_line_bytes),
    )
    waiter = asyncio.ensure_future(proc.wait())
    stopper = asyncio.ensure_future(stop.wait())
    timed_out = stopped = killed = False
    try:
        done, _ = await asyncio.wait(
            {waiter, stopper}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        if waiter not in done:
            if stopper in done:
                stopped = True
            else:
                timed_out = True
            _killpg(pgid, signal.SIGTERM)
            tree.signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(waiter), timeout=term_grace_s)
            except TimeoutError:
                killed = True
                _killpg(pgid, signal.SIGKILL)
                await waiter
        # The leader is gone; nothing it started may outlive it, in its group or not.
        _killpg(pgid, signal.SIGKILL)
        await tree.end()
        try:
            await asyncio.wait_for(asyncio.shield(readers), timeout=_DRAIN_AFTER_EXIT_S)
        except TimeoutError:
            # A descendant that left the group still holds a pipe; stop reading it.
            _log.warning(
                "CLI output still open %.0f s after exit; not read further", _DRAIN_AFTER_EXIT_S
            )
    finally:
        stopper.cancel()
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        if proc.returncode is None:  # cancelled or failed mid-way: never leave it running
            _killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        if not waiter.done():
            await asyncio.shield(waiter)
        _killpg(pgid, signal.SIGKILL)
        await asyncio.shield(tree.end())
        if not readers.done():
            readers.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await readers
        # Close the pipe transports so no ResourceWarning escapes.
        for stream in (proc.stdout, proc.stderr):
            transport = getattr(stream, "_transport", None)
            if transport is not None:
                transport.close()
    return CliResult(
        exit_code=proc.returncode,
        timed_out=timed_out,
        stopped=stopped,
        killed=killed,
        tail=tuple(sink.tail),
        duration_s=time.monotonic() - started,
        lines=sink.count,
        stderr_tail=tuple(sink.stderr_tail),
    )
