"""MtlsTaskDefinition alone in a bare Stack: the rollback mode, the contract's guard, its two roles."""

from __future__ import annotations

import pytest

from runtime import names

pytestmark = pytest.mark.infra


@pytest.fixture(scope="module")
def build(tmp_path_factory, cdk_context):
    import aws_cdk as cdk
    from aws_cdk import aws_ecs as ecs
    from aws_cdk import aws_logs as logs

    from constructs_lib.mtls_task_definition import MtlsTaskDefinition

    def build(stack_id: str, **overrides):
        app = cdk.App(context=cdk_context, outdir=str(tmp_path_factory.mktemp("task.out")))
        stack = cdk.Stack(app, stack_id)
        props = {
            "environment": "staging",
            "identity": names.WORKER,
            "mtls_mode": names.MTLS_MODE_STRICT,
            "image": ecs.ContainerImage.from_registry("public.ecr.aws/example/worker:1"),
            "log_group": logs.LogGroup(stack, "Logs"),
            **overrides,
        }
        return stack, MtlsTaskDefinition(stack, "Task", **props)

    return build


def test_mode_off_is_the_rollback_switch(build):
    from aws_cdk.assertions import Template

    stack, task = build("Off", mtls_mode=names.MTLS_MODE_OFF)
    assert task.environment_variables[names.ENV_ENABLE_MTLS] == "false"
    ((_, definition),) = Template.from_stack(stack).find_resources("AWS::ECS::TaskDefinition").items()
    (container,) = definition["Properties"]["ContainerDefinitions"]
    variables = {item["Name"]: item["Value"] for item in container["Environment"]}
    assert variables[names.ENV_ENABLE_MTLS] == "false"
    assert variables[names.ENV_MTLS_MODE] == names.MTLS_MODE_OFF


def test_extra_environment_cannot_override_the_contract(build):
    with pytest.raises(ValueError, match=names.ENV_ENABLE_MTLS):
        build("Clash", extra_environment={names.ENV_ENABLE_MTLS: "false"})


def test_unknown_mode_is_refused(build):
    with pytest.raises(ValueError, match="mtls_mode 'lenient'"):
        build("Lenient", mtls_mode="lenient")


def test_task_role_trusts_only_this_accounts_ecs_tasks(build):
    from aws_cdk.assertions import Template

    stack, task = build("Trust")
    roles = Template.from_stack(stack).find_resources("AWS::IAM::Role")
    task_role = roles[stack.get_logical_id(task.task_role.node.default_child)]
    (statement,) = task_role["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert statement["Principal"] == {"Service": "ecs-tasks.amazonaws.com"}
    assert statement["Condition"]["StringEquals"] == {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}
    assert ":ecs:" in str(statement["Condition"]["ArnLike"]["aws:SourceArn"])
    assert task.task_role is not task.execution_role
