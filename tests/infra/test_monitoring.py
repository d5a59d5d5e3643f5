"""MonitoringStack: alarm settings, the metric contract of runtime.names, the encrypted topic, cdk-nag.

One app holds the stack twice: production with the defaults and two addresses, development
with its own thresholds and no address, so a setting that is ignored shows up as a failure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from runtime import lifecycle, names
from tests.support.nag import nag_findings

pytestmark = pytest.mark.infra


@dataclass(frozen=True)
class Config:
    emails: tuple[str, ...]
    lifetime_hours: int
    failure_percent: float
    min_requests: int
    retain: bool


CONFIGS = {
    # Settings left to the constructor's defaults: 24-hour leaves, 1 %, 100 attempts.
    "production": Config(("oncall@example.com", "platform@example.com"), 24, 1, 100, retain=True),
    "development": Config((), 168, 5, 20, retain=False),
}
ENVIRONMENTS = pytest.mark.parametrize("env", sorted(CONFIGS))

CONTRACT_METRICS = {
    value for key, value in vars(names).items() if key.startswith("METRIC_") and key != "METRIC_NAMESPACE"
}
AUTH_SERVICES = {names.MLFLOW_SERVICE, names.API_SERVICE}
CLOUDWATCH = {"Service": "cloudwatch.amazonaws.com"}


@pytest.fixture(scope="module")
def stacks(tmp_path_factory) -> dict:
    import aws_cdk as cdk

    from stacks.monitoring_stack import MonitoringStack

    app = cdk.App(outdir=str(tmp_path_factory.mktemp("monitoring.out")))
    built = {}
    for env, config in CONFIGS.items():
        settings = {}
        if env != "production":
            settings = {
                "leaf_lifetime_hours": config.lifetime_hours,
                "mtls_failure_rate_percent": config.failure_percent,
                "mtls_failure_min_requests": config.min_requests,
            }
        built[env] = MonitoringStack(
            app,
            f"Monitoring-{env}",
            environment=env,
            alarm_emails=list(config.emails),
            removal_policy=cdk.RemovalPolicy.RETAIN if config.retain else cdk.RemovalPolicy.DESTROY,
            **settings,
        )
    return built


@pytest.fixture(scope="module")
def templates(stacks) -> dict:
    from aws_cdk.assertions import Template

    return {env: Template.from_stack(stack).to_json() for env, stack in stacks.items()}


# --- template helpers ---------------------------------------------------------------------


def resources(template: dict, resource_type: str) -> dict[str, dict]:
    return {
        logical_id: resource
        for logical_id, resource in template["Resources"].items()
        if resource["Type"] == resource_type
    }


def only(template: dict, resource_type: str) -> tuple[str, dict]:
    found = resources(template, resource_type)
    assert len(found) == 1, f"expected one {resource_type}, found {sorted(found)}"
    return next(iter(found.items()))


def alarms_by_name(template: dict) -> dict[str, dict]:
    return {
        alarm["Properties"]["AlarmName"]: alarm["Properties"]
        for alarm in resources(template, "AWS::CloudWatch::Alarm").values()
    }


def single_metric(alarm: dict) -> dict:
    """Namespace, MetricName, Dimensions and Statistic of a one-metric alarm, in either of
    CloudFormation's forms (top-level properties, or one MetricStat in `Metrics`)."""
    if "MetricName" in alarm:
        return {key: alarm[key] for key in ("Namespace", "MetricName", "Dimensions", "Statistic", "Period")}
    queries = alarm.get("Metrics", [])
    if len(queries) != 1 or "MetricStat" not in queries[0]:
        return {}
    stat = queries[0]["MetricStat"]
    return {**stat["Metric"], "Statistic": stat["Stat"], "Period": stat["Period"]}


def alarms_on(template: dict, metric_name: str) -> list[tuple[dict, dict]]:
    """(alarm properties, its metric) of every one-metric alarm on `metric_name`."""
    found = []
    for alarm in resources(template, "AWS::CloudWatch::Alarm").values():
        metric = single_metric(alarm["Properties"])
        if metric.get("MetricName") == metric_name:
            found.append((alarm["Properties"], metric))
    return found


def dimensions(metric: dict) -> dict[str, str]:
    return {d["Name"]: d["Value"] for d in metric["Dimensions"]}


