"""The platform's services, declared as data (issue 15): who serves, who calls whom, which identities exist.

A platform team adds a service by declaring it in cdk.json's `hokusai:services`, not by editing our code.
The CDK app reads that declaration (and adds per environment what only it needs: images, counts, sizes);
the runtime reads the same document from HOKUSAI_MTLS_SERVICES, which the stacks write into every
container and lifecycle Lambda, so the loader, `certs issue`/`upload`/`rollover`, the rotation, issuance
and expiry Lambdas and the local stack all know the same identities. Unset, it is our three.

    "hokusai:services": {
      "mlflow": {"runtime": "mlflow", "serves": "mtls", "port": 5000, "callers": ["api", "worker"],
                 "identity": "server", "role": "mlflow-server"},
      "api":    {"runtime": "api", "serves": "proxied", "port": 8000},
      "worker": {},
      "document-converter": {"serves": "mtls", "port": 8443, "callers": ["api"]}
    }

- `serves`: `mtls` (an mTLS listener on `port`, Cloud Map name `<service>.hokusai-<env>.local`, which its
  server certificate names), `proxied` (plain HTTP on `port` behind the trusted proxy, the platform's ALB),
  or absent (it serves nothing).
- `callers`: the services that may call an `mtls` server. Only their security groups reach its port, and
  only their certificates' identities get through its middleware. A service *calls* when some server
  lists it; it then holds a client certificate (`serves: mtls` and calls: one leaf with both usages).
- `runtime`: `mlflow` or `api` for our own two servers (the stacks add their stores); absent for anyone
  else's service (an image of its own, `hokusai-mtls serve --app` or `hokusai-mtls run` inside).
- `identity` and `role`: the identity's secret name (`<identity>-identity`) and the loader's `--role`;
  both default to the service's name (MLflow's are `server` and `mlflow-server`, as deployed).

Every mistake is a ValueError naming the service and the field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from runtime import json_input, names

CDK_CONTEXT_KEY = "hokusai:services"
"""Where cdk.json declares the services (its `context`)."""
SERVES_MTLS = "mtls"
SERVES_PROXIED = "proxied"
SERVES: tuple[str, ...] = (SERVES_MTLS, SERVES_PROXIED)
RUNTIME_MLFLOW = "mlflow"
RUNTIME_API = "api"
RUNTIMES: tuple[str, ...] = (RUNTIME_MLFLOW, RUNTIME_API)
MAX_SERVICES = 40
MAX_DOCUMENT_CHARS = 16 * 1024
"""The most characters of HOKUSAI_MTLS_SERVICES: it is a container variable (ECS: 64 KiB for all)."""
FIELDS = frozenset({"serves", "port", "callers", "runtime", "identity", "role"})
"""The fields the runtime reads; the CDK settings add their own (`image`, `desiredCount`, ...)."""
GENERIC_SERVER_CERT_DIR = "/etc/hokusai-mtls/certs"
"""Where a declared server's (not MLflow's) certificates are written in its container."""


@dataclass(frozen=True)
class ServiceDeclaration:
    """One declared service, as the runtime needs it."""

    name: str
    serves: str | None = None
    port: int | None = None
    callers: tuple[str, ...] = ()
    runtime: str | None = None
    identity_name: str = ""
    role: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "identity_name", self.identity_name or self.name)
        object.__setattr__(self, "role", self.role or self.name)

    @property
    def serves_mtls(self) -> bool:
        return self.serves == SERVES_MTLS

    def as_document(self) -> dict:
        """The declaration's JSON form (only what differs from the defaults)."""
        document: dict = {}
        if self.runtime:
            document["runtime"] = self.runtime
        if self.serves:
            document["serves"], document["port"] = self.serves, self.port
        if self.callers:
            document["callers"] = list(self.callers)
        if self.identity_name != self.name:
            document["identity"] = self.identity_name
        if self.role != self.name:
            document["role"] = self.role
        return document


