"""The pieces of `runtime.serving.workers`: how many, what a worker is told, the metrics it hands
over, and a supervisor keeping real (small) worker processes running, replacing and stopping them."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import textwrap
from pathlib import Path

import pytest

from runtime import names
from runtime.errors import WorkerError
from runtime.observability.metrics import Metrics
from runtime.serving import workers
from runtime.serving.workers import Supervisor, WorkerSpec, available_cpus, worker_count


# --- how many ------------------------------------------------------------------------------------
def test_the_flag_wins_over_the_setting_and_the_setting_over_the_cpus():
    assert worker_count({names.ENV_WORKERS: "3"}, flag=5) == 5
    assert worker_count({names.ENV_WORKERS: "3"}) == 3
    assert worker_count({}) == available_cpus()


@pytest.mark.parametrize("raw", ["0", "-1", "two", "1.5", "65", ""])
def test_a_bad_count_names_the_setting(raw):
    if raw == "":
        assert worker_count({names.ENV_WORKERS: raw}) == available_cpus()  # unset: the CPUs
        return
    with pytest.raises(ValueError, match=names.ENV_WORKERS):
        worker_count({names.ENV_WORKERS: raw})


def test_a_bad_flag_names_the_flag():
    with pytest.raises(ValueError, match="--workers"):
        worker_count({}, flag=0)


def test_a_cgroup_cpu_quota_caps_the_count(tmp_path):
    cpus = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # cgroup v2, 1.5 CPUs: 2 processes
    assert available_cpus(tmp_path) == min(cpus, 2)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(tmp_path) == cpus
    assert available_cpus(tmp_path / "missing") == cpus


def test_a_cgroup_v1_quota_caps_the_count_too(tmp_path):
    cpus = len(os.sched_getaffinity(0))
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")  # half a CPU: still one process
    assert available_cpus(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # no limit
    assert available_cpus(tmp_path) == cpus


# --- what a worker is told -----------------------------------------------------------------------
def test_a_worker_spec_travels_through_the_environment():
    spec = WorkerSpec(2, 7, {"service": 8}, "mtls", "secrets-manager")
    assert WorkerSpec.from_environ({workers.ENV_WORKER_SPEC: spec.to_json()}) == spec
    assert WorkerSpec.from_environ({}) is None


@pytest.mark.parametrize("raw", ["{", "[]", '{"index": 1}', json.dumps({"index": "x"})])
def test_a_malformed_worker_spec_names_the_variable(raw):
    with pytest.raises(ValueError, match=workers.ENV_WORKER_SPEC):
        WorkerSpec.from_environ({workers.ENV_WORKER_SPEC: raw})


# --- the metrics a worker hands over -------------------------------------------------------------
def record(metrics: Metrics, requests: int) -> None:
    for n in range(requests):
        metrics.auth(names.AUTH_PATH_MTLS, "success")
        metrics.internal_latency(0.001 * (n + 1))
    metrics.auth(names.AUTH_PATH_API_KEY, "invalid")
    metrics.handshake_started()
    metrics.handshake_started()
    metrics.handshake_completed()
    metrics.plain_port_request()
    metrics.internal_api_key_request()


def samples(metrics: Metrics) -> list[str]:
    """The Prometheus text without the `_created` timestamps (when each series began, per process)."""
    return [line for line in metrics.prometheus().decode().splitlines() if "_created" not in line]


def test_workers_intervals_added_up_equal_one_process_that_served_everything():
    one = Metrics(environment="staging", service="mlflow", stream=open(os.devnull, "w"))  # noqa: SIM115
    merged = Metrics(environment="staging", service="mlflow", stream=open(os.devnull, "w"))  # noqa: SIM115
    for requests in (3, 5):
        worker = Metrics(environment="staging", service="mlflow")
        record(worker, requests)
        record(one, requests)
        merged.add_interval(json.loads(json.dumps(worker.take_interval())))  # as it travels: JSON
    assert samples(merged) == samples(one)
    strip = lambda documents: [{k: v for k, v in d.items() if k != "_aws"} for d in documents]  # noqa: E731
    assert strip(merged.flush()) == strip(one.flush())


EMPTY_INTERVAL = {
    "auth": [],
    "started": 0,
    "completed": 0,
    "failed": [],
    "internal_api_key": 0,
    "policy_denied": 0,
    "policy_would_deny": 0,
    "plain": 0,
    "latency_ms": [],
}
"""What a worker reports for an interval with nothing in it (written out here, not taken from the code)."""


def test_taking_an_interval_starts_a_new_one():
    worker = Metrics(environment="staging", service="mlflow")
    record(worker, 2)
    assert worker.take_interval()["auth"]
    assert worker.take_interval() == EMPTY_INTERVAL


@pytest.mark.parametrize(
    "document",
    [
        {},
        {**EMPTY_INTERVAL, "auth": [["mtls", "success", -1]]},
        {**EMPTY_INTERVAL, "started": True},
        {**EMPTY_INTERVAL, "latency_ms": [["nan", 1]]},
        {**EMPTY_INTERVAL, "auth": "x"},
        {**EMPTY_INTERVAL, "policy_denied": -2},
    ],
)
def test_a_malformed_report_is_refused_and_counts_nothing(document):
    merged = Metrics(environment="staging", service="mlflow", stream=open(os.devnull, "w"))  # noqa: SIM115
    before = merged.prometheus()
    with pytest.raises(ValueError, match="not a metrics interval"):
        merged.add_interval(document)
    assert merged.prometheus() == before
    assert merged.flush() == []


# --- a supervisor and real worker processes ------------------------------------------------------
WORKER = textwrap.dedent(
    """
    import json, os, signal, socket, sys, threading, time
    spec = json.loads(os.environ["HOKUSAI_MTLS_WORKER_SPEC"])
    channel = socket.socket(fileno=spec["channel_fd"])
    behaviour = sys.argv[1]
    if behaviour == "fail":
        sys.exit(3)
    report = {"auth": [["mtls", "success", 2]], "started": 1, "completed": 1, "internal_api_key": 0, "policy_denied": 0, "policy_would_deny": 0,
              "plain": 0, "latency_ms": [[1.5, 2]]}
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))

    def answer_orders():
        for line in channel.makefile("rb"):
            order = json.loads(line)
            if "report" in order and behaviour != "mute":
                channel.sendall(json.dumps({"metrics": report, "reply": order["report"]}).encode() + b"\\n")

    threading.Thread(target=answer_orders, daemon=True).start()
    channel.sendall(json.dumps({"ready": {"pid": os.getpid(), "serial": "ab"}}).encode() + b"\\n")
    marker = sys.argv[2]
    if behaviour == "die-once" and not os.path.exists(marker):
        open(marker, "w").close()
        sys.exit(1)
    while not stopping:
        time.sleep(0.01)
    channel.sendall(json.dumps({"metrics": report}).encode() + b"\\n")  # the last report, after draining
    """
)


def supervisor(tmp_path: Path, behaviour: str, count: int, failures: list[str]) -> Supervisor:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    listening = socket.create_server(("127.0.0.1", 0))
    return Supervisor(
        command=[sys.executable, str(script), behaviour, str(tmp_path / "died")],
        environ=dict(os.environ),
        count=count,
        sockets={"service": listening},
        level="mtls",
        source="secrets-manager",
        metrics=Metrics(environment="staging", service="mlflow", stream=open(os.devnull, "w")),
        on_failure=failures.append,
    )


async def until(condition, seconds: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_workers_start_serve_and_hand_over_their_last_metrics_when_stopped(tmp_path):
    failures: list[str] = []
    sup = supervisor(tmp_path, "serve", 3, failures)

    async def scenario() -> list[int]:
        job = asyncio.create_task(sup.run())
        await until(lambda: sup.state().ready == 3)
        pids = [w["pid"] for w in sup.state().workers]
        sup.stop()
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)
        return pids

    pids = asyncio.run(scenario())
    assert failures == []
    assert len(set(pids)) == 3
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    documents = sup.metrics.flush()
    mtls = [d for d in documents if d.get(names.DIM_AUTH_PATH) == names.AUTH_PATH_MTLS]
    assert [d[names.METRIC_AUTH_REQUESTS] for d in mtls] == [6]  # 3 workers x 2, in one line


def test_a_worker_that_fails_before_serving_stops_the_task_with_its_status(tmp_path):
    failures: list[str] = []
    sup = supervisor(tmp_path, "fail", 2, failures)

    async def scenario() -> None:
        job = asyncio.create_task(sup.run())
        await until(lambda: failures)
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)

    asyncio.run(scenario())
    assert len(failures) == 1
    assert "exited with status 3 before it was serving" in failures[0]
    assert sup.failure == failures[0]
    assert issubclass(WorkerError, Exception) and WorkerError.code == "worker-failed"


def test_a_worker_that_dies_after_serving_is_replaced(tmp_path):
    failures: list[str] = []
    sup = supervisor(tmp_path, "die-once", 1, failures)

    async def scenario() -> None:
        job = asyncio.create_task(sup.run())
        await until(lambda: sup.restarts == 1 and sup.state().ready == 1)
        sup.stop()
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)

    asyncio.run(scenario())
    assert failures == []


@pytest.mark.parametrize("behaviour", ["serve", "mute"])
def test_a_scrape_waits_for_every_workers_counts_but_not_for_ever(tmp_path, behaviour):
    failures: list[str] = []
    sup = supervisor(tmp_path, behaviour, 2, failures)

    async def scenario() -> float:
        job = asyncio.create_task(sup.run())
        await until(lambda: sup.state().ready == 2)
        started = asyncio.get_running_loop().time()
        await sup.collect(timeout=2.0)
        took = asyncio.get_running_loop().time() - started
        sup.stop()
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)
        return took

    took = asyncio.run(scenario())
    assert failures == []
    if behaviour == "serve":  # both answered: 2 requests each, counted before the scrape returned
        assert took < 2.0
    else:  # nobody answers: the scrape gives up at its timeout and shows what it has
        assert took >= 2.0
    documents = sup.metrics.flush()
    counted = sum(d.get(names.METRIC_AUTH_REQUESTS, 0) for d in documents)
    # the answers to the scrape (2 x 2 when they answer) and the last reports at stop (2 x 2)
    assert counted == (8 if behaviour == "serve" else 4)