def failure_rate_alarm(template: dict, env: str) -> dict:
    from constructs_lib.mtls_alarms import alarm_name_prefix

    return alarms_by_name(template)[f"{alarm_name_prefix(env)}mtls-failure-rate"]


def math_queries(alarm: dict) -> tuple[str, dict[str, dict]]:
    """(the returned expression, id -> MetricStat of the metrics it uses)."""
    queries = alarm["Metrics"]
    returned = [q for q in queries if q.get("ReturnData", True)]
    assert len(returned) == 1 and "Expression" in returned[0], returned
    return returned[0]["Expression"], {q["Id"]: q["MetricStat"] for q in queries if "MetricStat" in q}


def _render_token(part: object) -> str:
    """A CloudFormation token inside the dashboard body as a readable JSON-safe placeholder."""
    if isinstance(part, str):
        return part
    if isinstance(part, dict) and set(part) == {"Ref"}:
        return "${" + part["Ref"] + "}"
    if isinstance(part, dict) and set(part) == {"Fn::GetAtt"}:
        return "${" + ".".join(part["Fn::GetAtt"]) + "}"
    raise AssertionError(f"unexpected token in the dashboard body: {part!r}")


def dashboard_body(template: dict) -> dict:
    _, dashboard = only(template, "AWS::CloudWatch::Dashboard")
    body = dashboard["Properties"]["DashboardBody"]
    if isinstance(body, dict):
        delimiter, parts = body["Fn::Join"]
        body = delimiter.join(_render_token(part) for part in parts)
    return json.loads(body)


@dataclass(frozen=True)
class DashboardMetric:
    namespace: str
    name: str
    dimensions: dict
    options: dict


def dashboard_metrics(widget: dict) -> tuple[list[DashboardMetric], list[dict]]:
    """(the plain metrics, the math expressions) of one metric widget."""
    metrics, expressions = [], []
    for entry in widget["properties"].get("metrics", []):
        if isinstance(entry[0], dict):
            expressions.append(entry[0])
            continue
        options = entry[-1] if isinstance(entry[-1], dict) else {}
        fields = entry[:-1] if options else entry
        namespace, name, *pairs = fields
        assert "." not in pairs, f"shorthand `.` in {entry}: this parser does not expand it"
        metrics.append(
            DashboardMetric(namespace, name, dict(zip(pairs[::2], pairs[1::2], strict=True)), options)
        )
    return metrics, expressions


def metric_widgets(template: dict) -> list[dict]:
    return [w for w in dashboard_body(template)["widgets"] if w["type"] == "metric"]


def all_dashboard_metrics(template: dict) -> list[DashboardMetric]:
    return [m for widget in metric_widgets(template) for m in dashboard_metrics(widget)[0]]


def widgets_showing(template: dict, metric_name: str) -> list[dict]:
    return [
        w for w in metric_widgets(template) if any(m.name == metric_name for m in dashboard_metrics(w)[0])
    ]


def evaluate_metric_math(expression: str, **series: float | None) -> float:
    """Evaluate the failure-rate expression for one period; None is a series with no datapoint.

    It uses only IF, FILL, arithmetic and comparisons, which read the same in Python.
    """
    functions = {"IF": lambda condition, then, otherwise: then if condition else otherwise}
    functions["FILL"] = lambda value, default: default if value is None else value
    code = compile(expression, "<metric math>", "eval")
    return eval(code, {"__builtins__": {}}, {**functions, **series})  # noqa: S307 - our own expression


# --- alarms -------------------------------------------------------------------------------


