"""Reading synthesized CloudFormation templates (plain dicts) in tests.

Everything is found through the template itself: a task is known by the `HOKUSAI_MTLS_ROLE`
its container runs with, a secret by the `Name` of the resource a policy points at, a
security group by the service that uses it. So a test compares what was deployed with
what the contract says, not the code's own constants re-derived the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from runtime import names

Template = Mapping[str, Any]


def resources(template: Template, resource_type: str) -> dict[str, dict]:
    return {
        logical_id: resource
        for logical_id, resource in template.get("Resources", {}).items()
        if resource["Type"] == resource_type
    }


def as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def ref_id(expression: Any) -> str | None:
    """The logical id behind `{"Ref": id}` or `{"Fn::GetAtt": [id, attr]}`, else None."""
    if isinstance(expression, Mapping):
        if "Ref" in expression:
            return expression["Ref"]
        if "Fn::GetAtt" in expression:
            return expression["Fn::GetAtt"][0]
    return None


def resolve_output(expression: Any, templates: Mapping[str, Template]) -> tuple[str, Any] | None:
    """`Fn::GetStackOutput` -> (producing stack name, the output's Value expression there)."""
    if not (isinstance(expression, Mapping) and "Fn::GetStackOutput" in expression):
        return None
    reference = expression["Fn::GetStackOutput"]
    producer = templates[reference["StackName"]]
    return reference["StackName"], producer["Outputs"][reference["OutputName"]]["Value"]


# --- ECS -------------------------------------------------------------------------------------


def container(task_definition: dict) -> dict:
    (only,) = task_definition["Properties"]["ContainerDefinitions"]
    return only


def environment_of(task_definition: dict) -> dict[str, str]:
    return {item["Name"]: item["Value"] for item in container(task_definition).get("Environment", [])}


def tasks_by_role(template: Template) -> dict[str, tuple[str, dict]]:
    """`HOKUSAI_MTLS_ROLE` value -> (logical id, task definition)."""
    found: dict[str, tuple[str, dict]] = {}
    for logical_id, task in resources(template, "AWS::ECS::TaskDefinition").items():
        role = environment_of(task)[names.ENV_ROLE]
        assert role not in found, f"two task definitions run as {role}"
        found[role] = (logical_id, task)
    return found


def service_of(template: Template, role: str) -> dict:
    task_id, _ = tasks_by_role(template)[role]
    (service,) = [
        service
        for service in resources(template, "AWS::ECS::Service").values()
        if ref_id(service["Properties"]["TaskDefinition"]) == task_id
    ]
    return service


def security_group_of(template: Template, role: str) -> str:
    groups = service_of(template, role)["Properties"]["NetworkConfiguration"]["AwsvpcConfiguration"][
        "SecurityGroups"
    ]
    (group,) = groups
    return ref_id(group)


def ingress_rules(template: Template) -> set[tuple[str, tuple[str, str], int, int]]:
    """Every ingress rule: (target group id, ("sg", source group id) | ("cidr", block), from, to)."""
    rules = set()
    for group_id, group in resources(template, "AWS::EC2::SecurityGroup").items():
        for rule in group["Properties"].get("SecurityGroupIngress", []):
            rules.add((group_id, _source(rule), rule.get("FromPort"), rule.get("ToPort")))
    for rule in resources(template, "AWS::EC2::SecurityGroupIngress").values():
        properties = rule["Properties"]
        rules.add(
            (
                ref_id(properties["GroupId"]),
                _source(properties),
                properties.get("FromPort"),
                properties.get("ToPort"),
            )
        )
    return rules


def _source(rule: Mapping[str, Any]) -> tuple[str, str]:
    if "SourceSecurityGroupId" in rule:
        return ("sg", ref_id(rule["SourceSecurityGroupId"]) or str(rule["SourceSecurityGroupId"]))
    if "CidrIp" in rule:
        return ("cidr", rule["CidrIp"])
    if "CidrIpv6" in rule:
        return ("cidr", rule["CidrIpv6"])
    return ("other", repr(rule))


# --- IAM -------------------------------------------------------------------------------------


def role_statements(template: Template, role_id: str) -> list[dict]:
    """Every statement of the role's inline policies and of the AWS::IAM::Policy resources attached to it
    (managed policies are not followed: check `ManagedPolicyArns` where it matters)."""
    statements = []
    role = template["Resources"][role_id]
    for policy in role["Properties"].get("Policies", []):
        statements += as_list(policy["PolicyDocument"]["Statement"])
    for policy in resources(template, "AWS::IAM::Policy").values():
        if role_id in [ref_id(r) for r in policy["Properties"].get("Roles", [])]:
            statements += as_list(policy["Properties"]["PolicyDocument"]["Statement"])
    return statements


def statements_with(statements: list[dict], action: str) -> list[dict]:
    return [s for s in statements if s["Effect"] == "Allow" and action in as_list(s["Action"])]
