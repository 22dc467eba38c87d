"""Create-or-update the overflow runner as a Scaleway Serverless Jobs job definition, on the SDK's
`scaleway.jobs.v1alpha2` (the only version this SDK ships for Serverless Jobs).

The definition runs the worker's image with `fondation-worker run-one` (docs/SCALING.md): same
image, CPU, memory and local storage as the container, a run time limit, plain environment
variables (never the container's secret values: a definition's environment is readable through
the API), and secret references to Secret Manager for what must stay secret (`WEBHOOK_SECRETS`
at least, which `run-one` needs to verify its message). Scaleway's own retries are off
(`max_retries` 0): Convex owns retries, and a retried run would replay a spent attempt.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scaleway.jobs.v1alpha2 import JobsV1Alpha2API
from scaleway.jobs.v1alpha2.types import (
    CreateSecretsRequestSecretConfig,
    JobDefinition,
    RetryPolicy,
    Secret,
    UpdateJobDefinitionRequestUpdateRetryPolicy,
)
from scaleway_core.client import Client

from deploy.recording import RecordingMixin, capture, dry_run_client
from deploy.scaleway import BaseDeployer, DeployError, at_most_one, seconds

# tini stays PID 1, as in the image's ENTRYPOINT: it forwards the run's SIGTERM to run-one
# (which reports the attempt interrupted) and reaps what the CLI leaves behind.
STARTUP_COMMAND = ("/usr/bin/tini", "--")
ARGS = ("fondation-worker", "run-one")
MAX_JOB_TIMEOUT_S = 24 * 3600  # Serverless Jobs runs last at most 24 h
DEFAULT_JOB_TIMEOUT_S = 5400  # JOB_TIMEOUT_S (3600) + clone and upload, with a margin
REQUIRED_SECRET = "WEBHOOK_SECRETS"  # noqa: S105 - a variable name, not a secret
# A run may wait in Scaleway's queue and pull the image before it reads its message, so it
# accepts a signature up to 15 minutes old (the container: 5). Replays are still refused by
# the claim: the message's callback token dies with its attempt.
ENV_DEFAULTS = (("WEBHOOK_TOLERANCE_S", "900"),)
DESCRIPTION = "fondation-worker overflow: one job per run (fondation-worker run-one)"
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True, slots=True)
class SecretRef:
    """A Secret Manager secret exposed to runs as an environment variable."""

    env_var: str
    secret_id: str
    version: str = "latest"

    @classmethod
    def parse(cls, item: str) -> SecretRef:
        """`ENV=SECRET_ID` or `ENV=SECRET_ID:VERSION` (`--job-secret-ref`)."""
        env_var, sep, ref = item.partition("=")
        secret_id, _, version = ref.partition(":")
        if not sep or not env_var or not secret_id:
            raise DeployError(f"--job-secret-ref expects ENV=SECRET_ID[:VERSION], got {item!r}", 2)
        return cls(env_var, secret_id, version or "latest")

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.env_var, self.secret_id, self.version)


@dataclass(frozen=True, slots=True)
class JobDefinitionSpec:
    """What the job definition should be. Holds no secret value: references only."""

    name: str
    image: str
    region: str
    cpu_mvcpu: int
    memory_mb: int
    local_storage_mb: int
    timeout_s: int = DEFAULT_JOB_TIMEOUT_S
    env: tuple[tuple[str, str], ...] = ()
    secret_refs: tuple[SecretRef, ...] = ()
    description: str = DESCRIPTION

    def validate(self) -> None:
        if not self.name:
            raise DeployError("--job-definition must not be empty", 2)
        if not 1 <= self.timeout_s <= MAX_JOB_TIMEOUT_S:
            raise DeployError(f"--job-timeout-s must be between 1 and {MAX_JOB_TIMEOUT_S}", 2)
        names = [r.env_var for r in self.secret_refs]
        for key in [k for k, _ in self.env] + names:
            if not _ENV_KEY.match(key):
                raise DeployError(f"invalid environment variable name {key!r}", 2)
        if len(set(names)) != len(names):
            raise DeployError("--job-secret-ref names an environment variable twice", 2)
        both = sorted(set(names) & {k for k, _ in self.env})
        if both:
            raise DeployError(f"set as both an env var and a secret ref: {', '.join(both)}", 2)
        if REQUIRED_SECRET not in names:
            raise DeployError(
                f"the job definition needs --job-secret-ref {REQUIRED_SECRET}=<Secret Manager "
                "secret id>: run-one verifies its message with it, and a run's plain environment "
                "is readable through the Scaleway API",
                2,
            )

    @property
    def env_dict(self) -> dict[str, str]:
        return {**dict(ENV_DEFAULTS), **dict(self.env)}

    @property
    def job_timeout(self) -> str:
        return f"{self.timeout_s}s"

    def fields(self) -> dict[str, Any]:
        """The settings shared by create and update, as the SDK names them."""
        return {
            "cpu_limit": self.cpu_mvcpu,
            "memory_limit": self.memory_mb,
            "local_storage_capacity": self.local_storage_mb,
            "image_uri": self.image,
            "startup_command": list(STARTUP_COMMAND),
            "args": list(ARGS),
            "environment_variables": self.env_dict,
            "description": self.description,
            "job_timeout": self.job_timeout,
        }

    def create_kwargs(self) -> dict[str, Any]:
        return {"name": self.name, **self.fields(), "retry_policy": RetryPolicy(max_retries=0)}

    def update_kwargs(self) -> dict[str, Any]:
        return {
            **self.fields(),
            "retry_policy": UpdateJobDefinitionRequestUpdateRetryPolicy(max_retries=0),
        }

    def secret_configs(self, refs: tuple[SecretRef, ...]) -> list[CreateSecretsRequestSecretConfig]:
        return [
            CreateSecretsRequestSecretConfig(
                secret_manager_id=r.secret_id,
                secret_manager_version=r.version,
                env_var_name=r.env_var,
            )
            for r in refs
        ]


def differences(current: JobDefinition, spec: JobDefinitionSpec) -> list[str]:
    """Names of the settings that differ; empty means the definition matches the spec."""
    retries = current.retry_policy.max_retries if current.retry_policy is not None else None
    pairs: list[tuple[str, object, object]] = [
        ("image_uri", current.image_uri, spec.image),
        ("cpu_limit", current.cpu_limit, spec.cpu_mvcpu),
        ("memory_limit", current.memory_limit, spec.memory_mb),
        ("local_storage_capacity", current.local_storage_capacity, spec.local_storage_mb),
        ("startup_command", list(current.startup_command or []), list(STARTUP_COMMAND)),
        ("args", list(current.args or []), list(ARGS)),
        ("environment_variables", dict(current.environment_variables or {}), spec.env_dict),
        ("description", current.description, spec.description),
        ("job_timeout", seconds(current.job_timeout), float(spec.timeout_s)),
        ("retry_policy", retries or 0, 0),
    ]
    return [name for name, have, want in pairs if have != want]


def _ref_of(secret: Secret) -> SecretRef | None:
    if secret.env_var is None:
        return None  # a file mount someone added by hand: not ours to judge, but reported
    return SecretRef(secret.env_var.name, secret.secret_manager_id, secret.secret_manager_version)


@dataclass(frozen=True, slots=True)
class JobsOutcome:
    action: str  # "created", "updated", "unchanged"
    definition: JobDefinition


class JobsDeployer(BaseDeployer[JobsV1Alpha2API, JobDefinitionSpec]):
    """Find the definition by exact name, create or update it, then align its secret refs."""

    def find(self) -> JobDefinition | None:
        # The list call has no name filter: read every page, compare names exactly.
        found = [
            d
            for d in self.api.list_job_definitions_all(region=self.spec.region)
            if d.name == self.spec.name
        ]
        ids = ", ".join(d.id for d in found)
        return at_most_one(found, f"several job definitions are named {self.spec.name!r}: {ids}")

    def run(self) -> JobsOutcome:
        spec = self.spec
        current = self.find()
        if current is None:
            self.say(f"creating job definition {spec.name!r} with image {spec.image}")
            definition = self.api.create_job_definition(region=spec.region, **spec.create_kwargs())
            action = "created"
        else:
            changed = differences(current, spec)
            if changed:
                self.say(f"updating job definition {spec.name!r}: {', '.join(changed)}")
                definition = self.api.update_job_definition(
                    job_definition_id=current.id, region=spec.region, **spec.update_kwargs()
                )
                action = "updated"
            else:
                definition, action = current, "unchanged"
        if self.align_secrets(definition.id) and action == "unchanged":
            action = "updated"
        if action == "unchanged":
            self.say(f"unchanged: job definition {spec.name!r} already runs {spec.image}")
        return JobsOutcome(action=action, definition=definition)

    def align_secrets(self, definition_id: str) -> bool:
        """Make the definition's secret refs exactly the spec's; True when anything changed."""
        spec = self.spec
        have = self.api.list_secrets(job_definition_id=definition_id, region=spec.region).secrets
        want = {r.key for r in spec.secret_refs}
        stale = [s for s in have if (ref := _ref_of(s)) is None or ref.key not in want]
        kept = {ref.key for s in have if (ref := _ref_of(s)) is not None and ref.key in want}
        missing = tuple(r for r in spec.secret_refs if r.key not in kept)
        for secret in stale:
            self.say(f"removing secret reference {secret.secret_id} from {spec.name!r}")
            self.api.delete_secret(secret_id=secret.secret_id, region=spec.region)
        if missing:
            names = ", ".join(r.env_var for r in missing)
            self.say(f"adding secret references to {spec.name!r}: {names}")
            self.api.create_secrets(
                job_definition_id=definition_id,
                secrets=spec.secret_configs(missing),
                region=spec.region,
            )
        return bool(stale or missing)


class _RecordingJobsAPI(RecordingMixin, JobsV1Alpha2API):  # type: ignore[misc]
    """The SDK's jobs API, recording instead of sending (`deploy.recording`)."""

    def __init__(self, client: Client) -> None:
        super().__init__(client, bypass_validation=True)
        self.recorded = []


