"""Secrets never leak: with every secret set to a recognisable value, run the happy and the
failure paths (completed, cli_failed, clone_failed, canceled, interrupted, 401, 422) and look
for the values in every worker log line, every HTTP answer, /metrics, the stored jobs (the
SQLite files byte for byte) and the CLI's environment (dumped by a wrapper CLI)."""

from __future__ import annotations

import base64
import json
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.config import load_settings
from tests.support.gitserver import GitHttpServer, make_repo
from tests.support.jobs import assert_workspace_empty, post_start, sim, wait_for
from tests.support.signing import OTHER_SECRET, cancel_body, headers_for, start_body
from tests.support.worker import REPO_ROOT, WorkerProcess, base_env

pytestmark = pytest.mark.faults


def _whsec(text: str) -> str:
    return "whsec_" + base64.b64encode(text.encode()).decode()


WEBHOOK_SECRET = _whsec("RECOGNISABLE-webhook-secret-current")
OLD_WEBHOOK_SECRET = _whsec("RECOGNISABLE-webhook-secret-rotated")
WORKER_SECRETS = {
    "SCW_SECRET_KEY": "RECOGNISABLE-scw-secret-key-0f3e9a",
    "SCW_ACCESS_KEY": "SCWRECOGNISABLEACCESS",
    "SCW_DEFAULT_PROJECT_ID": "RECOGNISABLE-scw-project-id",
    "CONVEX_DEPLOY_KEY": "prod:RECOGNISABLE-convex-deploy-key|abc",
    "COCKPIT_TOKEN": "RECOGNISABLE-cockpit-push-token",
}
ANTHROPIC_KEY = "sk-ant-RECOGNISABLE-anthropic-key"
# The CLI needs this one; every other name below must never reach it.
DENIED_PREFIXES = ("WEBHOOK_", "SCW_", "CONVEX_", "COCKPIT_")

ENV_DUMPER = """\
import json, os, sys
sys.path.insert(0, {root!r})
repo, out, dumps = sys.argv[1:4]
with open(os.path.join(dumps, f"{{os.getpid()}}.json"), "w") as f:
    json.dump({{"argv": sys.argv, "env": dict(os.environ)}}, f)
if os.path.exists(os.path.join(repo, "ECHO_KEY")):
    # A careless CLI: echoes the key it was given, on both streams, then fails.
    print("[FONDATION_STEP_1/6] using key", os.environ.get("ANTHROPIC_API_KEY"), flush=True)
    print("error: auth failed for", os.environ.get("ANTHROPIC_API_KEY"), file=sys.stderr)
    sys.exit(1)
from app.simulator import main
sys.exit(main(["analyze", repo, "--output-dir", out]))
"""


def secret_values(tokens: list[str]) -> dict[str, str]:
    values = {
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "WEBHOOK_SECRET_b64": WEBHOOK_SECRET.removeprefix("whsec_"),
        "WEBHOOK_SECRET_raw": "RECOGNISABLE-webhook-secret-current",
        "OLD_WEBHOOK_SECRET": OLD_WEBHOOK_SECRET,
        "OLD_WEBHOOK_SECRET_raw": "RECOGNISABLE-webhook-secret-rotated",
        "ANTHROPIC_API_KEY": ANTHROPIC_KEY,
        **WORKER_SECRETS,
    }
    values.update({f"callbackToken{i}": t for i, t in enumerate(tokens)})
    return values


def leaks(text: str, values: dict[str, str]) -> list[str]:
    return [name for name, value in values.items() if value in text]


@pytest.fixture(scope="module")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitHttpServer]:
    root = tmp_path_factory.mktemp("secret-repos")
    make_repo(root / "happy.git", sim())
    make_repo(root / "fail.git", sim(fail_at_step=2))
    make_repo(root / "hang.git", sim(hang_at_step=2, spawn_child=True))
    make_repo(root / "echo.git", {**sim(), "ECHO_KEY": "1\n"})
    with GitHttpServer(root) as server:
        yield server