@ENVIRONMENTS
def test_every_identity_warns_at_half_its_lifetime_left_and_pages_at_a_quarter(stacks, templates, env):
    lifetime = CONFIGS[env].lifetime_hours
    by_name = alarms_by_name(templates[env])
    alarms = alarms_on(templates[env], names.METRIC_CERT_HOURS_TO_EXPIRY)
    assert len(alarms) == 2 * len(names.IDENTITIES)
    for identity in names.IDENTITIES:
        for suffix, threshold in (("-warning", lifetime / 2), ("", lifetime / 4)):
            alarm = by_name[f"hokusai-mtls-{env}-certificate-expiry-{identity.name}{suffix}"]
            metric = single_metric(alarm)
            assert metric["MetricName"] == names.METRIC_CERT_HOURS_TO_EXPIRY
            assert dimensions(metric) == {names.DIM_ENVIRONMENT: env, names.DIM_IDENTITY: identity.name}
            assert (metric["Namespace"], metric["Statistic"], metric["Period"]) == (
                names.METRIC_NAMESPACE,
                "Minimum",
                3600,
            )
            assert (alarm["Threshold"], alarm["ComparisonOperator"]) == (threshold, "LessThanThreshold")
            assert (alarm["EvaluationPeriods"], alarm["DatapointsToAlarm"]) == (3, 1)  # any hour of 3
            # No gauge means an unreadable secret or a check that did not run: the check alarm pages.
            assert alarm["TreatMissingData"] == "missing"
    exposed = stacks[env].alarms
    assert (
        set(exposed.certificate_expiry)
        == set(exposed.certificate_expiry_warning)
        == {identity.name for identity in names.IDENTITIES}
    )


@ENVIRONMENTS
def test_the_ca_pages_at_sixty_days_left(templates, env):
    ((alarm, metric),) = alarms_on(templates[env], names.METRIC_CERT_DAYS_TO_EXPIRY)
    assert alarm["AlarmName"] == f"hokusai-mtls-{env}-certificate-expiry-ca"
    assert dimensions(metric) == {names.DIM_ENVIRONMENT: env, names.DIM_IDENTITY: lifecycle.CA_IDENTITY}
    assert (alarm["Threshold"], alarm["ComparisonOperator"]) == (60, "LessThanThreshold")
    assert (metric["Statistic"], metric["Period"]) == ("Minimum", 86400)


@ENVIRONMENTS
def test_failure_rate_alarm_watches_mlflow_handshakes_with_the_configured_rate(templates, env):
    config = CONFIGS[env]
    alarm = failure_rate_alarm(templates[env], env)
    assert alarm["Threshold"] == config.failure_percent
    assert alarm["ComparisonOperator"] == "GreaterThanThreshold"
    assert alarm["TreatMissingData"] == "notBreaching"
    _, used = math_queries(alarm)
    assert {stat["Metric"]["MetricName"] for stat in used.values()} == {
        names.METRIC_MTLS_HANDSHAKES,
        names.METRIC_MTLS_HANDSHAKE_FAILURES,
    }
    for stat in used.values():
        assert stat["Metric"]["Namespace"] == names.METRIC_NAMESPACE
        assert dimensions(stat["Metric"]) == {
            names.DIM_ENVIRONMENT: env,
            names.DIM_SERVICE: names.MLFLOW_SERVICE,
        }
        assert stat["Stat"] == "Sum"
        assert stat["Period"] == 300


@ENVIRONMENTS
def test_failure_rate_expression_is_zero_below_the_minimum_volume(templates, env):
    minimum = CONFIGS[env].min_requests
    expression, used = math_queries(failure_rate_alarm(templates[env], env))
    by_metric = {stat["Metric"]["MetricName"]: query_id for query_id, stat in used.items()}
    failures, handshakes = (
        by_metric[names.METRIC_MTLS_HANDSHAKE_FAILURES],
        by_metric[names.METRIC_MTLS_HANDSHAKES],
    )

    def rate(failed: float | None, verified: float | None) -> float:
        return evaluate_metric_math(expression, **{failures: failed, handshakes: verified})

    assert rate(minimum - 1, 0) == 0, "an idle service's failures must not page"
    assert rate(minimum - 1, None) == 0
    assert rate(1, minimum - 1) == pytest.approx(100 / minimum), "the guard counts failed + verified"
    assert rate(minimum, None) == 100, "failures without any verified handshake"
    assert rate(None, minimum) == 0, "verified handshakes and no failure series"
    assert rate(minimum, minimum * 3) == 25


@ENVIRONMENTS
def test_internal_api_key_alarm_per_publishing_service(templates, env):
    alarms = alarms_on(templates[env], names.METRIC_INTERNAL_API_KEY_REQUESTS)
    assert sorted(dimensions(metric)[names.DIM_SERVICE] for _, metric in alarms) == sorted(AUTH_SERVICES)
    for alarm, metric in alarms:
        service = dimensions(metric)[names.DIM_SERVICE]
        assert dimensions(metric) == {names.DIM_ENVIRONMENT: env, names.DIM_SERVICE: service}
        assert metric["Namespace"] == names.METRIC_NAMESPACE
        assert metric["Statistic"] == "Sum"
        assert (alarm["Threshold"], alarm["ComparisonOperator"]) == (0, "GreaterThanThreshold")
        assert alarm["TreatMissingData"] == "notBreaching"


