"""Auth and mTLS metrics, for Prometheus (`/metrics`) and CloudWatch (Embedded Metric Format).

Names, namespace and dimensions are `runtime.names`'s: the CDK dashboard and alarms read
exactly what is published here. Requests only touch in-memory counters; EMF lines are
written by `flush()` on an interval (one line per dimension set and interval, not one per
request), so metrics cost no I/O on the request path. The interval is
`HOKUSAI_MTLS_METRICS_SECONDS` for serve-mlflow and serve-api alike (`interval_from_environ`),
and both flush once more at shutdown, after their listeners have drained (`runtime.serving.server`'s
at-exit actions), so a deploy loses no counts.

Handshakes: OpenSSL calls our SNI callback at the start of every handshake and uvicorn's
protocol learns of each completed one, so failures = started - completed in an interval.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from typing import TextIO

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client import Counter as PromCounter

from runtime import env_numbers, names

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_EMF_MAX_VALUES = 100  # EMF allows at most 100 distinct values per metric per line
DEFAULT_INTERVAL_SECONDS = 60.0
MAX_INTERVAL_SECONDS = 24 * 3600.0


def _count(value: object) -> int:
    """A count from a worker's report: a non-negative int (bool is not a count)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{value!r} is not a count")
    return value


def interval_from_environ(environ: Mapping[str, str]) -> float:
    """`HOKUSAI_MTLS_METRICS_SECONDS` (default 60): how often the EMF lines are written.

    ValueError naming the variable unless it is a number of seconds above 0 and at most a day.
    """
    return env_numbers.seconds(
        environ, names.ENV_METRICS_SECONDS, default=DEFAULT_INTERVAL_SECONDS, maximum=MAX_INTERVAL_SECONDS
    )