@pytest.mark.timeout(150)
def test_no_secret_in_logs_answers_metrics_store_or_cli_env(
    tmp_path: Path, git_server: GitHttpServer
) -> None:
    dumps = tmp_path / "env-dumps"
    dumps.mkdir()
    script = tmp_path / "envdump.py"
    script.write_text(ENV_DUMPER.format(root=str(REPO_ROOT)))
    env = base_env(
        tmp_path,
        WEBHOOK_SECRETS=f"{WEBHOOK_SECRET},{OLD_WEBHOOK_SECRET}",
        FONDATION_COMMAND=f"{sys.executable} {script} {{repo_dir}} {{output_dir}} {dumps}",
        ANTHROPIC_API_KEY=ANTHROPIC_KEY,
        # The push target answers 404 to the push: its failure is logged, the token must not be.
        COCKPIT_METRICS_URL=f"{git_server.base_url}/otlp/v1/metrics",
        METRICS_PUSH_INTERVAL_S="1",
        SHUTDOWN_GRACE_S="5",
        **WORKER_SECRETS,
    )
    w = WorkerProcess(env, tmp_path / "w.log").start()
    tokens: list[str] = []
    answers: list[httpx.Response] = []

    def start(job_id: str, url: str, **kw: object) -> httpx.Response:
        token = f"cbtok-RECOGNISABLE-{job_id}-{secrets.token_hex(16)}"
        tokens.append(token)
        r = post_start(w, job_id, url, secret=WEBHOOK_SECRET, token=token, **kw)  # type: ignore[arg-type]
        answers.append(r)
        return r

    def hook(body: bytes, msg_id: str, secret: str = WEBHOOK_SECRET) -> httpx.Response:
        r = httpx.post(
            f"{w.url}/v1/webhooks",
            content=body,
            headers=headers_for(body, msg_id, secret=secret),
            timeout=10,
        )
        answers.append(r)
        return r

    try:
        outcomes = {
            "s-done": ("happy", "completed", None),
            "s-clifail": ("fail", "failed", "cli_failed"),
            "s-clonefail": ("happy", "failed", "clone_failed"),
            "s-echo": ("echo", "failed", "cli_failed"),
        }
        for job_id, (repo, _, _) in outcomes.items():
            ref = "no-such-ref" if job_id == "s-clonefail" else None
            assert start(job_id, git_server.url_for(repo), ref=ref).status_code == 202
            w.wait_status(job_id, {"completed", "failed"}, timeout_s=60)
        for job_id, (_, status, code) in outcomes.items():
            doc = httpx.get(f"{w.url}/v1/jobs/{job_id}").json()
            assert doc["status"] == status and (doc.get("error") or {}).get("code") == code, doc
        # canceled
        assert start("s-cancel", git_server.url_for("hang")).status_code == 202
        w.wait_status("s-cancel", {"analyzing"}, timeout_s=30)
        # The CLI starts a moment after `analyzing` (under its shim): let it dump its env first.
        assert wait_for(lambda: len(list(dumps.iterdir())) == 4, 30)
        assert hook(cancel_body("s-cancel"), "s-cancel:1:cancel").status_code == 202
        w.wait_status("s-cancel", {"canceled"}, timeout_s=30)
        # 401: another secret, no signature; the body carries a token of its own
        bad = start_body(
            "s-401", git_server.url_for("happy"), token=f"cbtok-RECOGNISABLE-{'x' * 32}"
        )
        tokens.append(f"cbtok-RECOGNISABLE-{'x' * 32}")
        assert hook(bad, "s-401:1", secret=OTHER_SECRET).status_code == 401
        r = httpx.post(
            f"{w.url}/v1/webhooks", content=bad, headers={"content-type": "application/json"}
        )
        answers.append(r)
        assert r.status_code == 401
        # 422: a URL the policy refuses, an idempotency conflict, a schema violation
        assert start("s-422", "https://github.com/o/r.git").status_code == 422
        assert start("s-done", git_server.url_for("happy"), ref="dev").status_code == 422
        body = json.dumps(
            {"type": "job.start", "data": {"jobId": "s-bad", "callbackToken": tokens[0]}}
        ).encode()
        assert hook(body, "s-bad:1").status_code == 422
        # every read API, /metrics included
        for path in ("/v1/jobs", "/metrics", "/readyz", "/healthz"):
            answers.append(httpx.get(f"{w.url}{path}", timeout=5))
        for job_id in (*outcomes, "s-cancel"):
            for suffix in ("", "/docs", "/events"):
                answers.append(httpx.get(f"{w.url}/v1/jobs/{job_id}{suffix}", timeout=10))
        # interrupted: a running job when SIGTERM comes
        assert start("s-int", git_server.url_for("hang")).status_code == 202
        w.wait_status("s-int", {"analyzing"}, timeout_s=30)
        assert wait_for(lambda: len(list(dumps.iterdir())) == 5, 30)
    finally:
        w.stop(timeout_s=30)
    assert_workspace_empty(w)

    values = secret_values(tokens)
    for r in answers:
        assert not leaks(r.text, values), (r.request.url, r.status_code, leaks(r.text, values))
        assert not leaks(str(r.headers), values)
    log_text = w.logs()
    assert '"job finished"' in log_text and "interrupted" in log_text
    assert not leaks(log_text, values), leaks(log_text, values)
    # The stored jobs, events and deliveries: every file of DATA_DIR, byte for byte.
    for f in Path(env["DATA_DIR"]).rglob("*"):
        if f.is_file():
            data = f.read_bytes().decode("latin-1")
            assert not leaks(data, values), (f.name, leaks(data, values))
    # The CLI's environment: one dump per CLI run (completed, 2 x cli_failed, canceled,
    # interrupted).
    runs = [json.loads(p.read_text()) for p in dumps.iterdir()]
    assert len(runs) == 5, [r["argv"] for r in runs]
    allowed_for_cli = {"ANTHROPIC_API_KEY": ANTHROPIC_KEY}
    for run in runs:
        cli_env: dict[str, str] = run["env"]
        denied = [k for k in cli_env if k.upper().startswith(DENIED_PREFIXES)]
        assert denied == [], denied
        assert cli_env.get("ANTHROPIC_API_KEY") == ANTHROPIC_KEY  # the CLI needs it
        others = {k: v for k, v in values.items() if k not in allowed_for_cli}
        assert not leaks(json.dumps(cli_env), others), leaks(json.dumps(cli_env), others)
        assert not leaks(json.dumps(run["argv"]), values)
    assert wait_for(lambda: True, 0)


