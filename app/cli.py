"""Command line: `fondation-worker serve`, `run-one` and `submit`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from app.config import load_settings
from app.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fondation-worker", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the worker (settings from the environment)")
    sub.add_parser(
        "run-one",
        help="run the one job.start in FONDATION_JOB_MESSAGE / FONDATION_JOB_HEADERS, then exit "
        "(0 completed, 1 failed, 2 config, 3 refused, 4 dropped, 5 canceled, 6 interrupted, "
        "7 unreported; see app/run_one.py)",
    )
    s = sub.add_parser("submit", help="send a signed job.start to a running worker")
    s.add_argument("repository_url", help="https:// URL of the git repository")
    s.add_argument("--ref", help="branch, tag or commit (default: the default branch)")
    default_url = f"http://127.0.0.1:{os.environ.get('PORT', '8080')}"
    s.add_argument("--url", default=default_url, help=f"worker base URL (default {default_url})")
    s.add_argument("--job-id", help="job id (default: a new random one)")
    s.add_argument("--model", help="model option passed to the CLI")
    s.add_argument("--no-follow", action="store_true", help="print the job id and exit")
    s.add_argument("--timeout-s", type=float, default=7200.0, help="how long to follow")
    s.add_argument(
        "--token",
        default=os.environ.get("BOARD_API_TOKEN"),
        help="bearer token for the job API beyond loopback (default: $BOARD_API_TOKEN)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    env = dict(os.environ)
    if args.command == "serve":
        from app.logs import Redactor, configure_logging
        from app.main import serve

        try:
            settings = load_settings(env)
        except ConfigError as exc:
            print(f"fondation-worker: configuration error: {exc}", file=sys.stderr)
            return 2
        if not settings.webhook_secrets:
            print("fondation-worker: WEBHOOK_SECRETS is required", file=sys.stderr)
            return 2
        redactor = Redactor(settings.secret_values())  # shared: logs and job reports
        configure_logging(settings.log_level, redactor)
        from app.isolation import secure_startup

        try:
            secure_startup(settings)  # before anything is written or any child started
        except ConfigError as exc:
            print(f"fondation-worker: configuration error: {exc}", file=sys.stderr)
            return 2
        serve(settings, env, redactor)
        return 0
    if args.command == "run-one":
        return _run_one(env)

    from app.submit import SubmitError, SubmitRequest, new_job_id, run_submit, secret_from_env

    try:
        req = SubmitRequest(
            url=args.url.rstrip("/"),
            repository_url=args.repository_url,
            ref=args.ref,
            secret=secret_from_env(env),
            job_id=args.job_id or new_job_id(),
            model=args.model,
            api_token=args.token or None,
        )
        return run_submit(req, follow_job=not args.no_follow, timeout_s=args.timeout_s)
    except SubmitError as exc:
        print(f"fondation-worker submit: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def _run_one(env: dict[str, str]) -> int:
    import asyncio

    from app.clock import SystemClock
    from app.errors import LaunchError
    from app.logs import Redactor, configure_logging
    from app.run_one import ExitCode, message_from_env, run_one
    from app.urlpolicy import system_resolver

    try:
        settings = load_settings(env)
    except ConfigError as exc:
        print(f"fondation-worker run-one: configuration error: {exc}", file=sys.stderr)
        return int(ExitCode.CONFIG)
    redactor = Redactor(settings.secret_values())
    configure_logging(settings.log_level, redactor)
    try:
        message = message_from_env(env)
    except LaunchError as exc:
        print(f"fondation-worker run-one: {exc}", file=sys.stderr)
        return int(ExitCode.REFUSED)
    code = asyncio.run(
        run_one(
            settings,
            message,
            environ=env,
            clock=SystemClock(),
            resolver=system_resolver,
            redactor=redactor,
        )
    )
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
