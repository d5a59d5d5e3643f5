"""The `Services` stack: MLflow, the API service and the workers on Fargate, with the mTLS wiring.

Per service: a task role that may read only its own identity and the CA bundle, a separate
execution role, an encrypted log group, a security group. MLflow registers in Cloud Map as
`mlflow.<namespace>` and accepts connections only from the API and worker security groups.
With `apiKeyStore`, the API's container alone gets the key store's URL and hashing secret
(`secrets=`: its execution role reads them; no task role, and neither mlflow nor the worker).
With `routePolicies`, each server named there gets its own policy (HOKUSAI_MTLS_ROUTE_POLICY).
The platform's existing ALB fronts the API; registering the API in its target group is not
done here (README: "Deploying").
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from aws_cdk import Acknowledgment, Aws, Duration, RemovalPolicy, Stack, Validations
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_ecr_assets as ecr_assets
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_iam as iam
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_servicediscovery as servicediscovery
from constructs import Construct

from constructs_lib.certificate_secrets import CertificateSecrets
from constructs_lib.key_hash_secret import KeyHashSecret
from constructs_lib.log_encryption_key import LogEncryptionKey
from constructs_lib.mtls_task_definition import MtlsTaskDefinition
from constructs_lib.naming import construct_label
from runtime import names
from runtime.service_catalog import ServiceDeclaration
from stacks.network import Network
from stacks.settings import EnvironmentSettings
from stacks.settings_services import PROJECT_ROOT, SERVING_SERVICES, ImageSource, MlflowStores

ARTIFACT_OBJECT_ACTIONS = ("s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload")
"""MLflow's proxied artifacts (S3ArtifactRepository): download, upload (multipart too), delete."""
ARTIFACT_BUCKET_ACTIONS = ("s3:ListBucket",)
"""list_artifacts / delete_artifacts list the keys under the prefix."""


def mlflow_ports(mtls_mode: str) -> tuple[int, ...]:
    """MLflow's listeners: one port in every mode (permissive serves TLS and plain HTTP on it)."""
    del mtls_mode
    return (names.MLFLOW_PORT,)


