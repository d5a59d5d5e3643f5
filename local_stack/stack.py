"""Process supervision for the local stack: start children, record them, stop exactly them.

Why it works this way:

- Every child starts in a session (and process group) of its own. A Ctrl-C in the terminal
  then reaches only the supervisor, which stops the children in reverse start order (the
  worker and the API before MLflow, MLflow before the Secrets Manager it reloads from); and
  a signal sent to a child's group also reaches anything that child started.
- The run directory's state file lists the supervisor and every child with its pid, process
  group and start time, so `python -m local_stack down` from another shell can stop them: it
  signals the supervisor, or, when the supervisor died without cleaning up, the recorded
  groups itself. A pid is signalled only while it still is the process we started (same
  start time): never by name, never by port, never a reused pid.
- Stopping: SIGTERM to the group, `grace` seconds to exit (our servers shut down gracefully),
  then SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

STATE_FILE = "state.json"
STOP_GRACE_SECONDS = 10.0


class Stop(BaseException):  # a signal, like KeyboardInterrupt, not an error
    """Raised in the supervisor by SIGINT, SIGTERM or SIGHUP: stop everything, then exit."""


_critical = 0
_pending: int | None = None


def _raise_stop(signum: int, _frame) -> None:
    global _pending
    if _critical:  # inside `deferred_signals()`: raise when it ends
        _pending = signum
        return
    raise Stop(signal.Signals(signum).name)


@contextlib.contextmanager
def deferred_signals():
    """Hold Stop back while a child is started and recorded, so none can start unrecorded.

    (Blocking the signals instead would not do: a blocked mask is inherited by the child.)
    """
    global _critical, _pending
    _critical += 1
    try:
        yield
    finally:
        _critical -= 1
        if not _critical and _pending is not None:
            signum, _pending = _pending, None
            raise Stop(signal.Signals(signum).name)


def install_signal_handlers() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_stop)


def ignore_signals_while_stopping() -> None:
    """A second Ctrl-C must not interrupt the orderly stop (it ends with SIGKILL anyway)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


# --- which process is it? -----------------------------------------------------------------
def start_marker(pid: int) -> str | None:
    """When `pid` started (None: no such process); tells a process apart from a later one with its pid.

    Linux: the start time in clock ticks from /proc/PID/stat; elsewhere `ps -o lstart=`.
    """
    stat = Path(f"/proc/{pid}/stat")
    if Path("/proc/self/stat").exists():
        try:
            text = stat.read_text()
        except OSError:
            return None
        return text[text.rindex(")") + 2 :].split()[19]  # field 22, starttime
    result = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True)
    return result.stdout.strip() or None


def process_exists(pid: int) -> bool:
    """`pid` is a process that has not exited (a zombie, exited but not yet reaped, counts as gone)."""
    if Path("/proc/self/stat").exists():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat[stat.rindex(")") + 2] != "Z"
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout
    return bool(state.strip()) and not state.strip().startswith("Z")


def is_alive(pid: int, marker: str | None) -> bool:
    """`pid` runs and is the process recorded with `marker`."""
    current = start_marker(pid)
    return current is not None and current == marker and process_exists(pid)


def group_members(pgid: int) -> list[int]:
    """Processes in process group `pgid` (Linux: from /proc; elsewhere the leader if it runs)."""
    if not Path("/proc/self/stat").exists():
        try:
            os.killpg(pgid, 0)
        except OSError:
            return []
        return [pgid]
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":  # field 5, pgrp; zombies are gone
            members.append(int(entry.name))
    return members


