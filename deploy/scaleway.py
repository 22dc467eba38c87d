"""Create-or-update the worker as a Scaleway Serverless Container, on the `scaleway` SDK.

Uses the Serverless Containers API v1 (`scaleway.container.v1`): the SDK's `v1beta1` module is
marked deprecated and lacks the fields this worker needs (`memory_limit_bytes`, `mvcpu_limit`,
`local_storage_limit_bytes`, `liveness_probe`, `startup_probe`, `https_connections_only`).
In v1, creating a container starts its deployment and updating one rolls it out; `redeploy`
only forces a rollout of the same settings (a mutable tag such as `:latest`, or `--redeploy`).
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TextIO, TypeVar

from scaleway.container.v1 import ContainerV1API
from scaleway.container.v1.types import (
    Container,
    ContainerPrivacy,
    ContainerProbe,
    ContainerProbeHTTPProbe,
    ContainerSandbox,
    ContainerStatus,
    Namespace,
    NamespaceStatus,
    UpdateContainerRequestProbe,
    UpdateContainerRequestProbeHTTPProbe,
)
from scaleway_core.api import ScalewayException
from scaleway_core.client import Client

from deploy.recording import RecordingMixin, capture, dry_run_client

API_PREFIX = "/containers/v1/regions"
# Ranges the Serverless Containers API accepts (issue 13's reading of Scaleway's API reference;
# the SDK validates none of them, so a bad value would only come back as a 400 mid-deploy).
MIN_TIMEOUT_S = 10
MAX_TIMEOUT_S = 3600
PROBE_INTERVAL_S = (5, 120)
PROBE_FAILURES = (3, 50)
NAMESPACE_DESCRIPTION = "fondation-worker"
REDACTED = "<redacted>"
SECRETS_TAG_PREFIX = "fondation-secrets-sha256="
TRANSIENT = frozenset(
    {
        ContainerStatus.CREATING,
        ContainerStatus.UPDATING,
        ContainerStatus.LOCKING,
        ContainerStatus.UPGRADING,
        ContainerStatus.DELETING,
    }
)
NS_TRANSIENT = frozenset(
    {
        NamespaceStatus.CREATING,
        NamespaceStatus.UPDATING,
        NamespaceStatus.LOCKING,
        NamespaceStatus.UPGRADING,
    }
)
T = TypeVar("T")
ApiT = TypeVar("ApiT")
SpecT = TypeVar("SpecT")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class DeployError(Exception):
    """A failure with a message for the operator; `code` is the process exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Probe:
    """An HTTP probe. The platform acts after `failure_threshold` failed checks in a row, so
    `failure_threshold * interval_s` is how long a dead (or still starting) worker lasts."""

    path: str
    failure_threshold: int
    interval_s: int
    timeout_s: int

    def problems(self, flag: str) -> list[str]:
        lo_i, hi_i = PROBE_INTERVAL_S
        lo_f, hi_f = PROBE_FAILURES
        out = []
        if not lo_i <= self.interval_s <= hi_i:
            out.append(f"{flag}-interval-s must be between {lo_i} and {hi_i}")
        if not lo_f <= self.failure_threshold <= hi_f:
            out.append(f"{flag}-failures must be between {lo_f} and {hi_f}")
        if not 1 <= self.timeout_s < self.interval_s:
            out.append(f"{flag} probe timeout ({self.timeout_s}s) must be under its interval")
        return out


# Liveness: a wedged worker is restarted after 3 x 10 s. Startup: traffic once /readyz
# answers, and up to 12 x 5 s = 60 s to get there (the worker is ready in about a second;
# the margin is for a cold image pull on a busy node).
LIVENESS = Probe("/healthz", failure_threshold=3, interval_s=10, timeout_s=5)
STARTUP = Probe("/readyz", failure_threshold=12, interval_s=5, timeout_s=2)


