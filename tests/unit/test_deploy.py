"""`python -m deploy` against a local fake of the Scaleway Containers API, through the real SDK."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.__main__ import main
from deploy.scaleway import DeploySpec, is_mutable_tag
from tests.support.fake_scaleway import (
    FakeScaleway,
    invalid_settings,
    use_fake_scaleway,
)

ROOT = Path(__file__).resolve().parents[2]
IMAGE_V1 = "rg.fr-par.scw.cloud/fondation/fondation-worker:1111111"
IMAGE_V2 = "rg.fr-par.scw.cloud/fondation/fondation-worker:2222222"
WEBHOOK_SECRET = "whsec_dGVzdC1zZWNyZXQtdmFsdWUtMTIzNDU2Nzg5MA=="


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeScaleway]:
    server = FakeScaleway().start()
    use_fake_scaleway(monkeypatch, server, tmp_path, WEBHOOK_SECRET)
    try:
        yield server
    finally:
        server.stop()


def args(image: str = IMAGE_V1, *extra: str) -> list[str]:
    return [
        "--namespace",
        "fondation",
        "--container",
        "worker",
        "--image",
        image,
        "--env",
        "CONVEX_URL=https://happy-otter-123.convex.cloud",
        "--env",
        "MAX_CONCURRENT_JOBS=2",
        "--secret-from-env",
        "WEBHOOK_SECRETS",
        "--secret",
        "ANTHROPIC_API_KEY=sk-ant-test-value",
        "--wait-timeout-s",
        "20",
        "--poll-s",
        "0.02",
        *extra,
    ]


def test_create_makes_namespace_and_container_with_the_settings(
    fake: FakeScaleway, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.add_namespace("fondation-old")  # a substring match that must not be taken
    assert main(args()) == 0
    out = capsys.readouterr()
    created_ns = fake.calls("POST", r"/namespaces$")
    assert len(created_ns) == 1 and created_ns[0].body["name"] == "fondation"
    (create,) = fake.calls("POST", r"/containers$")
    body = create.body
    assert body["image"] == IMAGE_V1
    assert body["min_scale"] == body["max_scale"] == 1
    assert body["timeout"] == "3600s"
    assert body["sandbox"] == "v2"
    assert body["memory_limit_bytes"] == 2048 * 1024 * 1024
    assert body["mvcpu_limit"] == 1120
    assert body["local_storage_limit_bytes"] == 5120 * 1024 * 1024
    assert body["https_connections_only"] is True
    assert body["liveness_probe"]["http"]["path"] == "/healthz"
    assert body["startup_probe"]["http"]["path"] == "/readyz"
    assert body["environment_variables"] == {
        "CONVEX_URL": "https://happy-otter-123.convex.cloud",
        "MAX_CONCURRENT_JOBS": "2",
    }
    assert body["secret_environment_variables"] == {
        "WEBHOOK_SECRETS": WEBHOOK_SECRET,
        "ANTHROPIC_API_KEY": "sk-ant-test-value",
    }
    assert "created" in out.out
    (container,) = fake.containers.values()
    assert f"url: https://{container['public_endpoint']}" in out.out
    assert WEBHOOK_SECRET not in out.out + out.err
    assert "sk-ant-test-value" not in out.out + out.err
    # it waited: the container was polled until ready
    assert len(fake.calls("GET", r"/containers/[^/]+$")) >= fake.polls_until_done


def test_update_rolls_out_the_new_image(
    fake: FakeScaleway, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args(IMAGE_V1)) == 0
    fake.requests.clear()
    assert main(args(IMAGE_V2)) == 0
    out = capsys.readouterr().out
    assert not fake.calls("POST", r"/containers$")
    assert not fake.calls("POST", r"/namespaces$")
    (patch,) = fake.calls("PATCH", r"/containers/")
    assert patch.body["image"] == IMAGE_V2
    assert patch.body["secret_environment_variables"]["WEBHOOK_SECRETS"] == WEBHOOK_SECRET
    (container,) = fake.containers.values()
    assert container["image"] == IMAGE_V2 and container["status"] == "ready"
    assert "updating container 'worker': image" in out
    assert "updated" in out


def test_changed_secret_value_is_an_update(
    fake: FakeScaleway, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(args()) == 0
    fake.requests.clear()
    monkeypatch.setenv("WEBHOOK_SECRETS", WEBHOOK_SECRET + ",whsec_bmV3LXNlY3JldA==")
    assert main(args()) == 0
    assert len(fake.calls("PATCH")) == 1


def test_unchanged_makes_no_update(fake: FakeScaleway, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args()) == 0
    fake.requests.clear()
    assert main(args()) == 0
    out = capsys.readouterr().out
    assert "unchanged" in out
    assert not fake.calls("PATCH") and not fake.calls("POST")
    assert "url: https://" in out


def test_redeploy_flag_forces_a_rollout(fake: FakeScaleway) -> None:
    assert main(args()) == 0
    fake.requests.clear()
    assert main(args(IMAGE_V1, "--redeploy")) == 0
    assert len(fake.calls("POST", r"/redeploy$")) == 1
    assert not fake.calls("PATCH")


def test_error_status_fails_loudly(fake: FakeScaleway, capsys: pytest.CaptureFixture[str]) -> None:
    fake.fail_with = "image pull failed: manifest unknown"
    assert main(args()) == 1
    err = capsys.readouterr().err
    assert "DEPLOY FAILED" in err
    assert "error" in err and "image pull failed: manifest unknown" in err


def test_api_error_is_reported_without_traceback(
    fake: FakeScaleway, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SCW_SECRET_KEY", "99999999-2222-4333-8444-555555555555")
    assert main(args()) == 1
    err = capsys.readouterr().err
    assert "Scaleway API error 401" in err and "Traceback" not in err


def test_unreachable_api_is_a_clean_failure(
    fake: FakeScaleway, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SCW_API_URL", "http://127.0.0.1:9")
    assert main(args()) == 1
    assert "cannot reach the Scaleway API" in capsys.readouterr().err


def test_missing_credentials_exit_2_with_a_clear_message(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCW_")}
    env["SCW_CONFIG_PATH"] = str(tmp_path / "none.yaml")
    env["HOME"] = str(tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deploy",
            "--namespace",
            "n",
            "--container",
            "c",
            "--image",
            IMAGE_V1,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "missing Scaleway credentials" in proc.stderr
    assert "SCW_ACCESS_KEY" in proc.stderr and "SCW_SECRET_KEY" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_dry_run_sends_nothing_and_redacts(
    fake: FakeScaleway, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("SCW_ACCESS_KEY")
    monkeypatch.delenv("SCW_SECRET_KEY")
    assert main([*args(), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert fake.requests == []
    plan = json.loads(out)
    assert plan["dry_run"] is True
    assert WEBHOOK_SECRET not in out and "sk-ant-test-value" not in out
    by_route = {(r["method"], r["path"]): r for r in plan["requests"]}
    create = by_route[("POST", "/containers/v1/regions/fr-par/containers")]
    assert create["body"]["secret_environment_variables"] == {
        "WEBHOOK_SECRETS": "<redacted>",
        "ANTHROPIC_API_KEY": "<redacted>",
    }
    assert create["body"]["image"] == IMAGE_V1
    patch = by_route[("PATCH", "/containers/v1/regions/fr-par/containers/<container id>")]
    assert patch["body"]["https_connection_only"] is True
    assert ("GET", "/containers/v1/regions/fr-par/namespaces") in by_route
    assert all({"when", "method", "path"} <= set(r) for r in plan["requests"])


def test_min_max_differ_warns_on_stderr(
    fake: FakeScaleway, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*args(), "--min-scale", "1", "--max-scale", "3", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "scale" in err and "background jobs" in err
    assert main([*args(), "--dry-run"]) == 0
    assert "WARNING" not in capsys.readouterr().err


def test_bad_arguments_exit_2(fake: FakeScaleway, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*args(), "--timeout-s", "7200", "--dry-run"]) == 2
    assert "--timeout-s" in capsys.readouterr().err
    assert main([*args(), "--min-scale", "3", "--max-scale", "1", "--dry-run"]) == 2
    assert main([*args(), "--env", "WEBHOOK_SECRETS=x", "--dry-run"]) == 2
    assert fake.requests == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--timeout-s", "9"], "--timeout-s must be between 10 and 3600"),
        (["--timeout-s", "3601"], "--timeout-s must be between 10 and 3600"),
        (["--liveness-interval-s", "4"], "--liveness-interval-s must be between 5 and 120"),
        (["--startup-interval-s", "121"], "--startup-interval-s must be between 5 and 120"),
        (["--liveness-failures", "2"], "--liveness-failures must be between 3 and 50"),
        (["--startup-failures", "51"], "--startup-failures must be between 3 and 50"),
    ],
)
def test_out_of_range_settings_exit_2_before_any_request(
    fake: FakeScaleway, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    assert main([*args(), *flags]) == 2
    assert message in capsys.readouterr().err
    assert fake.requests == []


def test_range_edges_are_accepted_and_reach_the_api(
    fake: FakeScaleway, capsys: pytest.CaptureFixture[str]
) -> None:
    edges = ["--timeout-s", "10", "--liveness-interval-s", "120", "--liveness-failures", "50"]
    edges += ["--startup-interval-s", "5", "--startup-failures", "3"]
    assert main([*args(), *edges]) == 0, capsys.readouterr().err
    (create,) = fake.calls("POST", r"/containers$")
    assert create.body["timeout"] == "10s"
    assert create.body["liveness_probe"]["interval"] == "120s"
    assert create.body["liveness_probe"]["failure_threshold"] == 50
    assert create.body["startup_probe"] == {
        "http": {"path": "/readyz"},
        "failure_threshold": 3,
        "interval": "5s",
        "timeout": "2s",
    }
    # --no-probes skips the probe ranges (nothing is sent for them)
    assert main([*args(IMAGE_V2), "--no-probes", "--liveness-interval-s", "1"]) == 0


def test_dry_run_shows_the_timeout_and_probe_fields_the_api_accepts(
    fake: FakeScaleway, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*args(), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    bodies = [r["body"] for r in plan["requests"] if r["method"] in ("POST", "PATCH")]
    create, update = (b for b in bodies if "image" in b)
    for body in (create, update):
        assert body["timeout"] == "3600s"
        assert body["liveness_probe"] == {
            "http": {"path": "/healthz"},
            "failure_threshold": 3,
            "interval": "10s",
            "timeout": "5s",
        }
        assert body["startup_probe"] == {
            "http": {"path": "/readyz"},
            "failure_threshold": 12,
            "interval": "5s",
            "timeout": "2s",
        }
        assert invalid_settings(body) is None  # the fake's copy of the API's range checks


def test_registry_uses_the_git_short_sha(
    fake: FakeScaleway, capsys: pytest.CaptureFixture[str]
) -> None:
    sha = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if not sha:
        pytest.skip("not a git checkout")
    argv = args()
    i = argv.index("--image")
    argv[i : i + 2] = ["--registry", "rg.fr-par.scw.cloud/fondation/"]
    assert main([*argv, "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["image"] == f"rg.fr-par.scw.cloud/fondation/fondation-worker:{sha}"


def test_spec_repr_hides_secrets_and_tag_mutability() -> None:
    spec = DeploySpec(namespace="n", container="c", image=IMAGE_V1, secrets=(("K", "hunter2"),))
    assert "hunter2" not in repr(spec)
    assert is_mutable_tag("rg.fr-par.scw.cloud/ns/img:latest")
    assert is_mutable_tag("rg.fr-par.scw.cloud/ns/img")
    assert not is_mutable_tag(IMAGE_V1)
    assert is_mutable_tag("localhost:5000/img")  # a registry port is not a tag


def test_without_the_sdk_the_script_says_which_extra_to_install() -> None:
    """The SDK is the `deploy` extra, absent from the runtime image: no traceback there."""
    hide_sdk = (
        "import runpy, sys\n"
        "sys.modules.update(dict.fromkeys(['scaleway', 'scaleway_core'], None))\n"
        "sys.argv = ['deploy', '--help']\n"
        "runpy.run_module('deploy', run_name='__main__')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", hide_sdk], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2
    assert "pip install 'fondation-worker[deploy]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_dry_run_printed_in_the_deploy_guide_is_what_the_script_prints(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/DEPLOY.md shows a dry run "verbatim": keep it so (image tag and the secrets'
    fingerprint aside, which depend on the commit and the values)."""
    text = (ROOT / "docs" / "DEPLOY.md").read_text()
    start = text.index('```json\n{\n  "dry_run"') + len("```json\n")
    documented = json.loads(text[start : text.index("```", start)])
    monkeypatch.setenv("WEBHOOK_SECRETS", "x")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "y")
    monkeypatch.setenv("SCW_DEFAULT_PROJECT_ID", "11111111-2222-3333-4444-555555555555")
    argv = ["--namespace", "fondation", "--container", "fondation-worker"]
    argv += [
        "--image",
        documented["image"],
        "--env",
        "CONVEX_URL=https://happy-otter-123.convex.cloud",
    ]
    argv += ["--env", "MAX_CONCURRENT_JOBS=2", "--secret-from-env", "WEBHOOK_SECRETS"]
    argv += ["--secret-from-env", "ANTHROPIC_API_KEY", "--dry-run"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)

    def without_fingerprint(plan: dict[str, object]) -> str:
        return re.sub(r"sha256=[0-9a-f]{16}", "sha256=…", json.dumps(plan, indent=2))

    assert without_fingerprint(printed) == without_fingerprint(documented)