@ENVIRONMENTS
def test_every_alarm_notifies_the_topic_on_alarm_and_on_ok(stacks, templates, env):
    template = templates[env]
    topic_id, _ = only(template, "AWS::SNS::Topic")
    alarms = resources(template, "AWS::CloudWatch::Alarm")
    # expiry warning, expiry page and check failures per identity, the CA's expiry and check failures,
    # failure rate, internal API key, a failed rotation per rotation function (one per identity, one for the CA)
    expected = 3 * len(names.IDENTITIES) + 2 + 1 + len(AUTH_SERVICES) + len(names.IDENTITIES) + 1
    assert len(alarms) == expected == len(stacks[env].alarms.all_alarms)
    for logical_id, alarm in alarms.items():
        assert alarm["Properties"]["AlarmActions"] == [{"Ref": topic_id}], logical_id
        assert alarm["Properties"]["OKActions"] == [{"Ref": topic_id}], logical_id


@ENVIRONMENTS
def test_alarm_attributes_name_the_right_alarms(stacks, templates, env):
    stack = stacks[env]
    alarms = resources(templates[env], "AWS::CloudWatch::Alarm")

    def properties(alarm) -> dict:
        return alarms[stack.get_logical_id(alarm.node.default_child)]["Properties"]

    lifetime = CONFIGS[env].lifetime_hours
    for identity in names.IDENTITIES:
        for exposed, threshold in (
            (stack.alarms.certificate_expiry, lifetime / 4),
            (stack.alarms.certificate_expiry_warning, lifetime / 2),
        ):
            alarm = properties(exposed[identity.name])
            metric = single_metric(alarm)
            assert (metric["MetricName"], dimensions(metric)[names.DIM_IDENTITY], alarm["Threshold"]) == (
                names.METRIC_CERT_HOURS_TO_EXPIRY,
                identity.name,
                threshold,
            )
    assert properties(stack.alarms.ca_expiry)["AlarmName"] == f"hokusai-mtls-{env}-certificate-expiry-ca"
    for service in AUTH_SERVICES:
        metric = single_metric(properties(stack.alarms.internal_api_key[service]))
        assert (metric["MetricName"], dimensions(metric)[names.DIM_SERVICE]) == (
            names.METRIC_INTERNAL_API_KEY_REQUESTS,
            service,
        )
    assert properties(stack.alarms.mtls_failure_rate) == failure_rate_alarm(templates[env], env)


@ENVIRONMENTS
def test_a_failed_rotation_alarms_per_rotation_function(stacks, templates, env):
    from constructs_lib.certificate_lifecycle import ROTATION_PURPOSES

    stack = stacks[env]
    alarms = resources(templates[env], "AWS::CloudWatch::Alarm")
    assert set(stack.alarms.rotation_failures) == set(ROTATION_PURPOSES)
    assert {"ca-rotation", "server-rotation", "api-rotation", "worker-rotation"} == set(ROTATION_PURPOSES)
    for purpose, alarm in stack.alarms.rotation_failures.items():
        properties = alarms[stack.get_logical_id(alarm.node.default_child)]["Properties"]
        assert properties["AlarmName"] == f"hokusai-mtls-{env}-{purpose}-failures"
        assert (properties["Namespace"], properties["MetricName"], properties["Statistic"]) == (
            "AWS/Lambda",
            "Errors",
            "Sum",
        )
        assert properties["Dimensions"] == [
            {"Name": "FunctionName", "Value": f"hokusai-mtls-{env}-{purpose}"}
        ]
        assert (properties["Threshold"], properties["ComparisonOperator"]) == (0, "GreaterThanThreshold")
        assert properties["Period"] == 3600
        assert properties["TreatMissingData"] == "notBreaching"
        assert f"/hokusai/{env}/lifecycle/{purpose}" in properties["AlarmDescription"]