@dataclass(frozen=True, slots=True)
class DeploySpec:
    """Everything the deploy wants the container to be. Secrets never appear in repr."""

    namespace: str
    container: str
    image: str
    region: str = "fr-par"
    min_scale: int = 1
    max_scale: int = 1
    memory_mb: int = 2048
    cpu_mvcpu: int = 1120
    timeout_s: int = MAX_TIMEOUT_S
    local_storage_mb: int = 5120
    sandbox: str = "v2"
    privacy: str = "public"
    port: int = 8080
    https_only: bool = True
    probes: bool = True
    liveness_probe: Probe = LIVENESS
    startup_probe: Probe = STARTUP
    env: tuple[tuple[str, str], ...] = ()
    secrets: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    description: str = "fondation-worker: webhook-driven Fondation CLI runner"
    redeploy: bool = False
    wait_timeout_s: float = 900.0
    poll_s: float = 2.0

    def validate(self) -> None:
        if not self.namespace or not self.container:
            raise DeployError("--namespace and --container must not be empty", 2)
        if not self.image or " " in self.image:
            raise DeployError(f"invalid image reference {self.image!r}", 2)
        if self.max_scale < 1 or self.min_scale < 0 or self.min_scale > self.max_scale:
            raise DeployError("need 0 <= --min-scale <= --max-scale and --max-scale >= 1", 2)
        if not MIN_TIMEOUT_S <= self.timeout_s <= MAX_TIMEOUT_S:
            raise DeployError(f"--timeout-s must be between {MIN_TIMEOUT_S} and {MAX_TIMEOUT_S}", 2)
        if self.probes:
            bad = self.liveness_probe.problems("--liveness") + self.startup_probe.problems(
                "--startup"
            )
            if bad:
                raise DeployError("; ".join(bad), 2)
        for name, value in (
            ("--memory-mb", self.memory_mb),
            ("--cpu-mvcpu", self.cpu_mvcpu),
            ("--local-storage-mb", self.local_storage_mb),
            ("--port", self.port),
        ):
            if value <= 0:
                raise DeployError(f"{name} must be positive", 2)
        if self.sandbox not in ("v1", "v2"):
            raise DeployError("--sandbox must be v1 or v2", 2)
        if self.privacy not in ("public", "private"):
            raise DeployError("--privacy must be public or private", 2)
        env_keys = [k for k, _ in self.env]
        secret_keys = [k for k, _ in self.secrets]
        for key in env_keys + secret_keys:
            if not _ENV_KEY.match(key):
                raise DeployError(f"invalid environment variable name {key!r}", 2)
        both = sorted(set(env_keys) & set(secret_keys))
        if both:
            raise DeployError(f"set as both --env and --secret: {', '.join(both)}", 2)

    # --- the values as the v1 API spells them -------------------------------------------------

    @property
    def env_dict(self) -> dict[str, str]:
        return dict(self.env)

    @property
    def secret_dict(self) -> dict[str, str]:
        return dict(self.secrets)

    @property
    def timeout(self) -> str:
        return f"{self.timeout_s}s"

    @property
    def memory_limit_bytes(self) -> int:
        return self.memory_mb * 1024 * 1024

    @property
    def local_storage_limit_bytes(self) -> int:
        return self.local_storage_mb * 1024 * 1024

    @property
    def secrets_fingerprint(self) -> str:
        """A short digest of the secret pairs, kept as a tag: the API never returns secret values,
        so this is how a later run tells whether the secrets changed."""
        digest = hashlib.sha256()
        for key, value in sorted(self.secrets):
            digest.update(f"{key}\0{value}\0".encode())
        return digest.hexdigest()[:16]

    @property
    def tags(self) -> list[str]:
        return ["fondation-worker", SECRETS_TAG_PREFIX + self.secrets_fingerprint]

    def liveness(self) -> ContainerProbe | None:
        if not self.probes:
            return None
        p = self.liveness_probe
        return ContainerProbe(
            failure_threshold=p.failure_threshold,
            interval=f"{p.interval_s}s",
            timeout=f"{p.timeout_s}s",
            http=ContainerProbeHTTPProbe(path=p.path),
        )

    def startup(self) -> ContainerProbe | None:
        if not self.probes:
            return None
        p = self.startup_probe
        return ContainerProbe(
            failure_threshold=p.failure_threshold,
            interval=f"{p.interval_s}s",
            timeout=f"{p.timeout_s}s",
            http=ContainerProbeHTTPProbe(path=p.path),
        )

    def startup_for_update(self) -> UpdateContainerRequestProbe | None:
        if not self.probes:
            return None
        p = self.startup_probe
        return UpdateContainerRequestProbe(
            failure_threshold=p.failure_threshold,
            interval=f"{p.interval_s}s",
            timeout=f"{p.timeout_s}s",
            http=UpdateContainerRequestProbeHTTPProbe(path=p.path),
        )

    def create_kwargs(self, namespace_id: str) -> dict[str, Any]:
        """Arguments of `ContainerV1API.create_container` (and of `CreateContainerRequest`)."""
        return {
            "namespace_id": namespace_id,
            "name": self.container,
            "image": self.image,
            "environment_variables": self.env_dict,
            "secret_environment_variables": self.secret_dict,
            "min_scale": self.min_scale,
            "max_scale": self.max_scale,
            "memory_limit_bytes": self.memory_limit_bytes,
            "mvcpu_limit": self.cpu_mvcpu,
            "timeout": self.timeout,
            "privacy": ContainerPrivacy(self.privacy),
            "description": self.description,
            "port": self.port,
            "https_connections_only": self.https_only,
            "sandbox": ContainerSandbox(self.sandbox),
            "local_storage_limit_bytes": self.local_storage_limit_bytes,
            "liveness_probe": self.liveness(),
            "startup_probe": self.startup(),
            "tags": self.tags,
        }

    def update_kwargs(self) -> dict[str, Any]:
        """Arguments of `ContainerV1API.update_container` (the SDK spells one field
        `https_connection_only` in updates)."""
        kwargs = self.create_kwargs("")
        for key in ("namespace_id", "name"):
            del kwargs[key]
        kwargs["https_connection_only"] = kwargs.pop("https_connections_only")
        kwargs["startup_probe"] = self.startup_for_update()
        return kwargs