@dataclass(frozen=True)
class Catalog:
    """The declared services and the identities they make; lookups name the choices when they fail."""

    services: tuple[ServiceDeclaration, ...]

    def __post_init__(self) -> None:
        _check(self)

    # --- services ---------------------------------------------------------------------
    @property
    def service_names(self) -> tuple[str, ...]:
        return tuple(service.name for service in self.services)

    def service(self, name: str) -> ServiceDeclaration:
        for service in self.services:
            if service.name == name:
                return service
        raise ValueError(f"unknown service {name!r}; declared: {', '.join(self.service_names)}")

    def by_runtime(self, runtime: str) -> ServiceDeclaration | None:
        """Our MLflow (`mlflow`) or API (`api`) service, if declared."""
        return next((service for service in self.services if service.runtime == runtime), None)

    def calls(self, name: str) -> tuple[str, ...]:
        """The servers whose `callers` list `name`, in declaration order."""
        return tuple(service.name for service in self.services if name in service.callers)

    def mtls_servers(self) -> tuple[ServiceDeclaration, ...]:
        return tuple(service for service in self.services if service.serves_mtls)

    # --- identities -------------------------------------------------------------------
    def identity_of(self, service: str) -> names.Identity | None:
        """The identity `service` runs as, or None when it neither serves mTLS nor calls anyone."""
        declaration = self.service(service)
        serves, calls = declaration.serves_mtls, bool(self.calls(service))
        if not (serves or calls):
            return None
        kind = names.Kind.BOTH if serves and calls else names.Kind.SERVER if serves else names.Kind.CLIENT
        if declaration.runtime == RUNTIME_MLFLOW:
            directory = names.SERVER_CERT_DIR
        else:
            directory = GENERIC_SERVER_CERT_DIR if serves else names.CLIENT_CERT_DIR
        return names.Identity(declaration.identity_name, kind, declaration.role, directory, service=service)

    @property
    def identities(self) -> tuple[names.Identity, ...]:
        """Every identity with a certificate, in declaration order."""
        found = (self.identity_of(service.name) for service in self.services)
        return tuple(identity for identity in found if identity is not None)

    @property
    def client_identities(self) -> tuple[names.Identity, ...]:
        return tuple(identity for identity in self.identities if identity.calls)

    def identity_by_name(self, name: str) -> names.Identity:
        for identity in self.identities:
            if identity.name == name:
                return identity
        choices = ", ".join(identity.name for identity in self.identities)
        raise ValueError(f"unknown identity {name!r}; expected one of {choices}")

    def identity_for_role(self, role: str) -> names.Identity:
        for identity in self.identities:
            if identity.role == role:
                return identity
        choices = ", ".join(identity.role for identity in self.identities)
        raise ValueError(f"unknown role {role!r}; expected one of {choices}")

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(identity.role for identity in self.identities)

    # --- the environment variable -----------------------------------------------------------
    def to_json(self) -> str:
        """HOKUSAI_MTLS_SERVICES: compact JSON `parse_catalog` reads back to an equal catalog."""
        document = {service.name: service.as_document() for service in self.services}
        return json.dumps(document, separators=(",", ":"))


def parse_catalog(document: object, where: str = "hokusai:services") -> Catalog:
    """The catalog of a declaration (a mapping service name -> fields); fields the runtime does not read
    (the CDK's own) are ignored here: the settings check them."""
    if not isinstance(document, Mapping) or not document:
        raise ValueError(f'{where}: expected an object of services, e.g. {{"worker": {{}}}}')
    if len(document) > MAX_SERVICES:
        raise ValueError(f"{where}: {len(document)} services; at most {MAX_SERVICES}")
    services = []
    for name, fields in document.items():
        at = f"{where}.{name}"
        if not isinstance(name, str) or not names.SERVICE_NAME.fullmatch(name):
            raise ValueError(f"{where}: {name!r} is not a service name ({_NAME_RULE})")
        if not isinstance(fields, Mapping):
            raise ValueError(f"{at}: expected an object")
        serves = _choice(fields, "serves", SERVES, at)
        runtime = _choice(fields, "runtime", RUNTIMES, at)
        port = fields.get("port")
        if serves is None and port is not None:
            raise ValueError(f"{at}.port: only a service that serves has a port (set serves)")
        if serves is not None and (
            not isinstance(port, int) or isinstance(port, bool) or not 1024 <= port <= 65535
        ):
            raise ValueError(f"{at}.port: {port!r} is not a port number from 1024 to 65535")
        callers = fields.get("callers", [])
        if not isinstance(callers, list) or not all(isinstance(c, str) for c in callers):
            raise ValueError(f"{at}.callers: expected a list of service names")
        services.append(
            ServiceDeclaration(
                name=name,
                serves=serves,
                port=port,
                callers=tuple(callers),
                runtime=runtime,
                identity_name=_name(fields, "identity", at),
                role=_name(fields, "role", at),
            )
        )
    return Catalog(tuple(services))


