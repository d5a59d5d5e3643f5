"""The contract shared by the CDK stacks and the containers: names defined once.

Secret names, environment variables, file names and identities are read by both
sides (the stacks grant and inject them, the runtime fetches and writes them).
They live here, and the stacks import them, so the two cannot drift apart.
This module imports nothing outside the standard library on purpose: the CDK
app imports it without the runtime's dependencies.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass

ENVIRONMENTS: tuple[str, ...] = ("development", "staging", "production")
"""The environments cdk.json declares by default. Any name `check_environment` accepts may be declared
(`qa`, `sandbox-alice`): an environment is data, not one of these."""

DEGRADABLE_ENVIRONMENTS: frozenset[str] = frozenset({"development"})
"""Where HOKUSAI_MTLS_MAY_DEGRADE defaults to true when it is unset (a developer's own shell or compose
file); the CDK stacks always set it, from the environment's `mayDegrade` setting."""

ENVIRONMENT_NAME = re.compile(r"[a-z][a-z0-9-]{0,22}[a-z0-9]|[a-z]")
"""An environment's name: it is a DNS label of `hokusai-<env>.local`, a SPIFFE path segment, a path
segment of every secret name and part of the stacks' names (so 1-24 characters, lower case)."""
SERVICE_NAME = re.compile(r"[a-z][a-z0-9-]{0,30}[a-z0-9]|[a-z]")
"""A declared service's (and identity's) name: the Cloud Map name `<service>.hokusai-<env>.local`, the
SPIFFE ID's last segment, part of `<identity>-identity` and of the stacks' resource names."""

CA_LIFETIME_DAYS = 5 * 365
"""Lifetime of a CA we make (first issuance, rollover); the stacks check rollover settings against it."""
SHORT_LEAF_LIFETIME_HOURS = 24
"""The leaf lifetime of every environment but development when none is given: Istio's, Linkerd's and
step-ca's; rotation renews a leaf before half of it has passed."""
DEVELOPMENT_LEAF_LIFETIME_HOURS = 365 * 24
"""A year for development's leaves when none is given: a developer's local set (`make local`)."""


def default_leaf_lifetime_hours(environment: str) -> int:
    """The lifetime of a leaf issued in `environment` when none is given."""
    return DEVELOPMENT_LEAF_LIFETIME_HOURS if environment == "development" else SHORT_LEAF_LIFETIME_HOURS


CA_EXPIRY_ALARM_DAYS = 60
"""The CA alarm fires when the trust bundle's first CA to expire has fewer days left; the automatic
rollover's start is checked to finish before it."""

