"""local_stack.stack: children in their own process groups, stopped exactly, by Ctrl-C or `down`.

Real processes (`sleep`, `sh`), no servers: what `make local` relies on to stop everything it
started and nothing else. The whole stack is tested in tests/integration/test_local_stack.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from local_stack.environment import REPO
from local_stack.stack import (
    Child,
    StateFile,
    Supervisor,
    group_members,
    is_alive,
    process_exists,
    start_marker,
    stop_recorded,
)


def gone(pid: int) -> bool:
    return not process_exists(pid)


def wait_for(condition, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def supervisor(tmp_path):
    supervisor = Supervisor(StateFile(tmp_path / "state.json"))
    yield supervisor
    supervisor.stop_all(lambda _line: None, grace=2)


def test_children_get_their_own_process_group_and_are_recorded(supervisor, tmp_path):
    child = supervisor.spawn("sleeper", ["sleep", "60"], env=os.environ, log=tmp_path / "sleeper.log")
    assert os.getpgid(child.pid) == child.pid != os.getpgid(0)
    recorded = supervisor.state.read()
    assert recorded["supervisor"]["pid"] == os.getpid()
    assert recorded["children"] == [
        {
            "name": "sleeper",
            "pid": child.pid,
            "pgid": child.pid,
            "marker": start_marker(child.pid),
            "argv": ["sleep", "60"],
            "log": str(tmp_path / "sleeper.log"),
            "long_running": True,
        }
    ]


def test_stop_all_stops_children_and_what_they_started_in_reverse_order(supervisor, tmp_path):
    first = supervisor.spawn("first", ["sleep", "60"], env=os.environ, log=tmp_path / "first.log")
    parent = supervisor.spawn(
        "parent", ["sh", "-c", "sleep 60 & echo $!; wait"], env=os.environ, log=tmp_path / "parent.log"
    )
    assert wait_for(lambda: (tmp_path / "parent.log").read_text().strip())
    grandchild = int((tmp_path / "parent.log").read_text())
    assert os.getpgid(grandchild) == parent.pgid
    lines: list[str] = []
    supervisor.stop_all(lines.append, grace=5)
    assert [line.split()[0] for line in lines] == ["parent", "first"]
    assert all(line.endswith("stopped") for line in lines)
    assert gone(first.pid) and gone(parent.pid) and gone(grandchild)
    assert not supervisor.state.path.exists()


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_period(supervisor, tmp_path):
    stubborn = supervisor.spawn(
        "stubborn", ["sh", "-c", "trap '' TERM; echo up; sleep 60"], env=os.environ, log=tmp_path / "s.log"
    )
    assert wait_for(lambda: (tmp_path / "s.log").read_text().strip() == "up")
    lines: list[str] = []
    supervisor.stop_all(lines.append, grace=0.5)
    assert "killed" in lines[0]
    assert gone(stubborn.pid) and group_members(stubborn.pgid) == []


def test_a_recorded_pid_that_now_belongs_to_another_process_is_left_alone(tmp_path):
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        recorded = Child("old", stranger.pid, stranger.pid, "12345", ["sleep"], str(tmp_path / "x.log"))
        assert recorded.process_is_reused()
        assert "another process" in recorded.stop(grace=0.5)
        assert stranger.poll() is None  # not signalled
    finally:
        stranger.kill()
        stranger.wait()


SUPERVISED = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from local_stack.stack import StateFile, Stop, Supervisor, install_signal_handlers
    install_signal_handlers()
    state = StateFile(Path(sys.argv[1]))
    supervisor = Supervisor(state)
    supervisor.spawn("sleeper", ["sleep", "60"], env=os.environ, log=state.path.with_name("sleeper.log"))
    try:
        print("ready", flush=True)
        while True:
            time.sleep(0.1)
    except Stop:
        supervisor.stop_all(print)
    """
)


def start_supervisor(tmp_path: Path) -> tuple[subprocess.Popen, dict]:
    process = subprocess.Popen(
        [sys.executable, "-c", SUPERVISED, str(tmp_path / "state.json")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline() == "ready\n"
    return process, StateFile(tmp_path / "state.json").read()


def test_down_asks_a_live_supervisor_to_stop_everything(tmp_path):
    process, recorded = start_supervisor(tmp_path)
    sleeper = recorded["children"][0]
    lines: list[str] = []
    assert stop_recorded(StateFile(tmp_path / "state.json"), lines.append)
    assert process.wait(10) == 0
    assert "stopped" in process.stdout.read()
    assert gone(sleeper["pid"])
    assert not (tmp_path / "state.json").exists()
    assert lines == [f"asking the local stack (supervisor pid {process.pid}) to stop"]


def test_down_stops_the_recorded_children_of_a_supervisor_that_died(tmp_path):
    process, recorded = start_supervisor(tmp_path)
    process.send_signal(signal.SIGKILL)  # no chance to clean up: its children are orphans now
    process.wait(10)
    sleeper = recorded["children"][0]
    assert is_alive(sleeper["pid"], sleeper["marker"])
    lines: list[str] = []
    assert stop_recorded(StateFile(tmp_path / "state.json"), lines.append)
    assert lines[0] == "the supervisor is gone; stopping the processes it recorded"
    assert wait_for(lambda: gone(sleeper["pid"]))
    assert not (tmp_path / "state.json").exists()


def test_down_without_a_state_file_does_nothing(tmp_path):
    assert stop_recorded(StateFile(tmp_path / "state.json"), print) is False
