"""A hostile CLI against a real worker (issue 11.2, issue 13 PID 1): it tries to read the
worker's environment and memory, the worker's store and a file of its own workspace, and
leaves children behind, one of them a `setsid` daemon with cwd `/` that no process-group kill
reaches. After the job: nothing read, nothing of the job left running, no zombie left.

The spy is a stdlib-only script run by the system Python (`/usr/bin/python3`), which an
unprivileged CLI user can execute (the test's own interpreter may sit under /root)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from app.clock import SystemClock
from app.config import load_settings
from app.domain import ClaimResult, JobSpec, Repository
from app.jobs import JobManager
from app.logs import Redactor
from app.metrics import create_metrics
from app.urlpolicy import system_resolver
from tests.support.fakes import HeldReporter
from tests.support.gitserver import GitHttpServer, make_repo
from tests.support.jobs import SOURCE, sim, submit, wait_for
from tests.support.signing import cancel_body, headers_for
from tests.support.worker import REPO_ROOT, WorkerProcess, base_env

pytestmark = [pytest.mark.faults, pytest.mark.timeout(120)]
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="starts the worker as another user / switches the CLI's user"
)

SYSTEM_PYTHON = "/usr/bin/python3"
SECRETS = {
    "SCW_SECRET_KEY": "ISOLATION-scw-secret-key-77a1",
    "SCW_ACCESS_KEY": "ISOLATION-scw-access-key-5c2e",
    "CONVEX_DEPLOY_KEY": "prod:ISOLATION-convex-key|x",
}
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"ISOLATION-webhook-secret").decode()
MARKERS = ("ISOLATION-", "SVNPTEFUSU9OLXdlYmhvb2stc2VjcmV0")  # raw, and the webhook's base64

SPY = r"""
import json, os, shutil, subprocess, sys, time
repo, out, template, reports, mode, *targets = sys.argv[1:]
report = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
          "home": os.environ.get("HOME"), "marker": "SPY-REPORT"}
ancestors, pid = [], os.getppid()
while pid > 1:  # the shim, the worker, and whatever started the worker
    ancestors.append(pid)
    with open(f"/proc/{pid}/stat") as f:
        pid = int(f.read().rsplit(")", 1)[1].split()[1])

def attempt(name, read):
    try:
        report[name] = "read:" + read()
    except OSError as exc:
        report[name] = "denied:" + (exc.strerror or str(exc.errno))

def mem(pid):
    with open(f"/proc/{pid}/maps") as maps:
        start = int(maps.readline().split("-")[0], 16)
    with open(f"/proc/{pid}/mem", "rb") as f:
        f.seek(start)
        return f.read(64).hex()

for pid in ancestors:
    attempt(f"environ:{pid}", lambda: open(f"/proc/{pid}/environ", "rb").read().decode("latin-1"))
    attempt(f"mem:{pid}", lambda: mem(pid))
for target in targets:
    attempt("file:" + os.path.basename(target), lambda: open(target, "rb").read().decode("latin-1"))
attempt("repo", lambda: open(os.path.join(repo, "README.md")).read())
def home_write():
    path = os.path.join(os.environ["HOME"], ".cli-state")
    with open(path, "w") as f:
        f.write("ok")
    return path
attempt("home", home_write)

