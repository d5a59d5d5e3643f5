"""Worker processes: serve-mlflow and serve-api on every core of the task, as one service.

A Python process serves on one core (the GIL), so a task with 2 or 4 vCPUs used one of them
while the sidecar pattern (nginx or Envoy in front of `mlflow server --workers N`) used all.
With `HOKUSAI_MTLS_WORKERS` = N > 1 the command becomes a supervisor of N worker processes:

- The supervisor binds the service port once and hands the listening socket to every worker
  (inherited, `pass_fds`): one accept queue, so a connection a dead worker never accepted is
  taken by another. Workers take one connection per readiness event (`Listener.accept_batch`),
  so a worker busy with a handshake leaves the next connection to an idle one.
- Once per task, in the supervisor: loading the certificates from Secrets Manager and their
  refresh, MLflow's store migrations and job runner, the loopback health port, the EMF lines.
  Workers never call Secrets Manager: they read the files the supervisor published and reload
  them when it says so, right after each refresh that loaded a new set, so a rotation reaches every
  worker within the refresh interval.
- Metrics: each worker reports its interval counts (`Metrics.take_interval`) every
  `REPORT_SECONDS`, when the supervisor asks (`collect`: a scrape of /metrics asks every worker
  first, so it counts every request answered before it) and once more after it has drained; the
  supervisor adds them (`Metrics.add_interval`) into the task's one Prometheus view and writes each
  interval's EMF lines once, so CloudWatch sees the same lines, and the dashboard the same figures,
  whatever N is.
  (prometheus_client's multiprocess mode would serve Prometheus alone; the EMF lines need the
  merged counts anyway, so one mechanism serves both.)
- A worker that dies after it was ready is replaced (after `RESTART_DELAYS`, longer while
  replacements keep dying). A worker that dies or hangs before it is ready at start-up stops the
  task with `worker-failed` (a bad setting or image fails loudly, once, and ECS shows it), as does
  a slot whose replacements died `MAX_FAILED_STARTS` times in a row.
- SIGTERM (or SIGINT) to the supervisor: every worker gets SIGTERM and drains as a single process
  does (`runtime.serving.server`); what is left after `STOP_SECONDS` gets SIGKILL. A worker whose
  supervisor disappears (its channel closes) stops too.

The channel between them is a Unix socket pair per worker carrying one JSON object per line:
worker -> supervisor `{"ready": {...}}`, `{"serving": {...}}`, `{"metrics": {...}, "reply": N?}`;
supervisor -> worker `{"reload": true}`, `{"report": N}` (answered by a metrics line with `"reply": N`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from runtime import env_numbers, names
from runtime.errors import WorkerError
from runtime.json_input import loads
from runtime.observability.metrics import Metrics
from runtime.serving.server import (
    EXIT_TIMEOUT_SECONDS,
    GRACEFUL_SHUTDOWN_SECONDS,
    Background,
    Serving,
    periodic,
)

log = logging.getLogger("hokusai_mtls")

ENV_WORKER_SPEC = "HOKUSAI_MTLS_WORKER_SPEC"
"""Set by a supervisor for its workers only (JSON, `WorkerSpec`): its presence makes the command a worker."""
MAX_WORKERS = names.MAX_WORKERS
REPORT_SECONDS = 1.0
"""How often a worker hands its metrics to the supervisor unasked (for the EMF lines)."""
COLLECT_TIMEOUT_SECONDS = 1.0
"""How long a /metrics scrape waits for every worker's answer; then it shows what has arrived."""
READY_TIMEOUT_SECONDS = 180.0
"""A worker must be serving within this (importing MLflow takes ~5-10 s; N at once on few cores longer)."""
RESTART_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
"""Before the 1st, 2nd, ... consecutive replacement of a slot whose workers die before they are ready."""
MAX_FAILED_STARTS = 5
STOP_SECONDS = GRACEFUL_SHUTDOWN_SECONDS + EXIT_TIMEOUT_SECONDS + 3.0
"""SIGTERM to SIGKILL for workers: a worker drains (10 s) and flushes (5 s) like a single process."""
_LINE_LIMIT = 1 << 20
"""The longest message line accepted on a channel (a metrics report is a few KiB)."""


