"""EMF documents the CloudWatch dashboard and alarms can read, aggregated per interval."""

from __future__ import annotations

import io
import json

import pytest

from runtime import names
from runtime.observability.metrics import DEFAULT_INTERVAL_SECONDS, Metrics, interval_from_environ


def metrics() -> tuple[Metrics, io.StringIO]:
    stream = io.StringIO()
    return Metrics(
        environment="production", service="mlflow", stream=stream, clock=lambda: 1_800_000_000
    ), stream


def by_metric(documents: list[dict]) -> dict[str, dict]:
    out = {}
    for document in documents:
        for metric in document["_aws"]["CloudWatchMetrics"][0]["Metrics"]:
            out[
                metric["Name"]
                + ("/" + document[names.DIM_AUTH_PATH] if names.DIM_AUTH_PATH in document else "")
            ] = document
    return out


def test_one_line_per_dimension_set_per_interval_not_per_request():
    m, stream = metrics()
    for _ in range(1000):
        m.auth(names.AUTH_PATH_MTLS, "success")
    m.auth(names.AUTH_PATH_API_KEY, "success")
    m.auth(names.AUTH_PATH_API_KEY, "invalid")  # refused requests are not "authenticated"
    documents = m.flush()
    assert len(stream.getvalue().splitlines()) == len(documents) == 2
    found = by_metric(documents)
    assert found["AuthenticatedRequests/mtls"]["AuthenticatedRequests"] == 1000
    assert found["AuthenticatedRequests/api_key"]["AuthenticatedRequests"] == 1


def test_emf_uses_the_contracts_namespace_and_dimensions():
    m, _ = metrics()
    m.handshake_started()
    m.handshake_started()
    m.handshake_completed()
    m.certificate_time_left("server", 42, 1010.5)
    found = by_metric(m.flush())
    handshakes = found[names.METRIC_MTLS_HANDSHAKES]
    directive = handshakes["_aws"]["CloudWatchMetrics"][0]
    assert directive["Namespace"] == names.METRIC_NAMESPACE
    assert directive["Dimensions"] == [[names.DIM_ENVIRONMENT, names.DIM_SERVICE]]
    assert handshakes["_aws"]["Timestamp"] == 1_800_000_000_000
    assert (handshakes[names.METRIC_MTLS_HANDSHAKES], handshakes[names.METRIC_MTLS_HANDSHAKE_FAILURES]) == (
        1,
        1,
    )
    expiry = found[names.METRIC_CERT_DAYS_TO_EXPIRY]
    assert expiry["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [
        [names.DIM_ENVIRONMENT, names.DIM_IDENTITY]
    ]
    assert (expiry[names.DIM_IDENTITY], expiry[names.METRIC_CERT_DAYS_TO_EXPIRY]) == ("server", 42)
    assert expiry[names.METRIC_CERT_HOURS_TO_EXPIRY] == 1010.5


def test_flush_starts_a_new_interval_and_an_idle_one_writes_nothing():
    m, stream = metrics()
    m.internal_api_key_request()
    assert m.flush()
    assert m.flush() == []
    assert len(stream.getvalue().splitlines()) == 1


def test_latency_is_a_distribution_split_at_emfs_100_values():
    m, _ = metrics()
    for ms in range(150):
        m.internal_latency(ms / 1000)
        m.internal_latency(ms / 1000)
    latency = [d for d in m.flush() if names.METRIC_INTERNAL_LATENCY in d]
    assert [len(d[names.METRIC_INTERNAL_LATENCY]["Values"]) for d in latency] == [100, 50]
    assert sum(sum(d[names.METRIC_INTERNAL_LATENCY]["Counts"]) for d in latency) == 300
    assert latency[0]["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Unit"] == "Milliseconds"


def test_prometheus_exposition_has_the_same_counts():
    m, _ = metrics()
    m.auth(names.AUTH_PATH_MTLS, "success")
    m.plain_port_request()
    text = m.prometheus().decode()
    assert (
        'hokusai_mtls_auth_requests_total{auth_path="mtls",environment="production",outcome="success",service="mlflow"} 1.0'
        in text
    )
    assert "hokusai_mtls_plain_port_requests_total" in text
    json.dumps(m.flush())  # still serialisable after Prometheus has read


def test_an_mtls_request_is_one_success_and_one_latency_sample_in_both_views():
    m, _ = metrics()
    for seconds in (0.0005, 0.001, 0.0011, 0.3, 20):  # 0.001 is inside its bucket: "<= le"
        m.auth(names.AUTH_PATH_MTLS, "success")
        m.internal_latency(seconds)
    m.auth(names.AUTH_PATH_MTLS, "forbidden")
    text = m.prometheus().decode()
    labels = 'environment="production",service="mlflow"'
    assert (
        'hokusai_mtls_auth_requests_total{auth_path="mtls",environment="production",outcome="success",service="mlflow"} 5.0'
        in text
    )
    assert 'outcome="forbidden",service="mlflow"} 1.0' in text
    for le, count in (("0.001", 2), ("0.0025", 3), ("0.25", 3), ("0.5", 4), ("10.0", 4), ("+Inf", 5)):
        bucket = f'environment="production",le="{le}",service="mlflow"'
        assert f"hokusai_mtls_internal_request_seconds_bucket{{{bucket}}} {count}.0" in text
    assert f"hokusai_mtls_internal_request_seconds_count{{{labels}}} 5.0" in text
    found = by_metric(m.flush())
    assert found["AuthenticatedRequests/mtls"]["AuthenticatedRequests"] == 5
    assert sum(found[names.METRIC_INTERNAL_LATENCY][names.METRIC_INTERNAL_LATENCY]["Counts"]) == 5
    # Prometheus counts since start; EMF counts per interval
    m.auth(names.AUTH_PATH_MTLS, "success")
    m.internal_latency(0.002)
    assert "hokusai_mtls_internal_request_seconds_count{" + labels + "} 6.0" in m.prometheus().decode()
    assert by_metric(m.flush())["AuthenticatedRequests/mtls"]["AuthenticatedRequests"] == 1


def test_the_interval_setting_both_servers_read():
    assert interval_from_environ({}) == interval_from_environ({names.ENV_METRICS_SECONDS: " "}) == 60
    assert DEFAULT_INTERVAL_SECONDS == 60
    assert interval_from_environ({names.ENV_METRICS_SECONDS: "0.5"}) == 0.5


@pytest.mark.parametrize("value", ["0", "-5", "soon", "inf", "nan", "86401"])
def test_a_bad_interval_is_refused_naming_the_variable(value):
    with pytest.raises(ValueError, match=f"{names.ENV_METRICS_SECONDS}='{value}': expected seconds"):
        interval_from_environ({names.ENV_METRICS_SECONDS: value})