# --- comparing an existing container with the spec ---------------------------------------------


def seconds(value: str | None) -> float | None:
    """An API duration (`"3600s"`) in seconds; None when absent or unreadable."""
    if value is None:
        return None
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)s?\s*", str(value))
    return float(match.group(1)) if match else None


def _probe_view(probe: ContainerProbe | None) -> tuple[str | None, int, float | None] | None:
    if probe is None:
        return None
    path = probe.http.path if probe.http is not None else None
    return (path, probe.failure_threshold, seconds(probe.interval))


def differences(current: Container, spec: DeploySpec) -> list[str]:
    """Names of the settings that differ; empty means the container already matches the spec."""
    want_live = _probe_view(spec.liveness())
    want_start = _probe_view(spec.startup())
    pairs: list[tuple[str, object, object]] = [
        ("image", current.image, spec.image),
        ("min_scale", current.min_scale, spec.min_scale),
        ("max_scale", current.max_scale, spec.max_scale),
        ("memory_limit_bytes", current.memory_limit_bytes, spec.memory_limit_bytes),
        ("mvcpu_limit", current.mvcpu_limit, spec.cpu_mvcpu),
        ("timeout", seconds(current.timeout), float(spec.timeout_s)),
        ("privacy", str(current.privacy), spec.privacy),
        ("port", current.port, spec.port),
        ("https_connections_only", current.https_connections_only, spec.https_only),
        ("sandbox", str(current.sandbox), spec.sandbox),
        (
            "local_storage_limit_bytes",
            current.local_storage_limit_bytes,
            spec.local_storage_limit_bytes,
        ),
        ("environment_variables", dict(current.environment_variables or {}), spec.env_dict),
        (
            "secret_environment_variables (keys)",
            sorted((current.secret_environment_variables or {}).keys()),
            sorted(spec.secret_dict),
        ),
    ]
    if want_live is not None:
        pairs.append(("liveness_probe", _probe_view(current.liveness_probe), want_live))
    if want_start is not None:
        pairs.append(("startup_probe", _probe_view(current.startup_probe), want_start))
    changed = [name for name, have, want in pairs if have != want]
    # The API does not return secret values; the tag holds a digest of the ones last deployed.
    if SECRETS_TAG_PREFIX + spec.secrets_fingerprint not in (current.tags or []):
        changed.append("secret_environment_variables (values)")
    return changed


def is_mutable_tag(image: str) -> bool:
    """`:latest` or no tag at all: the same reference can point at a new image."""
    if "@sha256:" in image:
        return False
    last = image.rsplit("/", 1)[-1]
    return ":" not in last or last.endswith(":latest")


# --- dry run ----------------------------------------------------------------------------------


def _redact(body: dict[str, Any]) -> dict[str, Any]:
    out = dict(body)
    secrets = out.get("secret_environment_variables")
    if isinstance(secrets, dict):
        out["secret_environment_variables"] = dict.fromkeys(secrets, REDACTED)
    return out


class _RecordingAPI(RecordingMixin, ContainerV1API):  # type: ignore[misc]
    """The SDK's own container API, recording instead of sending; secret values redacted."""

    def __init__(self, client: Client) -> None:
        super().__init__(client, bypass_validation=True)
        self.recorded = []

    def shown_body(self, body: Any) -> Any:
        return _redact(body) if isinstance(body, dict) else body


