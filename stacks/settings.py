"""Per-environment settings, read from cdk.json's context key `hokusai:environments`.

Pure Python (no aws-cdk-lib import) so it is cheap to test. Every problem is reported
as a `SettingsError` that names the environment and the setting, e.g.
`hokusai:environments.production.removalPolicy: ...`. The network and service settings
are parsed in `settings_network` and `settings_services`; this module composes them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from runtime import names
from runtime.lifecycle import (
    CA_SOURCE_IMPORTED,
    CA_SOURCE_ISSUED,
    CA_SOURCES,
    ROTATION_WINDOW_HOURS,
    SUB_DAY_ROTATION_HOURS,
    check_function_name,
    check_rotation_hours,
    default_rotation_hours,
    longest_rotation_hours,
    renews_before_half_life,
    rotation_purpose,
)
from runtime.service_catalog import CDK_CONTEXT_KEY, Catalog
from stacks.settings_checks import SettingsError, Where
from stacks.settings_declared import DEFAULT_DECLARED, DeclaredServices, parse_declared_services
from stacks.settings_network import (
    CreateVpc,
    ImportCluster,
    ImportNamespace,
    ImportVpc,
    parse_cluster,
    parse_namespace,
    parse_vpc,
)
from stacks.settings_services import (
    ApiKeyStore,
    ImageSource,
    MlflowStores,
    RoutePolicySetting,
    TaskSize,
    check_route_policy_identities,
    parse_api_key_store,
    parse_auth_service_url,
    parse_desired_counts,
    parse_images,
    parse_mlflow,
    parse_route_policies,
    parse_secret_name,
    parse_service_scopes,
    parse_task_sizes,
)

__all__ = ["CONTEXT_KEY", "EnvironmentSettings", "SettingsError", "load_settings"]

CONTEXT_KEY = "hokusai:environments"
SERVICES_KEY = CDK_CONTEXT_KEY
"""`hokusai:services`: the platform's services (`runtime.service_catalog`)."""

REMOVAL_POLICIES = ("retain", "destroy")
RETAINED_ENVIRONMENTS = frozenset({"production"})
"""Environments whose data must survive a stack deletion: `removalPolicy` must be `retain`."""

LOG_RETENTION_DAYS = (
    1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653,
)  # fmt: skip
"""The values CloudWatch Logs accepts for a log group's retention."""

MAX_LEAF_LIFETIME_HOURS = 397 * 24
"""The CA/Browser Forum's longest leaf; ours are meant to live a day."""
MIN_LEAF_LIFETIME_HOURS = 2 * (SUB_DAY_ROTATION_HOURS[0] + ROTATION_WINDOW_HOURS)
"""The shortest leaf that Secrets Manager's fastest rotation (4 hours, within a 1-hour window) renews
before half of it has passed."""
MAX_MIN_REQUESTS = 1_000_000
MAX_CA_ROLLOVER_WAIT_DAYS = 90

_ACCOUNT = re.compile(r"^\d{12}$")
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[A-Za-z]{2,}")
_SAN = re.compile(r"[A-Za-z0-9][A-Za-z0-9.:-]{0,252}")
_ORIGIN = re.compile(r"https://[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?(:[0-9]{1,5})?")

KEY_TYPES = ("ecdsa-p256", "rsa-2048", "rsa-3072", "rsa-4096")
"""`runtime.certificates.issuance.KeyType` values (a test keeps them equal; this module does not import cryptography)."""

_Parser = Callable[[object, Where, str], Any]
_ServiceParser = Callable[[object, Where, DeclaredServices], Any]


def _as_is(raw: object, where: Where, environment: str) -> object:
    return raw  # scalars: checked in EnvironmentSettings.__post_init__


def _non_empty_cidrs(raw: object, where: Where, environment: str) -> tuple[str, ...]:
    cidrs = where.cidrs(raw)
    if not cidrs:
        where.fail("needs at least one CIDR block (leave the setting out to use the VPC's CIDR)")
    return cidrs