@ENVIRONMENTS
def test_certificate_check_failures_alarm_per_identity_and_ca_breaches_on_missing_data(
    stacks, templates, env
):
    """The expiry check publishes 0 or 1 every hour: no data means the check is down, which pages."""
    stack = stacks[env]
    alarms = resources(templates[env], "AWS::CloudWatch::Alarm")
    expected = [lifecycle.CA_IDENTITY, *(identity.name for identity in names.IDENTITIES)]
    assert list(stack.alarms.certificate_check_failures) == expected
    for identity, alarm in stack.alarms.certificate_check_failures.items():
        properties = alarms[stack.get_logical_id(alarm.node.default_child)]["Properties"]
        metric = single_metric(properties)
        assert metric["MetricName"] == names.METRIC_CERT_CHECK_FAILURES
        assert metric["Namespace"] == names.METRIC_NAMESPACE
        assert dimensions(metric) == {names.DIM_ENVIRONMENT: env, names.DIM_IDENTITY: identity}
        assert (metric["Statistic"], metric["Period"]) == ("Maximum", 3 * 3600)
        assert (properties["Threshold"], properties["ComparisonOperator"]) == (0, "GreaterThanThreshold")
        assert properties["TreatMissingData"] == "breaching"
        assert properties["AlarmName"] == f"hokusai-mtls-{env}-certificate-check-failures-{identity}"


# --- dashboard ----------------------------------------------------------------------------


@ENVIRONMENTS
def test_dashboard_metrics_follow_the_runtime_names_contract(stacks, templates, env):
    _, dashboard = only(templates[env], "AWS::CloudWatch::Dashboard")
    assert dashboard["Properties"]["DashboardName"] == f"hokusai-mtls-{env}"
    assert stacks[env].dashboard.node.default_child.dashboard_name == f"hokusai-mtls-{env}"

    metrics = all_dashboard_metrics(templates[env])
    assert {m.name for m in metrics} == CONTRACT_METRICS, "every metric of the contract, nothing else"
    for metric in metrics:
        assert metric.namespace == names.METRIC_NAMESPACE, metric
        assert metric.dimensions[names.DIM_ENVIRONMENT] == env, metric

    def values(metric_name: str, dimension: str) -> set[str]:
        return {m.dimensions[dimension] for m in metrics if m.name == metric_name}

    assert values(names.METRIC_CERT_HOURS_TO_EXPIRY, names.DIM_IDENTITY) == {i.name for i in names.IDENTITIES}
    assert values(names.METRIC_CERT_DAYS_TO_EXPIRY, names.DIM_IDENTITY) == {lifecycle.CA_IDENTITY}
    assert values(names.METRIC_AUTH_REQUESTS, names.DIM_SERVICE) == AUTH_SERVICES
    assert values(names.METRIC_INTERNAL_API_KEY_REQUESTS, names.DIM_SERVICE) == AUTH_SERVICES
    assert values(names.METRIC_ROUTE_POLICY_DENIED, names.DIM_SERVICE) == AUTH_SERVICES
    assert values(names.METRIC_ROUTE_POLICY_WOULD_DENY, names.DIM_SERVICE) == AUTH_SERVICES
    for name in (
        names.METRIC_MTLS_HANDSHAKES,
        names.METRIC_MTLS_HANDSHAKE_FAILURES,
        names.METRIC_PLAIN_PORT_REQUESTS,
    ):
        assert values(name, names.DIM_SERVICE) == {names.MLFLOW_SERVICE}, name
    latency = [m for m in metrics if m.name == names.METRIC_INTERNAL_LATENCY]
    assert {m.options["stat"] for m in latency} == {"p50", "p99"}


@ENVIRONMENTS
def test_dashboard_stacks_auth_paths_per_service(templates, env):
    widgets = widgets_showing(templates[env], names.METRIC_AUTH_REQUESTS)
    assert len(widgets) == len(AUTH_SERVICES)
    for widget in widgets:
        assert widget["properties"]["stacked"] is True
        metrics, _ = dashboard_metrics(widget)
        assert sorted(m.dimensions[names.DIM_AUTH_PATH] for m in metrics) == sorted(names.AUTH_PATHS)
        assert len({m.dimensions[names.DIM_SERVICE] for m in metrics}) == 1, "one service per stack"


ROUTE_POLICY_WIDGET = "route policy: denied and would-deny"


