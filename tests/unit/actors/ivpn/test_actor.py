"""The ivpn actor in-process (no bus): what it publishes as `ivpn.status` and answers to `status`, and how
`splittun ivpn` prints it, as IVPN's daemon comes, connects and goes."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from actors.ivpn.actor import IvpnActor
from core.ivpn.protocol import NOT_RUNNING
from core.ivpn.status import to_status
from messages.control import Request, to_plain
from messages.events import IvpnStatus
from runtime import log as logmod
from runtime.actor import dispatch
from splittun.cli import build_parser
from splittun.commands.ivpn import cmd_ping, cmd_status, describe
from splittun.lab.ivpn import FakeIvpnDaemon, FakeVpn


class Bus:
    def __init__(self) -> None:
        self.sent: list[IvpnStatus] = []
        self.cond = threading.Condition()

    def publish(self, msg: IvpnStatus) -> bool:
        with self.cond:
            self.sent.append(msg)
            self.cond.notify_all()
        return True

    def wait_for(self, pred: Any) -> IvpnStatus:
        with self.cond:
            assert self.cond.wait_for(lambda: self.sent and pred(self.sent[-1]), 5), self.sent[-3:]
            return self.sent[-1]


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[IvpnActor, Bus, str]]:
    bus, port_file = Bus(), str(tmp_path / "port.txt")
    rt = SimpleNamespace(
        asked=[],
        name="ivpn",
        instance="ivpn",
        args=SimpleNamespace(port_file=[port_file], republish=0),
        log=logmod.EventLog("ivpn"),
        publish=bus.publish,
        loop=SimpleNamespace(call_every=lambda *a: None),
    )
    rt.ask = lambda instance, op, args=None, timeout=2.0: rt.asked.append((instance, op.name, args)) or args
    actor = IvpnActor(rt)  # type: ignore[arg-type]
    actor.start()
    yield actor, bus, port_file
    actor.stop()


def test_publishes_every_change_and_answers_status(running) -> None:
    actor, bus, port_file = running
    assert not bus.wait_for(lambda s: True).daemon  # "daemon not running" is published at once
    with FakeIvpnDaemon(port_file, FakeVpn(dns=[("198.51.100.53", 1, "")])) as daemon:
        dispatch(actor, Request(op="daemon.connect", args={}))  # `splittun ivpn ping`: no waiting for the backoff
        bus.wait_for(lambda s: s.daemon and s.state == "DISCONNECTED")
        daemon.connect()
        up = bus.wait_for(lambda s: s.connected)
        assert (up.server_ip, up.server_port, up.is_tcp, up.interface) == ("198.51.100.7", 2049, False, "wgivpn")
        answered = dispatch(actor, Request(op="status", args={}))
        assert to_plain(answered)["server_ip"] == "198.51.100.7"
    gone = bus.wait_for(lambda s: not s.daemon)
    assert gone.server_ip == "198.51.100.7"  # the carrier is kept while the daemon is away
    assert actor.counters()["connects"] == 1


def test_cli_commands() -> None:
    parser = build_parser()
    assert parser.parse_args(["ivpn"]).func is cmd_status
    assert parser.parse_args(["ivpn", "status", "--json"]).json
    assert parser.parse_args(["ivpn", "--json", "status"]).json
    assert parser.parse_args(["ivpn", "--json", "ping"]).json
    assert not parser.parse_args(["ivpn", "status"]).json
    assert parser.parse_args(["ivpn", "ping"]).func is cmd_ping


def test_cli_text() -> None:
    assert describe(to_plain(to_status(NOT_RUNNING, 0.0)))[0] == "daemon: not running"
    status = IvpnStatus(
        ts=0.0, daemon=True, state="CONNECTED", connected=True, vpn_type="wireguard", server_ip="198.51.100.7",
        server_port=2049, interface="wgivpn", kill_switch=True, daemon_version="3.14.2",
    )  # fmt: skip
    text = "\n".join(describe(to_plain(status)))
    assert "wireguard to 198.51.100.7:2049/udp on wgivpn" in text
    assert "kill switch: on" in text and "dns: IVPN default" in text


def test_port_file_comes_from_the_environment_supervisord_passes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse
    import os

    monkeypatch.setenv("SPLITTUN_IVPN_PORT_FILE", os.pathsep.join(["/tmp/a/port.txt", "/tmp/b/port.txt"]))
    parser = argparse.ArgumentParser()
    IvpnActor.add_arguments(parser)
    assert parser.parse_args([]).port_file == ["/tmp/a/port.txt", "/tmp/b/port.txt"]
    monkeypatch.delenv("SPLITTUN_IVPN_PORT_FILE")
    parser = argparse.ArgumentParser()
    IvpnActor.add_arguments(parser)
    assert parser.parse_args([]).port_file == []  # IVPN's own locations (port_file_paths)


def test_netenvs_location_is_off_while_ivpn_connects_or_holds_its_tunnel(running) -> None:
    import time

    from messages.control import Location

    actor, bus, port_file = running

    def gate() -> list[bool]:
        return [args.disabled for instance, op, args in actor.rt.asked if (instance, op) == ("netenv", "location")]

    def settled(expected: list[bool]) -> bool:
        deadline = time.monotonic() + 5
        while gate() != expected and time.monotonic() < deadline:
            time.sleep(0.01)
        return gate() == expected

    with FakeIvpnDaemon(port_file) as daemon:
        dispatch(actor, Request(op="daemon.connect", args={}))
        bus.wait_for(lambda s: s.daemon)
        assert gate() == []  # disconnected: nothing to change
        daemon.set_state("CONNECTING")
        assert settled([True])
        daemon.connect()
        bus.wait_for(lambda s: s.connected)
        daemon.disconnect()
        assert settled([True, False])
        daemon.connect()
        assert settled([True, False, True])
    bus.wait_for(lambda s: not s.daemon)  # the daemon exits (or the connection drops): on again
    assert settled([True, False, True, False])
    assert isinstance(actor.rt.asked[-1][2], Location)


def test_every_connect_asks_the_controller_to_show_the_connected_notice(running) -> None:
    import time

    actor, bus, port_file = running

    def notices() -> list[Any]:
        return [args for instance, op, args in actor.rt.asked if (instance, op) == ("controller", "notify")]

    def count(n: int) -> bool:
        deadline = time.monotonic() + 5
        while len(notices()) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return len(notices()) == n

    with FakeIvpnDaemon(port_file, FakeVpn(exit_hostname="nl1.wg.ivpn.net")) as daemon:
        dispatch(actor, Request(op="daemon.connect", args={}))
        bus.wait_for(lambda s: s.daemon)
        daemon.connect()
        bus.wait_for(lambda s: s.connected)
        assert count(1)
        daemon.kill_switch(True)  # still connected: no second notice
        bus.wait_for(lambda s: s.kill_switch)
        daemon.disconnect()
        daemon.connect()
        assert count(2)
    note = notices()[0]
    assert (note.topic, note.id, note.title) == ("notify.ivpn.connected", "ivpn.connected", "IVPN connected")
    assert "nl1.wg.ivpn.net" in note.message
    assert [(a.id, a.text) for a in note.actions][-1] == ("suppress", "Do not notify me anymore")
    assert actor.counters()["notices"] == 2


def test_ivpns_dns_counts_as_delegated_only_while_splittun_intercepts(running) -> None:
    from messages.events import InterceptionState

    actor, bus, port_file = running
    with FakeIvpnDaemon(port_file, FakeVpn(dns=[("198.51.100.53", 1, "")])) as daemon:
        dispatch(actor, Request(op="daemon.connect", args={}))
        bus.wait_for(lambda s: s.daemon)
        daemon.connect()
        assert not bus.wait_for(lambda s: s.connected).dns_delegated  # interception not (yet) running
        actor.on_message(InterceptionState(ts=0.0, active=True, reason="rules installed"))
        assert bus.wait_for(lambda s: s.dns_delegated).connected
        assert "splittun's resolver asks it" in "\n".join(describe(to_plain(actor.status)))
        actor.on_message(InterceptionState(ts=0.0, active=False, reason="stopping"))
        assert not bus.wait_for(lambda s: not s.dns_delegated).dns_delegated
        actor.on_message(InterceptionState(ts=0.0, active=True, reason="rules installed"))
        daemon.disconnect()
        assert not bus.wait_for(lambda s: s.state == "DISCONNECTED").dns_delegated


def test_a_refused_pre_connect_hook_is_told_and_shown_in_the_status(running) -> None:
    import time

    actor, bus, port_file = running
    actor.bypass_hosts = ("203.0.113.81/32",)  # splittun/bypassHosts, but no network known: refused, no route
    with FakeIvpnDaemon(port_file) as daemon:
        dispatch(actor, Request(op="daemon.connect", args={}))
        bus.wait_for(lambda s: s.daemon)
        daemon.set_state("CONNECTING")
        status = bus.wait_for(lambda s: s.state == "CONNECTING")
        assert status.bypass == "refused: the network is not known yet"
        assert "bypass: refused: the network is not known yet" in describe(to_plain(status))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(op == "notify" for _, op, _ in actor.rt.asked):
            time.sleep(0.01)
        [note] = [args for _, op, args in actor.rt.asked if op == "notify"]
        assert note.id == "ivpn.preconnect" and "bypassHosts: the network is not known yet" in note.message


def test_a_bypass_follow_up_that_arrives_after_the_disconnect_installs_nothing(running) -> None:
    """A network change while IVPN holds its tunnel re-plans the bypass routes on a thread of its own; when that
    thread runs after the disconnect removed them, the routes must stay gone (the lab saw them come back)."""
    actor, _bus, _port_file = running
    applied: list[Any] = []
    actor.routing = SimpleNamespace(apply=lambda routes: applied.append(list(routes)) or ["changed"])
    plan = [SimpleNamespace(family=4, destination="203.0.113.81/32")]
    actor._in_tunnel = True
    actor._set_bypass(plan, while_in_tunnel=True)  # while connected: followed
    assert applied == [plan] and actor._bypass_installed
    actor._on_snapshot(dataclasses.replace(NOT_RUNNING, daemon=True, state="DISCONNECTED"))
    assert applied[-1] == [] and not actor._bypass_installed  # the disconnect took them out
    actor._set_bypass(plan, while_in_tunnel=True)  # the follow-up, late
    assert applied[-1] == [] and not actor._bypass_installed