# Children: one in the CLI's group, and a daemon in a session of its own with cwd /.
kid = subprocess.Popen(["sleep", "300"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
report["children"] = [kid.pid]
if mode != "kids":
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.setsid()
        os.chdir("/")
        daemon = os.fork()
        if daemon == 0:
            os.execvp("sleep", ["sleep", "301"])
        os.write(w, str(daemon).encode())
        os._exit(0)
    os.waitpid(middle, 0)
    report["children"].append(int(os.read(r, 32)))

shutil.copytree(template, out, dirs_exist_ok=True)
for folder in ("chapters", "reviewed-chapters"):  # smuggle what was read into a chapter
    for name in os.listdir(os.path.join(out, folder)):
        with open(os.path.join(out, folder, name), "a") as f:
            f.write("\n\n" + json.dumps(report) + "\n")
with open(os.path.join(reports, f"{os.getpid()}.tmp"), "w") as f:
    json.dump(report, f)
os.rename(os.path.join(reports, f"{os.getpid()}.tmp"), os.path.join(reports, f"{os.getpid()}.json"))
print("[FONDATION_STEP_1/1] spying", flush=True)
if mode == "hang":
    time.sleep(300)
"""


@pytest.fixture(scope="module")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitHttpServer]:
    root = tmp_path_factory.mktemp("isolation-repos")
    make_repo(root / "spy.git", sim())
    with GitHttpServer(root) as server:
        yield server


@pytest.fixture
def arena() -> Iterator[Path]:
    """A directory an unprivileged CLI user can reach (pytest's base temp dir is 0700)."""
    found = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True, text=True, check=False,
    ) if os.access(SYSTEM_PYTHON, os.X_OK) else None  # fmt: skip
    if found is None or found.stdout.strip() != str(sys.version_info[:2]):
        pytest.skip(f"{SYSTEM_PYTHON} of this Python version runs the unprivileged processes")
    path = Path(tempfile.mkdtemp(prefix="fw-isolation-"))
    path.chmod(0o711)
    source, template = path / "source", path / "template"
    for name, text in SOURCE.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(text)
    subprocess.run(
        [sys.executable, "-m", "app.simulator", "analyze", str(source), "--output-dir",
         str(template)],
        cwd=REPO_ROOT, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    for p in [template, *template.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    (path / "spy.py").write_text(SPY)
    (path / "spy.py").chmod(0o644)
    reports = path / "reports"
    reports.mkdir()
    reports.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _worker(
    arena: Path,
    mode: str,
    *,
    as_nobody: bool = False,
    python: str = sys.executable,
    **overrides: Any,
) -> tuple[WorkerProcess, dict[str, str]]:
    data = arena / "data"
    command = (
        f"{SYSTEM_PYTHON} {arena / 'spy.py'} {{repo_dir}} {{output_dir}} {arena / 'template'}"
        f" {arena / 'reports'} {mode} {data / 'jobs.sqlite3'} {arena / 'worker-only.txt'}"
    )
    (arena / "worker-only.txt").write_text("ISOLATION-worker-only-file")
    (arena / "worker-only.txt").chmod(0o600)
    env = base_env(
        arena,
        DATA_DIR=str(data),
        WORK_DIR=str(data / "work"),
        FONDATION_COMMAND=command,
        WEBHOOK_SECRETS=WEBHOOK_SECRET,
        SHUTDOWN_GRACE_S="6",
        **SECRETS,
        **overrides,
    )
    if not as_nobody:
        return WorkerProcess(env, arena / "worker.log", python=python).start(), env
    # An unprivileged worker: the system Python (ours may sit under /root) with this
    # environment's packages, its data directory its own.
    nobody = pwd.getpwnam("nobody")
    data.mkdir()
    os.chown(data, nobody.pw_uid, nobody.pw_gid)
    env["PYTHONPATH"] = f"{REPO_ROOT}:{sysconfig.get_paths()['purelib']}"
    user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
    return WorkerProcess(env, arena / "worker.log", user, python=SYSTEM_PYTHON).start(), env


def _wait_report(arena: Path, w: WorkerProcess) -> dict[str, Any]:
    """What the spy read, once it has written it (before the job's end, which the old code
    never reached: the daemon holds the CLI's pipes)."""
    reports = arena / "reports"
    assert wait_for(lambda: any(reports.glob("*.json")), 30), w.logs()[-3000:]
    found = list(reports.glob("*.json"))
    assert len(found) == 1, found
    return dict(json.loads(found[0].read_text()))


def _gone(pid: int) -> bool:
    """Not running and not a zombie: reaped by whoever is its parent now."""
    return not psutil.pid_exists(pid)


def _assert_job_processes_gone(w: WorkerProcess, report: dict[str, Any]) -> None:
    children = report["children"]
    assert wait_for(lambda: all(_gone(pid) for pid in children), 5.0), [
        (pid, psutil.Process(pid).status()) for pid in children if psutil.pid_exists(pid)
    ]
    assert w.proc is not None
    if w.proc.poll() is None:  # the worker (a subreaper now) holds no zombie either

        def zombies() -> list[int]:
            kids = psutil.Process(w.proc.pid).children()  # type: ignore[union-attr]
            return [c.pid for c in kids if c.status() == psutil.STATUS_ZOMBIE]

        assert wait_for(lambda: not zombies(), 3.0), zombies()


def _assert_no_secret_in_docs(w: WorkerProcess, job_id: str) -> None:
    docs = httpx.get(f"{w.url}/v1/jobs/{job_id}/docs", timeout=10).json()["docs"]
    text = json.dumps(docs)
    assert "SPY-REPORT" in text  # the smuggled report did reach a doc: the check below means it
    assert not [m for m in MARKERS if m in text]


@needs_root
def test_same_uid_cli_cannot_read_worker_environ_or_memory(
    arena: Path, git_server: GitHttpServer
) -> None:
    """Worker and CLI run as the same unprivileged uid (nobody): only PR_SET_DUMPABLE 0 keeps
    /proc/<worker>/environ and mem closed."""
    w, _ = _worker(arena, "exit", as_nobody=True)
    try:
        submit(w, "iso-same-uid", git_server.url_for("spy"), secret=WEBHOOK_SECRET)
        report = _wait_report(arena, w)
        assert report["uid"] == pwd.getpwnam("nobody").pw_uid  # the worker's own uid
        assert w.proc is not None
        assert report[f"environ:{w.proc.pid}"].startswith("denied:"), report
        assert report[f"mem:{w.proc.pid}"].startswith("denied:"), report
        done = w.wait_status("iso-same-uid", {"completed", "failed"}, timeout_s=60)
        assert done["status"] == "completed", done
        _assert_no_secret_in_docs(w, "iso-same-uid")
        _assert_job_processes_gone(w, report)
    finally:
        w.stop()


@needs_root
def test_cli_user_reads_checkout_writes_output_and_nothing_of_the_worker(
    arena: Path, git_server: GitHttpServer
) -> None:
    """The worker is root, CLI_USER=nobody: the CLI runs as nobody with no extra groups, its
    own HOME, the checkout readable; the worker's environ, store and files are not."""
    nobody = pwd.getpwnam("nobody")
    w, env = _worker(arena, "exit", CLI_USER="nobody")
    try:
        submit(w, "iso-cli-user", git_server.url_for("spy"), secret=WEBHOOK_SECRET)
        report = _wait_report(arena, w)
        assert (report["uid"], report["gid"]) == (nobody.pw_uid, nobody.pw_gid)
        assert set(report["groups"]) <= {nobody.pw_gid}
        assert w.proc is not None
        assert report[f"environ:{w.proc.pid}"].startswith("denied:"), report
        assert report[f"mem:{w.proc.pid}"].startswith("denied:"), report
        assert report["file:jobs.sqlite3"].startswith("denied:"), report["file:jobs.sqlite3"]
        assert report["file:worker-only.txt"].startswith("denied:")
        assert report["repo"].startswith("read:# Demo"), report["repo"]
        assert report["home"].startswith(f"read:{env['WORK_DIR']}/"), report["home"]
        done = w.wait_status("iso-cli-user", {"completed", "failed"}, timeout_s=60)
        assert done["status"] == "completed", done
        _assert_no_secret_in_docs(w, "iso-cli-user")
        _assert_job_processes_gone(w, report)
        # The store written since startup is private too (umask 077).
        db = Path(env["DATA_DIR"]) / "jobs.sqlite3"
        assert db.stat().st_mode & 0o077 == 0, oct(db.stat().st_mode)
    finally:
        w.stop()


@pytest.mark.parametrize("end", ["cancel", "timeout", "shutdown"])
def test_setsid_daemon_and_children_end_with_the_job_and_leave_no_zombie(
    arena: Path, git_server: GitHttpServer, end: str
) -> None:
    """The CLI hangs after spawning a child and a setsid daemon with cwd /; however the job
    ends (cancel, timeout, worker shutdown) none of them survives, and none stays a zombie."""
    extra = {"JOB_TIMEOUT_S": "4"} if end == "timeout" else {}
    w, _ = _worker(arena, "hang", **extra)
    job_id = f"iso-{end}"
    try:
        submit(w, job_id, git_server.url_for("spy"), secret=WEBHOOK_SECRET)
        report = _wait_report(arena, w)
        assert all(psutil.pid_exists(pid) for pid in report["children"])
        t0 = time.monotonic()
        if end == "cancel":
            assert cancel_as(w, job_id).status_code == 202
            w.wait_status(job_id, {"canceled"}, timeout_s=30)
        elif end == "timeout":
            w.wait_status(job_id, {"failed"}, timeout_s=30)
        else:
            w.signal(signal.SIGTERM)
            assert w.wait(timeout_s=20) == 0
        _assert_job_processes_gone(w, report)
        print(f"FIGURES isolation {end}: every job process gone {time.monotonic() - t0:.2f} s")
    finally:
        w.stop()


def cancel_as(w: WorkerProcess, job_id: str) -> httpx.Response:
    """`tests.support.jobs.cancel`, signed with this module's webhook secret."""
    body = cancel_body(job_id)
    return httpx.post(
        f"{w.url}/v1/webhooks",
        content=body,
        headers=headers_for(body, f"{job_id}:1:cancel", secret=WEBHOOK_SECRET),
        timeout=10,
    )


# -- a clone token and another job's CLI (same uid) -----------------------------------------------

SNOOP = r"""
import json, os, shutil, sys, time
repo, out, template, log = sys.argv[1:5]
with open(log, "a") as f:
    f.write(json.dumps({"event": "cli start", "t": time.monotonic(), "pid": os.getpid()}) + "\n")
found, deadline = [], time.monotonic() + 2.5
while time.monotonic() < deadline:  # read every environment this uid can read
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/environ", "rb") as env:
                data = env.read()
        except OSError:
            continue
        if b"Authorization" in data:
            found.append(pid)
    time.sleep(0.02)
shutil.copytree(template, out, dirs_exist_ok=True)
with open(log, "a") as f:
    f.write(json.dumps({"event": "cli end", "t": time.monotonic(), "found": found}) + "\n")
"""

SLOW_GIT = """#!/bin/sh
# git, one second late, holding git's environment (the clone token) meanwhile, like git would.
printf '{"event": "git", "t": %s, "args": "%s"}\\n' "$(python3 -c 'import time; print(time.monotonic())')" "$1" >> {log}
sleep 1
exec git "$@"
"""


@dataclass
class TokenReporter(HeldReporter):
    """Claims succeed with a per-job clone token, as Convex's would."""

    async def claim(self, spec: JobSpec) -> ClaimResult:
        self.calls.append(("claim", spec.key))
        return ClaimResult(ok=True, clone_token=f"ghs_ISOLATION_{spec.job_id}")


@pytest.mark.timeout(90)
async def test_token_clone_never_runs_while_a_same_uid_cli_runs(
    arena: Path, git_server: GitHttpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Job A's CLI reads every /proc/*/environ it can for 2.5 s; job B, started meanwhile,
    clones with a token through a git that holds it in its environment for a second. B's clone
    waits until A's CLI has ended; no CLI ever sees an Authorization header."""
    log = arena / "events.jsonl"
    (arena / "snoop.py").write_text(SNOOP)
    slow_git = arena / "slow-git"
    slow_git.write_text(SLOW_GIT.replace("{log}", str(log)))
    slow_git.chmod(0o755)
    monkeypatch.setattr("app.adapters.git._git_program", lambda: str(slow_git))
    env = base_env(
        arena,
        FONDATION_COMMAND=f"{sys.executable} {arena / 'snoop.py'} {{repo_dir}} {{output_dir}}"
        f" {arena / 'template'} {log}",
    )
    reporter = TokenReporter()
    manager = JobManager(
        settings=load_settings(env),
        reporter=reporter,
        clock=SystemClock(),
        metrics=create_metrics(),
        environ=env,
        resolver=system_resolver,
        redactor=Redactor(),
    )

    def events() -> list[dict[str, Any]]:
        text = log.read_text() if log.exists() else ""
        return [json.loads(line) for line in text.splitlines()]

    url = git_server.url_for("spy")
    manager.start(JobSpec("gate-a", 1, "cb-a", Repository(url)))
    for _ in range(300):
        if any(e["event"] == "cli start" for e in events()):
            break
        await asyncio.sleep(0.05)
    manager.start(JobSpec("gate-b", 1, "cb-b", Repository(url)))
    assert await manager.wait_idle(60)
    seen = events()
    done = [c for c in reporter.calls if c[0] in ("complete", "fail")]
    assert [c[0] for c in done] == ["complete", "complete"], reporter.calls
    ends = [e for e in seen if e["event"] == "cli end"]
    assert [e["found"] for e in ends] == [[], []], ends  # no CLI saw a token
    first_end = min(e["t"] for e in ends)
    first_start = min(e["t"] for e in seen if e["event"] == "cli start")
    b_clone = [e["t"] for e in seen if e["event"] == "git" and e["t"] > first_start]
    assert b_clone and min(b_clone) >= first_end, seen  # B's clone waited for A's CLI


@needs_root
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_worker_as_pid_1_leaves_no_zombie_after_a_cli_with_children(
    arena: Path, git_server: GitHttpServer
) -> None:
    """Issue 13: in a container the worker may be PID 1, the reaper of last resort. The CLI
    leaves a child in its group and exits; killing the group used to leave that child a zombie
    of PID 1 for good. Here the worker is PID 1 of its own PID namespace."""
    pid1 = arena / "pid1-python"
    pid1.write_text(
        f'#!/bin/sh\nexec unshare --pid --fork --mount-proc --kill-child {sys.executable} "$@"\n'
    )
    pid1.chmod(0o755)
    w, _ = _worker(arena, "kids", python=str(pid1))
    assert w.proc is not None
    worker = psutil.Process(w.proc.pid).children()[0]  # the worker, PID 1 inside
    try:
        submit(w, "iso-pid1", git_server.url_for("spy"), secret=WEBHOOK_SECRET)
        done = w.wait_status("iso-pid1", {"completed", "failed"}, timeout_s=60)
        assert done["status"] == "completed", done

        def zombies() -> list[int]:
            kids = worker.children()
            return [c.pid for c in kids if c.status() == psutil.STATUS_ZOMBIE]

        assert wait_for(lambda: not zombies(), 3.0), zombies()
        assert all(_gone(pid) for pid in _report_pids(arena))
    finally:
        worker.terminate()
        w.wait(timeout_s=20)


def _report_pids(arena: Path) -> list[int]:
    """The spy's children as the host sees them (the spy printed namespace pids)."""
    return [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if p.info["cmdline"] == ["sleep", "300"] and str(arena) in _cwd(p)
    ]


def _cwd(p: psutil.Process) -> str:
    try:
        return p.cwd()
    except psutil.Error:
        return ""
