"""The `Monitoring` stack: the alarm topic, the mTLS alarms and the dashboard of one environment."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aws_cdk import ArnFormat, RemovalPolicy, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from constructs import Construct

from constructs_lib.mtls_alarms import MtlsAlarms, alarm_name_prefix
from constructs_lib.mtls_dashboard import MtlsDashboard
from runtime import names
from runtime.service_catalog import DEFAULT_CATALOG, RUNTIME_MLFLOW, Catalog

CLOUDWATCH = iam.ServicePrincipal("cloudwatch.amazonaws.com")


class MonitoringStack(Stack):
    """An SSE-KMS alarm topic with an e-mail subscription per address, `MtlsAlarms` on it and
    `MtlsDashboard`.

    Settings are keyword-only; the stack reads no environment variable and no context.

    Attributes:
        key: customer-managed KMS key (rotation on) that encrypts the topic.
        topic: the alarm topic; every alarm notifies it on ALARM and on OK.
        alarms: `MtlsAlarms` (`certificate_expiry`, `mtls_failure_rate`, `internal_api_key`, `all_alarms`).
        dashboard: the `hokusai-mtls-<env>` CloudWatch dashboard.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        environment: str,
        alarm_emails: Sequence[str],
        leaf_lifetime_hours: int = names.SHORT_LEAF_LIFETIME_HOURS,
        mtls_failure_rate_percent: float = 1,
        mtls_failure_min_requests: int = 100,
        removal_policy: RemovalPolicy = RemovalPolicy.RETAIN,
        catalog: Catalog = DEFAULT_CATALOG,
        **kwargs: Any,
    ) -> None:
        """`removal_policy` applies to the KMS key (default RETAIN, like an L2 `kms.Key`);
        the topic, alarms and dashboard hold no data and go with the stack. `catalog`: the declared
        services; every identity gets its alarms, every declared mTLS server a dashboard row."""
        names.check_environment(environment)
        emails = _check_emails(alarm_emails)
        super().__init__(
            scope,
            construct_id,
            description=f"hokusai-mtls {environment}: mTLS alarms, their SNS topic and the dashboard",
            **kwargs,
        )

        self.key = kms.Key(
            self,
            "AlarmTopicKey",
            description=f"hokusai-mtls {environment}: encrypts the alarm topic",
            enable_key_rotation=True,
            removal_policy=removal_policy,
        )
        self.topic = sns.Topic(
            self,
            "AlarmTopic",
            topic_name=f"hokusai-mtls-{environment}-alarms",
            display_name=f"hokusai-mtls {environment} alarms",
            master_key=self.key,
            enforce_ssl=True,
        )
        self._let_cloudwatch_alarms_publish(environment)
        for email in emails:
            self.topic.add_subscription(subscriptions.EmailSubscription(email))

        self.alarms = MtlsAlarms(
            self,
            "Alarms",
            environment=environment,
            topic=self.topic,
            leaf_lifetime_hours=leaf_lifetime_hours,
            mtls_failure_rate_percent=mtls_failure_rate_percent,
            mtls_failure_min_requests=mtls_failure_min_requests,
            identities=catalog.identities,
        )
        declared_servers = [
            server.name for server in catalog.mtls_servers() if server.runtime != RUNTIME_MLFLOW
        ]
        self.dashboard = MtlsDashboard(
            self, "Dashboard", environment=environment, alarms=self.alarms, servers=declared_servers
        ).dashboard

    def _let_cloudwatch_alarms_publish(self, environment: str) -> None:
        """CloudWatch publishes alarm notifications as cloudwatch.amazonaws.com: it needs
        sns:Publish in the topic policy (enforce_ssl replaces the default policy) and, for an
        SSE-KMS topic, kms:Decrypt and kms:GenerateDataKey* on the key; AWS-managed alias/aws/sns
        cannot grant that. Both are limited to this account's alarms named `hokusai-mtls-<env>-*`
        (confused-deputy protection): an alarm named otherwise would be refused, silently."""
        conditions = {
            "StringEquals": {"aws:SourceAccount": self.account},
            "ArnLike": {
                "aws:SourceArn": self.format_arn(
                    service="cloudwatch",
                    resource="alarm",
                    resource_name=f"{alarm_name_prefix(environment)}*",
                    arn_format=ArnFormat.COLON_RESOURCE_NAME,
                )
            },
        }
        self.topic.add_to_resource_policy(
            iam.PolicyStatement(
                sid="AllowCloudWatchAlarmsToPublish",
                principals=[CLOUDWATCH],
                actions=["sns:Publish"],
                resources=[self.topic.topic_arn],
                conditions=conditions,
            )
        )
        self.key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="AllowCloudWatchAlarmsToUseTheKeyForTheAlarmTopic",
                principals=[CLOUDWATCH],
                actions=["kms:Decrypt", "kms:GenerateDataKey*"],
                resources=["*"],
                conditions=conditions,
            )
        )


def _check_emails(alarm_emails: Sequence[str]) -> tuple[str, ...]:
    if isinstance(alarm_emails, str):
        raise ValueError("alarm_emails must be a sequence of addresses, not one string")
    emails = tuple(alarm_emails)
    bad = [email for email in emails if not isinstance(email, str) or email.count("@") != 1 or " " in email]
    if bad:
        raise ValueError(f"alarm_emails: not an e-mail address: {', '.join(map(repr, bad))}")
    duplicates = sorted({email for email in emails if emails.count(email) > 1})
    if duplicates:
        raise ValueError(f"alarm_emails: listed twice: {', '.join(duplicates)}")
    return emails
