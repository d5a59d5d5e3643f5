"""Two-minute leaves rotated continuously under load: no request fails, every service moves on in time.

Issue 16's proof with compressed time. moto's server holds the staging set; the real servers (the
MLflow and API images' commands) and a worker under `hokusai-mtls run` load from it and refresh every
REFRESH_SECONDS. Every ROUND_SECONDS the rotation Lambda's code (`runtime.lifecycle.rotation.handler`,
run by moto's rotate_secret) replaces the MLflow server's, the API's and the worker's leaves with
two-minute ones, for longer than a leaf lives. Requests run all the time: external callers through the
API (its proxy reaches MLflow over mTLS with the API's leaf), the worker's command calling MLflow's REST
API with requests and the files `run` keeps fresh, and fresh handshakes from this test. After every
rotation each service is on the new leaf within PICKUP_BOUND_SECONDS; by the end the first rotated
leaves have expired, so traffic kept flowing only because every service really moved on.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import json
import math
import ssl
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from local_stack.auth_service import ACTIVE_KEY, EXAMPLE_KEYS, FakeAuthService
from local_stack.environment import BIN
from runtime import names
from runtime.certificates import pem
from runtime.certificates.certset import CertificateSet
from runtime.lifecycle import ENV_LEAF_LIFETIME_HOURS, ENV_SERVER_SANS, rotation
from runtime.secrets.secret_store import SecretStore
from tests.integration.conftest import (
    container_command,
    secrets_manager_holding,
    server_environment,
    start_serve_mlflow,
    wait_healthy,
)
from tests.support.lifecycle import rotate, rotation_function
from tests.support.servers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ENV = "staging"
REGION = "us-east-1"
LEAF_LIFETIME_HOURS = 1 / 30
LEAF_LIFETIME = dt.timedelta(hours=LEAF_LIFETIME_HOURS)  # two minutes
ROUND_SECONDS = 25.0
"""A rotation of all three leaves this often: well before half a leaf's life (60 s)."""
ROUNDS = math.ceil(LEAF_LIFETIME.total_seconds() / ROUND_SECONDS) + 2
"""Rounds 0..6 (150 s): the last two run after the leaves of the first round expired."""
REFRESH_SECONDS = 1.0
PICKUP_ALLOWANCE_SECONDS = 10.0
"""Beyond the refresh interval: a refresh starts within REFRESH_SECONDS of the new AWSCURRENT (jitter
draws 80-100 % of it), then reads Secrets Manager, verifies, has OpenSSL load the set and swaps it in,
and we poll every POLL_SECONDS; on a 2-core CI runner that also runs moto, three servers and this
load, those steps can stall for seconds. A service that missed a refresh would take a whole interval more
(still inside this), one that never picked up fails: its leaf expires during the test."""
PICKUP_BOUND_SECONDS = REFRESH_SECONDS + PICKUP_ALLOWANCE_SECONDS
POLL_SECONDS = 0.1
SERVER_SANS = ("localhost", "127.0.0.1")
MLFLOW_SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"
API_SEARCH = "/mlflow/api/2.0/mlflow/experiments/search?max_results=5"
LOAD_KEY_RECORD = EXAMPLE_KEYS[ACTIVE_KEY] | {"rate_limit_per_hour": 10_000_000}
"""ACTIVE_KEY's record with a load test's rate limit: its 1,000 an hour would answer 429 within a minute."""
BURST = 6
BURST_PAUSE_SECONDS = 5.0
"""Concurrent API requests every so often: more than the idle pool's connections, after they expired
(`adaptive_client.KEEPALIVE_EXPIRY`, 4 s), so the API opens new connections to MLflow, with its newest leaf, all the time."""
MIN_REQUESTS = 100
"""Per caller at the least (the bursts make about 30 x BURST, the others several a second for over
two minutes): the load really ran."""

