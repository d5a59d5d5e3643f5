"""Service settings: images, desired counts, task sizes, MLflow's stores and the route policies.
Pure Python, no aws-cdk-lib."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from urllib.parse import urlsplit

from runtime import names
from runtime.auth.route_policy import ANY, RoutePolicy, check_no_route_tables, parse_policy
from stacks.settings_checks import SettingsError, Where

SERVICES: tuple[str, ...] = (names.MLFLOW_SERVICE, names.API_SERVICE, names.WORKER_SERVICE)
"""The ECS services, in the order the stacks build them; the keys of `images`, `desiredCounts` and
`taskSizes`."""
SERVING_SERVICES: tuple[str, ...] = (names.MLFLOW_SERVICE, names.API_SERVICE)
"""The services whose containers serve (serve-mlflow, serve-api) and so run `HOKUSAI_MTLS_WORKERS` processes;
the data-pipeline worker service only calls MLflow."""

PROJECT_ROOT = Path(__file__).resolve().parents[1]
"""The Docker build context of image assets: the repository root (see .dockerignore)."""
DOCKERFILE_DIR = "docker"

MAX_DESIRED_COUNT = 50

CPU_UNITS_PER_VCPU = 1024
MAX_WORKERS_PER_VCPU = 4
"""`workers` may be at most this many processes per vCPU of the task (and at least 1)."""
FARGATE_TASK_SIZES: Mapping[int, Sequence[int]] = MappingProxyType(
    {
        256: (512, 1024, 2048),
        512: range(1024, 4096 + 1, 1024),
        1024: range(2048, 8192 + 1, 1024),
        2048: range(4096, 16384 + 1, 1024),
        4096: range(8192, 30720 + 1, 1024),
        8192: range(16384, 61440 + 1, 4096),  # Linux platform 1.4.0 or later (unset in the services: LATEST)
        16384: range(32768, 122880 + 1, 8192),  # the same
    }
)
"""Task cpu units -> the memory sizes (MiB) Fargate accepts with it (the ECS Developer Guide's table of
valid task CPU and memory combinations; RegisterTaskDefinition refuses any other pair)."""

_DOCKERFILE = re.compile(rf"{DOCKERFILE_DIR}/[A-Za-z0-9_.-]+")
_IMAGE_URI = re.compile(
    r"(?P<registry>[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?(?::\d+)?)/(?P<repository>[a-z0-9]+(?:[._/-][a-z0-9]+)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})|@(?P<digest>sha256:[0-9a-f]{64}))"
)
_ECR_REGISTRY = re.compile(r"(?P<account>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(?:\.cn)?")
_SECRET_NAME = re.compile(r"[A-Za-z0-9/_+=.@-]{1,512}")
_S3_URI = re.compile(
    r"s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(?P<prefix>[A-Za-z0-9!_.'()/-]+))?"
)
"""No `*`, `?` or `$` in the prefix: they would be wildcards or variables in the IAM policy."""
_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
"""A service a certificate names: its SPIFFE ID's last segment (or, for SAN-less certificates, its CN)."""
_SCOPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9:._/*-]{0,127}")

MAX_KEY_USAGE_RETENTION_DAYS = 3650
"""`runtime.keys.usage.MAX_RETENTION_DAYS`, the most HOKUSAI_MTLS_KEY_USAGE_RETENTION_DAYS the runtime accepts
(a test keeps them equal; this module does not import SQLAlchemy)."""


DEFAULT_SCOPED_SERVICES: tuple[str, ...] = tuple(identity.name for identity in names.CLIENT_IDENTITIES)
"""The services a certificate identifies when `serviceScopes` is unset: the keys of
`runtime.auth.peer_identity.DEFAULT_SERVICE_SCOPES` (a test keeps them equal; this module does not import
cryptography). MLflow's own certificate names `mlflow` but is a server certificate: it calls no one."""
MAX_ROUTE_POLICY_CHARS = 16 * 1024
"""The most characters the compact JSON of one route policy may have: it becomes a container environment
variable, and ECS refuses a task definition over 64 KiB (every variable, command and setting together)."""


@dataclass(frozen=True, kw_only=True)
class EcrRepository:
    account: str
    region: str
    name: str
    tag_or_digest: str


@dataclass(frozen=True, kw_only=True)
class ImageSource:
    """Exactly one of: a Dockerfile under docker/ (an image asset built at deploy time) or a registry URI."""

    dockerfile: str | None = None
    uri: str | None = None

    def __post_init__(self) -> None:
        if (self.dockerfile is None) == (self.uri is None):
            raise ValueError("an ImageSource needs exactly one of dockerfile and uri")

    @property
    def ecr_repository(self) -> EcrRepository | None:
        """The ECR repository of `uri` (its pull permissions go to the execution role), else None."""
        match = _IMAGE_URI.fullmatch(self.uri or "")
        registry = _ECR_REGISTRY.fullmatch(match["registry"]) if match else None
        if match is None or registry is None:
            return None
        return EcrRepository(
            account=registry["account"],
            region=registry["region"],
            name=match["repository"],
            tag_or_digest=match["tag"] or match["digest"],
        )

    @classmethod
    def default_for(cls, service: str) -> ImageSource:
        return cls(dockerfile=f"{DOCKERFILE_DIR}/Dockerfile.{service}")


@dataclass(frozen=True, kw_only=True)
class TaskSize:
    """A Fargate task's size, one of `FARGATE_TASK_SIZES`, and the serving processes it runs."""

    cpu: int
    """CPU units: 1024 = 1 vCPU."""
    memory_mib: int
    workers: int | None = None
    """HOKUSAI_MTLS_WORKERS of a serving container; None: `default_workers(cpu)`."""

    def __post_init__(self) -> None:
        if self.memory_mib not in FARGATE_TASK_SIZES.get(self.cpu, ()):
            raise ValueError(f"cpu {self.cpu} with {self.memory_mib} MiB is not a Fargate task size")
        if self.workers is not None and not 1 <= self.workers <= max_workers(self.cpu):
            raise ValueError(
                f"{self.workers} workers: expected 1..{max_workers(self.cpu)} for cpu {self.cpu}"
            )

    @property
    def worker_processes(self) -> int:
        """The worker processes a serving container runs: `workers`, else one per whole vCPU."""
        return default_workers(self.cpu) if self.workers is None else self.workers


DEFAULT_TASK_SIZES: Mapping[str, TaskSize] = MappingProxyType(
    {
        names.MLFLOW_SERVICE: TaskSize(cpu=1024, memory_mib=2048),
        names.API_SERVICE: TaskSize(cpu=512, memory_mib=1024),
        names.WORKER_SERVICE: TaskSize(cpu=512, memory_mib=1024),
    }
)
"""The size of one of our three services that `taskSizes` leaves out."""
GENERIC_TASK_SIZE = TaskSize(cpu=512, memory_mib=1024)
"""The size of a declared service (not ours) that neither `hokusai:services` nor `taskSizes` sizes."""


def default_workers(cpu: int) -> int:
    """One worker process per whole vCPU, at least one (0.25 and 0.5 vCPU: 1)."""
    return max(1, cpu // CPU_UNITS_PER_VCPU)


def max_workers(cpu: int) -> int:
    """`MAX_WORKERS_PER_VCPU` per vCPU: 1 for the smallest Fargate size (256 units, 0.25 vCPU)."""
    return min(MAX_WORKERS_PER_VCPU * cpu // CPU_UNITS_PER_VCPU, names.MAX_WORKERS)


@dataclass(frozen=True, kw_only=True)
class MlflowStores:
    """Where the MLflow tracking server keeps runs (a database) and artifacts (S3, proxied)."""

    backend_store_secret_name: str
    """An EXISTING Secrets Manager secret whose value is the backend store URI (it holds a password)."""
    artifacts_destination: str
    """`s3://bucket/prefix`: the task role gets the S3 actions of MLflow's proxied artifacts there."""

    @property
    def bucket(self) -> str:
        return _match_s3(self.artifacts_destination)["bucket"]

    @property
    def prefix(self) -> str:
        """The key prefix without slashes at either end; empty for a whole bucket."""
        return (_match_s3(self.artifacts_destination)["prefix"] or "").strip("/")


@dataclass(frozen=True, kw_only=True)
class ApiKeyStore:
    """Our API-key store (`runtime.keys`), which the api validates keys against.

    The hashing secret is not a setting: the Secrets stack creates it (`names.key_hash_secret_name`).
    """

    url_secret_name: str
    """An EXISTING secret whose value is the store's database URL (`postgresql://user:password@host/db`),
    injected into the api only as HOKUSAI_MTLS_KEY_STORE_URL with `secrets=`."""
    usage_retention_days: int | None = None
    """HOKUSAI_MTLS_KEY_USAGE_RETENTION_DAYS of the api; None: the runtime's default (90 days)."""


def parse_images(raw: object, where: Where, services: Sequence[str] = SERVICES) -> Mapping[str, ImageSource]:
    """`{"<service>": {"dockerfile": ...} | {"uri": ...}}` for any of `services`; one left out takes its
    image from `hokusai:services` or, for our three, docker/Dockerfile.<service> (`stacks.settings_declared`)."""
    raw = where.mapping(raw, allowed=services)
    return MappingProxyType({service: parse_image(raw[service], where / service) for service in raw})


def parse_desired_counts(raw: object, where: Where, services: Sequence[str] = SERVICES) -> Mapping[str, int]:
    raw = where.mapping(raw, allowed=services)
    return MappingProxyType(
        {service: (where / service).whole_number(raw[service], 0, MAX_DESIRED_COUNT) for service in raw}
    )


def parse_task_sizes(raw: object, where: Where, services: Sequence[str] = SERVICES) -> Mapping[str, TaskSize]:
    """`{"<service>": {"cpu": N, "memoryMiB": M, "workers": W?}, ...}` for any of `services`; one left out
    keeps its declared or default size (`DEFAULT_TASK_SIZES`, `GENERIC_TASK_SIZE`)."""
    raw = where.mapping(raw, allowed=services)
    return MappingProxyType(
        {service: parse_task_size(raw[service], where / service, service=service) for service in raw}
    )


def parse_mlflow(raw: object, where: Where, *, environment: str) -> MlflowStores:
    raw = where.mapping(
        raw,
        allowed=("backendStoreSecretName", "artifactsDestination"),
        required=("backendStoreSecretName", "artifactsDestination"),
    )
    secret = parse_secret_name(
        raw["backendStoreSecretName"], where / "backendStoreSecretName", environment=environment
    )
    destination = (where / "artifactsDestination").string(
        raw["artifactsDestination"], _S3_URI, "an S3 URI such as 's3://my-bucket/mlflow-artifacts'"
    )
    if destination.endswith("/") or "//" in destination.removeprefix("s3://"):
        (where / "artifactsDestination").fail(f"{destination!r}: write the prefix without empty segments")
    return MlflowStores(backend_store_secret_name=secret, artifacts_destination=destination)


def parse_secret_name(raw: object, where: Where, *, environment: str) -> str:
    """The name of an EXISTING secret that ECS injects with `secrets=`; not under a prefix where the stacks
    create secrets (the certificates', the API-key store's)."""
    secret = where.string(raw, _SECRET_NAME, "a Secrets Manager secret name")
    if secret.startswith(names.secret_prefix(environment)):
        where.fail(
            f"{secret!r} is under {names.secret_prefix(environment)}, where the mTLS certificates live"
        )
    if secret.startswith(names.api_keys_secret_prefix(environment)):
        where.fail(
            f"{secret!r} is under {names.api_keys_secret_prefix(environment)}, where the stacks create "
            "the API-key store's hashing secret"
        )
    return secret


def parse_api_key_store(raw: object, where: Where, *, environment: str) -> ApiKeyStore:
    """`{"urlSecretName": "...", "usageRetentionDays": N?}`."""
    raw = where.mapping(raw, allowed=("urlSecretName", "usageRetentionDays"), required=("urlSecretName",))
    url_secret_name = parse_secret_name(
        raw["urlSecretName"], where / "urlSecretName", environment=environment
    )
    retention = None
    if "usageRetentionDays" in raw:
        retention = (where / "usageRetentionDays").whole_number(
            raw["usageRetentionDays"],
            1,
            MAX_KEY_USAGE_RETENTION_DAYS,
            why=" (leave it out for the runtime's default, 90)",
        )
    return ApiKeyStore(url_secret_name=url_secret_name, usage_retention_days=retention)


def parse_auth_service_url(raw: object, where: Where, *, environment: str) -> str:
    """The auth service's base URL (the client POSTs to `<url>/api/v1/keys/validate`).

    It goes into the container environment, so it may carry no credentials; `http://` only where
    `mayDegrade` is true (the settings check that: API keys travel to it).
    """
    del environment
    schemes = ("https", "http")
    example = "a URL such as 'https://auth.example.com'"
    if not isinstance(raw, str) or not raw or raw != raw.strip() or any(c.isspace() for c in raw):
        where.fail(f"{raw!r} is not {example}")
    try:
        url = urlsplit(raw)
        url.port  # noqa: B018 - raises ValueError for a port that is not a number in 0..65535
    except ValueError as error:
        where.fail(f"{raw!r} is not {example} ({error})")
    if url.scheme not in schemes:
        where.fail(
            f"{raw!r}: the scheme must be https (http only where mayDegrade is true): API keys are sent to it"
        )
    if not url.hostname:
        where.fail(f"{raw!r} has no host; expected {example}")
    if url.username is not None or url.password is not None:
        where.fail(f"{raw!r} holds credentials: it is written into the container environment in clear")
    if url.query or url.fragment or raw.endswith(("?", "#")):
        where.fail(f"{raw!r}: a base URL takes no query or fragment (the client appends the path)")
    return raw


@dataclass(frozen=True)
class RoutePolicySetting:
    """One server's `routePolicies` entry, read by the runtime's own parser."""

    policy: RoutePolicy
    """What `runtime.auth.route_policy.parse_policy` made of the document."""
    compact_json: str
    """The document as HOKUSAI_MTLS_ROUTE_POLICY: `json.dumps(document, separators=(",", ":"),
    sort_keys=True)`."""


def parse_route_policies(
    raw: object, where: Where, servers: Sequence[str] = SERVING_SERVICES
) -> Mapping[str, RoutePolicySetting]:
    """`{"<server>": {"mode": "enforce" | "audit", "rules": [...]}}`, for any of `servers` (the declared
    services that serve): each policy in the runtime's own
    format, checked by the runtime's own parser (`runtime.auth.route_policy.parse_policy`), so synth refuses
    exactly what the server would refuse at start. The identities the rules name are checked against the
    services that have certificates in `EnvironmentSettings.__post_init__` (`check_route_policy_identities`).
    """
    raw = where.mapping(raw, allowed=servers)
    policies = {}
    for server, document in raw.items():
        at = where / server
        try:
            policy = parse_policy(document, where=at.path)
        except ValueError as error:  # its message starts with the path: `at.path`, `.rules[0].paths`...
            raise SettingsError(str(error)) from None
        if server != names.MLFLOW_SERVICE:
            try:
                check_no_route_tables(policy, at.path)
            except ValueError as error:
                raise SettingsError(str(error)) from None
        compact = json.dumps(document, separators=(",", ":"), sort_keys=True)
        if len(compact) > MAX_ROUTE_POLICY_CHARS:
            at.fail(
                f"is {len(compact)} characters as JSON, more than {MAX_ROUTE_POLICY_CHARS}: it is a container "
                "environment variable, and ECS refuses a task definition over 64 KiB; use fewer, broader "
                "patterns (`*` segments, a final `**`)"
            )
        policies[server] = RoutePolicySetting(policy=policy, compact_json=compact)
    return MappingProxyType(policies)


def check_route_policy_identities(
    policies: Mapping[str, RoutePolicySetting], services: Sequence[str], where: Where, *, source: str
) -> None:
    """Every identity a rule names (other than `*`) is one of `services`, the ones a certificate can
    identify (`source` says where they come from); a rule naming any other could never match."""
    for server, setting in policies.items():
        if not setting.policy.identities() - set(services):
            continue
        for index, rule in enumerate(setting.policy.rules):
            unknown = sorted(rule.identities - set(services) - {ANY})
            if unknown:
                (where / server / f"rules[{index}]" / "identities").fail(
                    f"{unknown[0]!r} is not a service that has a certificate here; expected "
                    f"{', '.join(services)} ({source}) or {ANY}"
                )


def parse_service_scopes(raw: object, where: Where) -> Mapping[str, tuple[str, ...]]:
    """service -> its scopes, rendered as the JSON of `HOKUSAI_MTLS_SERVICE_SCOPES`.

    It replaces the runtime's default entirely, so an empty object (no service may do anything
    over mTLS) is refused: leave the setting out for the default.
    """
    if not isinstance(raw, Mapping):
        where.fail(f"expected an object of service -> list of scopes, got {_kind(raw)}")
    if not raw:
        where.fail("grants no service anything; leave the setting out for the runtime's default scopes")
    scopes = {}
    for service, granted in raw.items():
        if not isinstance(service, str) or not _SERVICE_NAME.fullmatch(service):
            (where / str(service)).fail(f"{service!r} is not a service name such as 'api'")
        scopes[service] = (where / service).strings(
            granted, _SCOPE, "a scope such as 'mlflow:read'", min_items=1
        )
    return MappingProxyType(scopes)


def default_images() -> Mapping[str, ImageSource]:
    return MappingProxyType({service: ImageSource.default_for(service) for service in SERVICES})


def default_desired_counts() -> Mapping[str, int]:
    return MappingProxyType(dict.fromkeys(SERVICES, 1))


def default_task_sizes() -> Mapping[str, TaskSize]:
    return DEFAULT_TASK_SIZES


def parse_task_size(raw: object, where: Where, *, service: str) -> TaskSize:
    serving = service in SERVING_SERVICES
    if not serving and isinstance(raw, Mapping) and "workers" in raw:
        (where / "workers").fail(
            f"only {' and '.join(SERVING_SERVICES)} run worker processes (HOKUSAI_MTLS_WORKERS); "
            f"the {service} service serves nothing"
        )
    raw = where.mapping(
        raw,
        allowed=("cpu", "memoryMiB", "workers") if serving else ("cpu", "memoryMiB"),
        required=("cpu", "memoryMiB"),
    )
    cpu = (where / "cpu").whole_number_in(
        raw["cpu"],
        FARGATE_TASK_SIZES,
        f"a Fargate task cpu value: one of {', '.join(map(str, FARGATE_TASK_SIZES))} "
        f"({CPU_UNITS_PER_VCPU} = 1 vCPU)",
    )
    memory = (where / "memoryMiB").whole_number_in(
        raw["memoryMiB"],
        FARGATE_TASK_SIZES[cpu],
        f"a memory size Fargate runs with cpu {cpu} ({cpu / CPU_UNITS_PER_VCPU:g} vCPU): "
        f"{_describe_sizes(FARGATE_TASK_SIZES[cpu])} MiB",
    )
    workers = None
    if "workers" in raw:
        workers = (where / "workers").whole_number(
            raw["workers"],
            1,
            max_workers(cpu),
            why=f": at least 1 and at most {MAX_WORKERS_PER_VCPU} per vCPU "
            f"(cpu {cpu} is {cpu / CPU_UNITS_PER_VCPU:g} vCPU)",
        )
    return TaskSize(cpu=cpu, memory_mib=memory, workers=workers)


def _describe_sizes(sizes: Sequence[int]) -> str:
    """`512, 1024 or 2048`, or `2048 to 8192 in steps of 1024`."""
    if isinstance(sizes, range):
        return f"{sizes[0]} to {sizes[-1]} in steps of {sizes.step}"
    return ", ".join(map(str, sizes[:-1])) + f" or {sizes[-1]}"


def parse_image(raw: object, where: Where) -> ImageSource:
    how, value = where.one_of_keys(raw, ("dockerfile", "uri"))
    where = where / how
    if how == "uri":
        return ImageSource(
            uri=where.string(
                value, _IMAGE_URI, "a registry image URI with a tag or digest (registry/repo:tag)"
            )
        )
    dockerfile = where.string(
        value, _DOCKERFILE, f"a Dockerfile in {DOCKERFILE_DIR}/ (e.g. docker/Dockerfile.api)"
    )
    if not (PROJECT_ROOT / dockerfile).is_file():
        where.fail(f"{dockerfile!r} does not exist in {PROJECT_ROOT}")
    return ImageSource(dockerfile=dockerfile)


def _kind(raw: object) -> str:
    return "null" if raw is None else type(raw).__name__


def _match_s3(uri: str) -> re.Match[str]:
    match = _S3_URI.fullmatch(uri)
    if match is None:
        raise ValueError(f"{uri!r} is not an S3 URI")
    return match