# --- what was started ----------------------------------------------------------------------
@dataclass
class Child:
    """One process the supervisor started, as recorded in the state file."""

    name: str
    pid: int
    pgid: int
    marker: str | None
    argv: list[str]
    log: str
    long_running: bool = True
    """False for a job that is meant to exit (the worker); its exit is not a failure."""
    process: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    def record(self) -> dict:
        return {name: getattr(self, name) for name in RECORDED}

    @classmethod
    def from_record(cls, record: Mapping) -> Child:
        return cls(**{name: record[name] for name in RECORDED if name in record})

    def running(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return is_alive(self.pid, self.marker)

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> str:
        """SIGTERM to its group, SIGKILL after `grace`; returns what happened, for the user."""
        if self.process is None and self.process_is_reused():
            return "had exited (its pid now belongs to another process)"
        if not self.running() and not group_members(self.pgid):
            return "had exited"
        how = "stopped"
        self._signal_group(signal.SIGTERM)
        if not self._wait_gone(grace):
            self._signal_group(signal.SIGKILL)
            how = f"killed (no exit {grace:.0f} s after SIGTERM)"
            self._wait_gone(5)
        return how

    def _signal_group(self, sig: signal.Signals) -> None:
        # Our own child (we hold its Popen, it cannot have been reaped and reused), or a recorded
        # one that still is the process we started: only then is its group ours to signal.
        if self.process is None and self.process_is_reused():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, sig)

    def process_is_reused(self) -> bool:
        """The recorded pid now belongs to another process (ours exited, the pid was reused)."""
        marker = start_marker(self.pid)
        return marker is not None and marker != self.marker

    def _wait_gone(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while True:
            if self.process is not None:
                self.process.poll()  # reap it, or it lingers as a zombie
            if not self.running() and not group_members(self.pgid):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


RECORDED = ("name", "pid", "pgid", "marker", "argv", "log", "long_running")
"""The fields of `Child` the state file keeps (not the Popen)."""


class StateFile:
    """`state.json`: who runs (the supervisor and its children) and where; written atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise RuntimeError(f"{self.path}: not a state file of the local stack ({exc})") from exc

    def write(self, state: Mapping) -> None:
        partial = self.path.with_name(f".{self.path.name}.partial")
        partial.write_text(json.dumps(state, indent=2) + "\n")
        partial.replace(self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def supervisor_record() -> dict:
    return {"pid": os.getpid(), "marker": start_marker(os.getpid()), "argv": sys.argv}


class Supervisor:
    """Starts children in their own process groups, keeps the state file current, stops them."""

    def __init__(self, state: StateFile, details: Mapping | None = None) -> None:
        self.state = state
        self.children: list[Child] = []
        self.details: dict = dict(details or {})
        """Written into the state file next to the processes (URLs, ports, the run directory)."""
        self.started = time.time()

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        log: Path,
        cwd: Path | None = None,
        long_running: bool = True,
    ) -> Child:
        with deferred_signals(), log.open("ab") as output:
            process = subprocess.Popen(
                list(argv),
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own session and process group (see the module doc)
            )
            child = Child(
                name=name,
                pid=process.pid,
                pgid=process.pid,
                marker=start_marker(process.pid),
                argv=[str(a) for a in argv],
                log=str(log),
                long_running=long_running,
                process=process,
            )
            self.children.append(child)
            self.save()
        return child

    def save(self, **details) -> None:
        self.details.update(details)
        self.state.write(
            {
                "supervisor": supervisor_record(),
                "started": self.started,
                "children": [child.record() for child in self.children],
                **self.details,
            }
        )

    def exited_unexpectedly(self) -> list[Child]:
        """Long-running children that are gone (each is reaped)."""
        return [c for c in self.children if c.long_running and not c.running()]

    def stop_all(self, report: Callable[[str], None], grace: float = STOP_GRACE_SECONDS) -> None:
        """Stop every child, last started first, then forget them (the state file goes)."""
        for child in reversed(self.children):
            report(f"{child.name:<16} pid {child.pid:<8} {child.stop(grace)}")
        self.children.clear()
        self.state.remove()


def stop_recorded(
    state: StateFile,
    report: Callable[[str], None],
    *,
    wait_for_supervisor: float = 60.0,
    grace: float = STOP_GRACE_SECONDS,
) -> bool:
    """`down`: stop the stack recorded in `state`; False when nothing was recorded.

    A live supervisor gets SIGTERM and stops its children itself (in order, as on Ctrl-C).
    If it is gone, or does not finish in `wait_for_supervisor` seconds, the recorded
    children that still are the processes it started are stopped here.
    """
    recorded = state.read()
    if recorded is None:
        return False
    supervisor = recorded.get("supervisor", {})
    pid, marker = supervisor.get("pid"), supervisor.get("marker")
    if pid and is_alive(pid, marker):
        report(f"asking the local stack (supervisor pid {pid}) to stop")
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + wait_for_supervisor
        while is_alive(pid, marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not is_alive(pid, marker):
            if state.read() is not None:  # it was killed before it could clean up
                report("the supervisor exited without removing the state file")
            else:
                return True
        else:
            report(f"the supervisor did not stop in {wait_for_supervisor:.0f} s; stopping its children here")
    else:
        report("the supervisor is gone; stopping the processes it recorded")
    for record in reversed(recorded.get("children", [])):
        child = Child.from_record(record)
        report(f"{child.name:<16} pid {child.pid:<8} {child.stop(grace)}")
    state.remove()
    return True


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