PROBE = r'''
"""The worker's command: MLflow's REST API over mTLS with requests (what MLflow's client uses) and
the two variables `hokusai-mtls run` exports; one line per request into its own file (argv[2]: not the
stream `run` logs to, where lines of two processes could interleave), one O_APPEND write each; SIGTERM
ends it."""
import os, signal, sys, time

import requests

url = sys.argv[1]
record = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


def say(*words):
    os.write(record, (" ".join(words) + "\n").encode())


cert = os.environ["MLFLOW_TRACKING_CLIENT_CERT_PATH"]
verify = os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"]
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
pooled = requests.Session()  # keep-alive, as MLflow's client keeps one per process


def search(session):
    response = session.get(url, cert=cert, verify=verify, timeout=10)
    if response.status_code != 200 or "experiments" not in response.json():
        raise RuntimeError(f"{response.status_code} {response.text[:300]!r}")


while not stopping:
    for kind in ("fresh", "keep-alive"):
        try:
            if kind == "fresh":
                with requests.Session() as session:  # a new connection: a new handshake, the files read again
                    search(session)
            else:
                search(pooled)
            say("PROBE-OK", kind)
        except Exception as exc:
            say("PROBE-FAILED", time.strftime("%H:%M:%S"), "worker", kind, repr(exc))
    time.sleep(0.02)
say("PROBE-DONE")
'''


class Load:
    """Callers that run for the whole test; every failure is kept, with when and which caller."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok: Counter[str] = Counter()
        self.failures: list[str] = []
        self.served_serials: set[str] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def attempt(self, name: str, call: Callable[[], object]) -> None:
        try:
            call()
        except Exception as exc:  # every failure counts, whatever it is
            with self._lock:
                self.failures.append(f"{time.strftime('%H:%M:%S')} {name}: {exc!r}")
        else:
            with self._lock:
                self.ok[name] += 1

    def repeat(self, name: str, step: Callable[[], object], pause: float) -> None:
        def loop() -> None:
            while not self.done.is_set():
                step()
                self.done.wait(pause)

        thread = threading.Thread(target=loop, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self.done.set()
        for thread in self._threads:
            thread.join(timeout=60)


def mtls_search(port: int, context: ssl.SSLContext) -> str:
    """One MLflow request over a new mTLS connection; the serial of the leaf the server presented."""
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        connection.connect()
        served = x509.load_der_x509_certificate(connection.sock.getpeercert(binary_form=True))
        connection.request("GET", MLFLOW_SEARCH)
        response = connection.getresponse()
        body = response.read()
        if response.status != 200 or "experiments" not in json.loads(body):
            raise AssertionError(f"{response.status} {body[:300]!r}")
    finally:
        connection.close()
    return f"{served.serial_number:x}"


def api_search(client: httpx.Client) -> None:
    response = client.get(API_SEARCH, headers={"X-API-Key": ACTIVE_KEY})
    if response.status_code != 200 or "experiments" not in response.json():
        raise AssertionError(f"{response.status_code} {response.text[:300]!r}")


def health_serial(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["certificate"]["serial"]


def file_serial(path: Path) -> str:
    """The leaf of a combined PEM (its first block), as the worker's TLS client reads it."""
    return f"{x509.load_pem_x509_certificate(path.read_bytes()).serial_number:x}"


def handshake_failures(health: int) -> tuple[float, float]:
    """MLflow's own count of refused handshakes on its mTLS port, and of completed ones."""
    text = httpx.get(f"http://127.0.0.1:{health}/metrics", timeout=5).text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    failed = sum(s.value for s in samples if s.name == "hokusai_mtls_handshake_failures_total")
    completed = sum(s.value for s in samples if s.name == "hokusai_mtls_handshakes_completed_total")
    return failed, completed


def stop(process: subprocess.Popen, seconds: float = 30) -> None:
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=seconds)


def summary(seconds: list[float]) -> str:
    return f"max {max(seconds):.2f} s, median {statistics.median(seconds):.2f} s over {len(seconds)}"


