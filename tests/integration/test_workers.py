"""serve-mlflow with worker processes, as an ECS task with 2 vCPUs runs it (HOKUSAI_MTLS_WORKERS=2).

The image's command on loopback, certificates in moto's Secrets Manager: under load every request
is answered, the load reaches both workers, a rotation reaches every worker within the refresh
interval, the task's metrics equal what was sent (Prometheus summed, EMF lines written once), a
killed worker loses no request another could take and is replaced, and SIGTERM drains them all.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from local_stack.auth_service import ACTIVE_KEY
from runtime import names
from runtime.certificates import pem
from runtime.certificates.certset import CertificateSet
from runtime.secrets.secret_store import SecretStore
from tests.integration.conftest import (
    ENV,
    container_command,
    loopback_options,
    server_environment,
    wait_healthy,
)
from tests.integration.test_metrics_at_shutdown import NEVER, SEARCH, Server, client_context, total
from tests.support.servers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WORKERS = 2
"""As a task with 2 vCPUs runs them."""
REFRESH_SECONDS = 2


def health(port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as answer:  # 503 while starting: the body says why
        return json.loads(answer.read())


def prometheus_total(port: int, metric: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    found = 0.0
    for line in text.splitlines():
        if not line.startswith(metric + "{"):
            continue
        pairs = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(pairs.get(k) == v for k, v in labels.items()):
            found += float(line.rsplit(" ", 1)[1])
    return found


def until(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not within {seconds} s: {what}")
        time.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def task(aws, tmp_path) -> Iterator[dict]:
    port, health_port = free_port(), free_port()
    env = server_environment(
        aws,
        **{
            names.ENV_CERT_DIR: str(tmp_path / "certs"),
            names.ENV_MLFLOW_BACKEND_STORE_URI: f"sqlite:///{tmp_path}/mlflow.db",
            names.ENV_MLFLOW_JOB_EXECUTION: "false",
            names.ENV_METRICS_SECONDS: NEVER,
            names.ENV_REFRESH_SECONDS: str(REFRESH_SECONDS),
            names.ENV_WORKERS: str(WORKERS),
        },
    )
    server = Server(
        [*container_command("Dockerfile.mlflow"), *loopback_options(port, health_port)], env, tmp_path
    )
    try:
        wait_healthy(server.process, health_port, server.stderr, seconds=120)
        until(lambda: health(health_port)["workers"]["ready"] == WORKERS, 60, "every worker serving")
        yield {
            "server": server,
            "port": port,
            "health": health_port,
            "api": client_context(aws, tmp_path, "api"),
        }
    finally:
        server.kill()


def get(url: str, context: ssl.SSLContext, client: httpx.Client | None = None) -> int:
    if client is not None:
        return client.get(url).status_code
    with httpx.Client(verify=context, timeout=30) as fresh:  # a new connection: a full handshake
        return fresh.get(url).status_code


def test_load_is_served_by_every_worker_and_counted_once(task):
    url = f"https://127.0.0.1:{task['port']}{SEARCH}"
    clients, per_client = 8, 30

    def one_client(n: int) -> list[int]:
        statuses = []
        with httpx.Client(verify=task["api"], timeout=30) as kept:
            for i in range(per_client):
                # every third request on a new connection: handshakes spread over the workers too
                statuses.append(get(url, task["api"], None if i % 3 == 0 else kept))
        return statuses

    with ThreadPoolExecutor(clients) as pool:
        statuses = [status for result in pool.map(one_client, range(clients)) for status in result]
    sent = clients * per_client
    assert statuses == [200] * sent

    # Prometheus on the health port: the task's one view, every worker's requests summed
    mtls_ok = {"auth_path": names.AUTH_PATH_MTLS, "outcome": "success"}
    # a scrape asks every worker first: it counts every request answered before it, at once
    assert prometheus_total(task["health"], "hokusai_mtls_auth_requests_total", **mtls_ok) == sent
    state = health(task["health"])["workers"]
    assert sum(p["requests"] for p in state["processes"]) == sent
    assert all(p["requests"] > 0 for p in state["processes"]), state  # the load reached every worker

    server = task["server"]
    pids = [p["pid"] for p in state["processes"]]
    status = server.terminate()
    assert status == 0, server.stderr.read_text()[-3000:]
    assert not any(alive(pid) for pid in pids), "a worker outlived its supervisor"
    documents = server.emf()
    auth_lines = [d for d in documents if d.get(names.DIM_AUTH_PATH) == names.AUTH_PATH_MTLS]
    assert len(auth_lines) == 1, "one EMF line per interval for the task, not one per worker"
    assert total(documents, names.METRIC_AUTH_REQUESTS, AuthPath=names.AUTH_PATH_MTLS) == sent
    assert total(documents, names.METRIC_INTERNAL_LATENCY) == sent
    assert "Traceback" not in server.stderr.read_text()


def served_serial(port: int, context: ssl.SSLContext) -> int:
    """The serial of the certificate the server presents on a new connection."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(True)
    return pem.load_der_certificate(der, "the served certificate").serial_number


