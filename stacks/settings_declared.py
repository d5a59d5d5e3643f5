"""cdk.json's `hokusai:services` as the stacks read it: the runtime's catalog plus what only the stacks need.

The runtime's parser (`runtime.service_catalog.parse_catalog`) reads who serves, who calls whom and which
identities exist, so synth and the containers (HOKUSAI_MTLS_SERVICES) cannot read the declaration
differently. The stacks add, per service, its `image`, `desiredCount` and `taskSize`, which an
environment's `images`, `desiredCounts` and `taskSizes` override; and they refuse what they cannot build:

- mlflow, api and worker stay as declared by default (their stores, ALB and logical IDs are ours);
  mlflow's `callers` may grow, since any declared service may call MLflow;
- every other service has a certificate: it serves mTLS, or some server lists it as a caller (a service
  with neither is not ours to build);
- nobody lists mlflow as a caller (its leaf is a server's: it calls no one);
- an mTLS server's health port (`port + 1`, as `hokusai-mtls serve --app` uses) is a port too.

Pure Python, no aws-cdk-lib.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from runtime import names
from runtime.service_catalog import CDK_CONTEXT_KEY, DEFAULT_CATALOG, FIELDS, Catalog, parse_catalog
from stacks.settings_checks import SettingsError, Where
from stacks.settings_services import (
    DEFAULT_TASK_SIZES,
    GENERIC_TASK_SIZE,
    MAX_DESIRED_COUNT,
    SERVICES,
    ImageSource,
    TaskSize,
    parse_image,
    parse_task_size,
)

STACK_FIELDS = ("image", "desiredCount", "taskSize")
"""The fields of a `hokusai:services` entry that only the stacks read."""
DEFAULT_DESIRED_COUNT = 1


@dataclass(frozen=True, kw_only=True)
class DeclaredServices:
    """The platform's services: the runtime's `catalog`, and per service what `hokusai:services` says of
    its image, count and size (an environment's settings override each)."""

    catalog: Catalog = DEFAULT_CATALOG
    images: Mapping[str, ImageSource] = field(default_factory=lambda: MappingProxyType({}))
    desired_counts: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    task_sizes: Mapping[str, TaskSize] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def names(self) -> tuple[str, ...]:
        return self.catalog.service_names

    @property
    def servers(self) -> tuple[str, ...]:
        """The services that serve (mTLS or behind the proxy): the ones a route policy may be for."""
        return tuple(service.name for service in self.catalog.services if service.serves)

    @property
    def extra(self) -> tuple[str, ...]:
        """The declared services other than our three, in declaration order."""
        return tuple(name for name in self.names if name not in SERVICES)

    def image(self, service: str, overrides: Mapping[str, ImageSource], where: Where) -> ImageSource:
        """The environment's image for `service`, else the declared one, else our Dockerfile."""
        if service in overrides:
            return overrides[service]
        if service in self.images:
            return self.images[service]
        if service in SERVICES:
            return ImageSource.default_for(service)
        (where / service).fail(
            f"{service} has no image: give it one here or in {CDK_CONTEXT_KEY}.{service}.image "
            '({"uri": "registry/repository:tag"} or {"dockerfile": "docker/..."})'
        )

    def desired_count(self, service: str, overrides: Mapping[str, int]) -> int:
        return overrides.get(service, self.desired_counts.get(service, DEFAULT_DESIRED_COUNT))

    def task_size(self, service: str, overrides: Mapping[str, TaskSize]) -> TaskSize:
        if service in overrides:
            return overrides[service]
        if service in self.task_sizes:
            return self.task_sizes[service]
        return DEFAULT_TASK_SIZES.get(service, GENERIC_TASK_SIZE)


DEFAULT_DECLARED = DeclaredServices()


def parse_declared_services(raw: object) -> DeclaredServices:
    """`hokusai:services` (None: our three). Every problem is a SettingsError naming the service and field."""
    if raw is None:
        return DEFAULT_DECLARED
    where = Where(CDK_CONTEXT_KEY)
    try:
        catalog = parse_catalog(raw, where=CDK_CONTEXT_KEY)
    except ValueError as error:
        raise SettingsError(str(error)) from None
    if not isinstance(raw, Mapping):  # parse_catalog refused anything else
        where.fail("expected an object of services")
    images, counts, sizes = {}, {}, {}
    for name, fields in raw.items():
        at = where / name
        unknown = sorted(set(fields) - FIELDS - set(STACK_FIELDS))
        if unknown:
            (at / unknown[0]).fail(f"unknown field; expected {', '.join(sorted(FIELDS | set(STACK_FIELDS)))}")
        if "image" in fields:
            images[name] = parse_image(fields["image"], at / "image")
        if "desiredCount" in fields:
            counts[name] = (at / "desiredCount").whole_number(fields["desiredCount"], 0, MAX_DESIRED_COUNT)
        if "taskSize" in fields:
            sizes[name] = parse_task_size(fields["taskSize"], at / "taskSize", service=name)
    _check_buildable(catalog)
    return DeclaredServices(
        catalog=catalog,
        images=MappingProxyType(images),
        desired_counts=MappingProxyType(counts),
        task_sizes=MappingProxyType(sizes),
    )


def _check_buildable(catalog: Catalog) -> None:
    """What the stacks can build (the module's docstring)."""
    where = Where(CDK_CONTEXT_KEY)
    for default in DEFAULT_CATALOG.services:
        if default.name not in catalog.service_names:
            (where / default.name).fail(
                "missing: the stacks build mlflow, api and worker; declare them as by default"
            )
        declared = catalog.service(default.name)
        expected = default
        if default.name == names.MLFLOW_SERVICE:
            if not set(default.callers) <= set(declared.callers):
                (where / default.name / "callers").fail(
                    f"must keep {', '.join(default.callers)} (other services may be added)"
                )
            expected = replace(default, callers=declared.callers)
        if declared != expected:
            (where / default.name).fail(
                f"declares {declared.as_document()}; the stacks build it as {expected.as_document()}"
                + (" (only its callers may grow)" if default.name == names.MLFLOW_SERVICE else "")
            )
    mlflow = catalog.by_runtime("mlflow")
    if mlflow is None:  # parse_catalog requires exactly one
        where.fail("declares no MLflow (runtime: mlflow)")
    calling_mlflow = catalog.calls(mlflow.name)
    if calling_mlflow:
        (where / calling_mlflow[0] / "callers").fail(
            f"lists {mlflow.name}: MLflow's certificate is a server's, it calls no one"
        )
    for name in catalog.service_names:
        if name in SERVICES:
            continue
        service = catalog.service(name)
        if catalog.identity_of(name) is None:
            (where / name).fail(
                "neither serves mtls nor is a caller of any server: it has no certificate, so there is "
                "nothing mTLS to build for it (declare serves: mtls, or list it in a server's callers)"
            )
        if service.serves_mtls and service.port is not None and service.port >= 65535:
            (where / name / "port").fail(
                f"{service.port}: an mTLS server's health port is port + 1, so at most 65534"
            )