# --- environment variables -------------------------------------------------------
ENV_ENVIRONMENT = "ENVIRONMENT"
ENV_ENABLE_MTLS = "ENABLE_MTLS_AUTH"
"""`false` is the rollback switch: no certificates, plain HTTP, API-key path only."""
ENV_MAY_DEGRADE = "HOKUSAI_MTLS_MAY_DEGRADE"
"""`true`: this environment may degrade at start-up (a local development CA, TLS only, plain HTTP), loudly;
`false`: it fails closed. Unset: true only for `DEGRADABLE_ENVIRONMENTS` (`may_degrade`)."""
ENV_SERVICES = "HOKUSAI_MTLS_SERVICES"
"""The platform's services (cdk.json's `hokusai:services`, compact JSON, `runtime.service_catalog`): which
identities exist, which serve and who may call them. The stacks write it into every container and Lambda;
unset: our three (mlflow, api, worker)."""
ENV_PORT = "HOKUSAI_MTLS_PORT"
"""The port `hokusai-mtls serve --app` listens on (mTLS; default 8443): a declared server's `port`."""
ENV_HEALTH_PORT = "HOKUSAI_MTLS_HEALTH_PORT"
"""The loopback plain-HTTP health port of `hokusai-mtls serve --app` (default: its port + 1)."""
ENV_ROLE = "HOKUSAI_MTLS_ROLE"
ENV_CERT_DIR = "HOKUSAI_MTLS_CERT_DIR"
ENV_DEV_CA_DIR = "HOKUSAI_MTLS_DEV_CA_DIR"
ENV_CA_BUNDLE_SECRET = "HOKUSAI_MTLS_CA_BUNDLE_SECRET"
ENV_IDENTITY_SECRET = "HOKUSAI_MTLS_IDENTITY_SECRET"
ENV_INTERNAL_CIDRS = "HOKUSAI_MTLS_INTERNAL_CIDRS"
"""Comma-separated CIDRs whose callers count as internal (the VPC): for metrics and paths, never identity."""
ENV_TRUSTED_PROXY_CIDRS = "HOKUSAI_MTLS_TRUSTED_PROXY_CIDRS"
"""Comma-separated CIDRs of our proxies (the ALB): only their X-Forwarded-* headers are read."""
ENV_PROXY_KIND = "HOKUSAI_MTLS_PROXY_KIND"
"""Which proxy in `HOKUSAI_MTLS_TRUSTED_PROXY_CIDRS` forwards client certificates, so which ONE header
is read (the others are stripped): `none` (default: no forwarded certificate is ever believed),
`alb` (an ALB in mutual-TLS verify mode: `X-Amzn-Mtls-Clientcert-Leaf`), `envoy` (Envoy with
`forward_client_cert_details: SANITIZE_SET`: `X-Forwarded-Client-Cert`)."""
PROXY_KIND_NONE = "none"
PROXY_KIND_ALB = "alb"
PROXY_KIND_ENVOY = "envoy"
PROXY_KINDS: tuple[str, ...] = (PROXY_KIND_NONE, PROXY_KIND_ALB, PROXY_KIND_ENVOY)
ENV_CORS_ALLOWED_ORIGINS = "HOKUSAI_MTLS_CORS_ALLOWED_ORIGINS"
"""Comma-separated origins (`https://ui.example.com`) whose CORS preflights are answered at the edge;
unset: none (a preflight is refused, never forwarded)."""
ENV_CN_FALLBACK = "HOKUSAI_MTLS_CN_FALLBACK"
"""`true`: a certificate with no SPIFFE URI SAN (an imported CA's) is identified by a CN of the form
`<service>.hokusai-<env>.local`; default `false`: the SPIFFE ID is the only identity."""
ENV_AUTH_SERVICE_URL = "AUTH_SERVICE_URL"
"""The external auth service that validates API keys (the API-key path); unset: no API-key path."""
ENV_KEY_STORE_URL = "HOKUSAI_MTLS_KEY_STORE_URL"
"""Our API-key store's database (`sqlite:///PATH` or `postgresql://...`; in ECS from a secret): set, the
API-key path validates against it instead of AUTH_SERVICE_URL (`runtime.auth.key_store_backend`)."""
ENV_KEY_HASH_SECRET = "HOKUSAI_MTLS_KEY_HASH_SECRET"
"""The secret keys are hashed under (HMAC-SHA256, at least 32 bytes; base64 or text; from Secrets Manager)."""
API_KEYS_SECRET_PREFIX_TEMPLATE = "hokusai/{environment}/api-keys/"
"""Where the CDK stacks create the API-key store's secrets; like the certificates' prefix, no setting may name
an existing secret under it (and no grant names it with a wildcard)."""
KEY_HASH_SECRET = "hash-secret"
"""The hashing secret's name under `API_KEYS_SECRET_PREFIX_TEMPLATE`: generated by the Secrets stack, never
rotated or deleted (every stored key is a hash under it), injected into the api as HOKUSAI_MTLS_KEY_HASH_SECRET."""


def api_keys_secret_prefix(environment: str) -> str:
    """`hokusai/<env>/api-keys/`."""
    return API_KEYS_SECRET_PREFIX_TEMPLATE.format(environment=check_environment(environment))


def key_hash_secret_name(environment: str) -> str:
    """`hokusai/<env>/api-keys/hash-secret`: the Secrets Manager secret of HOKUSAI_MTLS_KEY_HASH_SECRET."""
    return api_keys_secret_prefix(environment) + KEY_HASH_SECRET