@ENVIRONMENTS
def test_dashboard_graphs_route_policy_refusals_of_both_servers(templates, env):
    """One graph, always there (like the plain-port graph in strict mode): denied and would-deny, each per
    serving service, as 5-minute sums with the runtime's dimensions (Environment, Service)."""
    route_metrics = {names.METRIC_ROUTE_POLICY_DENIED, names.METRIC_ROUTE_POLICY_WOULD_DENY}
    widgets = [
        w for w in metric_widgets(templates[env]) if w["properties"].get("title") == ROUTE_POLICY_WIDGET
    ]
    assert len(widgets) == 1
    metrics, expressions = dashboard_metrics(widgets[0])
    assert expressions == []
    assert sorted((m.name, m.dimensions[names.DIM_SERVICE]) for m in metrics) == sorted(
        (name, service) for name in route_metrics for service in AUTH_SERVICES
    )
    for metric in metrics:
        assert metric.namespace == names.METRIC_NAMESPACE
        assert set(metric.dimensions) == {names.DIM_ENVIRONMENT, names.DIM_SERVICE}, metric
        # 300 s is CloudWatch's default period, which the body leaves out
        assert (metric.options["stat"], metric.options.get("period", 300)) == ("Sum", 300), metric
    for name in route_metrics:
        assert widgets_showing(templates[env], name) == widgets, "on no other graph"


@ENVIRONMENTS
def test_dashboard_shows_leaves_in_hours_and_the_ca_in_days_with_the_alarm_lines(templates, env):
    lifetime = CONFIGS[env].lifetime_hours
    widgets = widgets_showing(templates[env], names.METRIC_CERT_HOURS_TO_EXPIRY)
    assert {w["properties"]["view"] for w in widgets} == {"singleValue", "timeSeries"}
    (graph,) = (w for w in widgets if w["properties"]["view"] == "timeSeries")
    lines = [a["value"] for a in graph["properties"]["annotations"]["horizontal"]]
    assert lines == [lifetime / 2, lifetime / 4]
    (ca_graph,) = widgets_showing(templates[env], names.METRIC_CERT_DAYS_TO_EXPIRY)
    assert [a["value"] for a in ca_graph["properties"]["annotations"]["horizontal"]] == [60]


@ENVIRONMENTS
def test_dashboard_failure_rate_is_the_alarms_expression(templates, env):
    template = templates[env]
    alarm_expression, alarm_metrics = math_queries(failure_rate_alarm(template, env))
    graphs = [w for w in metric_widgets(template) if dashboard_metrics(w)[0] and dashboard_metrics(w)[1]]
    assert len(graphs) == 1  # the other expression is the reasons' SEARCH, over no metric of its own
    metrics, expressions = dashboard_metrics(graphs[0])
    assert [e["expression"] for e in expressions] == [alarm_expression]
    assert {m.options["id"]: m.name for m in metrics} == {
        query_id: stat["Metric"]["MetricName"] for query_id, stat in alarm_metrics.items()
    }
    assert [a["value"] for a in graphs[0]["properties"]["annotations"]["horizontal"]] == [
        CONFIGS[env].failure_percent
    ]


@ENVIRONMENTS
def test_dashboard_shows_the_state_of_every_alarm(templates, env):
    template = templates[env]
    (widget,) = (w for w in dashboard_body(template)["widgets"] if w["type"] == "alarm")
    expected = {"${" + logical_id + ".Arn}" for logical_id in resources(template, "AWS::CloudWatch::Alarm")}
    assert set(widget["properties"]["alarms"]) == expected


# --- topic and key ------------------------------------------------------------------------


def alarm_source_arn_pattern(statement: dict) -> str:
    """The literal tail of the statement's aws:SourceArn condition (after the account id)."""
    assert statement["Condition"]["StringEquals"] == {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}
    parts = statement["Condition"]["ArnLike"]["aws:SourceArn"]["Fn::Join"][1]
    return parts[-1]


def statements(policy: dict) -> list[dict]:
    return policy["Statement"]


