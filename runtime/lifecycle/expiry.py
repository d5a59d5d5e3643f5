"""Scheduled check: time to expiry of every certificate, and a failure count for unreadable ones.

For the trust bundle (`Identity=ca`, the CA that expires first) and each identity in
declared identity (HOKUSAI_MTLS_SERVICES, `runtime.service_catalog`) it publishes `CertificateDaysToExpiry`
(whole days, negative once expired), `CertificateHoursToExpiry` (hours, two decimals: the leaves live a
day, and their alarms are a share of that) and
`CertificateCheckFailures` (1 if the secret could not be read, parsed or verified against the
bundle, else 0) under `names.METRIC_NAMESPACE` with dimensions Environment and Identity.
A bad secret is an alarm, never a silent gap, and never stops the check of the others.
The only thing that raises is CloudWatch refusing the metrics.

Event: the EventBridge schedule's (ignored), or {"environment": "staging"} to override the
`ENVIRONMENT` variable.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass, field

from cryptography import x509

from runtime import names
from runtime.certificates.certset import verify_for
from runtime.certificates.inspection import days_left, hours_left
from runtime.errors import MtlsError
from runtime.lifecycle import CA_IDENTITY
from runtime.lifecycle.clients import cloudwatch_client, secrets_client
from runtime.secrets.secret_store import SecretStore

log = logging.getLogger("hokusai_mtls")


@dataclass
class Report:
    environment: str
    days_to_expiry: dict[str, int] = field(default_factory=dict)
    hours_to_expiry: dict[str, float] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)
    """One entry per secret that failed: identity, secret, error code and message (never a value)."""

    def as_dict(self) -> dict:
        return {
            "environment": self.environment,
            "days_to_expiry": self.days_to_expiry,
            "hours_to_expiry": self.hours_to_expiry,
            "failures": self.failures,
        }


def handler(event, context, *, secrets=None, cloudwatch=None, now: dt.datetime | None = None) -> dict:
    environment = (event or {}).get("environment") or os.environ.get(names.ENV_ENVIRONMENT, "")
    report = check(
        names.check_environment(environment),
        secrets=secrets or secrets_client(),
        cloudwatch=cloudwatch or cloudwatch_client(),
        now=now,
    )
    return report.as_dict()


def check(environment: str, *, secrets, cloudwatch, now: dt.datetime | None = None) -> Report:
    now = now or dt.datetime.now(dt.UTC)
    store = SecretStore(environment, client=secrets)
    report = Report(environment)
    data: list[dict] = []

    def record(identity: str, secret_id: str, certificate, error: MtlsError | None) -> None:
        if certificate is not None:
            days, hours = days_left(certificate, now), hours_left(certificate, now)
            report.days_to_expiry[identity] = days
            report.hours_to_expiry[identity] = hours
            data.append(_datum(names.METRIC_CERT_DAYS_TO_EXPIRY, environment, identity, days))
            data.append(_datum(names.METRIC_CERT_HOURS_TO_EXPIRY, environment, identity, hours))
        if error is not None:
            report.failures.append(
                {"identity": identity, "secret": secret_id, "code": error.code, "error": str(error)}
            )
            log.error("certificate check failed for %s (%s): %s", identity, secret_id, error)
        data.append(_datum(names.METRIC_CERT_CHECK_FAILURES, environment, identity, int(error is not None)))

    bundle = None
    try:
        bundle = store.fetch_trust_bundle()
        record(CA_IDENTITY, store.name(names.CA_BUNDLE_SECRET), min(bundle, key=_not_after), None)
    except MtlsError as exc:
        record(CA_IDENTITY, store.name(names.CA_BUNDLE_SECRET), None, exc)

    for identity in store.catalog.identities:
        secret_id = store.name(identity.secret_suffix)
        tls, error = None, None
        try:
            tls = store.fetch_identity(identity)
            if bundle is not None:
                verify_for(identity, tls, bundle, environment, now)
        except MtlsError as exc:
            error = exc
        record(identity.name, secret_id, tls.certificate if tls else None, error)

    cloudwatch.put_metric_data(Namespace=names.METRIC_NAMESPACE, MetricData=data)
    return report


def _not_after(certificate: x509.Certificate) -> dt.datetime:
    return certificate.not_valid_after_utc


def _datum(metric: str, environment: str, identity: str, value: float) -> dict:
    """No Timestamp: CloudWatch stamps the time it receives the value (`now` may be a test's clock)."""
    return {
        "MetricName": metric,
        "Dimensions": [
            {"Name": names.DIM_ENVIRONMENT, "Value": environment},
            {"Name": names.DIM_IDENTITY, "Value": identity},
        ],
        "Value": value,
        "Unit": "Count" if metric == names.METRIC_CERT_CHECK_FAILURES else "None",
    }
