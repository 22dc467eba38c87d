"""`python -m deploy`: create or update the worker's Scaleway Serverless Container and, with
`--job-definition`, the Serverless Jobs definition that runs overflow jobs (`run-one`).

Exit status: 0 deployed (or unchanged), 1 the deploy failed (API error, container not ready),
2 bad arguments or missing credentials.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence

try:
    from scaleway_core.api import ScalewayException

    from deploy.scaleway import (
        LIVENESS,
        MAX_TIMEOUT_S,
        MIN_TIMEOUT_S,
        PROBE_FAILURES,
        PROBE_INTERVAL_S,
        STARTUP,
        Deployer,
        DeployError,
        DeploySpec,
        Probe,
        api_error_message,
        make_client,
        plan,
    )
    from deploy.serverless_jobs import (
        DEFAULT_JOB_TIMEOUT_S,
        MAX_JOB_TIMEOUT_S,
        REQUIRED_SECRET,
        JobDefinitionSpec,
        JobsDeployer,
        SecretRef,
    )
    from deploy.serverless_jobs import plan as jobs_plan
except ModuleNotFoundError as exc:
    # The SDK is the `deploy` extra, not a runtime dependency (the image leaves it out).
    if not (exc.name or "").startswith("scaleway"):
        raise
    print(
        "deploy: the Scaleway SDK is not installed: pip install 'fondation-worker[deploy]'",
        file=sys.stderr,
    )
    sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m deploy",
        description="Create or update the fondation-worker Serverless Container on Scaleway.",
    )
    p.add_argument("--namespace", required=True, help="container namespace name (exact match)")
    p.add_argument("--container", required=True, help="container name (exact match)")
    img = p.add_mutually_exclusive_group(required=True)
    img.add_argument("--image", help="full image reference, e.g. rg.fr-par.scw.cloud/ns/img:tag")
    img.add_argument(
        "--registry",
        help="registry namespace endpoint, e.g. rg.fr-par.scw.cloud/ns; the image is "
        "<registry>/<--image-name>:<git short sha> (an immutable tag, so an update rolls out)",
    )
    p.add_argument("--image-name", default="fondation-worker", help="with --registry")
    p.add_argument("--region", default=None, help="default: SCW_DEFAULT_REGION or fr-par")
    p.add_argument("--min-scale", type=int, default=None, help="default: --max-scale (1)")
    p.add_argument("--max-scale", type=int, default=None, help="default: --min-scale (1)")
    p.add_argument("--memory-mb", type=int, default=2048)
    p.add_argument("--cpu-mvcpu", type=int, default=1120)
    p.add_argument(
        "--timeout-s",
        type=int,
        default=MAX_TIMEOUT_S,
        help=f"request time limit, {MIN_TIMEOUT_S} to {MAX_TIMEOUT_S}",
    )
    p.add_argument("--local-storage-mb", type=int, default=5120)
    p.add_argument("--sandbox", choices=("v1", "v2"), default="v2")
    p.add_argument("--privacy", choices=("public", "private"), default="public")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--allow-http", action="store_true", help="do not force HTTPS connections")
    p.add_argument("--no-probes", action="store_true", help="no /healthz and /readyz probes")
    interval = f"{PROBE_INTERVAL_S[0]} to {PROBE_INTERVAL_S[1]}"
    failures = f"{PROBE_FAILURES[0]} to {PROBE_FAILURES[1]}"
    for name, probe in (("liveness", LIVENESS), ("startup", STARTUP)):
        p.add_argument(
            f"--{name}-interval-s",
            type=int,
            default=probe.interval_s,
            help=f"{probe.path} probe interval, {interval} (default {probe.interval_s})",
        )
        p.add_argument(
            f"--{name}-failures",
            type=int,
            default=probe.failure_threshold,
            help=f"{probe.path} failures in a row before acting, {failures} "
            f"(default {probe.failure_threshold})",
        )
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="repeatable")
    p.add_argument(
        "--secret", action="append", default=[], metavar="K=V", help="secret env var; repeatable"
    )
    p.add_argument(
        "--secret-from-env",
        action="append",
        default=[],
        metavar="K",
        help="secret env var K, value read from this process's environment; repeatable",
    )
    jobs = p.add_argument_group(
        "overflow runs (Serverless Jobs)",
        "with --job-definition, also create or update a job definition that runs one job per "
        "run (fondation-worker run-one) with the container's image, CPU, memory and storage",
    )
    jobs.add_argument("--job-definition", metavar="NAME", help="job definition name (exact)")
    jobs.add_argument(
        "--job-timeout-s",
        type=int,
        default=DEFAULT_JOB_TIMEOUT_S,
        help=f"run time limit, 1 to {MAX_JOB_TIMEOUT_S} (default {DEFAULT_JOB_TIMEOUT_S})",
    )
    jobs.add_argument(
        "--job-env",
        action="append",
        default=[],
        metavar="K=V",
        help="plain env var for runs only (after --env); repeatable",
    )
    jobs.add_argument(
        "--job-secret-ref",
        action="append",
        default=[],
        metavar="ENV=SECRET_ID[:VERSION]",
        help=f"a Secret Manager secret exposed to runs as ENV; {REQUIRED_SECRET} is required; "
        "repeatable (version default: latest)",
    )
    p.add_argument("--redeploy", action="store_true", help="force a rollout even if unchanged")
    p.add_argument("--wait-timeout-s", type=float, default=900.0)
    p.add_argument("--poll-s", type=float, default=2.0, help=argparse.SUPPRESS)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the requests as JSON (secrets redacted); no network, no credentials",
    )
    return p


def _pairs(items: Sequence[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DeployError(f"{flag} expects K=V, got {item.split('=')[0]!r}...", 2)
        out.append((key, value))
    return out


def git_short_sha(cwd: str | None = None) -> str:
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=cwd,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        raise DeployError(
            "--registry needs a git checkout (git rev-parse --short HEAD)", 2
        ) from None
    return proc.stdout.strip()


def build_spec(args: argparse.Namespace, env: Mapping[str, str]) -> DeploySpec:
    image = args.image
    if image is None:
        image = f"{args.registry.rstrip('/')}/{args.image_name}:{git_short_sha()}"
    secrets = _pairs(args.secret, "--secret")
    for key in args.secret_from_env:
        if key not in env:
            raise DeployError(f"--secret-from-env {key}: {key} is not set in the environment", 2)
        secrets.append((key, env[key]))
    min_scale = args.min_scale if args.min_scale is not None else (args.max_scale or 1)
    max_scale = args.max_scale if args.max_scale is not None else max(min_scale, 1)
    spec = DeploySpec(
        namespace=args.namespace,
        container=args.container,
        image=image,
        region=args.region or env.get("SCW_DEFAULT_REGION") or "fr-par",
        min_scale=min_scale,
        max_scale=max_scale,
        memory_mb=args.memory_mb,
        cpu_mvcpu=args.cpu_mvcpu,
        timeout_s=args.timeout_s,
        local_storage_mb=args.local_storage_mb,
        sandbox=args.sandbox,
        privacy=args.privacy,
        port=args.port,
        https_only=not args.allow_http,
        probes=not args.no_probes,
        liveness_probe=Probe(
            LIVENESS.path,
            failure_threshold=args.liveness_failures,
            interval_s=args.liveness_interval_s,
            timeout_s=min(LIVENESS.timeout_s, max(args.liveness_interval_s - 1, 1)),
        ),
        startup_probe=Probe(
            STARTUP.path,
            failure_threshold=args.startup_failures,
            interval_s=args.startup_interval_s,
            timeout_s=min(STARTUP.timeout_s, max(args.startup_interval_s - 1, 1)),
        ),
        env=tuple(_pairs(args.env, "--env")),
        secrets=tuple(secrets),
        redeploy=args.redeploy,
        wait_timeout_s=args.wait_timeout_s,
        poll_s=args.poll_s,
    )
    spec.validate()
    return spec


def build_jobs_spec(args: argparse.Namespace, spec: DeploySpec) -> JobDefinitionSpec | None:
    """The job definition, from the container's spec (image, sizes, plain env) and the
    --job-* flags; never the container's secret values."""
    if args.job_definition is None:
        return None
    jobs = JobDefinitionSpec(
        name=args.job_definition,
        image=spec.image,
        region=spec.region,
        cpu_mvcpu=spec.cpu_mvcpu,
        memory_mb=spec.memory_mb,
        local_storage_mb=spec.local_storage_mb,
        timeout_s=args.job_timeout_s,
        env=tuple({**dict(spec.env), **dict(_pairs(args.job_env, "--job-env"))}.items()),
        secret_refs=tuple(SecretRef.parse(item) for item in args.job_secret_ref),
    )
    jobs.validate()
    return jobs