ENV_ROUTE_POLICY = "HOKUSAI_MTLS_ROUTE_POLICY"
"""JSON: which identities may call which methods and paths of this server, `enforce` or `audit`
(`runtime.auth.route_policy`); unset: every accepted identity reaches every route."""
ENV_KEY_USAGE = "HOKUSAI_MTLS_KEY_USAGE"
"""`on` (default, with a key store) or `off`: record every API-key request in `api_key_usage`
(`runtime.keys.usage`, a bounded background writer)."""
ENV_KEY_USAGE_RETENTION_DAYS = "HOKUSAI_MTLS_KEY_USAGE_RETENTION_DAYS"
"""How many days of API-key usage the store keeps (default 90); older rows are deleted in batches."""
ENV_REDIS_URL = "REDIS_URL"
"""Redis for the API-key cache and rate limit, shared by instances; unset: in-memory."""
ENV_REDIS_MAX_CONNECTIONS = "HOKUSAI_MTLS_REDIS_MAX_CONNECTIONS"
"""The most connections (default 32) one process opens to Redis: the key cache and the rate limiter
share one pool (`runtime.auth.redis_client`); a request waits briefly for a free one, then skips Redis."""
ENV_SERVICE_SCOPES = "HOKUSAI_MTLS_SERVICE_SCOPES"
"""JSON object service -> list of scopes, e.g. {"api": ["mlflow:read", "mlflow:write"]}; unset: the
runtime's default (`runtime.auth.peer_identity.DEFAULT_SERVICE_SCOPES`)."""
ENV_REFRESH_SECONDS = "HOKUSAI_MTLS_REFRESH_SECONDS"
"""How often (default 300 s) the servers and the API re-load their certificates from Secrets Manager."""
ENV_SECRETS_BUDGET_SECONDS = "HOKUSAI_MTLS_SECRETS_BUDGET_SECONDS"
"""The most time (default 30 s) one load or refresh may spend reading Secrets Manager, every retry
included; then it fails (start-up: `load-failed` in staging/production) well inside ECS's 60 s
health-check grace, instead of after 15 s x 5 attempts x 2 secrets."""
ENV_METRICS_SECONDS = "HOKUSAI_MTLS_METRICS_SECONDS"
"""How often (default 60 s) serve-mlflow and serve-api write their aggregated EMF metric lines; they
write the last interval's at shutdown too (`runtime.observability.metrics.interval_from_environ` reads it)."""
ENV_SECURITY_LEVEL = "HOKUSAI_MTLS_SECURITY_LEVEL"
"""Exported by the loader so the serving process can report what it runs with."""

# Connection timeouts and bounds of every listener serve-mlflow and serve-api run
# (`runtime.serving.connection_limits` reads, checks and documents them; defaults there).
ENV_HEADER_TIMEOUT_SECONDS = "HOKUSAI_MTLS_HEADER_TIMEOUT_SECONDS"
"""Total time a request's line and headers may take, from the connection (or its first byte on a
reused connection) until the end of the headers; trickled bytes do not extend it."""
ENV_BODY_IDLE_TIMEOUT_SECONDS = "HOKUSAI_MTLS_BODY_IDLE_TIMEOUT_SECONDS"
"""While a request body is being read (or a response written), the longest pause without progress."""
ENV_KEEPALIVE_TIMEOUT_SECONDS = "HOKUSAI_MTLS_KEEPALIVE_TIMEOUT_SECONDS"
"""How long an idle keep-alive connection is kept after a response."""
ENV_HANDSHAKE_TIMEOUT_SECONDS = "HOKUSAI_MTLS_HANDSHAKE_TIMEOUT_SECONDS"
"""How long a TLS handshake may take from the accepted connection."""
ENV_MAX_CONNECTIONS = "HOKUSAI_MTLS_MAX_CONNECTIONS"
"""The most connections (pending handshakes included) each listener holds; more are closed at once."""
ENV_LOG_LEVEL = "HOKUSAI_MTLS_LOG_LEVEL"
"""DEBUG, INFO (default), WARNING or ERROR for every command; `--log-level` and `-q` win over it.
Worker processes get their supervisor's level through it."""
MAX_WORKERS = 64
"""The most worker processes one task runs (the runtime refuses more, and so does synth)."""
ENV_WORKERS = "HOKUSAI_MTLS_WORKERS"
"""How many worker processes serve-mlflow and serve-api run on their one port (default: the CPUs the
task has, `runtime.serving.workers.worker_count`); the CDK stacks set it from the task's cpu setting."""

