"""Network settings: the VPC, the ECS cluster and the Cloud Map namespace, created or imported.

Imports are by attributes only (ids, ARNs, CIDRs written in cdk.json), so synthesis needs no
AWS credentials and no context lookups. Pure Python, no aws-cdk-lib.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from stacks.settings_checks import Where

CREATE = "create"
IMPORT = "import"

MIN_VPC_PREFIX, MAX_VPC_PREFIX = 16, 24
MAX_AZS = 6

_VPC_ID = re.compile(r"vpc-[0-9a-f]{8}(?:[0-9a-f]{9})?")
_SUBNET_ID = re.compile(r"subnet-[0-9a-f]{8}(?:[0-9a-f]{9})?")
_ROUTE_TABLE_ID = re.compile(r"rtb-[0-9a-f]{8}(?:[0-9a-f]{9})?")
_AVAILABILITY_ZONE = re.compile(r"[a-z]{2}(?:-[a-z]+)+-\d[a-z]")
_CLUSTER_NAME = re.compile(r"[A-Za-z0-9_-]{1,255}")
_NAMESPACE_ID = re.compile(r"ns-[a-z0-9]{16}")
_NAMESPACE_ARN = re.compile(r"arn:aws[a-z-]*:servicediscovery:[a-z0-9-]+:\d{12}:namespace/(ns-[a-z0-9]{16})")


@dataclass(frozen=True, kw_only=True)
class CreateVpc:
    """A new VPC: public subnets (NAT gateways only) and private subnets for the tasks, with flow logs."""

    cidr: str
    max_azs: int
    nat_gateways: int
    """At least 1: the tasks reach ECR, Secrets Manager and CloudWatch Logs through NAT (no VPC endpoints)."""


@dataclass(frozen=True, kw_only=True)
class ImportVpc:
    """An existing VPC, described by attributes (`Vpc.from_vpc_attributes`); its flow logs are its owner's."""

    vpc_id: str
    cidr: str
    availability_zones: tuple[str, ...]
    private_subnet_ids: tuple[str, ...]
    """Subnets with a route to the internet (NAT) or VPC endpoints; the tasks run here."""
    private_subnet_route_table_ids: tuple[str, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class ImportCluster:
    cluster_name: str


@dataclass(frozen=True, kw_only=True)
class ImportNamespace:
    """An existing private DNS namespace; its name must be `runtime.names.cloud_map_namespace(env)`."""

    namespace_id: str
    namespace_arn: str


def parse_vpc(raw: object, where: Where) -> CreateVpc | ImportVpc:
    how, body = where.one_of_keys(raw, (CREATE, IMPORT))
    where = where / how
    if how == CREATE:
        body = where.mapping(body, allowed=("cidr", "maxAzs", "natGateways"), required=("cidr",))
        cidr = (where / "cidr").cidr(body["cidr"])
        prefix = int(cidr.split("/")[1])
        if not MIN_VPC_PREFIX <= prefix <= MAX_VPC_PREFIX:
            (where / "cidr").fail(
                f"a VPC needs a /{MIN_VPC_PREFIX} to /{MAX_VPC_PREFIX} block, got /{prefix}"
            )
        max_azs = (where / "maxAzs").whole_number(body.get("maxAzs", 2), 1, MAX_AZS)
        nat_gateways = (where / "natGateways").whole_number(body.get("natGateways", 1), 0, max_azs)
        if nat_gateways == 0:
            (where / "natGateways").fail(
                "must be at least 1: the tasks reach ECR, Secrets Manager and CloudWatch Logs through NAT"
            )
        return CreateVpc(cidr=cidr, max_azs=max_azs, nat_gateways=nat_gateways)

    body = where.mapping(
        body,
        allowed=(
            "vpcId",
            "vpcCidrBlock",
            "availabilityZones",
            "privateSubnetIds",
            "privateSubnetRouteTableIds",
        ),
        required=("vpcId", "vpcCidrBlock", "availabilityZones", "privateSubnetIds"),
    )
    zones = (where / "availabilityZones").strings(
        body["availabilityZones"],
        _AVAILABILITY_ZONE,
        "an availability zone such as 'eu-west-1a'",
        min_items=1,
    )
    subnets = (where / "privateSubnetIds").strings(
        body["privateSubnetIds"], _SUBNET_ID, "a subnet id such as 'subnet-0123abcd'", min_items=1
    )
    if len(subnets) % len(zones):
        (where / "privateSubnetIds").fail(
            f"{len(subnets)} subnets do not spread evenly over {len(zones)} availability zones "
            "(list them in availabilityZones order)"
        )
    route_tables = None
    if "privateSubnetRouteTableIds" in body:
        route_tables = (where / "privateSubnetRouteTableIds").strings(
            body["privateSubnetRouteTableIds"], _ROUTE_TABLE_ID, "a route table id such as 'rtb-0123abcd'"
        )
        if len(route_tables) != len(subnets):
            (where / "privateSubnetRouteTableIds").fail("needs one route table per private subnet")
    return ImportVpc(
        vpc_id=(where / "vpcId").string(body["vpcId"], _VPC_ID, "a VPC id such as 'vpc-0123abcd'"),
        cidr=(where / "vpcCidrBlock").cidr(body["vpcCidrBlock"]),
        availability_zones=zones,
        private_subnet_ids=subnets,
        private_subnet_route_table_ids=route_tables,
    )


def parse_cluster(raw: object, where: Where) -> ImportCluster | None:
    """`"create"` -> None; `{"import": {"clusterName": ...}}` -> ImportCluster."""
    body = _create_or_import(raw, where)
    if body is None:
        return None
    where = where / IMPORT
    body = where.mapping(body, allowed=("clusterName",), required=("clusterName",))
    name = (where / "clusterName").string(body["clusterName"], _CLUSTER_NAME, "an ECS cluster name")
    return ImportCluster(cluster_name=name)


def parse_namespace(raw: object, where: Where) -> ImportNamespace | None:
    """`"create"` -> None; `{"import": {"namespaceId": ..., "namespaceArn": ...}}` -> ImportNamespace."""
    body = _create_or_import(raw, where)
    if body is None:
        return None
    where = where / IMPORT
    body = where.mapping(
        body, allowed=("namespaceId", "namespaceArn"), required=("namespaceId", "namespaceArn")
    )
    namespace_id = (where / "namespaceId").string(
        body["namespaceId"], _NAMESPACE_ID, "a Cloud Map namespace id such as 'ns-0123456789abcdef'"
    )
    arn = (where / "namespaceArn").string(body["namespaceArn"], _NAMESPACE_ARN, "a Cloud Map namespace ARN")
    if not arn.endswith(f"/{namespace_id}"):
        (where / "namespaceArn").fail(f"{arn!r} is not the ARN of namespace {namespace_id}")
    return ImportNamespace(namespace_id=namespace_id, namespace_arn=arn)


def _create_or_import(raw: object, where: Where) -> object | None:
    """None for `"create"`, else the body of `{"import": body}`."""
    if raw == CREATE:
        return None
    if not isinstance(raw, Mapping) or list(raw) != [IMPORT]:
        where.fail(f'expected "{CREATE}" or {{"{IMPORT}": {{...}}}}, got {raw!r}')
    return raw[IMPORT]