# cdk.json key -> (dataclass field, parser of the raw value)
_KEYS: dict[str, tuple[str, _Parser]] = {
    "leafLifetimeHours": ("leaf_lifetime_hours", _as_is),
    "logRetentionDays": ("log_retention_days", _as_is),
    "removalPolicy": ("removal_policy", _as_is),
    "account": ("account", _as_is),
    "region": ("region", _as_is),
    "mtlsMode": ("mtls_mode", _as_is),
    "alarmEmails": ("alarm_emails", lambda raw, where, _: where.strings(raw, _EMAIL, "an e-mail address")),
    "mtlsFailureRatePercent": ("mtls_failure_rate_percent", _as_is),
    "mtlsFailureMinRequests": ("mtls_failure_min_requests", _as_is),
    "vpc": ("vpc", lambda raw, where, _: parse_vpc(raw, where)),
    "cluster": ("cluster", lambda raw, where, _: parse_cluster(raw, where)),
    "namespace": ("namespace", lambda raw, where, _: parse_namespace(raw, where)),
    "internalCidrs": ("internal_cidrs", _non_empty_cidrs),
    "trustedProxyCidrs": ("trusted_proxy_cidrs", lambda raw, where, _: where.cidrs(raw)),
    "trustedProxyKind": ("trusted_proxy_kind", _as_is),
    "corsAllowedOrigins": (
        "cors_allowed_origins",
        lambda raw, where, _: where.strings(raw, _ORIGIN, "an origin such as https://ui.example.com"),
    ),
    "cnFallback": ("cn_fallback", _as_is),
    "mayDegrade": ("may_degrade", _as_is),
    "mlflow": ("mlflow", lambda raw, where, env: parse_mlflow(raw, where, environment=env)),
    "authServiceUrl": (
        "auth_service_url",
        lambda raw, where, env: parse_auth_service_url(raw, where, environment=env),
    ),
    "redisUrlSecretName": (
        "redis_url_secret_name",
        lambda raw, where, env: parse_secret_name(raw, where, environment=env),
    ),
    "apiKeyStore": (
        "api_key_store",
        lambda raw, where, env: parse_api_key_store(raw, where, environment=env),
    ),
    "serviceScopes": ("service_scopes", lambda raw, where, _: parse_service_scopes(raw, where)),
    "rotationHours": ("rotation_hours", _as_is),
    "keyType": ("key_type", _as_is),
    "serverSans": ("server_sans", lambda raw, where, _: where.strings(raw, _SAN, "a DNS name or IP address")),
    "caSource": ("ca_source", _as_is),
    "caRolloverStartDays": ("ca_rollover_start_days", _as_is),
    "caRolloverWaitDays": ("ca_rollover_wait_days", _as_is),
}
# cdk.json key -> (dataclass field, parser of the raw value given the declared services)
_SERVICE_KEYS: dict[str, tuple[str, _ServiceParser]] = {
    "images": ("images", lambda raw, where, declared: parse_images(raw, where, declared.names)),
    "desiredCounts": (
        "desired_counts",
        lambda raw, where, declared: parse_desired_counts(raw, where, declared.names),
    ),
    "taskSizes": ("task_sizes", lambda raw, where, declared: parse_task_sizes(raw, where, declared.names)),
    "routePolicies": (
        "route_policies",
        lambda raw, where, declared: parse_route_policies(raw, where, declared.servers),
    ),
}
_REQUIRED = ("logRetentionDays", "removalPolicy", "vpc", "mlflow")
_RETIRED: dict[str, str] = {
    "leafLifetimeDays": "leaves are counted in hours now: use leafLifetimeHours (90 days is 2160; "
    "leave it out for 24 hours, 1 year in development)",
    "rotationDays": "rotation is counted in hours now: use rotationHours (30 days is 720; leave it out "
    "to renew at half-life)",
    "certificateExpiryAlarmDays": "the leaf alarms follow the lifetime now (a warning below 50 % left, "
    "a page below 25 %) and the CA's fires at 60 days left: remove the setting",
}
"""Settings of earlier releases, refused with what replaces them (never silently ignored)."""