@ENVIRONMENTS
def test_topic_is_encrypted_with_a_rotating_key_cloudwatch_alarms_may_use(stacks, templates, env):
    from constructs_lib.mtls_alarms import alarm_name_prefix

    template = templates[env]
    key_id, key = only(template, "AWS::KMS::Key")
    _, topic = only(template, "AWS::SNS::Topic")
    assert topic["Properties"]["KmsMasterKeyId"] == {"Fn::GetAtt": [key_id, "Arn"]}
    assert key["Properties"]["EnableKeyRotation"] is True
    expected_policy = "Retain" if CONFIGS[env].retain else "Delete"
    assert (key["DeletionPolicy"], key["UpdateReplacePolicy"]) == (expected_policy, expected_policy)

    (grant,) = (s for s in statements(key["Properties"]["KeyPolicy"]) if s["Principal"] == CLOUDWATCH)
    assert grant["Effect"] == "Allow"
    assert set(grant["Action"]) == {"kms:Decrypt", "kms:GenerateDataKey*"}
    # The condition admits exactly the names our alarms carry: any other name is refused silently.
    assert alarm_source_arn_pattern(grant) == f":alarm:{alarm_name_prefix(env)}*"
    for name in alarms_by_name(template):
        assert name.startswith(alarm_name_prefix(env)), name


@ENVIRONMENTS
def test_topic_policy_enforces_tls_and_lets_only_our_alarms_publish(templates, env):
    from constructs_lib.mtls_alarms import alarm_name_prefix

    template = templates[env]
    topic_id, _ = only(template, "AWS::SNS::Topic")
    _, policy = only(template, "AWS::SNS::TopicPolicy")
    assert policy["Properties"]["Topics"] == [{"Ref": topic_id}]
    found = statements(policy["Properties"]["PolicyDocument"])

    (deny,) = (s for s in found if s["Effect"] == "Deny")
    assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert deny["Principal"] == "*" and deny["Action"] == "sns:Publish"
    assert deny["Resource"] == {"Ref": topic_id}

    (publish,) = (s for s in found if s["Effect"] == "Allow")
    assert publish["Principal"] == CLOUDWATCH and publish["Action"] == "sns:Publish"
    assert alarm_source_arn_pattern(publish) == f":alarm:{alarm_name_prefix(env)}*"


@ENVIRONMENTS
def test_one_email_subscription_per_address(templates, env):
    template = templates[env]
    topic_id, _ = only(template, "AWS::SNS::Topic")
    subscriptions = [s["Properties"] for s in resources(template, "AWS::SNS::Subscription").values()]
    assert sorted(s["Endpoint"] for s in subscriptions) == sorted(CONFIGS[env].emails)
    for subscription in subscriptions:
        assert subscription["Protocol"] == "email"
        assert subscription["TopicArn"] == {"Ref": topic_id}


@ENVIRONMENTS
def test_cdk_nag_reports_no_unacknowledged_violations(stacks, env):
    assert nag_findings(stacks[env], stacks[env]) == []


# --- settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"environment": "Prod"}, "is not a valid name"),
        ({"alarm_emails": "oncall@example.com"}, "not one string"),
        ({"alarm_emails": ["oncall.example.com"]}, "not an e-mail address"),
        ({"alarm_emails": ["a@example.com", "a@example.com"]}, "listed twice"),
        ({"leaf_lifetime_hours": 0}, "leaf_lifetime_hours"),
        ({"mtls_failure_rate_percent": 0}, "mtls_failure_rate_percent"),
        ({"mtls_failure_rate_percent": 100}, "mtls_failure_rate_percent"),
        ({"mtls_failure_min_requests": 0}, "mtls_failure_min_requests"),
    ],
)
def test_bad_settings_fail_with_a_message_naming_them(settings, message):
    import aws_cdk as cdk

    from stacks.monitoring_stack import MonitoringStack

    arguments = {"environment": "staging", "alarm_emails": [], **settings}
    with pytest.raises(ValueError, match=message):
        MonitoringStack(cdk.App(), "Monitoring", **arguments)


@ENVIRONMENTS
def test_dashboard_graphs_refused_handshakes_of_every_server_by_reason(templates, env):
    """One SEARCH over the Reason view of MtlsHandshakeFailures in this environment (the metrics publish
    Environment, Service, Reason): every server and reason appears without a dashboard change."""
    widgets = [
        w
        for w in metric_widgets(templates[env])
        if w["properties"].get("title") == "refused mTLS handshakes by server and reason"
    ]
    assert len(widgets) == 1
    metrics, expressions = dashboard_metrics(widgets[0])
    assert metrics == []
    (expression,) = expressions
    assert expression["expression"] == (
        "SEARCH('{Hokusai/mTLS,Environment,Reason,Service} "
        f'MetricName="MtlsHandshakeFailures" Environment="{env}"\', \'Sum\', 300)'
    )