def plan(spec: JobDefinitionSpec, project_id: str | None) -> dict[str, Any]:
    """The job definition requests a real run makes, each with its condition; no network."""
    api = _RecordingJobsAPI(dry_run_client(project_id, spec.region))
    d_id, s_id = "<job definition id>", "<secret reference id>"
    calls: list[tuple[str, Callable[[], object]]] = [
        (
            "always; every page is read and names are compared exactly",
            lambda: api.list_job_definitions(region=spec.region, page=1),
        ),
        (
            f"no job definition is named exactly {spec.name!r}",
            lambda: api.create_job_definition(region=spec.region, **spec.create_kwargs()),
        ),
        (
            "the job definition exists and a setting differs",
            lambda: api.update_job_definition(
                job_definition_id=d_id, region=spec.region, **spec.update_kwargs()
            ),
        ),
        (
            "always: the definition's secret references",
            lambda: api.list_secrets(job_definition_id=d_id, region=spec.region),
        ),
        (
            "a reference that is not wanted (or points at another secret or version)",
            lambda: api.delete_secret(secret_id=s_id, region=spec.region),
        ),
        (
            "wanted references that are missing (here: all of them)",
            lambda: api.create_secrets(
                job_definition_id=d_id,
                secrets=spec.secret_configs(spec.secret_refs),
                region=spec.region,
            ),
        ),
    ]
    return {
        "api": "Serverless Jobs v1alpha2 (scaleway.jobs.v1alpha2)",
        "name": spec.name,
        "requests": capture(api, calls),
    }