@dataclass(frozen=True, kw_only=True)
class EnvironmentSettings:
    """What differs between development, staging and production (cdk.json key in brackets)."""

    environment: str
    log_retention_days: int
    """[logRetentionDays] Retention of every log group the stacks create."""
    removal_policy: str
    """[removalPolicy] `retain` or `destroy`: what happens to keys, secrets and logs on stack deletion."""
    vpc: CreateVpc | ImportVpc
    """[vpc] `{"create": {cidr, maxAzs, natGateways}}` or `{"import": {vpcId, vpcCidrBlock, ...}}`."""
    mlflow: MlflowStores
    """[mlflow] `{backendStoreSecretName, artifactsDestination}`."""
    account: str | None = None
    region: str | None = None
    """Both None: the stage is environment-agnostic (the deploying credentials decide)."""
    mtls_mode: str = names.MTLS_MODE_STRICT
    """[mtlsMode] One of `runtime.names.MTLS_MODES`; `off` sets ENABLE_MTLS_AUTH=false (the rollback)."""
    alarm_emails: tuple[str, ...] = ()
    """[alarmEmails] Who the alarms e-mail; may be empty."""
    mtls_failure_rate_percent: float = 1.0
    """[mtlsFailureRatePercent] Alarm when more than this share of handshakes fail..."""
    mtls_failure_min_requests: int = 100
    """[mtlsFailureMinRequests] ...over at least this many handshakes in 5 minutes."""
    services: DeclaredServices = DEFAULT_DECLARED
    """[hokusai:services, shared by every environment] The platform's services (`stacks.settings_declared`)."""
    images: Mapping[str, ImageSource] = field(default_factory=lambda: MappingProxyType({}))
    """[images] service -> `{"dockerfile": "docker/Dockerfile.<service>"}` or `{"uri": ...}`. Complete after
    construction: a service left out takes its `hokusai:services` image or, for ours, docker/Dockerfile.<svc>."""
    desired_counts: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    """[desiredCounts] service -> number of tasks (else its declared `desiredCount`, else 1)."""
    task_sizes: Mapping[str, TaskSize] = field(default_factory=lambda: MappingProxyType({}))
    """[taskSizes] service -> `{"cpu", "memoryMiB", "workers"?}`: a Fargate cpu/memory pair; `workers` (mlflow
    and api only) is their HOKUSAI_MTLS_WORKERS, 1..4 per vCPU (default: one per whole vCPU, at least 1).
    A service left out keeps its declared `taskSize`, else `DEFAULT_TASK_SIZES` (mlflow 1024/2048, api and
    worker 512/1024), else 512/1024."""
    cluster: ImportCluster | None = None
    """[cluster] None (`"create"`) or the imported cluster."""
    namespace: ImportNamespace | None = None
    """[namespace] None (`"create"`) or the imported Cloud Map namespace (its VPC must be imported too)."""
    internal_cidrs: tuple[str, ...] | None = None
    """[internalCidrs] Networks whose callers count as internal; None -> the VPC's CIDR."""
    trusted_proxy_cidrs: tuple[str, ...] = ()
    """[trustedProxyCidrs] The proxies (the platform's ALB) whose forwarding headers are honoured;
    they may also reach the API's port."""
    trusted_proxy_kind: str = names.PROXY_KIND_NONE
    """[trustedProxyKind] HOKUSAI_MTLS_PROXY_KIND of the api: which proxy at trustedProxyCidrs forwards
    client certificates, so which one header is believed: `none`, `alb` (mutual TLS in verify mode) or
    `envoy` (XFCC with SANITIZE_SET). Not `none` needs trustedProxyCidrs."""
    cors_allowed_origins: tuple[str, ...] = ()
    """[corsAllowedOrigins] HOKUSAI_MTLS_CORS_ALLOWED_ORIGINS of mlflow and api: https origins whose CORS
    preflights are answered; empty: every preflight is refused at the edge."""
    may_degrade: bool = False
    """[mayDegrade] HOKUSAI_MTLS_MAY_DEGRADE of every container: whether a start-up without usable
    certificates may degrade (a local development CA, TLS only, plain HTTP; loudly) instead of failing
    closed, and whether authServiceUrl may be http. A setting, not a name: any environment may be declared."""
    cn_fallback: bool = False
    """[cnFallback] HOKUSAI_MTLS_CN_FALLBACK of mlflow and api: identify certificates without a SPIFFE URI
    by a CN `<service>.hokusai-<env>.local`. Only with caSource `imported` (our CA always writes SPIFFE IDs)."""
    auth_service_url: str | None = None
    """[authServiceUrl] AUTH_SERVICE_URL of mlflow and api: the auth service that validates API keys
    (https; http only in development). None: every request without a client certificate gets 401,
    so `permissive` and `off` need it."""
    redis_url_secret_name: str | None = None
    """[redisUrlSecretName] An EXISTING secret whose value is REDIS_URL (it may hold a password), injected
    into mlflow and api with ECS `secrets=`. None: the API-key cache and rate limits stay per task."""
    api_key_store: ApiKeyStore | None = None
    """[apiKeyStore] `{"urlSecretName", "usageRetentionDays"?}`: the api validates API keys against our store
    (HOKUSAI_MTLS_KEY_STORE_URL from that EXISTING secret) under the hashing secret the Secrets stack creates
    (`hokusai/<env>/api-keys/hash-secret`, HOKUSAI_MTLS_KEY_HASH_SECRET); both reach the api's container
    only, through its execution role. None: no store, the api asks the auth service as before."""
    service_scopes: Mapping[str, tuple[str, ...]] | None = None
    """[serviceScopes] HOKUSAI_MTLS_SERVICE_SCOPES of mlflow and api: service -> scopes of its
    certificate. None: the runtime's default (api and worker read and write MLflow)."""
    route_policies: Mapping[str, RoutePolicySetting] = field(default_factory=lambda: MappingProxyType({}))
    """[routePolicies] server (`mlflow`, `api`, any declared server) -> `{"mode": "enforce" | "audit", "rules": [{"identities",
    "methods", "paths"}]}` in the runtime's format (`runtime.auth.route_policy`), written into that server's
    HOKUSAI_MTLS_ROUTE_POLICY: which certificate identities may call which methods and paths. Identities are
    the server's declared callers (api: every caller; mlflow and api: the services of serviceScopes when it is
    set) or `*`. A server left out: every accepted identity
    reaches every route, as before."""
    leaf_lifetime_hours: int | None = None
    """[leafLifetimeHours] How long the leaf (service) certificates issued here stay valid, in hours.
    None: `names.default_leaf_lifetime_hours` (24; a year in development). 10 .. 397 x 24."""
    rotation_hours: int | None = None
    """[rotationHours] Secrets Manager rotates every identity secret this often (a fresh key and leaf):
    4, 6, 8, 12 or whole days in hours, and with its 1-hour window at most half the lifetime, so a leaf
    is renewed before half-life and a working rotation never trips the 50 % warning. None: the longest
    such period after which one missed rotation warns but does not page
    (`runtime.lifecycle.default_rotation_hours`: 8 hours for 24-hour leaves, 48 for a week)."""
    key_type: str = "ecdsa-p256"
    """[keyType] Key algorithm of issued leaves: one of `KEY_TYPES`."""
    server_sans: tuple[str, ...] = ()
    """[serverSans] Extra DNS names or IPs in the MLflow server's leaf, beyond mlflow.hokusai-<env>.local."""
    ca_source: str = CA_SOURCE_ISSUED
    """[caSource] `issued`: the first deploy makes the environment's CA. `imported`: the platform's CA,
    uploaded with `hokusai-mtls certs upload` before the first deploy, which fails without it; never
    rolled over automatically."""
    ca_rollover_wait_days: int = 7
    """[caRolloverWaitDays] Days between the automatic CA rollover's steps (every service loads the
    two-CA bundle, then its new leaf, meanwhile); the CA secrets' rotation schedule, too."""
    ca_rollover_start_days: int | None = None
    """[caRolloverStartDays] The automatic CA rollover begins when the CA has this many days left.
    None: 60 + 5 x caRolloverWaitDays + the leaf lifetime in days (rounded up): 96 for 24-hour leaves.
    At least the leaf lifetime in days + 3 x caRolloverWaitDays + 1, so the new CA issues before the
    old one is too short-lived to cover a leaf, and at least 60 + 4 x caRolloverWaitDays + 1, so the
    rollover is done before the CA alarm (60 days left) fires."""

    def __post_init__(self) -> None:
        try:
            names.check_environment(self.environment)
        except ValueError as error:
            raise SettingsError(f"{CONTEXT_KEY}: {error}") from None
        if self.leaf_lifetime_hours is None:
            object.__setattr__(
                self, "leaf_lifetime_hours", names.default_leaf_lifetime_hours(self.environment)
            )
        lifetime = self._at("leafLifetimeHours").whole_number(
            self.leaf_lifetime_hours, MIN_LEAF_LIFETIME_HOURS, MAX_LEAF_LIFETIME_HOURS
        )
        self._at("logRetentionDays").whole_number(self.log_retention_days, 1, max(LOG_RETENTION_DAYS))
        if self.log_retention_days not in LOG_RETENTION_DAYS:
            self._at("logRetentionDays").fail(
                f"{self.log_retention_days} is not a CloudWatch Logs retention period; "
                f"use one of {', '.join(map(str, LOG_RETENTION_DAYS))}"
            )
        self._at("removalPolicy").choice(self.removal_policy, REMOVAL_POLICIES)
        if self.environment in RETAINED_ENVIRONMENTS and self.removal_policy != "retain":
            self._at("removalPolicy").fail(f"must be 'retain' for {self.environment}")
        if self.account is not None and not (isinstance(self.account, str) and _ACCOUNT.match(self.account)):
            self._at("account").fail(f"{self.account!r} is not a 12-digit AWS account id (as a string)")
        if self.region is not None and not (isinstance(self.region, str) and _REGION.match(self.region)):
            self._at("region").fail(f"{self.region!r} is not an AWS region name such as 'eu-west-1'")
        self._at("mtlsMode").choice(self.mtls_mode, names.MTLS_MODES)
        self._check_rotation_hours(lifetime)
        self._at("keyType").choice(self.key_type, KEY_TYPES)
        self._at("caSource").choice(self.ca_source, CA_SOURCES)
        self._at("caRolloverWaitDays").whole_number(self.ca_rollover_wait_days, 1, MAX_CA_ROLLOVER_WAIT_DAYS)
        self._check_ca_rollover_start(lifetime)
        self._at("mtlsFailureRatePercent").number(self.mtls_failure_rate_percent, above=0, at_most=100)
        self._at("mtlsFailureMinRequests").whole_number(self.mtls_failure_min_requests, 1, MAX_MIN_REQUESTS)
        if self.namespace is not None and not isinstance(self.vpc, ImportVpc):
            self._at("namespace").fail(
                "an imported private DNS namespace belongs to an existing VPC: import the VPC too"
            )
        if not isinstance(self.may_degrade, bool):
            self._at("mayDegrade").fail(f"expected true or false, got {self.may_degrade!r}")
        plain_auth = self.auth_service_url is not None and urlsplit(self.auth_service_url).scheme == "http"
        if plain_auth and not self.may_degrade:
            self._at("authServiceUrl").fail(
                f"{self.auth_service_url!r}: the scheme must be https (http only where mayDegrade is true): "
                "API keys are sent to it"
            )
        if self.auth_service_url is None and self.mtls_mode != names.MTLS_MODE_STRICT:
            self._at("authServiceUrl").fail(
                f"required with mtlsMode {self.mtls_mode!r}: callers without a client certificate use "
                "the API-key path, and without the auth service every one of them gets 401"
            )
        if self.redis_url_secret_name is not None and (
            self.redis_url_secret_name == self.mlflow.backend_store_secret_name
        ):
            self._at("redisUrlSecretName").fail(
                "is mlflow.backendStoreSecretName: the Redis URL needs a secret of its own "
                "(the api's execution role would read the database password)"
            )
        self._check_api_key_store()
        self._complete_service_settings()
        for identity in self.catalog.identities:
            try:
                check_function_name(self.environment, rotation_purpose(identity.name))
            except ValueError as error:
                raise SettingsError(f"{CONTEXT_KEY}.{self.environment}: {error}") from None
        for server, policy in self.route_policies.items():
            callers, source = self._policy_identities(server)
            check_route_policy_identities({server: policy}, callers, self._at("routePolicies"), source=source)
        self._at("trustedProxyKind").choice(self.trusted_proxy_kind, names.PROXY_KINDS)
        if self.trusted_proxy_kind != names.PROXY_KIND_NONE and not self.trusted_proxy_cidrs:
            self._at("trustedProxyKind").fail(
                f"{self.trusted_proxy_kind!r} needs trustedProxyCidrs: a forwarded certificate is believed "
                "only from the proxy's own addresses"
            )
        if not isinstance(self.cn_fallback, bool):
            self._at("cnFallback").fail(f"expected true or false, got {self.cn_fallback!r}")
        if self.cn_fallback and self.ca_source != CA_SOURCE_IMPORTED:
            self._at("cnFallback").fail(
                "only with caSource 'imported': certificates of our own CA always carry a SPIFFE ID"
            )
        if self.internal_cidrs is None:
            object.__setattr__(self, "internal_cidrs", (self.vpc.cidr,))

    @property
    def leaf_lifetime_days(self) -> int:
        """The leaf lifetime in whole days, rounded up: what the CA must still outlive."""
        return math.ceil((self.leaf_lifetime_hours or 0) / 24)

    def _check_rotation_hours(self, lifetime: int) -> None:
        where = self._at("rotationHours")
        if self.rotation_hours is None:
            object.__setattr__(self, "rotation_hours", default_rotation_hours(lifetime))
            return
        try:
            hours = check_rotation_hours(self.rotation_hours)
        except ValueError as error:
            where.fail(str(error))
        if not renews_before_half_life(hours, lifetime):
            where.fail(
                f"{hours} is too slow for leafLifetimeHours {lifetime}: a rotation every {hours} hours "
                f"(within a {ROTATION_WINDOW_HOURS}-hour window) must renew a leaf before half its life; "
                f"use at most {longest_rotation_hours(lifetime)}, or leave it out"
            )

    def _check_ca_rollover_start(self, lifetime: int) -> None:
        wait, days = self.ca_rollover_wait_days, self.leaf_lifetime_days
        if self.ca_rollover_start_days is None:
            object.__setattr__(self, "ca_rollover_start_days", names.CA_EXPIRY_ALARM_DAYS + 5 * wait + days)
        where = self._at("caRolloverStartDays")
        start = where.whole_number(self.ca_rollover_start_days, 1, names.CA_LIFETIME_DAYS - 1)
        outlive, before_alarm = days + 3 * wait + 1, names.CA_EXPIRY_ALARM_DAYS + 4 * wait + 1
        if start < outlive:
            where.fail(
                f"{start} is too late: a rollover takes up to 3 x caRolloverWaitDays ({3 * wait}) before "
                f"the new CA issues, and the old one must still outlive a leaf of leafLifetimeHours "
                f"({lifetime}, {days} days); use at least {max(outlive, before_alarm)}"
            )
        if start < before_alarm:
            where.fail(
                f"{start} is too late: a rollover takes up to 4 x caRolloverWaitDays ({4 * wait}) to "
                f"retire the old CA, which pages once it has fewer than {names.CA_EXPIRY_ALARM_DAYS} days "
                f"left; use at least {max(outlive, before_alarm)}"
            )

    def _complete_service_settings(self) -> None:
        """Every declared service gets an image, a count and a size (the environment's, else the declared
        one, else the default); a key naming an undeclared service is refused."""
        declared = self.services.names
        for key, values in (
            ("images", self.images),
            ("desiredCounts", self.desired_counts),
            ("taskSizes", self.task_sizes),
            ("routePolicies", self.route_policies),
        ):
            allowed = self.services.servers if key == "routePolicies" else declared
            unknown = sorted(set(values) - set(allowed))
            if unknown:
                (self._at(key) / unknown[0]).fail(
                    f"is not a declared {'server' if key == 'routePolicies' else 'service'}; "
                    f"expected {', '.join(allowed)} ({CDK_CONTEXT_KEY})"
                )
        images = {svc: self.services.image(svc, self.images, self._at("images")) for svc in declared}
        counts = {svc: self.services.desired_count(svc, self.desired_counts) for svc in declared}
        sizes = {svc: self.services.task_size(svc, self.task_sizes) for svc in declared}
        object.__setattr__(self, "images", MappingProxyType(images))
        object.__setattr__(self, "desired_counts", MappingProxyType(counts))
        object.__setattr__(self, "task_sizes", MappingProxyType(sizes))

    def _policy_identities(self, server: str) -> tuple[tuple[str, ...], str]:
        """The identities a route policy of `server` may name, and where they come from (for the message).

        A declared mTLS server (not MLflow) identifies exactly its declared callers, whatever serviceScopes
        says (the stacks do not give it HOKUSAI_MTLS_SERVICE_SCOPES); MLflow and the api identify the
        services of serviceScopes when it is set, else their callers (the api: every caller of any server).
        """
        catalog = self.catalog
        declaration = catalog.service(server)
        ours = server in (names.MLFLOW_SERVICE, names.API_SERVICE)
        if ours and self.service_scopes is not None:
            return tuple(self.service_scopes), "the services of serviceScopes"
        if declaration.serves_mtls:
            callers = tuple(_identity_name(catalog, caller) for caller in declaration.callers)
            return callers, f"the callers {CDK_CONTEXT_KEY}.{server} declares"
        callers = tuple(identity.name for identity in catalog.client_identities)
        return callers, "the services that call a server; serviceScopes names others"

    @property
    def catalog(self) -> Catalog:
        """The runtime's view of the declared services (HOKUSAI_MTLS_SERVICES of every container)."""
        return self.services.catalog

    def _check_api_key_store(self) -> None:
        """The store's URL secret is the api's alone: no other secret of the settings may be it."""
        if self.api_key_store is None:
            return
        url_secret = self.api_key_store.url_secret_name
        where = self._at("apiKeyStore") / "urlSecretName"
        if url_secret == self.mlflow.backend_store_secret_name:
            where.fail(
                "is mlflow.backendStoreSecretName: the key store needs a secret of its own "
                "(the api's execution role would read MLflow's database password)"
            )
        if url_secret == self.redis_url_secret_name:
            where.fail(
                "is redisUrlSecretName: the key store needs a secret of its own "
                "(mlflow's execution role reads the Redis URL secret, and so would read the store's password)"
            )

    @property
    def retain(self) -> bool:
        return self.removal_policy == "retain"

    @property
    def mtls_enabled(self) -> bool:
        """ENABLE_MTLS_AUTH: false only in mode `off` (the rollback switch)."""
        return self.mtls_mode != names.MTLS_MODE_OFF

    @property
    def creates_network(self) -> bool:
        """Whether anything of the network (VPC, cluster, namespace) is created rather than imported."""
        return isinstance(self.vpc, CreateVpc) or self.cluster is None or self.namespace is None

    @property
    def stage_name(self) -> str:
        return f"Hokusai-{self.environment}"

    def _at(self, key: str) -> Where:
        return Where(f"{CONTEXT_KEY}.{self.environment}.{key}")

    @classmethod
    def from_context(
        cls, environment: str, raw: object, services: DeclaredServices = DEFAULT_DECLARED
    ) -> EnvironmentSettings:
        """Build from one entry of cdk.json's `hokusai:environments` (camelCase keys), for `services`."""
        where = Where(f"{CONTEXT_KEY}.{environment}")
        if isinstance(raw, Mapping):
            for key in raw:
                if key in _RETIRED:
                    (where / key).fail(_RETIRED[key])
        raw = where.mapping(raw, allowed=(*_KEYS, *_SERVICE_KEYS), required=_REQUIRED)
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key in _SERVICE_KEYS:
                field_name, parse_for_services = _SERVICE_KEYS[key]
                values[field_name] = parse_for_services(value, where / key, services)
            else:
                field_name, parse = _KEYS[key]
                values[field_name] = parse(value, where / key, environment)
        return cls(environment=environment, services=services, **values)


