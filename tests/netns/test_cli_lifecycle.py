"""`splittun up/status/down/events` under supervisord, inside network namespaces the tests create."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from messages.events import HEARTBEAT_INTERVAL
from runtime.paths import Home
from splittun.supervise import Supervisor
from tests.support.cli import assert_one_line_error, splittun

ALL_SINGLE = {"bus", "controller", "netenv", "ivpn", "api", "interceptor", "proxy_tcp_00", "proxy_udp_00", "resolver"}


def status_json(home: Path, ns: str) -> dict:
    result = splittun("status", "--json", home=home, ns=ns)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def actors_by_name(home: Path, ns: str) -> dict[str, dict]:
    return {row["actor"]: row for row in status_json(home, ns)["actors"]}


def leftover_processes(home: Path) -> list[int]:
    sup = Supervisor(Home.from_env({"SPLITTUN_HOME": str(home)}))
    pid = sup.pid()
    return [*sup.orphans(), *([pid] if pid else [])]


# --- user mistakes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("relative/home", "must be an absolute path"),
        ("/etc/hostname", "is not a directory"),
        ("/tmp/" + "x" * 120, "too long"),
    ],
)
def test_bad_splittun_home_is_refused(value: str, problem: str) -> None:
    result = splittun("up", env={"SPLITTUN_HOME": value})
    assert_one_line_error(result, 2, problem)
    assert not Path(value).joinpath("run").exists() or value == "/etc/hostname"


def test_nothing_running(home: Path) -> None:
    assert_one_line_error(splittun("status", home=home), 3, "not running")
    assert_one_line_error(splittun("events", home=home), 3, "not running")
    down = splittun("down", home=home)
    assert down.returncode == 0 and "not running" in down.stdout


# --- the life of an instance --------------------------------------------------------------------------


def test_up_status_events_down_cycle(home: Path, host_ns: str) -> None:
    up = splittun("up", home=home, ns=host_ns)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"{len(ALL_SINGLE)} processes heartbeating" in up.stdout
        rows = actors_by_name(home, host_ns)
        assert set(rows) == ALL_SINGLE
        for row in rows.values():
            assert row["state"] == "RUNNING" and row["pid"] > 0
            assert row["heartbeat_age"] is not None and row["heartbeat_age"] < HEARTBEAT_INTERVAL + 1
            assert row["ready"] is True, row

        table = splittun("status", home=home, ns=host_ns).stdout.splitlines()
        assert table[0].split() == ["ACTOR", "STATE", "PID", "UPTIME", "LAST", "HEARTBEAT", "NOTE"]
        assert len(table) == 1 + len(ALL_SINGLE)

        events = splittun("events", "actor.heartbeat", "--json", "--count", "8", home=home, ns=host_ns)
        seen = [json.loads(line) for line in events.stdout.splitlines()]
        assert len(seen) == 8 and all(e["topic"] == "actor.heartbeat" for e in seen)
        assert {e["pid"] for e in seen} <= {row["pid"] for row in rows.values()}
        human = splittun("events", "--count", "2", home=home, ns=host_ns).stdout.splitlines()
        assert len(human) == 2 and all(" actor.heartbeat name=" in line for line in human)

        assert_one_line_error(splittun("up", home=home, ns=host_ns), 2, "already running")
    finally:
        down = splittun("down", home=home, ns=host_ns)
    assert down.returncode == 0 and "stopped" in down.stdout
    assert leftover_processes(home) == []
    assert list((home / "run").glob("*.sock")) == []
    assert splittun("status", home=home, ns=host_ns).returncode == 3
    again = splittun("down", home=home, ns=host_ns)
    assert again.returncode == 0 and "not running" in again.stdout


def test_up_warns_about_an_actor_that_cannot_do_its_job(home: Path, host_ns: str) -> None:
    subprocess.run(["ip", "-n", host_ns, "link", "set", "eth0", "down"], check=True)  # no uplink at all
    up = splittun("up", home=home, ns=host_ns)
    try:
        assert up.returncode == 0, up.stdout + up.stderr  # everything runs; split connections stay in the VPN
        assert "warning: proxy_tcp_00 is not ready: no egress" in up.stdout
        rows = actors_by_name(home, host_ns)
        assert rows["proxy_udp_00"]["ready"] is False and "no egress" in rows["proxy_udp_00"]["not_ready"]
        assert rows["controller"]["ready"] is True
        assert "not ready: no egress" in splittun("status", home=home, ns=host_ns).stdout
    finally:
        splittun("down", home=home, ns=host_ns)


def test_killed_actor_is_restarted_with_a_new_pid(running: tuple[Path, str]) -> None:
    home, ns = running
    before = actors_by_name(home, ns)["proxy_udp_00"]["pid"]
    os.kill(before, signal.SIGKILL)
    deadline = time.monotonic() + 15
    row: dict = {}
    while time.monotonic() < deadline:
        row = actors_by_name(home, ns)["proxy_udp_00"]
        if row["state"] == "RUNNING" and row["pid"] not in (None, before) and row["heartbeat_age"] is not None:
            break
        time.sleep(0.3)
    assert row["pid"] != before and row["state"] == "RUNNING", row
    assert Path(f"/proc/{row['pid']}").exists()


def test_workers_scale_with_numprocs(home: Path, host_ns: str) -> None:
    up = splittun("up", "--tcp-workers", "2", "--udp-workers", "3", home=home, ns=host_ns)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        rows = actors_by_name(home, host_ns)
        workers = {name for name in rows if name.startswith("proxy_")}
        assert workers == {"proxy_tcp_00", "proxy_tcp_01", "proxy_udp_00", "proxy_udp_01", "proxy_udp_02"}
        assert all(rows[w]["heartbeat_age"] is not None for w in workers)
        assert len({rows[w]["pid"] for w in workers}) == 5
    finally:
        splittun("down", home=home, ns=host_ns)


def test_up_names_the_actor_that_did_not_start_and_leaves_nothing(home: Path, host_ns: str, tmp_path: Path) -> None:
    # A sitecustomize on PYTHONPATH makes exactly one actor fail at start, as a broken install would.
    (tmp_path / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if os.environ.get('SUPERVISOR_PROCESS_NAME') == 'ivpn':\n"
        "    sys.stderr.write('simulated failure: cannot reach the IVPN daemon\\n')\n"
        "    sys.stderr.flush()\n"
        "    os._exit(3)\n"
    )
    result = splittun("up", "--timeout", "6", home=home, ns=host_ns, env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 1
    assert "actors did not start:" in result.stdout
    assert "ivpn:" in result.stdout and "simulated failure" in result.stdout
    assert "controller:" not in result.stdout  # only the one that failed is named
    assert leftover_processes(home) == []
    assert splittun("status", home=home, ns=host_ns).returncode == 3


def test_crashed_supervisord_is_cleaned_up(home: Path, host_ns: str) -> None:
    assert splittun("up", home=home, ns=host_ns).returncode == 0
    sup = Supervisor(Home.from_env({"SPLITTUN_HOME": str(home)}))
    pid = sup.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while sup.orphans() and time.monotonic() < deadline:  # actors follow their supervisor (PDEATHSIG)
        time.sleep(0.1)
    assert sup.orphans() == []
    assert (home / "run" / "supervisord.pid").exists()  # stale
    down = splittun("down", home=home, ns=host_ns)
    assert down.returncode == 0
    assert not (home / "run" / "supervisord.pid").exists()
    assert list((home / "run").glob("*.sock")) == []
    up = splittun("up", home=home, ns=host_ns)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
    finally:
        splittun("down", home=home, ns=host_ns)


def test_two_instances_side_by_side(home: Path, host_ns: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    import shutil
    import tempfile

    other = Path(tempfile.mkdtemp(prefix="st-", dir="/tmp"))
    try:
        assert splittun("up", home=home, ns=host_ns).returncode == 0
        assert splittun("up", "--api-port", "8170", home=other, ns=host_ns).returncode == 0  # 817 is taken
        first, second = actors_by_name(home, host_ns), actors_by_name(other, host_ns)
        assert not {r["pid"] for r in first.values()} & {r["pid"] for r in second.values()}
        assert splittun("down", home=home, ns=host_ns).returncode == 0
        assert all(r["state"] == "RUNNING" for r in actors_by_name(other, host_ns).values())
    finally:
        splittun("down", home=home, ns=host_ns)
        splittun("down", home=other, ns=host_ns)
        shutil.rmtree(other, ignore_errors=True)
