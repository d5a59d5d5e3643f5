"""The AWS side of the certificate lifecycle: first issuance, rotation and the expiry check.

Four kinds of Lambda share one code asset (`lambda_bundle`), each with a role of its own that
holds exactly what its handler calls (no managed policy, no wildcard beyond what an API forces):

- issuance     (`runtime.lifecycle.issuance.handler`): a custom resource (cr.Provider) that fills
               the empty secrets on deploy; Get/PutSecretValue on the CA secrets and every identity.
- rotation     (`runtime.lifecycle.rotation.handler`): one function PER IDENTITY, so a rotation
               function can read and write its own `<identity>-identity` secret only (plus read the
               CA it issues from); Secrets Manager may invoke it for that secret only.
- CA rotation  (`runtime.lifecycle.ca_rotation.handler`): rotates ca-key-next, ca-key and ca-cert,
               each rotation one step of the CA rollover when it is due (begin, switch, finish);
               rotates those three and re-issues the identities at a switch.
- expiry       (`runtime.lifecycle.expiry.handler`): on a schedule, reads ca-cert and the identities
               and publishes CertificateHoursToExpiry, CertificateDaysToExpiry and
               CertificateCheckFailures (Hokusai/mTLS only).

Identity secrets rotate on a `rate(N hours)` schedule with a 1-hour window (24-hour leaves every
8 hours: renewed before half-life); the CA secrets every caRolloverWaitDays.

So every secret the lifecycle manages has a rotation schedule (cdk-nag SMG4, no acknowledgment). The
revocation lists (`ca-crl`) are not one of them: no function here reads or writes them (only an
operator's `certs revoke` does) and nothing rotates them; `CertificateSecrets` acknowledges SMG4 on that
secret alone. Every secret call is on
a customer-managed key: kms:Decrypt (and GenerateDataKey for a write) through Secrets Manager only
(`kms:ViaService`). Every log group is encrypted with a key of its own (`LogEncryptionKey`, usable
for `/hokusai/<env>/lifecycle/*` only): a failed rotation's log names secrets and serials.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from aws_cdk import Acknowledgment, CfnResource, CustomResource, Duration, RemovalPolicy, Stack, Validations
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import custom_resources as cr
from constructs import Construct

from constructs_lib import lambda_bundle
from constructs_lib.certificate_secrets import CertificateSecrets
from constructs_lib.log_encryption_key import LogEncryptionKey
from constructs_lib.naming import construct_label
from runtime import lifecycle, names
from runtime.service_catalog import DEFAULT_CATALOG, Catalog

ISSUANCE_HANDLER = "runtime.lifecycle.issuance.handler"
ROTATION_HANDLER = "runtime.lifecycle.rotation.handler"
CA_ROTATION_HANDLER = "runtime.lifecycle.ca_rotation.handler"
EXPIRY_HANDLER = "runtime.lifecycle.expiry.handler"


def rotation_purposes(identities: Sequence[names.Identity] = names.IDENTITIES) -> tuple[str, ...]:
    """The rotation functions, by the purpose in their names (`lifecycle_function_name`): the CA's and one
    per identity. The Monitoring stack alarms on each one's errors by that name, without a cross-stack
    export."""
    return (
        lifecycle.CA_ROTATION_PURPOSE,
        *(lifecycle.rotation_purpose(identity.name) for identity in identities),
    )


ROTATION_PURPOSES: tuple[str, ...] = rotation_purposes()
"""Our three identities' (and the CA's) rotation purposes."""


def lifecycle_function_name(environment: str, purpose: str) -> str:
    """`hokusai-mtls-<env>-<purpose>`, e.g. `hokusai-mtls-staging-ca-rotation` (at most 64 characters)."""
    return lifecycle.check_function_name(names.check_environment(environment), purpose)


EXPIRY_SCHEDULE = Duration.hours(1)
"""How often the expiry check runs; the CertificateCheckFailures alarm's period is a multiple of it."""

SECRETS_MANAGER = iam.ServicePrincipal("secretsmanager.amazonaws.com")
READ = ("secretsmanager:GetSecretValue",)
ISSUE = ("secretsmanager:GetSecretValue", "secretsmanager:PutSecretValue")
ROTATE = (
    "secretsmanager:DescribeSecret",
    "secretsmanager:GetSecretValue",
    "secretsmanager:PutSecretValue",
    "secretsmanager:UpdateSecretVersionStage",
)