def _identity_name(catalog: Catalog, service: str) -> str:
    identity = catalog.identity_of(service)
    if identity is None:  # a caller always calls, so it has a certificate
        raise SettingsError(f"{CDK_CONTEXT_KEY}.{service}: a caller without a certificate")
    return identity.name


def load_settings(
    raw: object, services: DeclaredServices = DEFAULT_DECLARED
) -> dict[str, EnvironmentSettings]:
    """Every declared environment's settings for `services` (`load_services`), in cdk.json's order.

    `raw` is the value of the context key (None when cdk.json does not have it). Any valid name is an
    environment (`qa`, `sandbox-alice`): environments are data; at least one is declared.
    """
    if raw is None:
        raise SettingsError(f"{CONTEXT_KEY}: missing from the CDK context (cdk.json)")
    if not isinstance(raw, Mapping):
        raise SettingsError(f"{CONTEXT_KEY}: expected an object, got {type(raw).__name__}")
    for environment in raw:
        try:
            names.check_environment(environment)
        except ValueError as error:
            raise SettingsError(f"{CONTEXT_KEY}.{environment}: {error}") from None
    if not raw:
        raise SettingsError(f"{CONTEXT_KEY}: declares no environment")
    return {env: EnvironmentSettings.from_context(env, raw[env], services) for env in raw}


def load_services(raw: object) -> DeclaredServices:
    """cdk.json's `hokusai:services` (missing: our three), read by the runtime's own parser
    (`runtime.service_catalog`) plus the stacks' own fields and checks (`stacks.settings_declared`)."""
    return parse_declared_services(raw)