# --- how many ------------------------------------------------------------------------------------
def available_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup CPU quota (rounded up):
    cgroup v2's `cpu.max`, or v1's `cpu/cpu.cfs_quota_us` over `cpu.cfs_period_us`."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota(cgroup)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def _cgroup_quota(cgroup: Path) -> float | None:
    """CPUs the cgroup's quota allows, or None without a readable limit."""
    try:
        v2_limit, v2_period = (cgroup / "cpu.max").read_text().split()[:2]
        return None if v2_limit == "max" else int(v2_limit) / int(v2_period)
    except (OSError, ValueError):
        pass
    try:
        limit = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        return None if limit <= 0 or period <= 0 else limit / period  # -1: no limit
    except (OSError, ValueError):
        return None


def worker_count(environ: Mapping[str, str], flag: int | None = None) -> int:
    """`--workers`, else HOKUSAI_MTLS_WORKERS, else the CPUs the task has; ValueError naming the setting."""
    source, variable = (
        (environ, names.ENV_WORKERS) if flag is None else ({"--workers": str(flag)}, "--workers")
    )
    return env_numbers.whole(
        source,
        variable,
        default=available_cpus(),
        low=1,
        high=MAX_WORKERS,
        what="a whole number of worker processes",
    )


# --- the worker's side ---------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerSpec:
    """What a supervisor tells each worker it starts (in `ENV_WORKER_SPEC`)."""

    index: int
    channel_fd: int
    listen_fds: dict[str, int]
    """Listener name -> the inherited listening socket's descriptor."""
    level: str
    """The security level the supervisor's loader reached (`runtime.security_level.SecurityLevel`)."""
    source: str

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> WorkerSpec | None:
        raw = environ.get(ENV_WORKER_SPEC)
        if not raw:
            return None
        try:
            document = loads(raw)
            return cls(
                index=int(document["index"]),
                channel_fd=int(document["channel_fd"]),
                listen_fds={str(k): int(v) for k, v in document["listen_fds"].items()},
                level=str(document["level"]),
                source=str(document["source"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{ENV_WORKER_SPEC}: not a worker specification ({exc})") from None

    def socket(self, listener: str) -> socket.socket:
        """The listening socket the supervisor bound for `listener`."""
        try:
            fd = self.listen_fds[listener]
        except KeyError:
            raise ValueError(f"{ENV_WORKER_SPEC}: no socket for listener {listener}") from None
        return socket.socket(fileno=fd)


class SupervisorLink:
    """A worker's end of its channel: reports metrics, says when it serves, takes reload orders."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self._socket = socket.socket(fileno=spec.channel_fd)
        self._socket.setblocking(True)
        self._writing = threading.Lock()

    def send(self, message: Mapping) -> None:
        """One line to the supervisor; blocking, from any thread. A closed channel is ignored (the
        supervisor is gone, and the reader below stops this worker)."""
        data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
        with self._writing, contextlib.suppress(OSError):
            self._socket.sendall(data)

    def background(
        self,
        serving: Serving,
        metrics: Metrics,
        *,
        on_reload: Callable[[], None],
        describe: Callable[[], dict],
    ) -> list[Background]:
        """The jobs a worker runs beside its listener: `on_reload` runs in a thread when the
        supervisor says the files changed; `describe()` (e.g. the serial served) goes with `ready`
        and after every reload."""

        def report() -> None:
            self.send({"metrics": metrics.take_interval()})

        def reply(token: int) -> None:
            self.send({"metrics": metrics.take_interval(), "reply": token})

        async def link() -> None:
            loop = asyncio.get_running_loop()
            orders: asyncio.Queue[tuple[str, int] | None] = asyncio.Queue(maxsize=64)
            threading.Thread(
                target=self._read, args=(loop, orders), name="hokusai-mtls supervisor link", daemon=True
            ).start()
            while not serving.started.is_set():
                await asyncio.sleep(0.02)
            self.send({"ready": {"index": self.spec.index, "pid": os.getpid(), **describe()}})
            while True:
                order = await orders.get()
                if order is None:
                    log.warning("worker %d: the supervisor's channel closed; stopping", self.spec.index)
                    serving.stop()
                    return
                kind, token = order
                if kind == "reload":
                    await asyncio.to_thread(on_reload)
                    self.send({"serving": {"index": self.spec.index, **describe()}})
                elif kind == "report":
                    await asyncio.to_thread(reply, token)

        return [
            Background("supervisor link", link),
            periodic("metrics report", REPORT_SECONDS, report, at_exit=True),
        ]

    def _read(self, loop: asyncio.AbstractEventLoop, orders: asyncio.Queue) -> None:
        """Blocking reads in a daemon thread; each order (None: the channel closed) onto the loop."""
        buffer = b""
        while True:
            try:
                chunk = self._socket.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                _put(loop, orders, None)
                return
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                with contextlib.suppress(ValueError, AttributeError, TypeError):
                    order = loads(line.decode())
                    if order.get("reload"):
                        _put(loop, orders, ("reload", 0))
                    elif isinstance(order.get("report"), int):
                        _put(loop, orders, ("report", order["report"]))


def _put(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item: object) -> None:
    def put() -> None:
        with contextlib.suppress(asyncio.QueueFull):  # a reload already waits: one is enough
            queue.put_nowait(item)

    with contextlib.suppress(RuntimeError):  # the loop has closed: the worker is exiting
        loop.call_soon_threadsafe(put)


# --- the supervisor's side -----------------------------------------------------------------------
@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process
    channel: socket.socket
    started_at: float
    buffer: bytes = b""
    requests: int = 0
    """Requests it has reported (every authentication outcome): how the load spreads over workers."""
    ready: dict | None = None
    """What the worker said when it started serving, updated after each reload; None: not yet."""


@dataclass
class WorkerState:
    """What the supervisor's health answer says about its workers."""

    configured: int
    ready: int = 0
    restarts: int = 0
    workers: list[dict] = field(default_factory=list)


class Supervisor:
    """Starts `count` workers running `command`, keeps them running, stops them, merges their metrics."""

    def __init__(
        self,
        *,
        command: Sequence[str],
        environ: Mapping[str, str],
        count: int,
        sockets: Mapping[str, socket.socket],
        level: str,
        source: str,
        metrics: Metrics,
        on_failure: Callable[[str], None],
    ) -> None:
        """`on_failure(message)` is called once if the workers cannot be kept running (the caller stops
        its `Serving` and exits with `worker-failed`)."""
        self.command = list(command)
        self.environ = dict(environ)
        self.count = count
        self.sockets = dict(sockets)
        self.level = level
        self.source = source
        self.metrics = metrics
        self.on_failure = on_failure
        self.failure: str | None = None
        self.restarts = 0
        self._workers: dict[int, _Worker] = {}
        self._ever_ready: set[int] = set()
        """Slots that have had a serving worker: a death there is replaced, not fatal."""
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._collections: dict[int, tuple[asyncio.Event, set[int]]] = {}
        self._next_token = 0

    # --- what others call ---------------------------------------------------------------------
    def background(self) -> Background:
        return Background("workers", self.run, on_stop=self.stop)

    def stop(self) -> None:
        """SIGTERM to every worker now (the supervisor was told to stop); no more replacements."""
        self._stopping = True
        for worker in self._workers.values():
            _signal(worker.process, signal.SIGTERM)

    def reload(self) -> None:
        """Tell every worker to reload the published files (thread-safe: the refresh runs in a thread)."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._broadcast, {"reload": True})

    async def collect(self, timeout: float = COLLECT_TIMEOUT_SECONDS) -> None:
        """Ask every serving worker for its counts and wait (up to `timeout`) until each has answered:
        then the metrics hold every request a worker answered before the call."""
        waiting = {w.index for w in self._workers.values() if w.ready is not None}
        if not waiting:
            return
        self._next_token += 1
        token = self._next_token
        done = asyncio.Event()
        self._collections[token] = (done, waiting)
        self._broadcast({"report": token})
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except TimeoutError:
            log.warning("metrics: workers %s did not answer within %g s", sorted(waiting), timeout)
        finally:
            del self._collections[token]

    def state(self) -> WorkerState:
        workers = [
            {
                "index": w.index,
                "pid": w.process.pid,
                "ready": w.ready is not None,
                "requests": w.requests,
                **(w.ready or {}),
            }
            for w in sorted(self._workers.values(), key=lambda w: w.index)
        ]
        ready = sum(1 for w in workers if w["ready"])
        return WorkerState(self.count, ready, self.restarts, workers)

    # --- running ----------------------------------------------------------------------------------
    async def run(self) -> None:
        """Start every worker, then keep each slot filled until cancelled; then stop them all."""
        self._loop = asyncio.get_running_loop()
        slots = [
            asyncio.create_task(self._slot(index), name=f"worker {index}")
            for index in range(1, self.count + 1)
        ]
        try:
            await asyncio.gather(*slots)
        except WorkerError as exc:
            self._fail(str(exc))
            await asyncio.Future()  # until the caller's shutdown cancels this job
        finally:
            self._stopping = True
            for slot in slots:
                slot.cancel()
            await asyncio.shield(self._stop_all())
            await asyncio.gather(*slots, return_exceptions=True)

    def _fail(self, message: str) -> None:
        if self.failure is None:
            self.failure = message
            log.error("workers: %s; stopping the task", message)
            self.on_failure(message)

    async def _slot(self, index: int) -> None:
        failed_starts = 0
        while not self._stopping:
            worker = await self._spawn(index)
            became_ready = await self._wait_ready(worker)
            code: int | None
            if became_ready:
                failed_starts = 0
                code = await worker.process.wait()
            else:
                code = worker.process.returncode
            self._drain(worker)
            self._forget(worker)
            if self._stopping:
                return
            how = _exit_description(code)
            if not became_ready:
                if worker.index not in self._ever_ready:
                    raise WorkerError(f"worker {index} {how} before it was serving (see its log above)")
                failed_starts += 1
                if failed_starts >= MAX_FAILED_STARTS:
                    raise WorkerError(f"worker {index} {how} before serving, {failed_starts} times in a row")
            delay = RESTART_DELAYS[min(failed_starts, len(RESTART_DELAYS) - 1)]
            log.error(
                "worker %d (pid %d) %s; starting a replacement in %g s", index, worker.process.pid, how, delay
            )
            await asyncio.sleep(delay)
            self.restarts += 1

    async def _spawn(self, index: int) -> _Worker:
        ours, theirs = socket.socketpair()
        listen_fds = {name: sock.fileno() for name, sock in self.sockets.items()}
        spec = WorkerSpec(index, theirs.fileno(), listen_fds, self.level, self.source)
        env = {
            **self.environ,
            ENV_WORKER_SPEC: spec.to_json(),
            names.ENV_LOG_LEVEL: logging.getLevelName(log.getEffectiveLevel()),
        }
        try:
            # Its own session: a terminal's Ctrl-C reaches the supervisor, which stops the workers in order.
            process = await asyncio.create_subprocess_exec(
                *self.command,
                env=env,
                pass_fds=(theirs.fileno(), *listen_fds.values()),
                start_new_session=True,
            )
        finally:
            theirs.close()
        ours.setblocking(False)
        worker = _Worker(index, process, ours, time.monotonic())
        self._workers[index] = worker
        loop = asyncio.get_running_loop()
        loop.add_reader(ours.fileno(), self._on_readable, worker)
        log.info("worker %d of %d started (pid %d)", index, self.count, process.pid)
        return worker

    async def _wait_ready(self, worker: _Worker) -> bool:
        """True once the worker serves; False if it exited, or hung past `READY_TIMEOUT_SECONDS` (killed)."""
        deadline = worker.started_at + READY_TIMEOUT_SECONDS
        while worker.ready is None:
            if worker.process.returncode is not None:
                return False
            if time.monotonic() > deadline:
                log.error(
                    "worker %d (pid %d) was not serving after %g s; killing it",
                    worker.index,
                    worker.process.pid,
                    READY_TIMEOUT_SECONDS,
                )
                _signal(worker.process, signal.SIGKILL)
                await worker.process.wait()
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(worker.process.wait()), 0.05)
        self._ever_ready.add(worker.index)
        log.info("worker %d of %d serving (pid %d)", worker.index, self.count, worker.process.pid)
        return True

    async def _stop_all(self) -> None:
        workers = list(self._workers.values())
        for worker in workers:
            _signal(worker.process, signal.SIGTERM)
        waits = [asyncio.ensure_future(worker.process.wait()) for worker in workers]
        if waits:
            _, late = await asyncio.wait(waits, timeout=STOP_SECONDS)
            for worker in workers:
                if worker.process.returncode is None:
                    log.error(
                        "worker %d (pid %d) did not stop within %g s; killing it",
                        worker.index,
                        worker.process.pid,
                        STOP_SECONDS,
                    )
                    _signal(worker.process, signal.SIGKILL)
            if late:
                await asyncio.wait(late, timeout=5)
        for worker in workers:
            self._drain(worker)  # its last report (written before it exited) is counted
            self._forget(worker)

    # --- the channels ---------------------------------------------------------------------------
    def _broadcast(self, message: Mapping) -> None:
        data = (json.dumps(message) + "\n").encode()
        for worker in self._workers.values():
            try:
                worker.channel.send(data)
            except OSError as exc:  # exiting, or its buffer is full of orders it has not read
                log.warning("worker %d: cannot send %s: %s", worker.index, list(message), exc)

    def _on_readable(self, worker: _Worker) -> None:
        self._drain(worker)

    def _drain(self, worker: _Worker) -> None:
        """Read what the worker has written so far and act on each complete line."""
        while True:
            try:
                chunk = worker.channel.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                chunk = b""
            if not chunk:
                self._stop_reading(worker)
                break
            worker.buffer += chunk
            if len(worker.buffer) > _LINE_LIMIT and b"\n" not in worker.buffer:
                log.error("worker %d: a message over %d bytes; ignoring it", worker.index, _LINE_LIMIT)
                worker.buffer = b""
        *lines, worker.buffer = worker.buffer.split(b"\n")
        for line in lines:
            if line:
                self._handle(worker, line)

    def _handle(self, worker: _Worker, line: bytes) -> None:
        try:
            message = loads(line.decode())
            if "metrics" in message:
                self.metrics.add_interval(message["metrics"])
                worker.requests += sum(entry[2] for entry in message["metrics"]["auth"])
                collection = self._collections.get(message.get("reply"))
                if collection is not None:
                    done, waiting = collection
                    waiting.discard(worker.index)
                    if not waiting:
                        done.set()
            for key in ("ready", "serving"):
                if isinstance(message.get(key), dict):
                    worker.ready = {
                        k: v for k, v in message[key].items() if k in ("pid", "serial", "not_after")
                    }
        except (ValueError, AttributeError, TypeError, KeyError, UnicodeDecodeError) as exc:
            log.error("worker %d: unreadable message ignored: %s: %s", worker.index, type(exc).__name__, exc)

    def _stop_reading(self, worker: _Worker) -> None:
        loop = self._loop
        if loop is not None and worker.channel.fileno() >= 0:
            loop.remove_reader(worker.channel.fileno())

    def _forget(self, worker: _Worker) -> None:
        self._stop_reading(worker)
        worker.channel.close()
        if self._workers.get(worker.index) is worker:
            del self._workers[worker.index]
        for done, waiting in self._collections.values():  # a scrape does not wait for the dead
            waiting.discard(worker.index)
            if not waiting:
                done.set()


def _signal(process: asyncio.subprocess.Process, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signum)


def _exit_description(code: int | None) -> str:
    if code is None:
        return "stopped"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with status {code}"


def worker_command(subcommand: str, *options: str) -> list[str]:
    """How a supervisor starts its workers: this interpreter, the same CLI command (the listening
    socket and the rest come with `ENV_WORKER_SPEC`; `options` such as --host and --port for its log)."""
    return [sys.executable, "-m", "runtime.cli", subcommand, *options]
