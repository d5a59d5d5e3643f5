"""The alarms of one environment's mTLS rollout, and the metrics they share with the dashboard.

Every metric name, dimension and value comes from `runtime.names`: the middleware publishes
with the same constants, so a typo here cannot silently watch a metric nobody writes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

from aws_cdk import Duration
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cloudwatch_actions
from aws_cdk import aws_sns as sns
from constructs import Construct

from constructs_lib.certificate_lifecycle import lifecycle_function_name, rotation_purposes
from constructs_lib.naming import construct_label
from runtime import names
from runtime.lifecycle import CA_IDENTITY

MTLS_SERVER_SERVICE = names.MLFLOW_SERVICE
"""The service that terminates mTLS: it publishes handshakes, failures, latency and plain-port counts."""
AUTH_SERVICES: tuple[str, ...] = (names.MLFLOW_SERVICE, names.API_SERVICE)
"""The services whose auth middleware publishes AuthenticatedRequests and InternalApiKeyRequests (and,
with a route policy, RoutePolicyDenied and RoutePolicyWouldDeny)."""

RATE_PERIOD = Duration.minutes(5)
"""Period of every count and rate alarm (and of the dashboard's count graphs)."""
EXPIRY_PERIOD = Duration.days(1)
"""The days-to-expiry gauge (the CA's alarm) changes once a day; a daily Minimum tolerates any publisher
that publishes at least once a day without the alarm dropping to INSUFFICIENT_DATA in between (which
would send a fresh OK/ALARM notification every time data returns)."""
LEAF_EXPIRY_PERIOD = Duration.hours(1)
LEAF_EXPIRY_EVALUATION_PERIODS = 3
"""The hours-to-expiry gauge of the leaves comes every hour: an hour's Minimum, any 1 of the last 3
hours below the threshold alarms (a late run of the check leaves an hour empty, not the alarm)."""
LEAF_EXPIRY_WARN_SHARE = 0.5
LEAF_EXPIRY_PAGE_SHARE = 0.25
"""Warn when a leaf has less than half its lifetime left (rotation renews it well before), page
below a quarter (the services have a few hours before their handshakes fail)."""
CHECK_FAILURES_PERIOD = Duration.hours(3)
"""The expiry check runs every hour (constructs_lib.certificate_lifecycle.EXPIRY_SCHEDULE) and always
publishes CertificateCheckFailures (0 or 1) per identity and `ca`: a 3-hour window holds two or
three runs however EventBridge's start time drifts, so an empty window means the check is down."""


def check_failure_identities(identities: Sequence[names.Identity] = names.IDENTITIES) -> tuple[str, ...]:
    """The `Identity` dimension values the expiry check publishes CertificateCheckFailures for."""
    return (CA_IDENTITY, *(identity.name for identity in identities))


CHECK_FAILURE_IDENTITIES: tuple[str, ...] = check_failure_identities()
ROTATION_ERRORS_PERIOD = Duration.hours(1)
"""Rotations run hours apart; an hour holds one rotation's four steps and Secrets Manager's retries."""
FAILURE_RATE_EVALUATION_PERIODS = 3
FAILURE_RATE_DATAPOINTS_TO_ALARM = 2
"""2 of 3 five-minute periods: a deploy's single bad window does not page, a broken certificate does."""

_FAILURES_ID = "failures"
_HANDSHAKES_ID = "handshakes"


def alarm_name_prefix(environment: str) -> str:
    """`hokusai-mtls-<env>-`: every alarm's name starts with it; the topic and key policies
    let CloudWatch publish only for alarms whose ARN matches `<prefix>*`."""
    return f"hokusai-mtls-{names.check_environment(environment)}-"


def mtls_metric(
    metric_name: str,
    *,
    environment: str,
    statistic: str,
    period: Duration,
    label: str | None = None,
    **dimensions: str,
) -> cloudwatch.Metric:
    """A metric in `names.METRIC_NAMESPACE` with the Environment dimension plus `dimensions`.

    `dimensions` are keyed by the `names.DIM_*` value, e.g. `**{names.DIM_SERVICE: names.API_SERVICE}`.
    """
    return cloudwatch.Metric(
        namespace=names.METRIC_NAMESPACE,
        metric_name=metric_name,
        dimensions_map={names.DIM_ENVIRONMENT: environment, **dimensions},
        statistic=statistic,
        period=period,
        label=label,
    )


def certificate_hours_to_expiry(
    environment: str, identity: names.Identity, *, label: str | None = None
) -> cloudwatch.Metric:
    """Hourly Minimum of the identity's hours-to-expiry gauge (its leaf in the secret)."""
    return mtls_metric(
        names.METRIC_CERT_HOURS_TO_EXPIRY,
        environment=environment,
        statistic=cloudwatch.Stats.MINIMUM,
        period=LEAF_EXPIRY_PERIOD,
        label=label,
        **{names.DIM_IDENTITY: identity.name},
    )


def ca_days_to_expiry(environment: str, *, label: str | None = None) -> cloudwatch.Metric:
    """Daily Minimum of the trust bundle's days-to-expiry gauge (its first CA to expire)."""
    return mtls_metric(
        names.METRIC_CERT_DAYS_TO_EXPIRY,
        environment=environment,
        statistic=cloudwatch.Stats.MINIMUM,
        period=EXPIRY_PERIOD,
        label=label,
        **{names.DIM_IDENTITY: CA_IDENTITY},
    )


def service_count(
    metric_name: str, environment: str, service: str, label: str | None = None
) -> cloudwatch.Metric:
    """Sum per `RATE_PERIOD` of a count metric with dimensions (Environment, Service)."""
    return mtls_metric(
        metric_name,
        environment=environment,
        statistic=cloudwatch.Stats.SUM,
        period=RATE_PERIOD,
        label=label,
        **{names.DIM_SERVICE: service},
    )


def mtls_failure_rate(environment: str, *, min_requests: int) -> cloudwatch.MathExpression:
    """Percentage of refused mTLS handshakes, or 0 below `min_requests` attempts per period.

    rate = 100 * failures / (failures + handshakes), where handshakes counts the verified ones.
    Counters are published only when something happens, so a missing series is filled with 0:
    handshakes without any failure give 0 %, not "no data". The volume guard keeps an idle
    service (one failed probe out of three attempts) from paging. The alarm and the dashboard
    both call this function, so they always show the same number.
    """
    if min_requests < 1:
        raise ValueError(f"min_requests must be at least 1, got {min_requests}")
    failures = f"FILL({_FAILURES_ID}, 0)"
    attempts = f"({failures} + FILL({_HANDSHAKES_ID}, 0))"
    return cloudwatch.MathExpression(
        expression=f"IF({attempts} >= {min_requests}, 100 * {failures} / {attempts}, 0)",
        using_metrics={
            _FAILURES_ID: service_count(
                names.METRIC_MTLS_HANDSHAKE_FAILURES, environment, MTLS_SERVER_SERVICE, "failed handshakes"
            ),
            _HANDSHAKES_ID: service_count(
                names.METRIC_MTLS_HANDSHAKES, environment, MTLS_SERVER_SERVICE, "verified handshakes"
            ),
        },
        label=f"mTLS handshake failure rate (%), 0 below {min_requests} attempts per 5 min",
        period=RATE_PERIOD,
    )


class MtlsAlarms(Construct):
    """Certificate expiry, mTLS failure rate and internal API-key use; each notifies `topic`
    when it goes into ALARM and when it returns to OK.

    Attributes:
        certificate_expiry: identity name (`server`, `api`, `worker`, any declared) -> its page (below 25 %
            of the leaf lifetime left); `certificate_expiry_warning`: the same -> its warning (below 50 %).
        ca_expiry: the trust bundle's CA has fewer than `names.CA_EXPIRY_ALARM_DAYS` days left.
        mtls_failure_rate: the failure-rate alarm on the MLflow server.
        failure_rate_expression: the metric math it watches (the dashboard graphs the same object).
        internal_api_key: service name (`mlflow`, `api`) -> its internal API-key request alarm.
        all_alarms: every alarm above, in that order.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        environment: str,
        topic: sns.ITopic,
        leaf_lifetime_hours: float,
        mtls_failure_rate_percent: float,
        mtls_failure_min_requests: int,
        identities: Sequence[names.Identity] = names.IDENTITIES,
    ) -> None:
        """`identities`: the declared services' (`Catalog.identities`): each gets its expiry, check-failure
        and rotation-failure alarms."""
        super().__init__(scope, construct_id)
        self.identities = tuple(identities)
        _check_settings(leaf_lifetime_hours, mtls_failure_rate_percent, mtls_failure_min_requests)
        self._environment = names.check_environment(environment)
        self._prefix = alarm_name_prefix(environment)
        self._action = cloudwatch_actions.SnsAction(topic)
        self.leaf_lifetime_hours = leaf_lifetime_hours
        self.leaf_warn_hours = leaf_lifetime_hours * LEAF_EXPIRY_WARN_SHARE
        self.leaf_page_hours = leaf_lifetime_hours * LEAF_EXPIRY_PAGE_SHARE
        self.mtls_failure_rate_percent = mtls_failure_rate_percent
        self.mtls_failure_min_requests = mtls_failure_min_requests

        self.certificate_expiry: Mapping[str, cloudwatch.Alarm] = MappingProxyType(
            {identity.name: self._certificate_expiry(identity, warning=False) for identity in self.identities}
        )
        self.certificate_expiry_warning: Mapping[str, cloudwatch.Alarm] = MappingProxyType(
            {identity.name: self._certificate_expiry(identity, warning=True) for identity in self.identities}
        )
        self.ca_expiry = self._ca_expiry()

        self.certificate_check_failures: Mapping[str, cloudwatch.Alarm] = MappingProxyType(
            {
                identity: self._certificate_check_failures(identity)
                for identity in check_failure_identities(self.identities)
            }
        )

        self.failure_rate_expression = mtls_failure_rate(environment, min_requests=mtls_failure_min_requests)
        self.mtls_failure_rate = self._alarm(
            "MtlsFailureRate",
            "mtls-failure-rate",
            metric=self.failure_rate_expression,
            threshold=mtls_failure_rate_percent,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
            evaluation_periods=FAILURE_RATE_EVALUATION_PERIODS,
            datapoints_to_alarm=FAILURE_RATE_DATAPOINTS_TO_ALARM,
            # No data means no handshake attempt at all: nothing is failing. A service that is
            # down is the ECS service's own health alarm, not this one.
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            description=(
                f"More than {mtls_failure_rate_percent}% of mTLS handshakes to {MTLS_SERVER_SERVICE} "
                f"were refused in 2 of 3 five-minute periods (only counted from "
                f"{mtls_failure_min_requests} attempts per period): a client has no, a foreign or an "
                "expired certificate, or the server's trust bundle is wrong."
            ),
        )

        self.internal_api_key: Mapping[str, cloudwatch.Alarm] = MappingProxyType(
            {service: self._internal_api_key(service) for service in AUTH_SERVICES}
        )

        self.rotation_failures: Mapping[str, cloudwatch.Alarm] = MappingProxyType(
            {purpose: self._rotation_failures(purpose) for purpose in rotation_purposes(self.identities)}
        )

    @property
    def all_alarms(self) -> tuple[cloudwatch.Alarm, ...]:
        return (
            *self.certificate_expiry.values(),
            *self.certificate_expiry_warning.values(),
            self.ca_expiry,
            *self.certificate_check_failures.values(),
            self.mtls_failure_rate,
            *self.internal_api_key.values(),
            *self.rotation_failures.values(),
        )

    def _certificate_expiry(self, identity: names.Identity, *, warning: bool) -> cloudwatch.Alarm:
        hours = self.leaf_warn_hours if warning else self.leaf_page_hours
        share = LEAF_EXPIRY_WARN_SHARE if warning else LEAF_EXPIRY_PAGE_SHARE
        suffix = ("Warning", "-warning") if warning else ("", "")
        return self._alarm(
            f"{construct_label(identity.name)}CertificateExpiry{suffix[0]}",
            f"certificate-expiry-{identity.name}{suffix[1]}",
            metric=certificate_hours_to_expiry(self._environment, identity),
            threshold=hours,
            comparison_operator=cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD,
            evaluation_periods=LEAF_EXPIRY_EVALUATION_PERIODS,
            datapoints_to_alarm=1,
            # MISSING, deliberately, now that the expiry check publishes: the gauge is missing exactly
            # when the check could not read the certificate (it then publishes CertificateCheckFailures
            # = 1) or did not run at all (then CertificateCheckFailures is missing too). Both page
            # through the check-failure alarm below, which names the real problem; BREACHING here
            # would page twice for one cause, under a message that says "expires soon" about a
            # certificate nobody could read. Without data this alarm waits in INSUFFICIENT_DATA.
            treat_missing_data=cloudwatch.TreatMissingData.MISSING,
            description=(
                f"{'Warning' if warning else 'Page'}: the {identity.name} certificate of {self._environment} "
                f"has less than {share:.0%} of its {self.leaf_lifetime_hours:g}-hour life left "
                f"({hours:g} hours): its rotation (Secrets Manager, every rotationHours) has not replaced "
                "it; check the rotation function's logs, or rotate it now with "
                "`aws secretsmanager rotate-secret`."
            ),
        )

    def _ca_expiry(self) -> cloudwatch.Alarm:
        days = names.CA_EXPIRY_ALARM_DAYS
        return self._alarm(
            "CaCertificateExpiry",
            "certificate-expiry-ca",
            metric=ca_days_to_expiry(self._environment),
            threshold=days,
            comparison_operator=cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD,
            evaluation_periods=1,
            treat_missing_data=cloudwatch.TreatMissingData.MISSING,  # as the leaves': the check alarm pages
            description=(
                f"A CA in the trust bundle of {self._environment} expires in fewer than {days} days: the "
                "automatic rollover (caRolloverStartDays) has not retired it, or the CA is imported; see "
                "docs/MTLS_CERTIFICATE_MANAGEMENT.md (CA rollover)."
            ),
        )

    def _certificate_check_failures(self, identity: str) -> cloudwatch.Alarm:
        return self._alarm(
            f"{construct_label(identity)}CertificateCheckFailures",
            f"certificate-check-failures-{identity}",
            metric=mtls_metric(
                names.METRIC_CERT_CHECK_FAILURES,
                environment=self._environment,
                statistic=cloudwatch.Stats.MAXIMUM,
                period=CHECK_FAILURES_PERIOD,
                **{names.DIM_IDENTITY: identity},
            ),
            threshold=0,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
            evaluation_periods=1,
            # BREACHING: unlike the request counters, this metric has a publisher that writes a value
            # (0 or 1) for every identity on every hourly run, so no data means the check itself is
            # broken (function failing, schedule or permissions gone) and nothing watches expiry any
            # more: that must page. The cost: right after the first deploy the alarm may fire once
            # until the first run (within the hour), then return to OK.
            treat_missing_data=cloudwatch.TreatMissingData.BREACHING,
            description=(
                f"The certificate check of {self._environment} could not read, parse or verify the "
                f"{identity} secret, or did not run: see the expiry function's logs "
                "(hokusai-mtls Secrets stack, Lifecycle/Expiry)."
            ),
        )

    def _internal_api_key(self, service: str) -> cloudwatch.Alarm:
        return self._alarm(
            f"{service.capitalize()}InternalApiKey",
            f"internal-api-key-{service}",
            metric=service_count(names.METRIC_INTERNAL_API_KEY_REQUESTS, self._environment, service),
            threshold=0,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
            evaluation_periods=1,
            # The counter is published only when such a request happens: no data means zero.
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            description=(
                f"An internal caller authenticated to {service} with an API key instead of its client "
                "certificate (fallback to the API-key path): check its certificate and mTLS settings."
            ),
        )

    def _rotation_failures(self, purpose: str) -> cloudwatch.Alarm:
        function_name = lifecycle_function_name(self._environment, purpose)
        return self._alarm(
            f"{construct_label(purpose)}Failures",
            f"{purpose}-failures",
            metric=cloudwatch.Metric(
                namespace="AWS/Lambda",
                metric_name="Errors",
                dimensions_map={"FunctionName": function_name},
                statistic=cloudwatch.Stats.SUM,
                period=ROTATION_ERRORS_PERIOD,
            ),
            threshold=0,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
            evaluation_periods=1,
            # Errors is published only when the function runs: no data is no rotation, not a failure.
            # A rotation that never runs at all shows as the certificate running out (expiry alarm).
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            description=(
                f"A rotation step of {function_name} failed (a check refused, an error or a timeout): "
                "Secrets Manager kept the current version. The log group "
                f"/hokusai/{self._environment}/lifecycle/{purpose} says which step and why; the runbook is "
                "docs/MTLS_CERTIFICATE_MANAGEMENT.md section 9."
            ),
        )

    def _alarm(
        self,
        construct_id: str,
        name: str,
        *,
        metric: cloudwatch.IMetric,
        description: str,
        **props,
    ) -> cloudwatch.Alarm:
        alarm = cloudwatch.Alarm(
            self,
            construct_id,
            alarm_name=f"{self._prefix}{name}",
            alarm_description=description,
            metric=metric,
            **props,
        )
        alarm.add_alarm_action(self._action)
        alarm.add_ok_action(self._action)
        return alarm


def _check_settings(lifetime_hours: float, failure_rate_percent: float, min_requests: int) -> None:
    problems = []
    if not isinstance(lifetime_hours, int | float) or isinstance(lifetime_hours, bool) or lifetime_hours <= 0:
        problems.append(f"leaf_lifetime_hours must be a number of hours > 0, got {lifetime_hours!r}")
    if (
        not isinstance(failure_rate_percent, int | float)
        or isinstance(failure_rate_percent, bool)
        or not 0 < failure_rate_percent < 100
    ):
        problems.append(f"mtls_failure_rate_percent must be > 0 and < 100, got {failure_rate_percent!r}")
    if not isinstance(min_requests, int) or isinstance(min_requests, bool) or min_requests < 1:
        problems.append(f"mtls_failure_min_requests must be a whole number >= 1, got {min_requests!r}")
    if problems:
        raise ValueError("; ".join(problems))