def jobs_warnings(spec: DeploySpec, jobs: JobDefinitionSpec) -> list[str]:
    refs = {r.env_var for r in jobs.secret_refs}
    return [
        f"WARNING: the container gets {key} as a secret but runs will not: add "
        f"--job-secret-ref {key}=<Secret Manager secret id> if the CLI needs it in runs too."
        for key, _ in spec.secrets
        if key not in refs
    ]


def scale_warnings(spec: DeploySpec) -> list[str]:
    notes = []
    if spec.min_scale != spec.max_scale:
        notes.append(
            f"WARNING: --min-scale {spec.min_scale} != --max-scale {spec.max_scale}. Scaleway may "
            "scale an instance down whenever no request is in flight on it, and that stops the "
            "background jobs it runs (they fail as 'interrupted' and are re-dispatched). "
            "Use equal values for an always-warm worker."
        )
    if spec.min_scale == 0:
        notes.append(
            "WARNING: --min-scale 0 lets the container scale to zero: jobs started by a webhook "
            "can be stopped as soon as the 202 is sent."
        )
    return notes


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    environ = dict(os.environ) if env is None else dict(env)
    args = _parser().parse_args(argv)
    try:
        spec = build_spec(args, environ)
        jobs = build_jobs_spec(args, spec)
        notes = scale_warnings(spec) + (jobs_warnings(spec, jobs) if jobs else [])
        for note in notes:
            print(note, file=sys.stderr, flush=True)
        if args.dry_run:
            project = environ.get("SCW_DEFAULT_PROJECT_ID")
            printed = plan(spec, project)
            if jobs is not None:
                printed["job_definition"] = jobs_plan(jobs, project)
            print(json.dumps(printed, indent=2))
            return 0
        from scaleway.container.v1 import ContainerV1API
        from scaleway.jobs.v1alpha2 import JobsV1Alpha2API

        client = make_client(environ, spec.region)
        outcome = Deployer(ContainerV1API(client), spec).run()
        jobs_outcome = JobsDeployer(JobsV1Alpha2API(client), jobs).run() if jobs else None
    except DeployError as exc:
        print(f"deploy: {exc}", file=sys.stderr, flush=True)
        return exc.code
    except ScalewayException as exc:
        print(f"deploy: DEPLOY FAILED: {api_error_message(exc)}", file=sys.stderr, flush=True)
        return 1
    except OSError as exc:  # requests' connection errors are OSErrors
        print(f"deploy: DEPLOY FAILED: cannot reach the Scaleway API: {exc}", file=sys.stderr)
        return 1
    print(f"{outcome.action}: {spec.container} ({spec.image}) is ready")
    print(f"url: {outcome.url}")
    if jobs_outcome is not None:
        definition = jobs_outcome.definition
        print(f"{jobs_outcome.action}: job definition {definition.name} ({definition.image_uri})")
        print(f"job definition id: {definition.id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