# The only two TLS variables the MLflow client knows (docs/DESIGN.md: there is no KEY_PATH).
ENV_MLFLOW_CLIENT_CERT = "MLFLOW_TRACKING_CLIENT_CERT_PATH"
"""requests' `cert=`: ONE PEM file holding the certificate AND its unencrypted key."""
ENV_MLFLOW_SERVER_CERT = "MLFLOW_TRACKING_SERVER_CERT_PATH"
"""requests' `verify=`: the CA bundle that signs the MLflow server's certificate."""
ENV_MLFLOW_INSECURE_TLS = "MLFLOW_TRACKING_INSECURE_TLS"
"""Disables verification in MLflow's client: the loader always unsets it."""

# MLflow server options read from the environment (`mlflow server`'s click `envvar=`s).
ENV_MLFLOW_BACKEND_STORE_URI = "MLFLOW_BACKEND_STORE_URI"
"""The tracking database URI; it holds a password, so ECS injects it from Secrets Manager."""
ENV_MLFLOW_ARTIFACTS_DESTINATION = "MLFLOW_ARTIFACTS_DESTINATION"
"""Where the server's proxied artifacts go (`s3://bucket/prefix`)."""
ENV_MLFLOW_ALLOWED_HOSTS = "MLFLOW_SERVER_ALLOWED_HOSTS"
"""MLflow's DNS-rebinding guard: Host headers it serves. serve-mlflow always allows the Cloud Map
name (with any port), localhost and 127.0.0.1, plus the names in its certificate; hosts set here
are added to those."""
ENV_MLFLOW_JOB_EXECUTION = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"
"""MLflow's own switch for its jobs (UI judges, evaluations, prompt optimisation): `true` by default,
as under `mlflow server`, which starts MLflow's job runner; `false`: no runner, and the jobs API
refuses submissions (MLflow's answer under `mlflow server` with the same setting)."""
ENV_MLFLOW_S3_ENDPOINT_URL = "MLFLOW_S3_ENDPOINT_URL"
"""MLflow's S3 endpoint override for artifacts (tests point it at moto's S3; unset in ECS)."""

# The server side (our launcher passes these to uvicorn's --ssl-* options).
ENV_SERVER_CERT_FILE = "HOKUSAI_MTLS_SERVER_CERT_FILE"
ENV_SERVER_KEY_FILE = "HOKUSAI_MTLS_SERVER_KEY_FILE"
ENV_CA_BUNDLE_FILE = "HOKUSAI_MTLS_CA_BUNDLE_FILE"

# --- Secrets Manager -------------------------------------------------------------
SECRET_PREFIX_TEMPLATE = "hokusai/{environment}/mlflow/"
CA_BUNDLE_SECRET = "ca-cert"
"""PEM trust bundle; may hold several CAs during a rollover."""
CA_KEY_SECRET = "ca-key"
"""The issuing CA's certificate and private key; readable only by the issuer."""
CA_NEXT_SECRET = "ca-key-next"
"""The successor CA during a rollover (`hokusai-mtls certs rollover`): `begin` stores the new CA's
certificate and key here while the bundle in `ca-cert` trusts old and new; `switch` moves it into
`ca-key` and leaves a marker value (no CA) here. Readable only by the issuer, like `ca-key`."""
CA_REVOCATIONS_SECRET = "ca-crl"
"""The revocation lists (PEM `X509 CRL` blocks, one per CA that revoked something), signed by the CA
they speak for: written only by `hokusai-mtls certs revoke`, read by every identity that serves
(servers refuse a revoked client certificate); empty (no value yet) until the first revocation. Its
own secret, not part of `ca-cert`: a runtime that predates revocation reads the bundle unchanged."""
IDENTITY_SECRET_SUFFIX = "-identity"
"""Each identity's certificate and key live together in `<identity>-identity`."""

