"""A Fargate task definition for one mTLS identity: its own roles, one container, the mTLS contract.

The container learns everything the loader (`hokusai-mtls load-certs`) needs from the
environment: names only, never a secret value (the loader fetches the certificates with
the task role; other secrets arrive through ECS `secrets=`). The root filesystem is
read-only; the certificate directory and /tmp are task-local bind volumes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

from aws_cdk import Acknowledgment, Duration, Stack, Validations
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_iam as iam
from aws_cdk import aws_logs as logs
from constructs import Construct

from runtime import names

TMP_DIR = "/tmp"  # noqa: S108 - a task-local volume, not a shared host directory
CONTAINER_NAME = "app"

ECS2_REASON = (
    "The environment holds names, modes, paths, network ranges, scopes, a route policy (service names, "
    "methods and path patterns), a worker count, a retention in days and the auth service's URL only "
    "(ENVIRONMENT, ENABLE_MTLS_AUTH, HOKUSAI_MTLS_* including HOKUSAI_MTLS_ROUTE_POLICY, "
    "MLFLOW_ARTIFACTS_DESTINATION, AUTH_SERVICE_URL, which the settings refuse with credentials): no secret "
    "values. The certificates are fetched by the loader with the task role; the MLflow backend store URI, "
    "REDIS_URL and the API-key store's URL and hashing secret are injected from Secrets Manager with "
    "`secrets=`."
)


def mtls_environment(
    *, environment: str, identity: names.Identity, mtls_mode: str, may_degrade: bool = False
) -> dict[str, str]:
    """The container variables of the mTLS contract (README: "Container environment")."""
    if mtls_mode not in names.MTLS_MODES:
        raise ValueError(f"mtls_mode {mtls_mode!r} is not one of {', '.join(names.MTLS_MODES)}")
    return {
        names.ENV_ENVIRONMENT: names.check_environment(environment),
        names.ENV_ENABLE_MTLS: "false" if mtls_mode == names.MTLS_MODE_OFF else "true",
        names.ENV_ROLE: identity.role,
        names.ENV_MTLS_MODE: mtls_mode,
        names.ENV_MAY_DEGRADE: "true" if may_degrade else "false",
        names.ENV_CERT_DIR: identity.default_cert_dir,
        names.ENV_CA_BUNDLE_SECRET: names.secret_name(environment, names.CA_BUNDLE_SECRET),
        names.ENV_IDENTITY_SECRET: names.identity_secret_name(environment, identity),
    }


class MtlsTaskDefinition(Construct):
    """A Fargate task definition running `image` as `identity`, with a task role and an execution role.

    Attributes:
        task_definition: the Fargate task definition (awsvpc).
        task_role: what the application may do; grant it the identity's secrets (in the stack).
        execution_role: what ECS may do to start the task (pull the image, write logs, read `secrets`).
        container: the single container, named `CONTAINER_NAME`.
        environment_variables: the container's environment, as rendered into the task definition.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        environment: str,
        identity: names.Identity,
        mtls_mode: str,
        may_degrade: bool = False,
        image: ecs.ContainerImage,
        log_group: logs.ILogGroup,
        cpu: int = 512,
        memory_limit_mib: int = 1024,
        ports: Sequence[int] = (),
        health_check_port: int | None = None,
        extra_environment: Mapping[str, str] | None = None,
        secrets: Mapping[str, ecs.Secret] | None = None,
    ) -> None:
        """`ports`: container ports to map (TCP); the first is the service's main port.
        `health_check_port`: run `hokusai-mtls health --port N` as the container health check
        (a plain-HTTP listener on 127.0.0.1 inside the task); None: no health check.
        `extra_environment` may not redefine a variable of the mTLS contract, and no variable may be
        both in the environment and in `secrets` (injected from Secrets Manager by the execution role)."""
        super().__init__(scope, construct_id)
        contract = mtls_environment(
            environment=environment, identity=identity, mtls_mode=mtls_mode, may_degrade=may_degrade
        )
        clash = sorted(set(contract) & set(extra_environment or {}))
        if clash:
            raise ValueError(f"extra_environment may not redefine {', '.join(clash)}")
        self.environment_variables = MappingProxyType({**contract, **(extra_environment or {})})
        both = sorted(set(self.environment_variables) & set(secrets or {}))
        if both:
            raise ValueError(
                f"{', '.join(both)}: a variable is either a secret or in the environment, not both"
            )

        self.task_role = iam.Role(
            self,
            "TaskRole",
            assumed_by=_task_principal(Stack.of(self)),
            description=f"hokusai-mtls {environment}: the {identity.name} application",
        )
        self.execution_role = iam.Role(
            self,
            "ExecutionRole",
            assumed_by=iam.ServicePrincipal("ecs-tasks.amazonaws.com"),
            description=f"hokusai-mtls {environment}: starts {identity.name} tasks (image, logs, secrets)",
        )
        self.task_definition = ecs.FargateTaskDefinition(
            self,
            "TaskDefinition",
            cpu=cpu,
            memory_limit_mib=memory_limit_mib,
            task_role=self.task_role,
            execution_role=self.execution_role,
        )
        health_check = None
        if health_check_port is not None:
            health_check = ecs.HealthCheck(
                command=["CMD", "hokusai-mtls", "health", "--port", str(health_check_port)],
                interval=Duration.seconds(30),
                timeout=Duration.seconds(5),
                retries=3,
                start_period=Duration.seconds(60),
            )
        self.container = self.task_definition.add_container(
            CONTAINER_NAME,
            image=image,
            essential=True,
            readonly_root_filesystem=True,
            environment=dict(self.environment_variables),
            secrets=dict(secrets or {}),
            logging=ecs.LogDrivers.aws_logs(stream_prefix=identity.name, log_group=log_group),
            health_check=health_check,
            port_mappings=[ecs.PortMapping(container_port=port, protocol=ecs.Protocol.TCP) for port in ports],
        )
        for volume, path in self._writable_paths(identity).items():
            self.task_definition.add_volume(name=volume)  # no host: an empty, task-local bind volume
            self.container.add_mount_points(
                ecs.MountPoint(container_path=path, source_volume=volume, read_only=False)
            )
        Validations.of(self.task_definition).acknowledge(
            Acknowledgment(id="AwsSolutions-ECS2", reason=ECS2_REASON)
        )

    @staticmethod
    def _writable_paths(identity: names.Identity) -> dict[str, str]:
        """The temporary directory, plus the certificate directory unless it is inside it (the clients' is)."""
        paths = {"tmp": TMP_DIR}
        if not identity.default_cert_dir.startswith(f"{TMP_DIR}/"):
            paths["certs"] = identity.default_cert_dir
        return paths


def _task_principal(stack: Stack) -> iam.ServicePrincipal:
    """ECS tasks of this account and region only: the confused-deputy conditions ECS documents for task roles."""
    return iam.ServicePrincipal(
        "ecs-tasks.amazonaws.com",
        conditions={
            "StringEquals": {"aws:SourceAccount": stack.account},
            "ArnLike": {"aws:SourceArn": stack.format_arn(service="ecs", resource="*")},
        },
    )