def plan(spec: DeploySpec, project_id: str | None) -> dict[str, Any]:
    """The requests a real run makes, without any network and without credentials.

    Which branch runs depends on what exists, so every request is listed with its condition.
    """
    api = _RecordingAPI(dry_run_client(project_id, spec.region))
    ns_id, c_id = "<namespace id>", "<container id>"
    calls: list[tuple[str, Callable[[], object]]] = [
        (
            "always; every page is read and names are compared exactly",
            lambda: api.list_namespaces(region=spec.region, name=spec.namespace, page=1),
        ),
        (
            f"no namespace is named exactly {spec.namespace!r}",
            lambda: api.create_namespace(
                region=spec.region, name=spec.namespace, description=NAMESPACE_DESCRIPTION
            ),
        ),
        (
            "always; every page is read and names are compared exactly",
            lambda: api.list_containers(
                region=spec.region, namespace_id=ns_id, name=spec.container, page=1
            ),
        ),
        (
            f"no container is named exactly {spec.container!r}",
            lambda: api.create_container(region=spec.region, **spec.create_kwargs(ns_id)),
        ),
        (
            "the container exists and a setting differs (this rolls it out)",
            lambda: api.update_container(
                container_id=c_id, region=spec.region, **spec.update_kwargs()
            ),
        ),
        (
            "--redeploy, a mutable image tag (:latest), or an unchanged container not ready",
            lambda: api.redeploy_container(container_id=c_id, region=spec.region),
        ),
        (
            f"repeatedly until the status is not transient, at most {spec.wait_timeout_s:.0f}s",
            lambda: api.get_container(container_id=c_id, region=spec.region),
        ),
    ]
    return {
        "dry_run": True,
        "api": "Serverless Containers v1 (scaleway.container.v1)",
        "region": spec.region,
        "image": spec.image,
        "requests": capture(api, calls),
    }


# --- the real run -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    action: str  # "created", "updated", "unchanged", "redeployed"
    container: Container
    url: str


def container_url(container: Container) -> str:
    endpoint = container.public_endpoint or ""
    if endpoint and "://" not in endpoint:
        endpoint = "https://" + endpoint
    return endpoint


def make_client(env: Mapping[str, str], region: str | None) -> Client:
    """An SDK client from ~/.config/scw/config.yaml and SCW_* variables (the variables win).

    Raises DeployError(code=2) with a plain message when credentials are missing or malformed.
    """
    logging.getLogger("scaleway").setLevel(logging.ERROR)  # "no config file" is not news
    client = Client.from_config_file_and_env()
    for var, attr in (
        ("SCW_ACCESS_KEY", "access_key"),
        ("SCW_SECRET_KEY", "secret_key"),
        ("SCW_DEFAULT_PROJECT_ID", "default_project_id"),
        ("SCW_DEFAULT_REGION", "default_region"),
        ("SCW_API_URL", "api_url"),
    ):
        if env.get(var):
            setattr(client, attr, env[var])
    if region:
        client.default_region = region
    missing = [
        var
        for var, value in (
            ("SCW_ACCESS_KEY", client.access_key),
            ("SCW_SECRET_KEY", client.secret_key),
            ("SCW_DEFAULT_PROJECT_ID", client.default_project_id),
        )
        if not value
    ]
    if missing:
        raise DeployError(
            "missing Scaleway credentials: set "
            + ", ".join(missing)
            + " (or run `scw init`); --dry-run needs none",
            2,
        )
    try:
        client.validate()
    except ValueError as exc:
        raise DeployError(f"invalid Scaleway credentials or settings: {exc}", 2) from None
    return client


class BaseDeployer(Generic[ApiT, SpecT]):
    """What the container and the job definition deployers share: an SDK API, a spec, and
    progress lines for the operator (stdout unless `out`)."""

    def __init__(self, api: ApiT, spec: SpecT, out: TextIO | None = None) -> None:
        self.api = api
        self.spec = spec
        self.out = out

    def say(self, message: str) -> None:
        print(message, file=self.out or sys.stdout, flush=True)


def at_most_one(found: list[T], several: str) -> T | None:
    """The one resource an exact-name lookup found, or None; more than one is an error for the
    operator (`several`): the deploy never guesses which one is meant."""
    if len(found) > 1:
        raise DeployError(several)
    return found[0] if found else None