SECRET_TAG_PREFIX = "hokusai-mtls:"
SECRET_SCHEMA_VERSION = 1

# --- files written by the loader -------------------------------------------------
CA_BUNDLE_FILE = "ca.crt"
CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
COMBINED_PEM_FILE = "tls.pem"
"""Certificate followed by key, for MLflow's single `MLFLOW_TRACKING_CLIENT_CERT_PATH`."""
REVOCATIONS_FILE = "crl.pem"
"""A serving identity's verified revocation lists (`ca-crl`), possibly empty; part of its set."""

SERVER_CERT_DIR = "/etc/mlflow/certs"
CLIENT_CERT_DIR = "/tmp/mlflow-certs"  # noqa: S108 - the seed's path; the loader makes it 0700

# --- identities -------------------------------------------------------------------
TRUST_DOMAIN = "hokusai"

# --- ports and modes -------------------------------------------------------------------
MLFLOW_PORT = 5000
"""MLflow's port, `mlflow.hokusai-<env>.local:5000` in Cloud Map: mTLS (strict), mTLS and the old
plain HTTP told apart by the first byte (permissive), or plain HTTP (off)."""
MLFLOW_HEALTH_PORT = 5001
"""Plain HTTP on 127.0.0.1 inside the task: the container health check under strict mTLS."""
API_PORT = 8000
"""The API service's plain-HTTP port behind the ALB (external traffic, API-key path)."""

ENV_MTLS_MODE = "HOKUSAI_MTLS_MODE"
MTLS_MODE_STRICT = "strict"
"""Only the mTLS listener: a client certificate is required at the handshake."""
MTLS_MODE_PERMISSIVE = "permissive"
"""mTLS and the old plain HTTP side by side on the same port (zero-downtime migration)."""
MTLS_MODE_OFF = "off"
"""Rollback: ENABLE_MTLS_AUTH=false, plain HTTP, API-key path only."""
MTLS_MODES: tuple[str, ...] = (MTLS_MODE_STRICT, MTLS_MODE_PERMISSIVE, MTLS_MODE_OFF)


class Kind(enum.Enum):
    """What a certificate is for: it decides the extended key usage."""

    SERVER = "server"
    CLIENT = "client"

    BOTH = "server-and-client"
    """A service that serves mTLS and calls others: one leaf with both usages, its DNS name and SPIFFE ID."""


@dataclass(frozen=True)
class Identity:
    """A service that holds a certificate of its own."""

    name: str
    """Its secret is `<name>-identity`; the same as `service` except MLflow's historic `server`."""
    kind: Kind
    role: str
    """The `hokusai-mtls load-certs --role` value that loads this identity."""
    default_cert_dir: str
    service: str = ""
    """The declared service it is: the SPIFFE ID's last segment and, if it serves, its Cloud Map name.
    Empty means `name`."""

    def __post_init__(self) -> None:
        if not self.service:
            object.__setattr__(self, "service", self.name)

    @property
    def secret_suffix(self) -> str:
        return f"{self.name}{IDENTITY_SECRET_SUFFIX}"

    @property
    def serves(self) -> bool:
        """Its leaf is a server certificate (serverAuth, DNS name `<service>.hokusai-<env>.local`)."""
        return self.kind in (Kind.SERVER, Kind.BOTH)

    @property
    def calls(self) -> bool:
        """Its leaf is a client certificate (clientAuth): it calls a server of the platform."""
        return self.kind in (Kind.CLIENT, Kind.BOTH)

    def hostname(self, environment: str) -> str:
        """The Cloud Map name its callers dial (and its server certificate names)."""
        return f"{self.service}.{cloud_map_namespace(environment)}"

    def reads_revocations(self, proxy_kind: str = PROXY_KIND_NONE) -> bool:
        """Whether its tasks read `ca-crl`: they accept client certificates, on their own mTLS port
        (`serves`) or forwarded by a proxy (`proxy_kind`, HOKUSAI_MTLS_PROXY_KIND). The loader and the
        stacks' grants both ask this, so a task reads the lists exactly when it may."""
        return self.serves or proxy_kind != PROXY_KIND_NONE


