"""The Network stack of every environment as cdk.json creates it: VPC with flow logs, cluster, namespace."""

from __future__ import annotations

import pytest

from runtime import names
from stacks.settings import RETAINED_ENVIRONMENTS, load_settings
from tests.support.cfn import ref_id, resources

pytestmark = pytest.mark.infra

ENVIRONMENTS = pytest.mark.parametrize("env", names.ENVIRONMENTS)


@pytest.fixture(scope="module")
def settings(cdk_json_settings) -> dict:
    return load_settings(cdk_json_settings)


@pytest.fixture(scope="module")
def network(network_templates) -> dict:
    return {env: template.to_json() for env, template in network_templates.items()}


@ENVIRONMENTS
def test_vpc_follows_the_settings(network, settings, env):
    template = network[env]
    ((_, vpc),) = resources(template, "AWS::EC2::VPC").items()
    assert vpc["Properties"]["CidrBlock"] == settings[env].vpc.cidr
    assert len(resources(template, "AWS::EC2::NatGateway")) == settings[env].vpc.nat_gateways
    private = [
        subnet
        for subnet in resources(template, "AWS::EC2::Subnet").values()
        if {"Key": "aws-cdk:subnet-type", "Value": "Private"} in subnet["Properties"]["Tags"]
    ]
    assert len(private) == settings[env].vpc.max_azs
    assert all(subnet["Properties"]["MapPublicIpOnLaunch"] is False for subnet in private)


@ENVIRONMENTS
def test_vpc_flow_logs_go_to_an_encrypted_log_group(network, settings, env):
    template = network[env]
    ((vpc_id, _),) = resources(template, "AWS::EC2::VPC").items()
    ((_, flow_log),) = resources(template, "AWS::EC2::FlowLog").items()
    properties = flow_log["Properties"]
    assert ref_id(properties["ResourceId"]) == vpc_id
    assert properties["ResourceType"] == "VPC"
    assert properties["TrafficType"] == "ALL"
    group = template["Resources"][ref_id(properties["LogGroupName"])]
    assert group["Properties"]["LogGroupName"] == f"/hokusai/{env}/vpc/flow-logs"
    assert group["Properties"]["RetentionInDays"] == settings[env].log_retention_days
    key = template["Resources"][ref_id(group["Properties"]["KmsKeyId"])]
    assert key["Properties"]["EnableKeyRotation"] is True
    expected = "Retain" if env in RETAINED_ENVIRONMENTS else "Delete"
    assert group["DeletionPolicy"] == key["DeletionPolicy"] == expected


@ENVIRONMENTS
def test_cluster_has_container_insights(network, env):
    ((_, cluster),) = resources(network[env], "AWS::ECS::Cluster").items()
    assert {"Name": "containerInsights", "Value": "enabled"} in cluster["Properties"]["ClusterSettings"]


@ENVIRONMENTS
def test_namespace_is_the_environments_private_dns_name(network, env):
    template = network[env]
    ((_, namespace),) = resources(template, "AWS::ServiceDiscovery::PrivateDnsNamespace").items()
    assert namespace["Properties"]["Name"] == names.cloud_map_namespace(env)
    ((vpc_id, _),) = resources(template, "AWS::EC2::VPC").items()
    assert ref_id(namespace["Properties"]["Vpc"]) == vpc_id