class ServicesStack(Stack):
    """Attributes (each a mapping service name -> object, keys `runtime.names.*_SERVICE`):
    `task_definitions` (MtlsTaskDefinition), `services` (FargateService), `security_groups`,
    `log_groups`; and `log_key` (LogEncryptionKey of the services' log groups)."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: EnvironmentSettings,
        certificates: CertificateSecrets,
        network: Network | None,
        key_hash_secret: KeyHashSecret | None = None,
        **kwargs: Any,
    ) -> None:
        """`network`: the Network stack's; None when the settings import all of it (then the
        references are made here, since a Network stack would have no resources).
        `key_hash_secret`: the Secrets stack's, required exactly when the settings have `apiKeyStore`."""
        super().__init__(
            scope,
            construct_id,
            description=f"hokusai-mtls {settings.environment}: MLflow, API and worker services with mTLS",
            **kwargs,
        )
        env = settings.environment
        if network is None:
            network = Network(self, "ImportedNetwork", settings=settings)
        vpc, cluster, namespace = network.vpc, network.cluster, network.namespace
        self.log_key = LogEncryptionKey(
            self,
            "LogKey",
            log_group_prefix=f"/hokusai/{env}/ecs/",
            description=f"hokusai-mtls {env}: encrypts the services' logs",
            removal_policy=RemovalPolicy.RETAIN if settings.retain else RemovalPolicy.DESTROY,
        )

        catalog = settings.catalog
        declared = catalog.service_names
        security_groups = {
            service: ec2.SecurityGroup(
                self,
                f"{construct_label(service)}SecurityGroup",
                vpc=vpc,
                description=f"hokusai-mtls {env}: {service} tasks",
                allow_all_outbound=True,
            )
            for service in declared
        }
        self._allow_callers(settings, security_groups)

        log_groups = {
            service: self.log_key.log_group(
                self,
                f"{construct_label(service)}Logs",
                name=service,
                retention_days=settings.log_retention_days,
            )
            for service in declared
        }

        backend_store = secretsmanager.Secret.from_secret_name_v2(
            self, "MlflowBackendStore", settings.mlflow.backend_store_secret_name
        )
        # Both servers decide internal vs external callers, and whose X-Forwarded-For to read,
        # and both run the API-key path (auth service, shared cache and rate limit) and map
        # certificates to scopes. Workers serve nothing: they get none of this.
        serving = {
            names.ENV_INTERNAL_CIDRS: ",".join(settings.internal_cidrs),
            names.ENV_TRUSTED_PROXY_CIDRS: ",".join(settings.trusted_proxy_cidrs),
            **self._authentication_environment(settings),
        }
        serving_secrets = self._authentication_secrets(settings)
        key_store_secrets = self._key_store_secrets(settings, key_hash_secret)
        # One process per whole vCPU of the task unless `taskSizes.<service>.workers` says otherwise.
        workers = {
            service: str(settings.task_sizes[service].worker_processes) for service in SERVING_SERVICES
        }
        options: dict[str, dict[str, Any]] = {
            names.MLFLOW_SERVICE: {
                "ports": mlflow_ports(settings.mtls_mode),
                "health_check_port": names.MLFLOW_HEALTH_PORT,
                "extra_environment": {
                    names.ENV_MLFLOW_ARTIFACTS_DESTINATION: settings.mlflow.artifacts_destination,
                    names.ENV_WORKERS: workers[names.MLFLOW_SERVICE],
                    **serving,
                    **self._route_policy_environment(settings, names.MLFLOW_SERVICE),
                },
                "secrets": {
                    names.ENV_MLFLOW_BACKEND_STORE_URI: ecs.Secret.from_secrets_manager(backend_store),
                    **serving_secrets,
                },
            },
            names.API_SERVICE: {
                "ports": (names.API_PORT,),
                "health_check_port": names.API_PORT,
                # Only the API sits behind the platform's proxy (the ALB); MLflow is dialed directly.
                "extra_environment": {
                    **serving,
                    names.ENV_PROXY_KIND: settings.trusted_proxy_kind,
                    names.ENV_WORKERS: workers[names.API_SERVICE],
                    **self._key_store_environment(settings),
                    **self._route_policy_environment(settings, names.API_SERVICE),
                },
                "secrets": {**serving_secrets, **key_store_secrets},
            },
            names.WORKER_SERVICE: {},
        }
        for service in settings.services.extra:
            options[service] = self._declared_service_options(
                settings, catalog.service(service), serving, serving_secrets
            )

        task_definitions: dict[str, MtlsTaskDefinition] = {}
        services: dict[str, ecs.FargateService] = {}
        for service in declared:
            identity, size = catalog.identity_of(service), settings.task_sizes[service]
            if identity is None:  # the settings refuse a declared service without a certificate
                raise ValueError(f"{service} has no certificate: nothing mTLS to build")
            label = construct_label(service)
            service_options = options[service]
            task = MtlsTaskDefinition(
                self,
                f"{label}Task",
                environment=env,
                identity=identity,
                mtls_mode=settings.mtls_mode,
                may_degrade=settings.may_degrade,
                image=self._image(service, settings.images[service]),
                log_group=log_groups[service],
                cpu=size.cpu,
                memory_limit_mib=size.memory_mib,
                **{
                    **service_options,
                    "extra_environment": {
                        names.ENV_SERVICES: catalog.to_json(),
                        **service_options.get("extra_environment", {}),
                    },
                },
            )
            proxy_kind = (
                settings.trusted_proxy_kind if service == names.API_SERVICE else names.PROXY_KIND_NONE
            )
            certificates.grant_identity(identity, task.task_role, proxy_kind=proxy_kind)
            self._acknowledge_image_pull(task, settings.images[service])
            task_definitions[service] = task
            declaration = catalog.service(service)
            services[service] = ecs.FargateService(
                self,
                f"{label}Service",
                cluster=cluster,
                task_definition=task.task_definition,
                desired_count=settings.desired_counts[service],
                security_groups=[security_groups[service]],
                vpc_subnets=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS),
                assign_public_ip=False,
                circuit_breaker=ecs.DeploymentCircuitBreaker(enable=True, rollback=True),
                min_healthy_percent=100,
                max_healthy_percent=200,
                # An mTLS server is dialed by its Cloud Map name, `<service>.hokusai-<env>.local`, the DNS
                # name its server certificate carries.
                cloud_map_options=(
                    ecs.CloudMapOptions(
                        name=service,
                        cloud_map_namespace=namespace,
                        dns_record_type=servicediscovery.DnsRecordType.A,
                        dns_ttl=Duration.seconds(10),
                    )
                    if declaration.serves_mtls
                    else None
                ),
            )

        mlflow_task = task_definitions[names.MLFLOW_SERVICE]
        self._grant_artifacts(mlflow_task.task_role, settings.mlflow)
        if key_hash_secret is not None:  # the hashing secret is under the certificates' customer-managed key
            key_hash_secret.grant_decrypt(task_definitions[names.API_SERVICE].execution_role)

        self.task_definitions: Mapping[str, MtlsTaskDefinition] = MappingProxyType(task_definitions)
        self.services: Mapping[str, ecs.FargateService] = MappingProxyType(services)
        self.security_groups: Mapping[str, ec2.SecurityGroup] = MappingProxyType(security_groups)
        self.log_groups = MappingProxyType(log_groups)

    @staticmethod
    def _allow_callers(
        settings: EnvironmentSettings, security_groups: Mapping[str, ec2.SecurityGroup]
    ) -> None:
        """Only a server's declared callers reach an mTLS server's port; only the trusted proxies (the
        platform's ALB) reach a proxied server's. Nothing reaches a service that serves nothing."""
        for server in settings.catalog.services:
            if server.serves_mtls:
                ports = mlflow_ports(settings.mtls_mode) if server.runtime == "mlflow" else (server.port,)
                what = "MLflow" if server.runtime == "mlflow" else server.name
                for caller in server.callers:
                    for port in ports:
                        security_groups[server.name].add_ingress_rule(
                            security_groups[caller],
                            ec2.Port.tcp(port),
                            f"{caller} tasks to {what} port {port}",
                        )
            elif server.serves:
                for cidr in settings.trusted_proxy_cidrs:
                    security_groups[server.name].add_ingress_rule(
                        ec2.Peer.ipv4(cidr),
                        ec2.Port.tcp(server.port),
                        f"trusted proxy {cidr} (the platform's ALB)",
                    )

    def _declared_service_options(
        self,
        settings: EnvironmentSettings,
        declaration: ServiceDeclaration,
        serving: Mapping[str, str],
        serving_secrets: Mapping[str, ecs.Secret],
    ) -> dict[str, Any]:
        """The task options of a declared service (not ours).

        An mTLS server runs `hokusai-mtls serve --app` (or anything that honours the same variables): its
        port and loopback health port (`port + 1`), what MLflow gets to tell callers apart and run the
        API-key path, and its route policy. It does not get HOKUSAI_MTLS_SERVICE_SCOPES: it identifies
        exactly its declared callers (`HOKUSAI_MTLS_SERVICES`), whatever serviceScopes grants MLflow.
        A proxied service (its own server behind the ALB) gets its port mapped; a client gets nothing more.
        """
        if declaration.serves_mtls:
            port = _port_of(declaration)
            health_port = port + 1
            environment = {
                names.ENV_PORT: str(port),
                names.ENV_HEALTH_PORT: str(health_port),
                **{key: value for key, value in serving.items() if key != names.ENV_SERVICE_SCOPES},
                **self._route_policy_environment(settings, declaration.name),
            }
            return {
                "ports": (port,),
                "health_check_port": health_port,
                "extra_environment": environment,
                "secrets": dict(serving_secrets),
            }
        if declaration.serves:
            return {
                "ports": (_port_of(declaration),),
                "extra_environment": self._route_policy_environment(settings, declaration.name),
            }
        return {}

    @staticmethod
    def _authentication_environment(settings: EnvironmentSettings) -> dict[str, str]:
        """AUTH_SERVICE_URL, HOKUSAI_MTLS_SERVICE_SCOPES, _CORS_ALLOWED_ORIGINS and _CN_FALLBACK, each only
        when its setting is set (unset, the runtime's defaults apply: no API-key path, the default
        scopes, no cross-origin preflight, SPIFFE IDs only)."""
        variables = {}
        if settings.auth_service_url is not None:
            variables[names.ENV_AUTH_SERVICE_URL] = settings.auth_service_url
        if settings.service_scopes is not None:
            scopes = {service: list(granted) for service, granted in settings.service_scopes.items()}
            variables[names.ENV_SERVICE_SCOPES] = json.dumps(scopes, separators=(",", ":"))
        if settings.cors_allowed_origins:
            variables[names.ENV_CORS_ALLOWED_ORIGINS] = ",".join(settings.cors_allowed_origins)
        if settings.cn_fallback:
            variables[names.ENV_CN_FALLBACK] = "true"
        return variables

    @staticmethod
    def _route_policy_environment(settings: EnvironmentSettings, service: str) -> dict[str, str]:
        """HOKUSAI_MTLS_ROUTE_POLICY of `service` (any declared server), only when `routePolicies` has one for it:
        the compact JSON of the document the settings checked with the runtime's parser."""
        policy = settings.route_policies.get(service)
        return {} if policy is None else {names.ENV_ROUTE_POLICY: policy.compact_json}

    def _authentication_secrets(self, settings: EnvironmentSettings) -> dict[str, ecs.Secret]:
        """REDIS_URL from its existing secret (it may hold a password): never in the environment.

        `ecs.Secret.from_secrets_manager` makes each container's execution role read it
        (GetSecretValue and DescribeSecret on `secret:<name>-??????`); the task roles get nothing.
        """
        if settings.redis_url_secret_name is None:
            return {}
        redis_url = secretsmanager.Secret.from_secret_name_v2(
            self, "RedisUrl", settings.redis_url_secret_name
        )
        return {names.ENV_REDIS_URL: ecs.Secret.from_secrets_manager(redis_url)}

    def _key_store_secrets(
        self, settings: EnvironmentSettings, key_hash_secret: KeyHashSecret | None
    ) -> dict[str, ecs.Secret]:
        """HOKUSAI_MTLS_KEY_STORE_URL (the existing secret of `apiKeyStore.urlSecretName`) and
        HOKUSAI_MTLS_KEY_HASH_SECRET (the Secrets stack's), for the api's container only.

        ECS's grant for `secrets=` gives the api's execution role GetSecretValue and DescribeSecret on
        `secret:<urlSecretName>-??????` and on the hashing secret's own ARN. The hashing secret is
        referenced by ARN, without its key: `grant_read` on the Secrets stack's object would write the
        execution role into the key policy (a reference back from Secrets to Services, a cycle); the
        decrypt permission is granted on the role instead (`KeyHashSecret.grant_decrypt`).
        """
        if (settings.api_key_store is None) != (key_hash_secret is None):
            raise ValueError("a key_hash_secret is needed exactly when the settings have apiKeyStore")
        if settings.api_key_store is None or key_hash_secret is None:
            return {}
        url = secretsmanager.Secret.from_secret_name_v2(
            self, "KeyStoreUrl", settings.api_key_store.url_secret_name
        )
        hash_secret = secretsmanager.Secret.from_secret_complete_arn(
            self, "KeyHashSecret", key_hash_secret.secret.secret_arn
        )
        return {
            names.ENV_KEY_STORE_URL: ecs.Secret.from_secrets_manager(url),
            names.ENV_KEY_HASH_SECRET: ecs.Secret.from_secrets_manager(hash_secret),
        }

    @staticmethod
    def _key_store_environment(settings: EnvironmentSettings) -> dict[str, str]:
        """HOKUSAI_MTLS_KEY_USAGE_RETENTION_DAYS, only when `apiKeyStore.usageRetentionDays` is set."""
        store = settings.api_key_store
        if store is None or store.usage_retention_days is None:
            return {}
        return {names.ENV_KEY_USAGE_RETENTION_DAYS: str(store.usage_retention_days)}

    def _image(self, service: str, source: ImageSource) -> ecs.ContainerImage:
        """An image asset built from docker/ at deploy time, an ECR image (pull granted), or a registry image."""
        if source.dockerfile is not None:
            return ecs.ContainerImage.from_asset(
                str(PROJECT_ROOT),
                file=source.dockerfile,
                platform=ecr_assets.Platform.LINUX_AMD64,
                display_name=f"hokusai-mtls {service} image",
            )
        repository = source.ecr_repository
        if repository is None:
            return ecs.ContainerImage.from_registry(str(source.uri))
        imported = ecr.Repository.from_repository_attributes(
            self,
            f"{construct_label(service)}Repository",
            repository_arn=self.format_arn(
                service="ecr",
                region=repository.region,
                account=repository.account,
                resource="repository",
                resource_name=repository.name,
            ),
            repository_name=repository.name,
        )
        return ecs.ContainerImage.from_ecr_repository(imported, repository.tag_or_digest)

    @staticmethod
    def _acknowledge_image_pull(task: MtlsTaskDefinition, source: ImageSource) -> None:
        if source.dockerfile is None and source.ecr_repository is None:
            return  # a public registry image: no ECR permissions at all
        Validations.of(task.execution_role).acknowledge(
            Acknowledgment(
                id="AwsSolutions-IAM5[Resource::*]",
                reason="ecr:GetAuthorizationToken has no resource-level permissions; the layer and image "
                "actions are limited to the image's repository.",
            )
        )

    def _grant_artifacts(self, role: iam.IRole, stores: MlflowStores) -> None:
        """The S3 actions of MLflow's proxied artifacts, on the destination's bucket and prefix only."""
        bucket_arn = f"arn:{Aws.PARTITION}:s3:::{stores.bucket}"
        objects = f"{stores.prefix}/*" if stores.prefix else "*"
        list_statement = iam.PolicyStatement(actions=list(ARTIFACT_BUCKET_ACTIONS), resources=[bucket_arn])
        if stores.prefix:
            list_statement.add_condition("StringLike", {"s3:prefix": [stores.prefix, f"{stores.prefix}/*"]})
        role.add_to_principal_policy(list_statement)
        role.add_to_principal_policy(
            iam.PolicyStatement(actions=list(ARTIFACT_OBJECT_ACTIONS), resources=[f"{bucket_arn}/{objects}"])
        )
        Validations.of(role).acknowledge(
            Acknowledgment(
                id=f"AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:s3:::{stores.bucket}/{objects}]",
                reason="MLflow writes each run's artifacts under its own keys below the configured "
                "artifactsDestination prefix; the object actions are limited to that prefix.",
            )
        )


def _port_of(declaration: ServiceDeclaration) -> int:
    """A serving declaration's port (parse_catalog requires one of every server)."""
    if declaration.port is None:
        raise ValueError(f"{declaration.name} serves without a port")
    return declaration.port