def test_two_minute_leaves_rotated_under_load_fail_no_request(tmp_path, monkeypatch):
    began = time.monotonic()
    # the rotation Lambda's settings, read by the handler (it runs in this process, in moto's thread)
    monkeypatch.setenv(ENV_LEAF_LIFETIME_HOURS, repr(LEAF_LIFETIME_HOURS))
    monkeypatch.setenv(
        ENV_SERVER_SANS, ",".join(SERVER_SANS)
    )  # the rotated server leaf still names 127.0.0.1
    monkeypatch.delenv(names.ENV_SERVICES, raising=False)  # our three identities

    load = Load()
    logs: dict[str, Path] = {}
    pickups: dict[str, list[float]] = {}
    with contextlib.ExitStack() as stack:
        initial = CertificateSet.issue(ENV, server_sans=SERVER_SANS)
        aws = stack.enter_context(secrets_manager_holding(initial))
        client = aws["client"]
        secrets = SecretStore(ENV, client=client)
        function = rotation_function(REGION, endpoint_url=aws["endpoint"])

        auth = FakeAuthService(keys={ACTIVE_KEY: LOAD_KEY_RECORD})
        auth_url = stack.enter_context(auth.serving())

        refresh = {names.ENV_REFRESH_SECONDS: str(REFRESH_SECONDS)}
        mlflow_port, mlflow_health = free_port(), free_port()
        logs["mlflow"] = tmp_path / "mlflow.log"
        mlflow = start_serve_mlflow(
            server_environment(
                aws,
                **refresh,
                **{
                    names.ENV_CERT_DIR: str(tmp_path / "mlflow-certs"),
                    names.ENV_MLFLOW_BACKEND_STORE_URI: f"sqlite:///{tmp_path}/mlflow.db",
                    names.ENV_MLFLOW_ARTIFACTS_DESTINATION: str(tmp_path / "artifacts"),
                },
            ),
            mlflow_port,
            mlflow_health,
            logs["mlflow"],
        )
        stack.callback(stop, mlflow)
        wait_healthy(mlflow, mlflow_health, logs["mlflow"])

        api_port = free_port()
        logs["api"] = tmp_path / "api.log"
        api_env = server_environment(
            aws,
            **refresh,
            **{
                names.ENV_CERT_DIR: str(tmp_path / "api-certs"),
                names.ENV_AUTH_SERVICE_URL: auth_url,
                "MLFLOW_TRACKING_URI": f"https://127.0.0.1:{mlflow_port}",
            },
        )
        with logs["api"].open("w") as output:
            api = subprocess.Popen(
                [*container_command("Dockerfile.api"), "--host", "127.0.0.1", "--port", str(api_port)],
                env=api_env,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        stack.callback(stop, api)
        wait_healthy(api, api_port, logs["api"])

        worker_certs = tmp_path / "worker-certs"
        probe = tmp_path / "probe.py"
        probe.write_text(PROBE)
        logs["worker"] = tmp_path / "worker.log"
        probe_record = tmp_path / "probe.record"
        with logs["worker"].open("w") as output:
            worker = subprocess.Popen(
                [
                    str(BIN / "hokusai-mtls"),
                    *("run", "--role", "worker", "--env", ENV, "--cert-dir", str(worker_certs), "--"),
                    *(sys.executable, str(probe), f"https://127.0.0.1:{mlflow_port}{MLFLOW_SEARCH}"),
                    str(probe_record),
                ],
                env=server_environment(aws, **refresh),
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        stack.callback(stop, worker)

        # --- the load, for the whole test ----------------------------------------------------------
        test_client = tmp_path / "test-client.pem"
        test_client.write_bytes(initial.identities["api"].combined_pem())  # a 24-hour leaf, never rotated
        context = ssl.create_default_context(cadata=pem.bundle_pem(initial.trust_bundle).decode())
        context.load_cert_chain(test_client)

        def direct() -> None:
            load.served_serials.add(mtls_search(mlflow_port, context))

        kept = stack.enter_context(httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=30))
        burst_pool = stack.enter_context(ThreadPoolExecutor(BURST))
        stack.callback(load.stop)  # before the pool and the client close

        def burst() -> None:
            futures = [
                burst_pool.submit(load.attempt, "api burst", lambda: api_search(kept)) for _ in range(BURST)
            ]
            wait(futures, timeout=60)

        load.repeat("direct mTLS, new connections", lambda: load.attempt("direct mTLS", direct), 0.02)
        load.repeat("api keep-alive", lambda: load.attempt("api keep-alive", lambda: api_search(kept)), 0.02)
        load.repeat("api burst", burst, BURST_PAUSE_SECONDS)

        def probe_lines(prefix: str) -> list[str]:
            text = probe_record.read_text() if probe_record.exists() else ""
            return [line for line in text.splitlines() if line.startswith(prefix)]

        deadline = time.monotonic() + 60
        while (
            len(probe_lines("PROBE-OK")) < 10
            or min(load.ok[n] for n in ("direct mTLS", "api keep-alive")) < 10
        ):
            assert worker.poll() is None, logs["worker"].read_text()[-3000:]
            assert time.monotonic() < deadline, f"the load did not start: {load.ok} {load.failures[:5]}"
            time.sleep(0.2)

        # --- the rotations -------------------------------------------------------------------------
        readers: dict[str, tuple[names.Identity, Callable[[], str]]] = {
            "mlflow-server (health)": (names.SERVER, lambda: health_serial(mlflow_health)),
            "mlflow-server (handshake)": (names.SERVER, lambda: mtls_search(mlflow_port, context)),
            "api (health)": (names.API, lambda: health_serial(api_port)),
            "worker (client file)": (
                names.WORKER,
                lambda: file_serial(worker_certs / names.COMBINED_PEM_FILE),
            ),
        }
        pickups = {name: [] for name in readers}
        first_leaves: list[x509.Certificate] = []
        rotated_server_serials: set[str] = set()
        newest: dict[names.Identity, str] = {}
        started = time.monotonic()
        for round_number in range(ROUNDS):
            current: dict[names.Identity, float] = {}
            for identity in (names.SERVER, names.API, names.WORKER):
                marks: dict[str, float] = {}
                rotate(
                    client,
                    function,
                    names.secret_name(ENV, identity.secret_suffix),
                    rotation.handler,
                    before_step=lambda step, marks=marks: marks.setdefault(step, time.monotonic()),
                )
                leaf = secrets.fetch_identity(identity).certificate
                now = dt.datetime.now(dt.UTC)
                assert leaf.not_valid_after_utc <= now + LEAF_LIFETIME, (
                    "the rotation did not issue a short leaf"
                )
                assert f"{leaf.serial_number:x}" != newest.get(identity)
                newest[identity] = f"{leaf.serial_number:x}"
                current[identity] = marks["finishSecret"]  # AWSCURRENT moves during finishSecret
                if round_number == 0:
                    first_leaves.append(leaf)
            rotated_server_serials.add(newest[names.SERVER])

            waiting = dict(readers)
            last_seen: dict[str, str] = {}
            while waiting:
                for name, (identity, read) in list(waiting.items()):
                    last_seen[name] = read()
                    if last_seen[name] == newest[identity]:
                        pickups[name].append(time.monotonic() - current[identity])
                        del waiting[name]
                late = {
                    name: f"on {last_seen[name]}, not {newest[identity]}"
                    for name, (identity, _) in waiting.items()
                    if time.monotonic() - current[identity] > PICKUP_BOUND_SECONDS
                }
                assert not late, (
                    f"round {round_number}: not on the new leaf within {PICKUP_BOUND_SECONDS} s: {late}"
                )
                time.sleep(POLL_SECONDS)
            print(
                f"round {round_number} at {time.monotonic() - started:.0f} s: picked up in "
                + ", ".join(f"{name} {times[-1]:.2f} s" for name, times in pickups.items())
            )
            if round_number < ROUNDS - 1:
                time.sleep(max(0.0, started + (round_number + 1) * ROUND_SECONDS - time.monotonic()))

        # --- the end state, with the load still running ----------------------------------------------
        ended = dt.datetime.now(dt.UTC)
        on_newest = {name: read() == newest[identity] for name, (identity, read) in readers.items()}
        failed_handshakes, completed_handshakes = handshake_failures(mlflow_health)
        alive = {"mlflow": mlflow.poll(), "api": api.poll(), "worker": worker.poll()}
        load.stop()
        stop(worker)
        worker_code = worker.returncode

    requests_made = {**load.ok, **Counter(line.split()[1] for line in probe_lines("PROBE-OK"))}
    failures = load.failures + probe_lines("PROBE-FAILED")
    duration = time.monotonic() - began
    print(
        f"\nrequests {sum(requests_made.values())} ({dict(requests_made)}), failed {len(failures)}; "
        f"handshakes on MLflow's port: {completed_handshakes:.0f} completed, {failed_handshakes:.0f} refused; "
        f"distinct server leaves seen by the load {len(load.served_serials)}; test {duration:.0f} s"
    )
    for name, times in pickups.items():
        print(f"pickup {name}: {summary(times)}")

    assert failures == [], f"{len(failures)} failed requests:\n" + "\n".join(failures[:40])
    assert failed_handshakes == 0
    assert alive == {"mlflow": None, "api": None, "worker": None}
    assert worker_code == 0 and probe_lines("PROBE-DONE"), logs["worker"].read_text()[-3000:]
    assert set(requests_made) == {"direct mTLS", "api keep-alive", "api burst", "fresh", "keep-alive"}
    assert min(requests_made.values()) >= MIN_REQUESTS, requests_made
    assert all(on_newest.values()), on_newest
    assert rotated_server_serials <= load.served_serials  # every rotated server leaf was served to the load
    assert len(first_leaves) == 3 and all(leaf.not_valid_after_utc < ended for leaf in first_leaves), (
        "the test ended before the first rotated leaves expired"
    )
    for name, log in logs.items():
        assert "Traceback" not in log.read_text(), f"{name}:\n{log.read_text()[-3000:]}"
