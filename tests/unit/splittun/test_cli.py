"""The command line without a running instance (no root needed): one readable line for a user's mistakes, and how
`status` writes its notes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support.cli import SPLITTUN, assert_one_line_error


def test_not_root_gets_one_readable_line(home: Path) -> None:
    argv = [*SPLITTUN, "up"]
    if os.geteuid() == 0:
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    env = {**os.environ, "SPLITTUN_HOME": str(home)}
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30)
    assert_one_line_error(result, 2, "needs root")


def test_status_notes_say_why_an_actor_is_not_ready_and_what_a_proxy_refused() -> None:
    from splittun.commands.lifecycle import _note

    row = {"not_ready": "", "sessions_refused": 12, "refused_session_limit": 10}
    assert _note(row) == "refused 12 sessions (10 at the session limit)"
    assert _note({"not_ready": "no egress", "sessions_refused": 0}) == "not ready: no egress"
    assert _note({"not_ready": ""}) == ""


def test_a_wrong_time_window_is_one_line_before_anything_is_asked(home: Path) -> None:
    env = {**os.environ, "SPLITTUN_HOME": str(home)}
    for flag, value in (("--since", "soon"), ("--until", "yesterday-ish")):
        result = subprocess.run([*SPLITTUN, "connections", flag, value], capture_output=True, text=True, env=env)
        assert_one_line_error(result, 2, f"{flag}: '{value}' is not a time")


def test_nothing_running_is_one_line_for_notifications_api_and_ui(home: Path) -> None:
    env = {**os.environ, "SPLITTUN_HOME": str(home)}
    if os.geteuid() != 0:
        return  # they need root first: test_not_root_gets_one_readable_line
    for argv in (["notifications"], ["notifications", "reset"], ["api", "token"], ["ui"]):
        result = subprocess.run([*SPLITTUN, *argv], capture_output=True, text=True, env=env, timeout=30)
        assert_one_line_error(result, 3, "not running")


def test_up_names_an_actor_it_saw_restarting_even_when_caught_between_two_restarts() -> None:
    """A crash-looping actor is STARTING half the time: `up` names it if supervisord was seen restarting it."""
    from messages.events import Heartbeat
    from splittun.commands.lifecycle import _wait_for_heartbeats
    from splittun.supervise import ProcessState

    polls = iter(["BACKOFF", "STARTING", "BACKOFF"])

    class FakeSupervisor:
        def processes(self) -> list[ProcessState]:
            state = next(polls, "STARTING")
            return [ProcessState("bus", "RUNNING", 10, 1.0, ""), ProcessState("ivpn", state, 11, 0.0, "")]

    class FakeHeartbeats:
        def recv(self, timeout: float | None = None) -> Heartbeat | None:
            beat = Heartbeat(name="bus", instance="bus", pid=10, started=0.0, uptime=1.0, ts=0.0)
            return beat

    seen, states, exited = _wait_for_heartbeats(FakeSupervisor(), FakeHeartbeats(), timeout=1.0)  # type: ignore[arg-type]
    assert set(seen) == {"bus"}
    assert [s.state for s in states if s.instance == "ivpn"] == ["STARTING"]  # caught between two restarts
    assert exited == {"ivpn"}