SERVER = Identity("server", Kind.SERVER, "mlflow-server", SERVER_CERT_DIR, service="mlflow")
API = Identity("api", Kind.CLIENT, "api", CLIENT_CERT_DIR)
WORKER = Identity("worker", Kind.CLIENT, "worker", CLIENT_CERT_DIR)
IDENTITIES: tuple[Identity, ...] = (SERVER, API, WORKER)
"""Our three, the identities of the default declaration; a platform's own come from
`runtime.service_catalog` (cdk.json, HOKUSAI_MTLS_SERVICES)."""
CLIENT_IDENTITIES: tuple[Identity, ...] = tuple(i for i in IDENTITIES if i.kind is Kind.CLIENT)
ROLES: dict[str, Identity] = {i.role: i for i in IDENTITIES}


def check_environment(environment: str) -> str:
    """Return `environment` if it is a valid environment name, else raise ValueError saying why."""
    if not isinstance(environment, str) or not ENVIRONMENT_NAME.fullmatch(environment):
        raise ValueError(
            f"environment {environment!r} is not a valid name: 1-24 lower-case letters, digits and '-', "
            "starting with a letter (e.g. development, staging, production, qa)"
        )
    return environment


def may_degrade(environment: str, environ: Mapping[str, str]) -> bool:
    """Whether `environment` may degrade at start-up: HOKUSAI_MTLS_MAY_DEGRADE, else its default.

    A bad value is a ValueError naming the variable, never a guess (a typo must not open production).
    """
    value = environ.get(ENV_MAY_DEGRADE, "").strip().lower()
    if not value:
        return environment in DEGRADABLE_ENVIRONMENTS
    if value in ("true", "false"):
        return value == "true"
    raise ValueError(f"{ENV_MAY_DEGRADE}={environ[ENV_MAY_DEGRADE]!r} is not a boolean; use true or false")


def secret_prefix(environment: str) -> str:
    return SECRET_PREFIX_TEMPLATE.format(environment=check_environment(environment))


def secret_name(environment: str, suffix: str) -> str:
    """`hokusai/<env>/mlflow/<suffix>`, e.g. `secret_name("staging", CA_BUNDLE_SECRET)`."""
    return secret_prefix(environment) + suffix


def identity_secret_name(environment: str, identity: Identity) -> str:
    return secret_name(environment, identity.secret_suffix)


def identity_by_name(name: str) -> Identity:
    for identity in IDENTITIES:
        if identity.name == name:
            return identity
    raise ValueError(f"unknown identity {name!r}; expected one of {', '.join(i.name for i in IDENTITIES)}")


def identity_for_role(role: str) -> Identity:
    try:
        return ROLES[role]
    except KeyError:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}") from None


def spiffe_id(environment: str, service: str) -> str:
    """The URI SAN that names a service: `spiffe://hokusai/<env>/<service>`."""
    return f"spiffe://{TRUST_DOMAIN}/{check_environment(environment)}/{service}"


def mlflow_hostname(environment: str) -> str:
    """The Cloud Map name clients dial: `mlflow.hokusai-<env>.local`."""
    return SERVER.hostname(environment)


def cloud_map_namespace(environment: str) -> str:
    return f"hokusai-{check_environment(environment)}.local"


# --- metrics: what the middleware publishes and the CDK dashboard and alarms read -----
METRIC_NAMESPACE = "Hokusai/mTLS"
DIM_ENVIRONMENT = "Environment"
DIM_SERVICE = "Service"
"""The service that publishes: `mlflow` (the server side of internal calls) or `api`."""
DIM_IDENTITY = "Identity"
DIM_AUTH_PATH = "AuthPath"
DIM_REASON = "Reason"
"""Why a handshake failed (`HANDSHAKE_FAILURE_REASONS`): MtlsHandshakeFailures has it as a second view."""
AUTH_PATH_MTLS = "mtls"
AUTH_PATH_API_KEY = "api_key"
AUTH_PATHS: tuple[str, ...] = (AUTH_PATH_MTLS, AUTH_PATH_API_KEY)