class Metrics:
    """One service's counters. Thread-safe: handshakes are counted from OpenSSL callbacks."""

    def __init__(
        self,
        *,
        environment: str,
        service: str,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.environment = names.check_environment(environment)
        self.service = service
        self._stream = stream or sys.stdout
        self._clock = clock
        self._lock = threading.Lock()
        self._writing = threading.Lock()  # a periodic and the final flush never interleave their lines
        self.registry = CollectorRegistry()
        labels = ("environment", "service")
        self._prom_auth = PromCounter(
            "hokusai_mtls_auth_requests",
            "Requests by authentication path and outcome",
            (*labels, "auth_path", "outcome"),
            registry=self.registry,
        )
        self._prom_started = PromCounter(
            "hokusai_mtls_handshakes_started",
            "TLS handshakes begun on the mTLS port",
            labels,
            registry=self.registry,
        )
        self._prom_failed = PromCounter(
            "hokusai_mtls_handshake_failures",
            "TLS handshakes refused on the mTLS port, by reason (runtime.serving.handshake_failures)",
            (*labels, "reason"),
            registry=self.registry,
        )
        self._prom_completed = PromCounter(
            "hokusai_mtls_handshakes_completed",
            "TLS handshakes that verified a client certificate",
            labels,
            registry=self.registry,
        )
        self._prom_internal_api_key = PromCounter(
            "hokusai_mtls_internal_api_key_requests",
            "API-key requests from internal callers",
            labels,
            registry=self.registry,
        )
        self._prom_policy_denied = PromCounter(
            "hokusai_mtls_route_policy_denied",
            "mTLS requests the route policy refused",
            labels,
            registry=self.registry,
        )
        self._prom_policy_would_deny = PromCounter(
            "hokusai_mtls_route_policy_would_deny",
            "mTLS requests an audit-mode route policy would refuse",
            labels,
            registry=self.registry,
        )
        self._prom_plain = PromCounter(
            "hokusai_mtls_plain_port_requests",
            "Requests on the permissive plain port",
            labels,
            registry=self.registry,
        )
        self._prom_latency = Histogram(
            "hokusai_mtls_internal_request_seconds",
            "Latency of requests on the internal mTLS path",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._prom_days = Gauge(
            "hokusai_mtls_certificate_days_to_expiry",
            "Whole days until the served certificate expires",
            ("environment", "identity"),
            registry=self.registry,
        )
        self._prom_hours = Gauge(
            "hokusai_mtls_certificate_hours_to_expiry",
            "Hours until the served certificate expires (leaves live a day)",
            ("environment", "identity"),
            registry=self.registry,
        )
        # Label lookups cost microseconds per request: resolve the per-request children once.
        self._latency_child = self._prom_latency.labels(self.environment, self.service)
        self._auth_children: dict[tuple[str, str], object] = {}
        self._reset_interval()

    def _auth_child(self, auth_path: str, outcome: str):
        child = self._auth_children.get((auth_path, outcome))
        if child is None:
            child = self._prom_auth.labels(self.environment, self.service, auth_path, outcome)
            self._auth_children[(auth_path, outcome)] = child
        return child

    def _reset_interval(self) -> None:
        self._auth: Counter[tuple[str, str]] = Counter()
        self._started = 0
        self._completed = 0
        self._failed: Counter[str] = Counter()
        self._internal_api_key = 0
        self._policy_denied = 0
        self._policy_would_deny = 0
        self._plain = 0
        self._latency_ms: defaultdict[float, int] = defaultdict(int)
        self._left: dict[str, tuple[int, float]] = {}

    # --- recording (cheap, in memory) ------------------------------------------------------
    def auth(self, auth_path: str, outcome: str) -> None:
        self._auth_child(auth_path, outcome).inc()
        with self._lock:
            self._auth[(auth_path, outcome)] += 1

    def handshake_started(self) -> None:
        self._prom_started.labels(self.environment, self.service).inc()
        with self._lock:
            self._started += 1

    def handshake_completed(self) -> None:
        self._prom_completed.labels(self.environment, self.service).inc()
        with self._lock:
            self._completed += 1

    def handshake_failed(self, reason: str) -> None:
        """A refused handshake and why (`names.HANDSHAKE_FAILURE_REASONS`); `started - completed` still
        counts it in MtlsHandshakeFailures without a reason, which the failure-rate alarm watches."""
        if reason not in names.HANDSHAKE_FAILURE_REASONS:
            raise ValueError(f"{reason!r} is not a handshake failure reason")
        self._prom_failed.labels(self.environment, self.service, reason).inc()
        with self._lock:
            self._failed[reason] += 1

    def internal_api_key_request(self) -> None:
        self._prom_internal_api_key.labels(self.environment, self.service).inc()
        with self._lock:
            self._internal_api_key += 1

    def route_policy(self, *, denied: bool) -> None:
        """A request the route policy refused (`denied`), or that its audit mode let through."""
        counter = self._prom_policy_denied if denied else self._prom_policy_would_deny
        counter.labels(self.environment, self.service).inc()
        with self._lock:
            if denied:
                self._policy_denied += 1
            else:
                self._policy_would_deny += 1

    def plain_port_request(self) -> None:
        self._prom_plain.labels(self.environment, self.service).inc()
        with self._lock:
            self._plain += 1

    def internal_latency(self, seconds: float) -> None:
        self._latency_child.observe(seconds)
        with self._lock:
            self._latency_ms[round(seconds * 1000, 1)] += 1

    def certificate_time_left(self, identity: str, days: int, hours: float) -> None:
        """The served certificate's time left (`inspection.days_left`, `hours_left`): the leaf alarms
        watch the hours of every task as well as the secret's, so a task stuck on an old leaf pages."""
        self._prom_days.labels(self.environment, identity).set(days)
        self._prom_hours.labels(self.environment, identity).set(hours)
        with self._lock:
            self._left[identity] = (days, hours)

    # --- publishing ------------------------------------------------------------------------
    def prometheus(self) -> bytes:
        return generate_latest(self.registry)

    # --- worker processes (runtime.serving.workers) -------------------------------------------
    def take_interval(self) -> dict:
        """This interval's counts as a JSON-able document, and a new interval: what a worker process
        reports to its supervisor, which `add_interval`s every worker's into the task's one view."""
        with self._lock:
            document = {
                "auth": [[path, outcome, count] for (path, outcome), count in self._auth.items()],
                "started": self._started,
                "completed": self._completed,
                "failed": [[reason, count] for reason, count in self._failed.items()],
                "internal_api_key": self._internal_api_key,
                "policy_denied": self._policy_denied,
                "policy_would_deny": self._policy_would_deny,
                "plain": self._plain,
                "latency_ms": [[value, count] for value, count in self._latency_ms.items()],
            }
            self._reset_interval()
        return document

    def add_interval(self, document: Mapping) -> None:
        """Count a worker's `take_interval` document as if its requests had been served here: the
        Prometheus totals and this interval's EMF figures. ValueError if it is not such a document
        (nothing is counted then)."""
        try:
            auth = [(str(path), str(outcome), _count(n)) for path, outcome, n in document["auth"]]
            started, completed = _count(document["started"]), _count(document["completed"])
            failed = [(str(reason), _count(n)) for reason, n in document.get("failed", [])]
            internal_api_key, plain = _count(document["internal_api_key"]), _count(document["plain"])
            denied, would_deny = _count(document["policy_denied"]), _count(document["policy_would_deny"])
            latency = [(float(value), _count(n)) for value, n in document["latency_ms"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a metrics interval: {type(exc).__name__}: {exc}") from None
        if any(reason not in names.HANDSHAKE_FAILURE_REASONS for reason, _ in failed):
            raise ValueError("not a metrics interval: an unknown handshake failure reason")
        if any(not (math.isfinite(value) and value >= 0) for value, _ in latency):
            raise ValueError("not a metrics interval: a latency that is not a finite positive number")
        labels = (self.environment, self.service)
        for path, outcome, n in auth:
            if n:
                self._prom_auth.labels(*labels, path, outcome).inc(n)
        for counter, n in (
            (self._prom_started, started),
            (self._prom_completed, completed),
            (self._prom_internal_api_key, internal_api_key),
            (self._prom_policy_denied, denied),
            (self._prom_policy_would_deny, would_deny),
            (self._prom_plain, plain),
        ):
            if n:
                counter.labels(*labels).inc(n)
        for reason, n in failed:
            if n:
                self._prom_failed.labels(*labels, reason).inc(n)
        for value, n in latency:
            for _ in range(n):
                self._latency_child.observe(value / 1000)
        with self._lock:
            for path, outcome, n in auth:
                self._auth[(path, outcome)] += n
            self._started += started
            self._completed += completed
            for reason, n in failed:
                self._failed[reason] += n
            self._internal_api_key += internal_api_key
            self._policy_denied += denied
            self._policy_would_deny += would_deny
            self._plain += plain
            for value, n in latency:
                self._latency_ms[value] += n

    def flush(self) -> list[dict]:
        """Write this interval's EMF documents (one JSON line each) and start a new interval."""
        with self._lock:
            auth: Counter[str] = Counter()
            for (auth_path, outcome), count in self._auth.items():
                if outcome == "success":
                    auth[auth_path] += count
            started, completed = self._started, self._completed
            failed = dict(self._failed)
            internal_api_key, plain = self._internal_api_key, self._plain
            denied, would_deny = self._policy_denied, self._policy_would_deny
            latency, left = dict(self._latency_ms), dict(self._left)
            self._reset_interval()
        base = {names.DIM_ENVIRONMENT: self.environment, names.DIM_SERVICE: self.service}
        documents = []
        if started or completed:
            documents.append(
                self._emf(
                    base,
                    {
                        names.METRIC_MTLS_HANDSHAKES: (completed, "Count"),
                        names.METRIC_MTLS_HANDSHAKE_FAILURES: (max(started - completed, 0), "Count"),
                    },
                )
            )
        for reason, count in sorted(failed.items()):
            if count:
                documents.append(
                    self._emf(
                        {**base, names.DIM_REASON: reason},
                        {names.METRIC_MTLS_HANDSHAKE_FAILURES: (count, "Count")},
                    )
                )
        for auth_path, count in sorted(auth.items()):
            documents.append(
                self._emf(
                    {**base, names.DIM_AUTH_PATH: auth_path}, {names.METRIC_AUTH_REQUESTS: (count, "Count")}
                )
            )
        if internal_api_key:
            documents.append(
                self._emf(base, {names.METRIC_INTERNAL_API_KEY_REQUESTS: (internal_api_key, "Count")})
            )
        if plain:
            documents.append(self._emf(base, {names.METRIC_PLAIN_PORT_REQUESTS: (plain, "Count")}))
        if denied or would_deny:
            documents.append(
                self._emf(
                    base,
                    {
                        names.METRIC_ROUTE_POLICY_DENIED: (denied, "Count"),
                        names.METRIC_ROUTE_POLICY_WOULD_DENY: (would_deny, "Count"),
                    },
                )
            )
        values = sorted(latency.items())
        for start in range(0, len(values), _EMF_MAX_VALUES):
            chunk = values[start : start + _EMF_MAX_VALUES]
            distribution = {"Values": [v for v, _ in chunk], "Counts": [c for _, c in chunk]}
            documents.append(self._emf(base, {names.METRIC_INTERNAL_LATENCY: (distribution, "Milliseconds")}))
        for identity, (days, hours) in sorted(left.items()):
            documents.append(
                self._emf(
                    {names.DIM_ENVIRONMENT: self.environment, names.DIM_IDENTITY: identity},
                    {
                        names.METRIC_CERT_DAYS_TO_EXPIRY: (days, "None"),
                        names.METRIC_CERT_HOURS_TO_EXPIRY: (hours, "None"),
                    },
                )
            )
        text = "".join(json.dumps(document, separators=(",", ":")) + "\n" for document in documents)
        with self._writing:
            if text:
                self._stream.write(text)
            self._stream.flush()
        return documents

    def _emf(self, dimensions: dict[str, str], metrics: dict[str, tuple[object, str]]) -> dict:
        return {
            "_aws": {
                "Timestamp": int(self._clock() * 1000),
                "CloudWatchMetrics": [
                    {
                        "Namespace": names.METRIC_NAMESPACE,
                        "Dimensions": [list(dimensions)],
                        "Metrics": [{"Name": name, "Unit": unit} for name, (_, unit) in metrics.items()],
                    }
                ],
            },
            **dimensions,
            **{name: value for name, (value, _) in metrics.items()},
        }
