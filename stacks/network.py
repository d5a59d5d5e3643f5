"""The network the services run in: VPC, ECS cluster and Cloud Map namespace, each created or imported.

Imports are by attributes from cdk.json (no lookups, no credentials at synth). A created
VPC gets flow logs into a KMS-encrypted log group; an imported one keeps its owner's.
`NetworkStack` holds this when anything is created; when everything is imported the
references are made inside the Services stack (a stack without resources cannot deploy).
"""

from __future__ import annotations

from aws_cdk import CfnResource, RemovalPolicy, Stack
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_servicediscovery as servicediscovery
from constructs import Construct

from constructs_lib.log_encryption_key import LogEncryptionKey
from runtime import names
from stacks.settings import EnvironmentSettings
from stacks.settings_network import CreateVpc, ImportVpc

_RESTRICT_DEFAULT_SG_PROVIDER = "Custom::VpcRestrictDefaultSGCustomResourceProvider"


class Network(Construct):
    """Attributes: `vpc`, `cluster`, `namespace` (created or imported), `flow_log_key` (None when imported)."""

    def __init__(self, scope: Construct, construct_id: str, *, settings: EnvironmentSettings) -> None:
        super().__init__(scope, construct_id)
        env = settings.environment
        removal_policy = RemovalPolicy.RETAIN if settings.retain else RemovalPolicy.DESTROY
        self.flow_log_key: LogEncryptionKey | None = None

        if isinstance(settings.vpc, CreateVpc):
            self.vpc: ec2.IVpc = ec2.Vpc(
                self,
                "Vpc",
                ip_addresses=ec2.IpAddresses.cidr(settings.vpc.cidr),
                max_azs=settings.vpc.max_azs,
                nat_gateways=settings.vpc.nat_gateways,
                subnet_configuration=[
                    ec2.SubnetConfiguration(name="public", subnet_type=ec2.SubnetType.PUBLIC),
                    ec2.SubnetConfiguration(name="private", subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS),
                ],
            )
            self.flow_log_key = LogEncryptionKey(
                self,
                "FlowLogKey",
                log_group_prefix=f"/hokusai/{env}/vpc/",
                description=f"hokusai-mtls {env}: encrypts the VPC flow logs",
                removal_policy=removal_policy,
            )
            flow_logs = self.flow_log_key.log_group(
                self, "FlowLogs", name="flow-logs", retention_days=settings.log_retention_days
            )
            self.vpc.add_flow_log(
                "FlowLog",
                destination=ec2.FlowLogDestination.to_cloud_watch_logs(flow_logs),
                traffic_type=ec2.FlowLogTrafficType.ALL,
            )
            self._drop_redundant_provider_dependency()
        elif isinstance(settings.vpc, ImportVpc):
            self.vpc = ec2.Vpc.from_vpc_attributes(
                self,
                "Vpc",
                vpc_id=settings.vpc.vpc_id,
                vpc_cidr_block=settings.vpc.cidr,
                availability_zones=list(settings.vpc.availability_zones),
                private_subnet_ids=list(settings.vpc.private_subnet_ids),
                private_subnet_route_table_ids=(
                    list(settings.vpc.private_subnet_route_table_ids)
                    if settings.vpc.private_subnet_route_table_ids
                    else None
                ),
            )
        else:  # pragma: no cover - the settings parser returns one of the two
            raise TypeError(f"unexpected vpc settings {settings.vpc!r}")

        if settings.cluster is None:
            self.cluster: ecs.ICluster = ecs.Cluster(
                self, "Cluster", vpc=self.vpc, container_insights_v2=ecs.ContainerInsights.ENABLED
            )
        else:
            self.cluster = ecs.Cluster.from_cluster_attributes(
                self, "Cluster", cluster_name=settings.cluster.cluster_name, vpc=self.vpc, security_groups=[]
            )

        namespace_name = names.cloud_map_namespace(env)
        if settings.namespace is None:
            self.namespace: servicediscovery.IPrivateDnsNamespace = servicediscovery.PrivateDnsNamespace(
                self,
                "Namespace",
                name=namespace_name,
                vpc=self.vpc,
                description=f"hokusai-mtls {env}: internal service names (mlflow)",
            )
        else:
            self.namespace = servicediscovery.PrivateDnsNamespace.from_private_dns_namespace_attributes(
                self,
                "Namespace",
                namespace_name=namespace_name,
                namespace_id=settings.namespace.namespace_id,
                namespace_arn=settings.namespace.namespace_arn,
            )

    def _drop_redundant_provider_dependency(self) -> None:
        """Keep cfn-lint clean (W3005) without silencing it for everything else.

        The VPC's `restrictDefaultSecurityGroup` custom resource (feature flag
        `@aws-cdk/aws-ec2:restrictDefaultSecurityGroup`) renders its Lambda with both
        `Role: !GetAtt Role.Arn` and `DependsOn: Role`; the GetAtt already orders them.
        """
        stack = Stack.of(self)
        provider = stack.node.try_find_child(_RESTRICT_DEFAULT_SG_PROVIDER)
        if provider is None:
            raise LookupError(
                f"{self.node.path}: no {_RESTRICT_DEFAULT_SG_PROVIDER}; has aws-cdk-lib renamed it?"
            )
        handler, role = provider.node.find_child("Handler"), provider.node.find_child("Role")
        if not (isinstance(handler, CfnResource) and isinstance(role, CfnResource)):
            raise TypeError(f"{provider.node.path}: expected CfnResource children Handler and Role")
        handler.remove_resource_dependency(role)
