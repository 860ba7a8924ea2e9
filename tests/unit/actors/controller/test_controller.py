"""The controller: registry joins (pure), and the real process following its config file."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from actors.controller.registry import ConnectionRegistry
from core.state import ConnectionFilter
from messages import (
    ConnEnd,
    ConnNew,
    ConnVerdict,
    DnsQuery,
    Heartbeat,
    Notification,
    PolicySnapshot,
    ProcessInfo,
    ProxySessionClose,
    ProxySessionOpen,
    ProxySessionStats,
    SessionCounters,
    Verdict,
    flow_key,
)
from messages import control as c
from messages.control import RequestFailed
from runtime import paths
from runtime.transport import Publisher, Subscriber, ask, request
from tests.support import REPO

KEY = flow_key(6, "192.0.2.66", 40000, "203.0.113.80", 80)


def new(conn_id: str = "c1", port: int = 40000) -> ConnNew:
    return ConnNew(
        conn_id=conn_id,
        ts=1.0,
        ip_version=4,
        protocol=6,
        src_ip="192.0.2.66",
        src_port=port,
        dst_ip="203.0.113.80",
        dst_port=80,
        process=ProcessInfo(pid=9, name="curl", exe="/usr/bin/curl", cmdline=["curl", "http://x"], uid=0),
    )


def verdict(conn_id: str = "c1", key: str = KEY, v: Verdict = Verdict.REROUTE_TO_SPLIT_TUN) -> ConnVerdict:
    return ConnVerdict(conn_id=conn_id, ts=1.1, verdict=v, rule="r1", split_key=key, interface="eth0")


def opened(key: str = KEY) -> ProxySessionOpen:
    return ProxySessionOpen(
        session_id="s1",
        worker="proxy_tcp_00",
        protocol="tcp",
        split_key=key,
        ts=1.2,
        client_ip="192.0.2.66",
        client_port=40000,
        orig_dst_ip="203.0.113.80",
        orig_dst_port=80,
        local_ip="192.0.2.10",
        local_port=50000,
        interface="eth0",
    )


def closed(bytes_down: int = 500) -> ProxySessionClose:
    return ProxySessionClose(
        session_id="s1",
        worker="proxy_tcp_00",
        split_key=KEY,
        ts=2.0,
        counters=SessionCounters(bytes_up=100, bytes_down=bytes_down, packets_up=2, packets_down=3),
        duration=0.8,
        reason="closed",
    )


# --- registry -----------------------------------------------------------------------------------------


def test_registry_joins_verdict_and_session_in_either_order() -> None:
    for order in ("verdict-first", "session-first"):
        reg = ConnectionRegistry()
        reg.handle(new())
        if order == "verdict-first":
            reg.handle(verdict())
            reg.handle(opened())
        else:
            reg.handle(opened())  # the proxy can be faster than the bus delivers the verdict
            reg.handle(verdict())
        reg.handle(
            ProxySessionStats(
                session_id="s1", worker="w", split_key=KEY, ts=1.5, counters=SessionCounters(bytes_up=10, bytes_down=20)
            )
        )
        assert reg.get("c1").split.bytes_down == 20
        assert reg.get("c1").state == "open"
        reg.handle(closed())
        assert reg.get("c1").state == "closed"  # the session closed: no need to wait for conntrack
        reg.handle(ConnEnd(conn_id="c1", ts=2.1, reason="closed"))
        rec = reg.get("c1")
        assert rec is not None and rec.verb == "split tunneled", order
        ctx = rec.split
        assert ctx is not None and (ctx.interface, ctx.local_ip, ctx.session_id) == ("eth0", "192.0.2.10", "s1")
        assert (ctx.bytes_up, ctx.bytes_down, ctx.packets_up, ctx.packets_down) == (100, 500, 2, 3)
        assert rec.ended == 2.1 and rec.process_name == "curl"


def test_registry_reads_a_version_2_conn_new_as_the_version_1_pair() -> None:
    v = verdict()
    decided = dataclasses.replace(
        new(), verdict=v.verdict, rule=v.rule, split_key=v.split_key, interface=v.interface
    )  # one event: the connection with its verdict
    for session_first in (False, True):
        records = []
        for events in ([new(), verdict()], [decided]):
            reg = ConnectionRegistry()
            if session_first:
                reg.handle(opened())  # the proxy can be faster than the bus delivers the verdict
            for event in events:
                reg.handle(event)
            if not session_first:
                reg.handle(opened())
            records.append(reg.get("c1"))
        assert records[0] == records[1]
        rec = records[1]
        assert rec is not None and rec.verb == "split tunneled" and rec.split is not None
        assert (rec.split.session_id, rec.rule, rec.process_name) == ("s1", "r1", "curl")


def test_registry_reads_a_close_carrying_its_open_as_the_open_and_close_pair() -> None:
    records = []
    for events in ([opened(), closed()], [dataclasses.replace(closed(), opened=opened())]):
        reg = ConnectionRegistry()
        reg.handle(new())
        reg.handle(verdict())
        for event in events:
            reg.handle(event)
        records.append(reg.get("c1"))
    assert records[0] == records[1]
    rec = records[1]
    assert rec is not None and rec.state == "closed" and rec.split is not None
    assert (rec.split.session_id, rec.split.local_ip, rec.split.bytes_down) == ("s1", "192.0.2.10", 500)


def test_registry_takes_a_kernel_path_connection_from_its_verdict_and_its_counts_from_its_end() -> None:
    reg = ConnectionRegistry()
    reg.handle(new())
    kernel = {"interface": "eth0", "data_path": "kernel", "local_ip": "192.0.2.10"}
    reg.handle(
        ConnVerdict(conn_id="c1", ts=1.1, verdict=Verdict.REROUTE_TO_SPLIT_TUN, rule="r1", split_key=KEY, **kernel)
    )
    rec = reg.get("c1")
    assert rec is not None and rec.split is not None and rec.state == "open"
    where = (rec.split.data_path, rec.split.interface, rec.split.local_ip, rec.split.local_port)
    assert where == ("kernel", "eth0", "192.0.2.10", 40000)
    counted = SessionCounters(bytes_up=396, bytes_down=5316, packets_up=6, packets_down=5)
    reg.handle(ConnEnd(conn_id="c1", ts=2.0, reason="closed", counters=counted))
    rec = reg.get("c1")
    assert rec is not None and rec.split is not None and rec.state == "closed"
    assert (rec.split.bytes_up, rec.split.bytes_down, rec.split.packets_up, rec.split.packets_down) == (396, 5316, 6, 5)
    assert rec.split.data_path == "kernel"


def test_registry_shows_how_a_dns_query_and_the_connections_to_its_answer_were_resolved() -> None:
    reg = ConnectionRegistry()
    query = ConnNew(conn_id="q1", ts=1.0, ip_version=4, protocol=17, src_ip="192.0.2.66", src_port=41000,
                    dst_ip="192.0.2.65", dst_port=53)  # fmt: skip
    reg.handle(query)
    reg.handle(DnsQuery(ts=1.1, flow=flow_key(17, "192.0.2.66", 41000, "192.0.2.65", 53), name="geo.example.net",
                        qtype="A", path="split", upstream="192.0.2.1", interface="eth0", answers=1,
                        addresses=["203.0.113.80"]))  # fmt: skip
    reg.handle(new())  # curl → 203.0.113.80, the address the answer gave
    assert reg.get("q1").resolved_via == "split 192.0.2.1 via eth0"
    assert reg.get("c1").resolved_via == "split 192.0.2.1 via eth0"


def test_registry_filters_and_rolls_off_old_connections() -> None:
    reg = ConnectionRegistry(max_closed=3)
    for i in range(10):
        reg.handle(new(f"c{i}", 40000 + i))
        reg.handle(
            verdict(
                f"c{i}",
                flow_key(6, "192.0.2.66", 40000 + i, "203.0.113.80", 80),
                Verdict.REROUTE_TO_SPLIT_TUN if i % 2 else Verdict.ACCEPT,
            )
        )
        reg.handle(ConnEnd(conn_id=f"c{i}", ts=3.0))
    assert [r.conn_id for r in reg.query()] == ["c9", "c8", "c7"]  # newest first, bounded
    assert reg.counts()["connections_rolled_off"] == 7
    assert reg.get("c0") is None
    assert [r.conn_id for r in reg.query(ConnectionFilter(verdict=int(Verdict.ACCEPT)))] == ["c8"]
    assert [r.conn_id for r in reg.query(ConnectionFilter(app="CURL"))] == ["c9", "c8", "c7"]
    assert reg.query(ConnectionFilter(app="firefox")) == []
    stored = reg.take_closed()  # every connection that closed, also those that rolled off memory since
    assert sorted(r.conn_id for r in stored) == sorted(f"c{i}" for i in range(10))
    assert all(r.state == "closed" and r.ended == 3.0 for r in stored) and reg.take_closed() == []


def test_registry_hands_a_connection_to_the_history_when_it_closes_and_again_when_it_changes() -> None:
    reg = ConnectionRegistry()
    for msg in (new(), verdict(), opened()):
        reg.handle(msg)
    assert reg.take_closed() == [] and reg.closed_waiting == 0
    reg.handle(closed())
    [first] = reg.take_closed()
    assert first.state == "closed" and first.ended is None and first.split.bytes_down == 500
    reg.handle(ConnEnd(conn_id="c1", ts=9.0, reason="timeout"))  # conntrack forgets it minutes later
    [again] = reg.take_closed()
    assert again.ended == 9.0 and again.end_reason == "timeout" and again.split == first.split


def test_registry_ignores_events_for_unknown_connections() -> None:
    reg = ConnectionRegistry()
    reg.handle(verdict("ghost"))
    reg.handle(ConnEnd(conn_id="ghost", ts=1.0))
    reg.handle(closed())
    assert reg.query() == [] and reg.counts()["connections_active"] == 0


# --- the process --------------------------------------------------------------------------------------


class Controller:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.run = home / "run"
        self.run.mkdir(mode=0o700)
        env = {**os.environ, "SPLITTUN_HOME": str(home), "PYTHONUNBUFFERED": "1"}
        env.pop("SPLITTUN_RUN_DIR", None)
        self.log = home / "controller.log"
        with open(self.log, "wb") as out:
            self.bus = subprocess.Popen([sys.executable, "-m", "runtime.bus"], env=env, stderr=out, cwd=REPO)
            self.proc = subprocess.Popen([sys.executable, "-m", "actors.controller"], env=env, stderr=out, cwd=REPO)
        self.ctx = zmq.Context()
        self.sub = Subscriber(self.ctx, paths.bus_out(self.run), ["policy.snapshot", "notify.", "actor.heartbeat"])
        self.pub = Publisher(self.ctx, paths.bus_in(self.run))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self.ask("ping")
                break
            except RequestFailed:
                time.sleep(0.1)
        else:
            raise AssertionError("controller did not start: " + self.log.read_text())
        # Its heartbeat reaching us means our subscriptions reached its publisher: from here on a config
        # change's snapshot is not lost to the slow-joiner window (the periodic republish is 10 s away).
        self.next_message(Heartbeat, timeout=5.0)

    def ask(self, op: str, **args: object) -> object:
        return request(paths.control(self.run), op, args, timeout=2, ctx=self.ctx)

    def write_config(self, data: object) -> None:
        tmp = self.home / "config.tmp"
        tmp.write_text(json.dumps(data))
        tmp.replace(self.home / "config.json")

    def next_message(self, cls: type, timeout: float = 3.0, after: int = 0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self.sub.recv(timeout=0.2)
            if isinstance(msg, cls) and (not isinstance(msg, PolicySnapshot) or msg.version > after):
                return msg
        raise AssertionError(f"no {cls.__name__} within {timeout} s")

    def close(self) -> None:
        self.sub.close()
        self.pub.close()
        self.ctx.term()
        for proc in (self.proc, self.bus):
            proc.terminate()
            proc.wait(timeout=5)


@pytest.fixture
def controller(home: Path) -> Iterator[Controller]:
    c = Controller(home)
    try:
        yield c
    finally:
        c.close()


def test_config_change_is_published_and_served(controller: Controller) -> None:
    first = PolicySnapshot.from_wire(controller.ask("policy"), "policy.snapshot")
    assert first.enabled is False and first.rules == []
    controller.write_config(
        {"splittun/enable": True, "splittun/rules": [{"id": "r1", "action": "split", "app_name": "curl"}]}
    )
    snap = controller.next_message(PolicySnapshot, after=first.version)
    assert snap.enabled and [r.app_name for r in snap.rules] == ["curl"] and snap.version > first.version
    served = PolicySnapshot.from_wire(controller.ask("policy"), "policy.snapshot")
    assert served == snap


def test_invalid_config_is_refused_and_the_old_one_stays(controller: Controller) -> None:
    first = PolicySnapshot.from_wire(controller.ask("policy"), "policy.snapshot")  # the controller is up
    controller.write_config({"splittun/enable": True})
    good = controller.next_message(PolicySnapshot, after=first.version)  # the edit is seen (inotify)
    assert good.enabled is True
    controller.write_config(
        {"splittun/enable": True, "splittun/rules": [{"id": "r1", "action": "split", "dest": "10.0.0.0/33"}]}
    )
    note = controller.next_message(Notification)
    assert note.topic == "notify.config.refused"
    assert "splittun/rules[0].dest: '10.0.0.0/33' is not a valid CIDR" in note.message
    kept = PolicySnapshot.from_wire(controller.ask("policy"), "policy.snapshot")
    assert kept.version == good.version and kept.enabled is True and kept.rules == []
    status = controller.ask("config")
    assert status["last_error"].startswith("splittun/rules[0].dest")  # type: ignore[index]
    (controller.home / "config.json").write_text("{not json")
    assert "not valid JSON" in controller.next_message(Notification).message
    assert controller.proc.poll() is None


def test_registry_over_the_bus(controller: Controller) -> None:
    for msg in (new(), verdict(), opened(), closed(bytes_down=4242)):
        controller.pub.publish(msg)
    deadline = time.monotonic() + 5
    rows: list = []
    while time.monotonic() < deadline:
        for msg in (new(), verdict(), opened(), closed(bytes_down=4242)):  # slow joiner: resend until seen
            controller.pub.publish(msg)
        rows = controller.ask("connections", verdict="split")  # type: ignore[assignment]
        if rows and rows[0]["split"] and rows[0]["split"]["bytes_down"] == 4242:
            break
        time.sleep(0.1)
    assert rows and rows[0]["conn_id"] == "c1" and rows[0]["verb"] == "split tunneled"
    assert rows[0]["split"]["interface"] == "eth0"
    assert controller.ask("connections", verdict="accept") == []
    with pytest.raises(RequestFailed, match="unknown verdict"):
        controller.ask("connections", verdict="sideways")
    with pytest.raises(RequestFailed, match="no connection"):
        controller.ask("connection", id="nope")


# --- edits: the controller is the only writer of the config file --------------------------------------


def edit(controller: Controller, op: c.Op[Any, c.Edited], args: Any = None) -> c.Edited:
    return ask(paths.control(controller.run), op, args, timeout=3, ctx=controller.ctx)


def refused(controller: Controller, op: c.Op[Any, c.Edited], args: Any = None) -> RequestFailed:
    with pytest.raises(RequestFailed) as caught:
        edit(controller, op, args)
    return caught.value


def test_edits_are_validated_written_and_applied(controller: Controller) -> None:
    config = controller.home / "config.json"
    first = edit(controller, c.Controller.ADD_RULE, c.RuleAdd(name="curl", dest="203.0.113.0/24"))
    assert first.applied and first.rule is not None and (first.rule.id, first.rule.app_name) == ("r1", "curl")
    snap = controller.next_message(PolicySnapshot, after=first.version - 1)
    assert snap.version == first.version and [r.id for r in snap.rules] == ["r1"]
    assert json.loads(config.read_text())["splittun/rules"] == [
        {"id": "r1", "action": "split", "app_name": "curl", "dest": "203.0.113.0/24"}
    ]
    second = edit(controller, c.Controller.ADD_RULE, c.RuleAdd(endpoint="- 203.0.113.81 tcp/80", position=1))
    assert second.version > first.version and second.rule is not None and second.rule.action == "keep"
    enabled = edit(controller, c.Controller.ENABLE)
    moved = edit(controller, c.Controller.MOVE_RULE, c.RuleMove(id="r1", position=1))
    edit(controller, c.Controller.SET_CONFIG, c.ConfigSet(key="splittun/interface", value="auto"))
    assert enabled.version < moved.version
    served = PolicySnapshot.from_wire(controller.ask("policy"), "policy.snapshot")
    assert served.enabled and [r.id for r in served.rules] == ["r1", "r2"]
    assert json.loads(config.read_text())["splittun/enable"] is True
    assert edit(controller, c.Controller.REMOVE_RULE, c.RuleRef(id="r2")).version > moved.version
    assert [r["id"] for r in json.loads(config.read_text())["splittun/rules"]] == ["r1"]
    status = controller.ask("config")
    assert status["last_error"] == "" and status["config"]["splittun/rules"][0]["id"] == "r1"  # type: ignore[index]


def test_refused_edits_change_nothing_and_say_why_in_one_line(controller: Controller) -> None:
    edit(controller, c.Controller.ADD_RULE, c.RuleAdd(name="curl"))
    config = controller.home / "config.json"
    before, version = config.read_text(), PolicySnapshot.from_wire(controller.ask("policy"), "p").version
    cases = [
        (c.Controller.ADD_RULE, c.RuleAdd(interface="nosuch0"), c.INVALID_ARGUMENT,
         "--interface: unknown interface 'nosuch0'"),
        (c.Controller.ADD_RULE, c.RuleAdd(dest="203.0.113.300/24"), c.INVALID_ARGUMENT,
         "dest: '203.0.113.300/24' is not a valid CIDR"),
        (c.Controller.SET_CONFIG, c.ConfigSet(key="splittun/rules", value='[{"id": "x", "action": "split", '
         '"dest": "10.0.0.0/33"}]'), c.INVALID_ARGUMENT, "splittun/rules[0].dest: '10.0.0.0/33' is not a valid CIDR"),
        (c.Controller.SET_CONFIG, c.ConfigSet(key="splittun/enable", value="maybe"), c.INVALID_ARGUMENT,
         "splittun/enable: expected true or false, got a string"),
        (c.Controller.SET_INTERFACE, c.InterfaceChoice(choice="wlan9"), c.INVALID_ARGUMENT,
         "splittun/interface: unknown interface 'wlan9'"),
        (c.Controller.REMOVE_RULE, c.RuleRef(id="r9"), c.NOT_FOUND, "r9: no such rule (rules: r1)"),
        (c.Controller.MOVE_RULE, c.RuleMove(id="r1", position=3), c.INVALID_ARGUMENT,
         "position: must be between 1 and 1, got 3"),
    ]  # fmt: skip
    for op, args, code, message in cases:
        err = refused(controller, op, args)
        assert err.code == code and err.message.startswith(message) and "\n" not in err.message, (op, err.message)
    assert config.read_text() == before
    assert PolicySnapshot.from_wire(controller.ask("policy"), "p").version == version


def test_a_hand_edit_is_what_the_next_edit_starts_from_and_an_invalid_file_blocks_edits(
    controller: Controller,
) -> None:
    controller.write_config({"splittun/rules": [{"id": "mine", "action": "keep", "dest": "192.0.2.0/24"}]})
    added = edit(controller, c.Controller.ADD_RULE, c.RuleAdd(name="curl"))  # right away: no lost hand edit
    assert added.rule is not None and added.rule.id == "r1"
    rules = json.loads((controller.home / "config.json").read_text())["splittun/rules"]
    assert [r["id"] for r in rules] == ["mine", "r1"]
    (controller.home / "config.json").write_text("{not json")
    err = refused(controller, c.Controller.ENABLE)
    assert err.code == c.INVALID_ARGUMENT
    assert (
        err.message.startswith("the config file is invalid, fix or remove it first: ")
        and "not valid JSON" in err.message
    )
    assert (controller.home / "config.json").read_text() == "{not json"
