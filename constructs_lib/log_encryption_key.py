"""A KMS key for CloudWatch Logs, usable only for the log groups under one name prefix."""

from __future__ import annotations

from aws_cdk import ArnFormat, RemovalPolicy, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from constructs import Construct

_RETENTION = {
    1: logs.RetentionDays.ONE_DAY,
    3: logs.RetentionDays.THREE_DAYS,
    5: logs.RetentionDays.FIVE_DAYS,
    7: logs.RetentionDays.ONE_WEEK,
    14: logs.RetentionDays.TWO_WEEKS,
    30: logs.RetentionDays.ONE_MONTH,
    60: logs.RetentionDays.TWO_MONTHS,
    90: logs.RetentionDays.THREE_MONTHS,
    120: logs.RetentionDays.FOUR_MONTHS,
    150: logs.RetentionDays.FIVE_MONTHS,
    180: logs.RetentionDays.SIX_MONTHS,
    365: logs.RetentionDays.ONE_YEAR,
    400: logs.RetentionDays.THIRTEEN_MONTHS,
    545: logs.RetentionDays.EIGHTEEN_MONTHS,
    731: logs.RetentionDays.TWO_YEARS,
    1096: logs.RetentionDays.THREE_YEARS,
    1827: logs.RetentionDays.FIVE_YEARS,
    2192: logs.RetentionDays.SIX_YEARS,
    2557: logs.RetentionDays.SEVEN_YEARS,
    2922: logs.RetentionDays.EIGHT_YEARS,
    3288: logs.RetentionDays.NINE_YEARS,
    3653: logs.RetentionDays.TEN_YEARS,
}

# What CloudWatch Logs does with a log group's key (its documented `kms:Encrypt*`, `Decrypt*`,
# `ReEncrypt*`, `GenerateDataKey*`, `Describe*`, without the key-pair actions it never uses).
_LOGS_ACTIONS = (
    "kms:Encrypt",
    "kms:Decrypt",
    "kms:ReEncryptFrom",
    "kms:ReEncryptTo",
    "kms:GenerateDataKey",
    "kms:GenerateDataKeyWithoutPlaintext",
    "kms:DescribeKey",
)


class LogEncryptionKey(Construct):
    """A customer-managed key (rotation on) that CloudWatch Logs may use for `<prefix>*` log groups only.

    Attributes:
        key: the KMS key.
        log_group_prefix: the names its log groups start with, e.g. `/hokusai/staging/ecs/`.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        log_group_prefix: str,
        description: str,
        removal_policy: RemovalPolicy,
    ) -> None:
        super().__init__(scope, construct_id)
        if not (log_group_prefix.startswith("/") and log_group_prefix.endswith("/")):
            raise ValueError(f"log_group_prefix {log_group_prefix!r} must start and end with '/'")
        self.log_group_prefix = log_group_prefix
        self._removal_policy = removal_policy
        stack = Stack.of(self)
        self.key = kms.Key(
            self,
            "Key",
            description=description,
            enable_key_rotation=True,
            removal_policy=removal_policy,
        )
        self.key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="CloudWatchLogsForTheseLogGroupsOnly",
                principals=[iam.ServicePrincipal(f"logs.{stack.region}.amazonaws.com")],
                actions=list(_LOGS_ACTIONS),
                resources=["*"],  # in a key policy, "*" is this key
                conditions={
                    "ArnLike": {
                        "kms:EncryptionContext:aws:logs:arn": stack.format_arn(
                            service="logs",
                            resource="log-group",
                            resource_name=f"{log_group_prefix}*",
                            arn_format=ArnFormat.COLON_RESOURCE_NAME,
                        )
                    }
                },
            )
        )

    def log_group(
        self, scope: Construct, construct_id: str, *, name: str, retention_days: int
    ) -> logs.LogGroup:
        """A log group named `<prefix><name>`, encrypted with this key, removed like the key."""
        if "/" in name or not name:
            raise ValueError(f"log group name {name!r} must be one path segment")
        if retention_days not in _RETENTION:
            raise ValueError(f"{retention_days} is not a CloudWatch Logs retention period")
        return logs.LogGroup(
            scope,
            construct_id,
            log_group_name=f"{self.log_group_prefix}{name}",
            encryption_key=self.key,
            retention=_RETENTION[retention_days],
            removal_policy=self._removal_policy,
        )