METRIC_CERT_DAYS_TO_EXPIRY = "CertificateDaysToExpiry"
"""Gauge, dimensions (Environment, Identity): whole days until the identity's notAfter (the CA's alarm)."""
METRIC_CERT_HOURS_TO_EXPIRY = "CertificateHoursToExpiry"
"""Gauge, dimensions (Environment, Identity): hours (two decimals) until the notAfter of the identity's
leaf in its secret; the leaf alarms compare it with the lifetime (warn below 50 %, page below 25 %)."""
METRIC_CERT_CHECK_FAILURES = "CertificateCheckFailures"
"""Count, dimensions (Environment, Identity): 1 when the expiry check could not read, parse or verify
the identity's secret (or `ca` for the trust bundle), 0 when it could; an alarm on > 0 makes a broken
secret loud instead of a silent gap in CertificateDaysToExpiry."""
METRIC_AUTH_REQUESTS = "AuthenticatedRequests"
"""Count, dimensions (Environment, Service, AuthPath): requests let through, by path."""
METRIC_MTLS_HANDSHAKES = "MtlsHandshakes"
"""Count, dimensions (Environment, Service): TLS handshakes that verified a client certificate."""
METRIC_MTLS_HANDSHAKE_FAILURES = "MtlsHandshakeFailures"
HANDSHAKE_NO_CERTIFICATE = "no_certificate"
HANDSHAKE_UNKNOWN_CA = "unknown_ca"
HANDSHAKE_EXPIRED = "expired"
HANDSHAKE_NOT_YET_VALID = "not_yet_valid"
HANDSHAKE_WRONG_USAGE = "wrong_usage"
HANDSHAKE_REVOKED = "revoked"
HANDSHAKE_BAD_CERTIFICATE = "bad_certificate"
HANDSHAKE_PEER_ALERT = "peer_alert"
HANDSHAKE_PROTOCOL = "protocol"
HANDSHAKE_TIMEOUT = "timeout"
HANDSHAKE_RESET = "reset"
HANDSHAKE_FAILURE_REASONS: tuple[str, ...] = (
    HANDSHAKE_NO_CERTIFICATE,
    HANDSHAKE_UNKNOWN_CA,
    HANDSHAKE_EXPIRED,
    HANDSHAKE_NOT_YET_VALID,
    HANDSHAKE_WRONG_USAGE,
    HANDSHAKE_REVOKED,
    HANDSHAKE_BAD_CERTIFICATE,
    HANDSHAKE_PEER_ALERT,
    HANDSHAKE_PROTOCOL,
    HANDSHAKE_TIMEOUT,
    HANDSHAKE_RESET,
)
"""The `Reason` values of MtlsHandshakeFailures (`runtime.serving.handshake_failures.classify`)."""
"""Count, dimensions (Environment, Service): handshakes refused (no, foreign or expired certificate)."""
METRIC_INTERNAL_LATENCY = "InternalRequestLatency"
"""Milliseconds, dimensions (Environment, Service): latency of requests on the internal (mTLS) path."""
METRIC_INTERNAL_API_KEY_REQUESTS = "InternalApiKeyRequests"
"""Count, dimensions (Environment, Service): API-key requests from internal callers, i.e. a
service that should have used its certificate (the PRD's "fallback to API key" alarm)."""
METRIC_ROUTE_POLICY_DENIED = "RoutePolicyDenied"
"""Count, dimensions (Environment, Service): mTLS requests the route policy refused (403)."""
METRIC_ROUTE_POLICY_WOULD_DENY = "RoutePolicyWouldDeny"
"""Count, dimensions (Environment, Service): mTLS requests an `audit` route policy let through
that `enforce` would refuse (Istio's dry-run)."""
METRIC_PLAIN_PORT_REQUESTS = "PlainPortRequests"
"""Count, dimensions (Environment, Service): plain-HTTP requests in permissive mode (not yet migrated)."""

MLFLOW_SERVICE = "mlflow"
API_SERVICE = "api"
WORKER_SERVICE = "worker"
