"""One CloudWatch dashboard per environment, `hokusai-mtls-<env>`: the mTLS rollout at a glance.

It graphs the metrics `MtlsAlarms` watches, built by the same functions, so a graph and its
alarm cannot disagree; metric names and dimensions come from `runtime.names`.
"""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import Duration
from aws_cdk import aws_cloudwatch as cloudwatch
from constructs import Construct

from constructs_lib.mtls_alarms import (
    AUTH_SERVICES,
    EXPIRY_PERIOD,
    MTLS_SERVER_SERVICE,
    RATE_PERIOD,
    MtlsAlarms,
    ca_days_to_expiry,
    certificate_hours_to_expiry,
    mtls_metric,
    service_count,
)
from runtime import names
from runtime.lifecycle import CA_IDENTITY

_ALARM_RED = "#d62728"
_FULL, _HALF, _THIRD = 24, 12, 8
_HEIGHT = 6
DEFAULT_INTERVAL = Duration.days(3)
"""Long enough to show a few rotations of the leaves (hourly hours-to-expiry) and points of the CA's
daily days-to-expiry next to the 5-minute counts."""


def dashboard_name(environment: str) -> str:
    return f"hokusai-mtls-{names.check_environment(environment)}"


class MtlsDashboard(Construct):
    """Certificate expiry, auth paths, handshakes and failure rate, latency, API-key fallbacks,
    plain-port traffic, route-policy refusals and the state of every alarm in `alarms`.

    Attributes:
        dashboard: the `hokusai-mtls-<env>` dashboard.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        environment: str,
        alarms: MtlsAlarms,
        servers: Sequence[str] = (),
    ) -> None:
        """`servers`: the declared mTLS servers other than MLflow; each gets a row of its handshakes and
        its route policy's refusals. The certificate graphs show `alarms.identities`."""
        super().__init__(scope, construct_id)
        self._environment = names.check_environment(environment)
        self._alarms = alarms
        self._servers = tuple(servers)
        self.dashboard = cloudwatch.Dashboard(
            self,
            "Dashboard",
            dashboard_name=dashboard_name(environment),
            default_interval=DEFAULT_INTERVAL,
            # INHERIT: every graph keeps its own period. AUTO would widen the failure-rate graph's
            # period on long time ranges, and its volume guard would then count a different window
            # than the alarm does.
            period_override=cloudwatch.PeriodOverride.INHERIT,
        )
        self.dashboard.add_widgets(self._header())
        self.dashboard.add_widgets(*self._certificate_widgets())
        self.dashboard.add_widgets(*self._auth_path_widgets())
        self.dashboard.add_widgets(*self._handshake_widgets())
        self.dashboard.add_widgets(self._failure_reasons_widget())
        self.dashboard.add_widgets(
            self._latency_widget(), self._internal_api_key_widget(), self._plain_port_widget()
        )
        self.dashboard.add_widgets(self._route_policy_widget())
        for server in self._servers:
            self.dashboard.add_widgets(*self._declared_server_widgets(server))
        self.dashboard.add_widgets(
            cloudwatch.AlarmStatusWidget(
                title="Alarms", alarms=list(alarms.all_alarms), width=_FULL, height=_HEIGHT
            )
        )

    def _header(self) -> cloudwatch.TextWidget:
        alarms = self._alarms
        return cloudwatch.TextWidget(
            markdown=(
                f"# hokusai-mtls — {self._environment}\n"
                f"Internal calls to `{MTLS_SERVER_SERVICE}` over mutual TLS. Alarms: a leaf with less than "
                f"{alarms.leaf_warn_hours:g} hours (warning) or {alarms.leaf_page_hours:g} hours (page) of its "
                f"{alarms.leaf_lifetime_hours:g} left, the CA with fewer than {names.CA_EXPIRY_ALARM_DAYS} "
                "days; more than "
                f"{alarms.mtls_failure_rate_percent}% refused handshakes (from "
                f"{alarms.mtls_failure_min_requests} attempts per 5 minutes); any internal API-key request."
            ),
            width=_FULL,
            height=2,
        )

    def _certificate_widgets(self) -> list[cloudwatch.IWidget]:
        alarms = self._alarms
        metrics = [
            certificate_hours_to_expiry(self._environment, identity, label=identity.name)
            for identity in alarms.identities
        ]
        ca_days = names.CA_EXPIRY_ALARM_DAYS
        return [
            cloudwatch.SingleValueWidget(
                title="Leaf hours to expiry", metrics=metrics, width=_THIRD, height=_HEIGHT
            ),
            cloudwatch.GraphWidget(
                title="Leaf hours to expiry, per identity (secret and every task, lowest)",
                left=metrics,
                left_annotations=[
                    cloudwatch.HorizontalAnnotation(
                        value=alarms.leaf_warn_hours,
                        label=f"warning below {alarms.leaf_warn_hours:g} hours",
                        color="#ff7f0e",
                    ),
                    cloudwatch.HorizontalAnnotation(
                        value=alarms.leaf_page_hours,
                        label=f"page below {alarms.leaf_page_hours:g} hours",
                        color=_ALARM_RED,
                        fill=cloudwatch.Shading.BELOW,
                    ),
                ],
                left_y_axis=cloudwatch.YAxisProps(min=0, label="hours", show_units=False),
                width=_THIRD,
                height=_HEIGHT,
            ),
            cloudwatch.GraphWidget(
                title="CA days to expiry (the bundle's first to expire)",
                left=[ca_days_to_expiry(self._environment, label=CA_IDENTITY)],
                left_annotations=[
                    cloudwatch.HorizontalAnnotation(
                        value=ca_days,
                        label=f"alarm below {ca_days} days",
                        color=_ALARM_RED,
                        fill=cloudwatch.Shading.BELOW,
                    )
                ],
                left_y_axis=cloudwatch.YAxisProps(min=0, label="days", show_units=False),
                width=_THIRD,
                height=_HEIGHT,
            ),
            cloudwatch.GraphWidget(
                title="Certificate secrets the expiry check could not read or verify",
                left=[
                    mtls_metric(
                        names.METRIC_CERT_CHECK_FAILURES,
                        environment=self._environment,
                        statistic=cloudwatch.Stats.MAXIMUM,
                        period=EXPIRY_PERIOD,
                        label=identity,
                        **{names.DIM_IDENTITY: identity},
                    )
                    for identity in (CA_IDENTITY, *(i.name for i in self._alarms.identities))
                ],
                left_y_axis=cloudwatch.YAxisProps(min=0, label="failures", show_units=False),
                width=_FULL,
                height=_HEIGHT,
            ),
        ]

    def _auth_path_widgets(self) -> list[cloudwatch.IWidget]:
        return [
            cloudwatch.GraphWidget(
                title=f"{service}: authenticated requests by path (mTLS vs API key)",
                left=[
                    mtls_metric(
                        names.METRIC_AUTH_REQUESTS,
                        environment=self._environment,
                        statistic=cloudwatch.Stats.SUM,
                        period=RATE_PERIOD,
                        label=path,
                        **{names.DIM_SERVICE: service, names.DIM_AUTH_PATH: path},
                    )
                    for path in names.AUTH_PATHS
                ],
                stacked=True,
                left_y_axis=cloudwatch.YAxisProps(min=0, label="requests / 5 min", show_units=False),
                width=_HALF,
                height=_HEIGHT,
            )
            for service in AUTH_SERVICES
        ]

    def _handshake_widgets(self) -> list[cloudwatch.IWidget]:
        rate = self._alarms.failure_rate_expression
        threshold = self._alarms.mtls_failure_rate_percent
        return [
            cloudwatch.GraphWidget(
                title=f"{MTLS_SERVER_SERVICE}: mTLS handshakes",
                left=[
                    service_count(
                        names.METRIC_MTLS_HANDSHAKES, self._environment, MTLS_SERVER_SERVICE, "verified"
                    ),
                    service_count(
                        names.METRIC_MTLS_HANDSHAKE_FAILURES,
                        self._environment,
                        MTLS_SERVER_SERVICE,
                        "refused",
                    ),
                ],
                left_y_axis=cloudwatch.YAxisProps(min=0, label="handshakes / 5 min", show_units=False),
                width=_HALF,
                height=_HEIGHT,
            ),
            cloudwatch.GraphWidget(
                title=f"{MTLS_SERVER_SERVICE}: mTLS handshake failure rate (the alarm's metric)",
                left=[rate],
                left_annotations=[
                    cloudwatch.HorizontalAnnotation(
                        value=threshold, label=f"alarm above {threshold}%", color=_ALARM_RED
                    )
                ],
                left_y_axis=cloudwatch.YAxisProps(min=0, label="%", show_units=False),
                width=_HALF,
                height=_HEIGHT,
            ),
        ]

    def _declared_server_widgets(self, server: str) -> list[cloudwatch.IWidget]:
        """A declared server's row: its handshakes (verified, refused) and its route policy's refusals."""
        route_outcomes = (
            (names.METRIC_ROUTE_POLICY_DENIED, "denied"),
            (names.METRIC_ROUTE_POLICY_WOULD_DENY, "would deny (audit)"),
        )
        return [
            cloudwatch.GraphWidget(
                title=f"{server}: mTLS handshakes",
                left=[
                    service_count(names.METRIC_MTLS_HANDSHAKES, self._environment, server, "verified"),
                    service_count(names.METRIC_MTLS_HANDSHAKE_FAILURES, self._environment, server, "refused"),
                ],
                left_y_axis=cloudwatch.YAxisProps(min=0, label="handshakes / 5 min", show_units=False),
                width=_HALF,
                height=_HEIGHT,
            ),
            cloudwatch.GraphWidget(
                title=f"{server}: route policy denied and would-deny",
                left=[
                    service_count(metric_name, self._environment, server, outcome)
                    for metric_name, outcome in route_outcomes
                ],
                left_y_axis=cloudwatch.YAxisProps(min=0, label="requests / 5 min", show_units=False),
                width=_HALF,
                height=_HEIGHT,
            ),
        ]

    def _failure_reasons_widget(self) -> cloudwatch.IWidget:
        """Every server's refused handshakes by reason (`names.HANDSHAKE_FAILURE_REASONS`): one SEARCH, so a
        declared server or a reason shows up without a dashboard change; the servers' logs name the peer."""
        search = (
            f"SEARCH('{{{names.METRIC_NAMESPACE},{names.DIM_ENVIRONMENT},{names.DIM_REASON},{names.DIM_SERVICE}}} "
            f'MetricName="{names.METRIC_MTLS_HANDSHAKE_FAILURES}" {names.DIM_ENVIRONMENT}="{self._environment}"\', '
            f"'Sum', {int(RATE_PERIOD.to_seconds())})"
        )
        return cloudwatch.GraphWidget(
            title="refused mTLS handshakes by server and reason",
            left=[cloudwatch.MathExpression(expression=search, period=RATE_PERIOD)],
            left_y_axis=cloudwatch.YAxisProps(min=0, label="handshakes / 5 min", show_units=False),
            width=_FULL,
            height=_HEIGHT,
        )

    def _latency_widget(self) -> cloudwatch.IWidget:
        return cloudwatch.GraphWidget(
            title=f"{MTLS_SERVER_SERVICE}: internal request latency",
            left=[
                mtls_metric(
                    names.METRIC_INTERNAL_LATENCY,
                    environment=self._environment,
                    statistic=statistic,
                    period=RATE_PERIOD,
                    label=statistic,
                    **{names.DIM_SERVICE: MTLS_SERVER_SERVICE},
                )
                for statistic in ("p50", "p99")
            ],
            left_y_axis=cloudwatch.YAxisProps(min=0, label="ms", show_units=False),
            width=_THIRD,
            height=_HEIGHT,
        )

    def _internal_api_key_widget(self) -> cloudwatch.IWidget:
        return cloudwatch.GraphWidget(
            title="API-key requests from internal callers (should be 0)",
            left=[
                service_count(names.METRIC_INTERNAL_API_KEY_REQUESTS, self._environment, service, service)
                for service in AUTH_SERVICES
            ],
            left_y_axis=cloudwatch.YAxisProps(min=0, label="requests / 5 min", show_units=False),
            width=_THIRD,
            height=_HEIGHT,
        )

    def _route_policy_widget(self) -> cloudwatch.IWidget:
        """Always there, like the plain-port graph in strict mode: without `routePolicies` (or without
        refusals) it stays empty, and an audit policy's would-deny line is what to read before `enforce`."""
        outcomes = (
            (names.METRIC_ROUTE_POLICY_DENIED, "denied"),
            (names.METRIC_ROUTE_POLICY_WOULD_DENY, "would deny (audit)"),
        )
        return cloudwatch.GraphWidget(
            title="route policy: denied and would-deny",
            left=[
                service_count(metric_name, self._environment, service, f"{service} {outcome}")
                for service in AUTH_SERVICES
                for metric_name, outcome in outcomes
            ],
            left_y_axis=cloudwatch.YAxisProps(min=0, label="requests / 5 min", show_units=False),
            width=_FULL,
            height=_HEIGHT,
        )

    def _plain_port_widget(self) -> cloudwatch.IWidget:
        return cloudwatch.GraphWidget(
            title=f"{MTLS_SERVER_SERVICE}: plain-HTTP requests (permissive mode: not yet migrated)",
            left=[
                service_count(
                    names.METRIC_PLAIN_PORT_REQUESTS, self._environment, MTLS_SERVER_SERVICE, "plain port"
                )
            ],
            left_y_axis=cloudwatch.YAxisProps(min=0, label="requests / 5 min", show_units=False),
            width=_THIRD,
            height=_HEIGHT,
        )