def test_a_rotation_reaches_every_worker_within_the_refresh_interval(task, aws):
    before = health(task["health"])["workers"]["processes"]
    assert len({p["serial"] for p in before}) == 1
    # new leaves from the same CA (a rotation, not a CA rollover), as the rotation Lambda stores them
    rotated = CertificateSet.issue(ENV, server_sans=("localhost", "127.0.0.1"), ca=aws["set"].ca)
    SecretStore(ENV, client=aws["client"]).upload(rotated)
    new_server = rotated.identities[names.SERVER.name]
    new_serial = f"{new_server.certificate.serial_number:x}"

    def everyone_on_the_new_leaf():
        processes = health(task["health"])["workers"]["processes"]
        return len(processes) == WORKERS and all(p.get("serial") == new_serial for p in processes)

    until(everyone_on_the_new_leaf, REFRESH_SECONDS * 2 + 3, "every worker serving the new leaf")
    for _ in range(2 * WORKERS * 3):  # new connections land on any worker: all serve the new leaf
        assert served_serial(task["port"], task["api"]) == new_server.certificate.serial_number


def test_a_killed_worker_loses_no_request_another_can_take_and_is_replaced(task):
    url = f"https://127.0.0.1:{task['port']}{SEARCH}"
    victim = health(task["health"])["workers"]["processes"][0]
    stop = threading.Event()
    results: list[tuple[float, object]] = []
    lock = threading.Lock()
    killed_at: list[float] = []

    def load() -> None:
        while not stop.is_set():
            try:
                outcome: object = get(url, task["api"])
            except httpx.TransportError as exc:
                outcome = exc
            with lock:
                results.append((time.monotonic(), outcome))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at.append(time.monotonic())
    time.sleep(3.0)
    stop.set()
    for thread in threads:
        thread.join(30)
    failed = [outcome for _, outcome in results if outcome != 200]
    # at most the requests in flight on the killed worker (one per client thread) fail ...
    assert len(failed) <= len(threads), failed
    # ... and every request that began after the kill was served (by the worker left, meanwhile)
    assert all(outcome == 200 for at, outcome in results if at > killed_at[0] + 0.5)
    assert sum(1 for at, outcome in results if at > killed_at[0] + 0.5) > 0

    def replaced():
        state = health(task["health"])["workers"]
        pids = {p["pid"] for p in state["processes"] if p["ready"]}
        return state["restarts"] == 1 and len(pids) == WORKERS and victim["pid"] not in pids

    until(replaced, 90, "a replacement worker serving")
    assert "worker 1" in task["server"].stderr.read_text() or "worker 2" in task["server"].stderr.read_text()


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def test_serve_api_workers_answer_every_request_and_write_the_metrics_once(aws, auth_service, tmp_path):
    port = free_port()
    env = server_environment(
        aws,
        **{
            names.ENV_CERT_DIR: str(tmp_path / "certs"),
            names.ENV_AUTH_SERVICE_URL: auth_service.base_url,
            "MLFLOW_TRACKING_URI": f"https://127.0.0.1:{free_port()}",  # not called here
            names.ENV_METRICS_SECONDS: NEVER,
            names.ENV_WORKERS: str(WORKERS),
        },
    )
    argv = [*container_command("Dockerfile.api"), "--host", "127.0.0.1", "--port", str(port)]
    server = Server(argv, env, tmp_path)
    try:
        wait_healthy(server.process, port, server.stderr, seconds=120)
        until(
            lambda: all(f"worker {n} of {WORKERS} serving" in server.stderr.read_text() for n in (1, 2)),
            60,
            "both API workers serving",
        )
        workers = children(server.process.pid)
        assert len(workers) == WORKERS

        def one_client(_: int) -> list[int]:
            return [
                httpx.get(
                    f"http://127.0.0.1:{port}/platform/{n}", headers={"X-API-Key": ACTIVE_KEY}, timeout=30
                ).status_code
                for n in range(20)
            ]

        with ThreadPoolExecutor(8) as pool:
            statuses = [status for result in pool.map(one_client, range(8)) for status in result]
        assert statuses == [404] * 160  # authenticated; the platform app has no such route
        status = server.terminate()
    finally:
        server.kill()
    log = server.stderr.read_text()
    assert status == 0, log[-3000:]
    assert "Traceback" not in log
    assert not any(alive(pid) for pid in workers), "an API worker outlived its supervisor"
    documents = server.emf()
    lines = [d for d in documents if d.get(names.DIM_AUTH_PATH) == names.AUTH_PATH_API_KEY]
    assert len(lines) == 1, "one EMF line per interval for the task"
    assert lines[0][names.METRIC_AUTH_REQUESTS] == 160