L1_REASON = (
    "The lifecycle Lambdas run Python 3.13, the version their cryptography wheels are bundled for "
    "(manylinux2014_x86_64 cp313, constructs_lib/lambda_bundle.py); moving to 3.14 is a change of "
    "the bundle's --python-version together with the runtime, not a drive-by"
)
PROVIDER_IAM5_REASON = (
    "cr.Provider's framework function may invoke the issuance function and its versions "
    "(`<arn>:*`); the wildcard is the version qualifier of that one function"
)
PROVIDER_L1_REASON = "cr.Provider's framework function: its Node.js runtime is chosen by aws-cdk-lib"
PUT_METRIC_REASON = (
    "cloudwatch:PutMetricData has no resource type (it needs Resource *); the statement is limited "
    f"to the {names.METRIC_NAMESPACE} namespace by the cloudwatch:namespace condition"
)


class CertificateLifecycle(Construct):
    """Issuance custom resource, per-identity rotation with a schedule on every identity secret,
    and the scheduled expiry check, all for `certificates` (same stack: cdk-nag SMG4), except its
    revocation lists (`ca_revocations`), which no function here touches.

    Attributes:
        issuance: the issuance function; `certificates_resource`: the custom resource (the
            rotation schedules depend on it, so nothing rotates an empty secret).
        rotation: identity name -> its rotation function.
        rotation_schedules: identity name -> its CfnRotationSchedule.
        expiry: the expiry-check function; `expiry_rule`: its EventBridge schedule.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        certificates: CertificateSecrets,
        environment: str,
        leaf_lifetime_hours: int,
        rotation_hours: int,
        key_type: str,
        server_sans: Sequence[str],
        ca_source: str,
        ca_rollover_start_days: int,
        ca_rollover_wait_days: int,
        log_retention_days: int,
        removal_policy: RemovalPolicy,
        catalog: Catalog = DEFAULT_CATALOG,
    ) -> None:
        """`catalog`: the declared services; `certificates` has a secret for each of its identities, and
        every function gets HOKUSAI_MTLS_SERVICES, so the handlers issue, rotate and check exactly them."""
        super().__init__(scope, construct_id)
        schedule_expression = lifecycle.rotation_schedule_expression(rotation_hours)  # checks it
        if not lifecycle.renews_before_half_life(rotation_hours, leaf_lifetime_hours):
            raise ValueError(
                f"rotation_hours ({rotation_hours}) with its {lifecycle.ROTATION_WINDOW_HOURS}-hour window "
                f"must renew a leaf of leaf_lifetime_hours ({leaf_lifetime_hours}) before half its life"
            )
        if ca_source not in lifecycle.CA_SOURCES:
            raise ValueError(f"ca_source {ca_source!r}: expected one of {', '.join(lifecycle.CA_SOURCES)}")
        self._certificates = certificates
        self._environment = names.check_environment(environment)
        self._log_retention_days = log_retention_days
        self._services = {names.ENV_SERVICES: catalog.to_json()}
        self.log_key = LogEncryptionKey(
            self,
            "LogKey",
            log_group_prefix=f"/hokusai/{environment}/lifecycle/",
            description=f"hokusai-mtls {environment}: encrypts the certificate lifecycle Lambdas' logs",
            removal_policy=removal_policy,
        )
        self._code = lambda_bundle.lifecycle_code(self)
        identities = [certificates.identity(identity) for identity in catalog.identities]

        # --- issuance -------------------------------------------------------------------
        self.issuance = self._function(
            "Issuance",
            ISSUANCE_HANDLER,
            "first issuance of the CA and every identity (custom resource)",
            timeout=Duration.minutes(5),
        )
        ca_secrets = [certificates.ca_key_next, certificates.ca_key, certificates.ca_bundle]
        self._allow_secrets(self.issuance, ISSUE, [*ca_secrets, *identities], write=True)
        provider_role = iam.Role(
            self, "ProviderRole", assumed_by=iam.ServicePrincipal("lambda.amazonaws.com")
        )
        provider_logs = self._log_group("ProviderLogs", "issuance-provider")
        provider_logs.grant_write(provider_role)
        provider = cr.Provider(
            self,
            "IssuanceProvider",
            on_event_handler=self.issuance,
            framework_on_event_role=provider_role,
            log_group=provider_logs,
        )
        _depend_on_policy_only(
            provider.node.find_child("framework-onEvent").node.default_child, provider_role
        )
        stack = Stack.of(self)
        issuance_id = stack.resolve(stack.get_logical_id(self.issuance.node.default_child))
        Validations.of(provider_role).acknowledge(
            Acknowledgment(
                id=f"AwsSolutions-IAM5[Resource::<{issuance_id}.Arn>:*]", reason=PROVIDER_IAM5_REASON
            )
        )
        Validations.of(provider).acknowledge(Acknowledgment(id="AwsSolutions-L1", reason=PROVIDER_L1_REASON))
        self.certificates_resource = CustomResource(
            self,
            "Certificates",
            service_token=provider.service_token,
            resource_type="Custom::HokusaiMtlsCertificates",
            properties={
                "Environment": environment,
                "LeafLifetimeHours": str(leaf_lifetime_hours),
                "ServerSans": list(server_sans),
                "KeyType": key_type,
                "CaSource": ca_source,
                # The handler issues what HOKUSAI_MTLS_SERVICES declares; listing the identities here makes
                # a newly declared service an Update of this resource, so its first leaf is issued on
                # the deploy that adds it (before its tasks start: Services depends on Secrets).
                "Identities": [identity.name for identity in catalog.identities],
            },
        )
        for secret in (*ca_secrets, *certificates.identities.values()):
            self.certificates_resource.node.add_dependency(secret)  # what issuance writes

        # --- rotation: one function per identity ----------------------------------------
        rotation_environment = {
            lifecycle.ENV_LEAF_LIFETIME_HOURS: str(leaf_lifetime_hours),
            lifecycle.ENV_KEY_TYPE: key_type,
        }
        if server_sans:
            rotation_environment[lifecycle.ENV_SERVER_SANS] = ",".join(server_sans)
        rotation: dict[str, lambda_.Function] = {}
        schedules: dict[str, secretsmanager.CfnRotationSchedule] = {}
        for identity in catalog.identities:
            secret = certificates.identity(identity)
            label = construct_label(identity.name)
            function = self._function(
                f"{label}Rotation",
                ROTATION_HANDLER,
                f"rotates {names.identity_secret_name(environment, identity)}",
                timeout=Duration.minutes(2),
                environment=rotation_environment,
                function_purpose=lifecycle.rotation_purpose(identity.name),
            )
            self._allow_secrets(function, ROTATE, [secret], write=True)
            self._allow_secrets(function, READ, [certificates.ca_key, certificates.ca_bundle])
            every_hours = secretsmanager.CfnRotationSchedule.RotationRulesProperty(
                schedule_expression=schedule_expression,
                duration=f"{lifecycle.ROTATION_WINDOW_HOURS}h",
            )
            schedule = self._rotate(label, secret, function, every_hours)
            rotation[identity.name] = function
            schedules[identity.name] = schedule
        self.rotation: Mapping[str, lambda_.Function] = MappingProxyType(rotation)
        self.rotation_schedules: Mapping[str, secretsmanager.CfnRotationSchedule] = MappingProxyType(
            schedules
        )

        # --- CA rotation: the rollover, one step per CA secret ---------------------------------
        self.ca_rotation = self._function(
            "CaRotation",
            CA_ROTATION_HANDLER,
            "rolls the CA over, a step per rotation of ca-key-next, ca-key, ca-cert",
            timeout=Duration.minutes(5),
            environment={
                lifecycle.ENV_CA_SOURCE: ca_source,
                lifecycle.ENV_CA_ROLLOVER_START_DAYS: str(ca_rollover_start_days),
                lifecycle.ENV_CA_ROLLOVER_WAIT_DAYS: str(ca_rollover_wait_days),
                lifecycle.ENV_LEAF_LIFETIME_HOURS: str(leaf_lifetime_hours),
            },
        )
        self._allow_secrets(self.ca_rotation, ROTATE, ca_secrets, write=True)
        self._allow_secrets(self.ca_rotation, ISSUE, identities, write=True)  # a switch re-issues them
        every_wait = secretsmanager.CfnRotationSchedule.RotationRulesProperty(
            automatically_after_days=ca_rollover_wait_days
        )
        self.ca_rotation_schedules: Mapping[str, secretsmanager.CfnRotationSchedule] = MappingProxyType(
            {
                suffix: self._rotate(label, secret, self.ca_rotation, every_wait)
                for suffix, label, secret in (
                    (names.CA_NEXT_SECRET, "CaKeyNext", certificates.ca_key_next),
                    (names.CA_KEY_SECRET, "CaKey", certificates.ca_key),
                    (names.CA_BUNDLE_SECRET, "CaBundle", certificates.ca_bundle),
                )
            }
        )

        # --- expiry check ------------------------------------------------------------------
        self.expiry = self._function(
            "Expiry",
            EXPIRY_HANDLER,
            "publishes hours and days to expiry and check failures of every certificate",
            timeout=Duration.minutes(1),
            environment={names.ENV_ENVIRONMENT: environment},
        )
        self._allow_secrets(self.expiry, READ, [certificates.ca_bundle, *identities])
        self.expiry.add_to_role_policy(
            iam.PolicyStatement(
                actions=["cloudwatch:PutMetricData"],
                resources=["*"],
                conditions={"StringEquals": {"cloudwatch:namespace": names.METRIC_NAMESPACE}},
            )
        )
        Validations.of(self.expiry.role).acknowledge(
            Acknowledgment(id="AwsSolutions-IAM5[Resource::*]", reason=PUT_METRIC_REASON)
        )
        self.expiry_rule = events.Rule(
            self,
            "ExpirySchedule",
            description=f"hokusai-mtls {environment}: certificate expiry check",
            schedule=events.Schedule.rate(EXPIRY_SCHEDULE),
            targets=[targets.LambdaFunction(self.expiry, retry_attempts=2)],
        )

    def _log_group(self, construct_id: str, name: str) -> logs.LogGroup:
        return self.log_key.log_group(self, construct_id, name=name, retention_days=self._log_retention_days)

    def _rotate(
        self,
        label: str,
        secret: secretsmanager.ISecret,
        function: lambda_.Function,
        rules: secretsmanager.CfnRotationSchedule.RotationRulesProperty,
    ) -> secretsmanager.CfnRotationSchedule:
        """Let Secrets Manager invoke `function` for `secret` only, on `rules`' schedule."""
        permission = lambda_.CfnPermission(
            self,
            f"{label}RotationInvoke",
            action="lambda:InvokeFunction",
            function_name=function.function_arn,
            principal=SECRETS_MANAGER.service,
            source_arn=secret.secret_arn,
            source_account=Stack.of(self).account,
        )
        schedule = secretsmanager.CfnRotationSchedule(
            self,
            f"{label}RotationSchedule",
            secret_id=secret.secret_arn,
            rotation_lambda_arn=function.function_arn,
            rotation_rules=rules,
            # The first rotation waits for the schedule: the issuance custom resource has just
            # filled the secret.
            rotate_immediately_on_update=False,
        )
        schedule.node.add_dependency(permission, self.certificates_resource)
        return schedule

    def _function(
        self,
        construct_id: str,
        handler: str,
        purpose: str,
        *,
        timeout: Duration,
        environment: Mapping[str, str] | None = None,
        function_purpose: str | None = None,
    ) -> lambda_.Function:
        """`function_purpose` names the function and its log group (`hokusai-mtls-<env>-<purpose>`);
        default: the construct id in kebab case (`CaRotation` -> `ca-rotation`). Every function gets
        HOKUSAI_MTLS_SERVICES."""
        role = iam.Role(
            self,
            f"{construct_id}Role",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            description=f"hokusai-mtls {self._environment}: {purpose}",
        )
        purpose = function_purpose or _kebab(construct_id)
        log_group = self._log_group(f"{construct_id}Logs", purpose)
        log_group.grant_write(role)
        function = lambda_.Function(
            self,
            construct_id,
            function_name=lifecycle_function_name(self._environment, purpose),
            description=f"hokusai-mtls {self._environment}: {purpose}",
            runtime=lambda_bundle.PYTHON_RUNTIME,
            architecture=lambda_bundle.ARCHITECTURE,
            code=self._code,
            handler=handler,
            role=role,
            log_group=log_group,
            timeout=timeout,
            memory_size=512,
            environment={**(environment or {}), **self._services},
        )
        Validations.of(function).acknowledge(Acknowledgment(id="AwsSolutions-L1", reason=L1_REASON))
        _depend_on_policy_only(function.node.default_child, role)
        return function

    def _allow_secrets(
        self,
        function: lambda_.Function,
        actions: Sequence[str],
        secrets: Sequence[secretsmanager.ISecret],
        *,
        write: bool = False,
    ) -> None:
        function.add_to_role_policy(
            iam.PolicyStatement(actions=list(actions), resources=[secret.secret_arn for secret in secrets])
        )
        kms_actions = ["kms:Decrypt", "kms:GenerateDataKey"] if write else ["kms:Decrypt"]
        function.add_to_role_policy(
            iam.PolicyStatement(
                actions=kms_actions,
                resources=[self._certificates.key.key_arn],
                conditions={
                    "StringEquals": {
                        "kms:ViaService": f"secretsmanager.{Stack.of(self).region}.amazonaws.com"
                    }
                },
            )
        )


def _depend_on_policy_only(function: CfnResource, role: iam.Role) -> None:
    """Keep cfn-lint clean (W3005): a Function with a given role renders `DependsOn: [Role,
    DefaultPolicy]` next to `Role: !GetAtt Role.Arn`; the GetAtt already orders the role, only
    the policy (its log permissions) needs the DependsOn."""
    policy = role.node.find_child("DefaultPolicy").node.default_child
    function.add_override("DependsOn", [Stack.of(function).get_logical_id(policy)])


def _kebab(construct_id: str) -> str:
    """`CaRotation` -> `ca-rotation`: a log group name from a construct id."""
    return re.sub(r"(?<!^)(?=[A-Z])", "-", construct_id).lower()