class Deployer(BaseDeployer[ContainerV1API, DeploySpec]):
    """Find by exact name, create or update, wait, and judge the final status."""

    def find_namespace(self) -> Namespace | None:
        found = [
            ns
            for ns in self.api.list_namespaces_all(
                region=self.spec.region, name=self.spec.namespace
            )
            if ns.name == self.spec.namespace
        ]
        ids = ", ".join(ns.id for ns in found)
        return at_most_one(found, f"several namespaces are named {self.spec.namespace!r}: {ids}")

    def find_container(self, namespace_id: str) -> Container | None:
        found = [
            c
            for c in self.api.list_containers_all(
                region=self.spec.region, namespace_id=namespace_id, name=self.spec.container
            )
            if c.name == self.spec.container and c.namespace_id == namespace_id
        ]
        return at_most_one(found, f"several containers are named {self.spec.container!r}")

    def ensure_namespace(self) -> Namespace:
        namespace = self.find_namespace()
        if namespace is None:
            self.say(f"creating namespace {self.spec.namespace!r} in {self.spec.region}")
            namespace = self.api.create_namespace(
                region=self.spec.region, name=self.spec.namespace, description=NAMESPACE_DESCRIPTION
            )
        if namespace.status in NS_TRANSIENT:
            ns_id = namespace.id
            namespace = self._poll(
                lambda: self.api.get_namespace(namespace_id=ns_id, region=self.spec.region),
                lambda ns: ns.status not in NS_TRANSIENT,
                f"namespace {self.spec.namespace!r}",
            )
        if namespace.status != NamespaceStatus.READY:
            raise DeployError(
                f"namespace {namespace.name!r} is {namespace.status}: "
                f"{namespace.error_message or 'no error message'}"
            )
        return namespace

    def _poll(self, fetch: Callable[[], T], done: Callable[[T], bool], what: str) -> T:
        """Fetch until `done`, every `poll_s`, for at most `wait_timeout_s`.

        Like the SDK's `wait_for_container` (whose waiter also refuses delays under 1 s), this
        returns on `error` without raising: callers judge the final status themselves.
        """
        deadline = time.monotonic() + self.spec.wait_timeout_s
        while True:
            item = fetch()
            if done(item):
                return item
            if time.monotonic() + self.spec.poll_s > deadline:
                raise DeployError(
                    f"{what} still not ready after {self.spec.wait_timeout_s:.0f}s "
                    "(--wait-timeout-s); see `scw container container list` for its status"
                )
            time.sleep(self.spec.poll_s)

    def wait(self, container_id: str) -> Container:
        return self._poll(
            lambda: self.api.get_container(container_id=container_id, region=self.spec.region),
            lambda c: c.status not in TRANSIENT,
            f"container {self.spec.container!r}",
        )

    def run(self) -> Outcome:
        spec = self.spec
        namespace = self.ensure_namespace()
        current = self.find_container(namespace.id)
        if current is None:
            self.say(f"creating container {spec.container!r} with image {spec.image}")
            container = self.api.create_container(
                region=spec.region, **spec.create_kwargs(namespace.id)
            )
            action = "created"
        else:
            changed = differences(current, spec)
            if changed:
                self.say(f"updating container {spec.container!r}: {', '.join(changed)}")
                container = self.api.update_container(
                    container_id=current.id, region=spec.region, **spec.update_kwargs()
                )
                action = "updated"
            else:
                container = current
                action = "unchanged"
        if container.status in TRANSIENT:
            container = self.wait(container.id)
        must_redeploy = spec.redeploy or (
            action == "unchanged"
            and (is_mutable_tag(spec.image) or container.status != ContainerStatus.READY)
        )
        if action == "unchanged" and not must_redeploy:
            self.say(f"unchanged: container {spec.container!r} already runs {spec.image}")
        if must_redeploy:
            self.say(f"redeploying container {spec.container!r}")
            container = self.api.redeploy_container(container_id=container.id, region=spec.region)
            container = self.wait(container.id)
            action = "redeployed" if action == "unchanged" else action
        if container.status != ContainerStatus.READY:
            raise DeployError(
                f"DEPLOY FAILED: container {spec.container!r} is {container.status!s}: "
                f"{container.error_message or 'no error message from Scaleway'}"
            )
        return Outcome(action=action, container=container, url=container_url(container))


def api_error_message(exc: ScalewayException) -> str:
    try:
        data = exc.response.json()
        text = str(data.get("message") or data)
    except ValueError:
        text = exc.response.text
    return f"Scaleway API error {exc.status_code} on {exc.response.request.method} " + (
        f"{exc.response.request.path_url}: {text}"
    )