def test_logs_and_jobs_share_one_redactor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve` must get the log formatter's redactor: the per-job callback and clone tokens are
    added to the job manager's redactor, and a second instance would leave log lines unscrubbed.
    """
    import app.cli
    import app.isolation
    import app.logs
    import app.main

    seen: dict[str, object] = {}
    monkeypatch.setattr(app.logs, "configure_logging", lambda _l, r, _s=None: seen.update(log=r))
    monkeypatch.setattr(app.main, "serve", lambda _s, _e, r=None: seen.update(serve=r))
    # `serve` hardens the process (non-dumpable, subreaper): not this test runner's.
    monkeypatch.setattr(app.isolation, "secure_startup", lambda s: seen.update(hardened=s))
    for name, value in base_env(tmp_path, ANTHROPIC_API_KEY=ANTHROPIC_KEY).items():
        monkeypatch.setenv(name, value)
    assert app.cli.main(["serve"]) == 0
    assert seen["log"] is not None and seen["log"] is seen["serve"]
    assert "hardened" in seen  # before serving
    redactor = app.logs.Redactor()
    asgi = app.main.create_app(
        load_settings(base_env(tmp_path)),
        environ={"ANTHROPIC_API_KEY": ANTHROPIC_KEY, "SCW_SECRET_KEY": "RECOGNISABLE-scw-2"},
        redactor=redactor,
    )
    asgi.state.services.store.close()
    assert redactor.scrub(f"k={ANTHROPIC_KEY} s=RECOGNISABLE-scw-2") == "k=[redacted] s=[redacted]"