def catalog_from_environ(environ: Mapping[str, str]) -> Catalog:
    """HOKUSAI_MTLS_SERVICES's catalog; unset, `DEFAULT_CATALOG`. A bad value names the variable."""
    text = environ.get(names.ENV_SERVICES, "").strip()
    if not text:
        return DEFAULT_CATALOG
    if len(text) > MAX_DOCUMENT_CHARS:
        raise ValueError(f"{names.ENV_SERVICES}: {len(text)} characters; at most {MAX_DOCUMENT_CHARS}")
    try:
        return parse_catalog(json_input.loads(text), where=names.ENV_SERVICES)
    except ValueError as exc:
        message = str(exc)
        raise ValueError(
            message if message.startswith(names.ENV_SERVICES) else f"{names.ENV_SERVICES}: {message}"
        ) from None


_NAME_RULE = "1-32 lower-case letters, digits and '-', starting with a letter"


def _choice(fields: Mapping, field: str, choices: tuple[str, ...], at: str) -> str | None:
    value = fields.get(field)
    if value is not None and value not in choices:
        raise ValueError(f"{at}.{field}: {value!r}; expected one of {', '.join(choices)}")
    return value


def _name(fields: Mapping, field: str, at: str) -> str:
    value = fields.get(field, "")
    if value != "" and (not isinstance(value, str) or not names.SERVICE_NAME.fullmatch(value)):
        raise ValueError(f"{at}.{field}: {value!r} is not a valid name ({_NAME_RULE})")
    return value


def _check(catalog: Catalog) -> None:
    """What makes a set of declarations a platform: unique names, callers that exist, one MLflow."""
    declared = catalog.service_names
    if len(set(declared)) != len(declared):
        raise ValueError("hokusai:services: a service is declared twice")
    for service in catalog.services:
        at = f"hokusai:services.{service.name}"
        if service.callers and not service.serves_mtls:
            raise ValueError(f"{at}.callers: only an mTLS server (serves: mtls) has callers")
        for caller in service.callers:
            if caller not in declared:
                raise ValueError(
                    f"{at}.callers: {caller!r} is not a declared service ({', '.join(declared)})"
                )
            if caller == service.name:
                raise ValueError(f"{at}.callers: a service does not call itself")
        if len(set(service.callers)) != len(service.callers):
            raise ValueError(f"{at}.callers: a caller is listed twice")
    for runtime in RUNTIMES:
        count = sum(service.runtime == runtime for service in catalog.services)
        if count != 1:
            raise ValueError(f"hokusai:services: exactly one service has runtime {runtime!r} (found {count})")
    mlflow, api = catalog.by_runtime(RUNTIME_MLFLOW), catalog.by_runtime(RUNTIME_API)
    if mlflow is not None and not mlflow.serves_mtls:
        raise ValueError(f"hokusai:services.{mlflow.name}.serves: MLflow serves mtls")
    if api is not None and api.serves != SERVES_PROXIED:
        raise ValueError(f"hokusai:services.{api.name}.serves: the API serves proxied (behind the ALB)")
    for attribute, label in (("identity_name", "identity"), ("role", "role")):
        values = [getattr(service, attribute) for service in catalog.services]
        if len(set(values)) != len(values):
            raise ValueError(f"hokusai:services: two services have the same {label}")


DEFAULT_CATALOG = parse_catalog(
    {
        names.MLFLOW_SERVICE: {
            "runtime": RUNTIME_MLFLOW,
            "serves": SERVES_MTLS,
            "port": names.MLFLOW_PORT,
            "callers": [names.API_SERVICE, names.WORKER_SERVICE],
            "identity": names.SERVER.name,
            "role": names.SERVER.role,
        },
        names.API_SERVICE: {"runtime": RUNTIME_API, "serves": SERVES_PROXIED, "port": names.API_PORT},
        names.WORKER_SERVICE: {},
    }
)
"""Our three: MLflow (mTLS, called by the API and the workers), the API (behind the ALB), the workers."""


def catalog_from_file(path: Path) -> Catalog:
    """The catalog of a JSON file: cdk.json (its context's `hokusai:services`) or a declaration itself.
    Every failure is a ValueError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        document = json_input.loads(text)
        if isinstance(document, Mapping) and isinstance(document.get("context"), Mapping):
            if CDK_CONTEXT_KEY not in document["context"]:
                raise ValueError(f"its context has no {CDK_CONTEXT_KEY}")
            return parse_catalog(document["context"][CDK_CONTEXT_KEY], where=CDK_CONTEXT_KEY)
        return parse_catalog(document, where=str(path))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
