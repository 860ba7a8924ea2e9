"""The daemon's lines → one immutable snapshot; bad lines → one-line ProtocolError (the caller resets)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from core.ivpn.protocol import (
    DaemonExiting,
    DaemonRejected,
    DnsServer,
    KillSwitch,
    LineSplitter,
    ProtocolError,
    Session,
    hello_request,
    parse_dns,
)


def line(command: str, idx: int = 0, **fields: Any) -> bytes:
    return json.dumps({"Command": command, "Idx": idx, **fields}).encode()


CONNECTED = line(
    "ConnectedResp",
    VpnType=1,
    TimeSecFrom1970=1700000000,
    ClientIP="10.0.0.2",
    ClientIPv6="fd00::2",
    ServerIP="198.51.100.7",
    ServerPort=2049,
    ExitHostname="nl1.wg.ivpn.net",
    Dns={"Dns": {"Servers": [{"Address": "10.0.254.1", "Encryption": 0, "Template": ""}]}, "AntiTrackerStatus": {}},
    IsTCP=False,
    Mtu=1420,
    V2RayProxy=0,
    Obfsproxy={"Version": 0, "Obfs4Iat": 0},
    IsPaused=False,
    PausedTill="",
)


def greeted(*lines: bytes) -> Session:
    session = Session()
    session.feed(line("HelloResp", 1, Version="3.14.2", Dns=None))
    for raw in lines:
        session.feed(raw)
    return session


def test_hello_request_is_one_line_with_bare_secret() -> None:
    raw = hello_request(0xFFFFFFFFFFFFFFFF, idx=7)
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    obj = json.loads(raw)
    assert obj["Command"] == "Hello" and obj["Idx"] == 7 and obj["GetStatus"] is True
    assert obj["Secret"] == 2**64 - 1 and b'"Secret":18446744073709551615' in raw  # a number, not a string


def test_connected_fills_the_snapshot() -> None:
    snap = greeted(CONNECTED).snapshot
    assert snap.daemon and snap.daemon_version == "3.14.2" and snap.connected
    assert (snap.vpn_type, snap.server_ip, snap.server_port, snap.is_tcp) == ("wireguard", "198.51.100.7", 2049, False)
    assert (snap.client_ip, snap.client_ipv6, snap.exit_hostname) == ("10.0.0.2", "fd00::2", "nl1.wg.ivpn.net")
    assert snap.dns == (DnsServer("10.0.254.1"),)


@pytest.mark.parametrize(
    ("dns", "expected"),
    [
        ({"Servers": [{"Address": "9.9.9.9", "Encryption": 1, "Template": ""}]}, (DnsServer("9.9.9.9", "dot"),)),
        (
            {"Servers": [{"Address": "1.1.1.1", "Encryption": 2, "Template": "https://x/dns-query"}]},
            (DnsServer("1.1.1.1", "doh", "https://x/dns-query"),),
        ),
        ({"Servers": None}, ()),
        (
            {"DnsHost": "9.9.9.9", "Encryption": 2, "DohTemplate": "https://q/d"},
            (DnsServer("9.9.9.9", "doh", "https://q/d"),),
        ),
        ({"DnsHost": "", "Encryption": 0, "DohTemplate": ""}, ()),
        ({"Dns": {"DnsHost": "8.8.8.8", "Encryption": 0}, "AntiTrackerStatus": {}}, (DnsServer("8.8.8.8"),)),
        (None, ()),
    ],
)
def test_both_dns_shapes(dns: Any, expected: tuple[DnsServer, ...]) -> None:
    assert parse_dns(dns) == expected


def test_state_sequence() -> None:
    session = greeted()
    steps = [
        (line("DisconnectedResp", IsStateInfo=True), "DISCONNECTED"),
        (line("VpnStateResp", State="CONNECTING", StateVal=1), "CONNECTING"),
        (CONNECTED, "CONNECTED"),
        (line("VpnStateResp", StateVal=8, State=""), "RECONNECTING"),
        (line("DisconnectedResp", Failure=True, Reason=0, ReasonDescription="timeout"), "DISCONNECTED"),
    ]
    for raw, state in steps:
        assert session.feed(raw).state == state
    assert session.snapshot.server_ip == "" and session.snapshot.last_error == "timeout"


def test_reconnecting_keeps_the_carrier() -> None:
    snap = greeted(CONNECTED, line("VpnStateResp", State="RECONNECTING", StateVal=8)).snapshot
    assert snap.state == "RECONNECTING" and snap.server_ip == "198.51.100.7"  # still never split the carrier


def test_kill_switch_error_and_unchanged_snapshot_is_same_object() -> None:
    session = greeted()
    ks = line("KillSwitchStatusResp", IsEnabled=True, IsPersistent=False, IsAllowLAN=True, UserExceptions="")
    first = session.feed(ks)
    assert first.kill_switch == KillSwitch(enabled=True, allow_lan=True)
    assert session.feed(ks) is first  # no change, no new status to publish
    assert session.feed(line("EmptyResp", 3)) is first
    assert session.feed(line("ErrorRespDelayed", ErrorMessage="Failed to connect")).last_error == "Failed to connect"


@pytest.mark.parametrize(
    ("lines", "error", "text"),
    [
        ([b"{not json"], ProtocolError, "not JSON"),
        ([b"[1,2]"], ProtocolError, "not a JSON object"),
        ([b'{"Idx":1}'], ProtocolError, "no Command"),
        ([b'{"Command":"HelloResp","Idx":"1"}'], ProtocolError, "Idx is not an integer"),
        ([CONNECTED], ProtocolError, "ConnectedResp before HelloResp"),
        ([line("ErrorResp", 1, ErrorMessage="Secret verification error")], DaemonRejected, "Secret"),
        ([line("HelloResp", 1), line("HelloResp", 1)], ProtocolError, "second HelloResp"),
        ([line("HelloResp", 1), line("ServiceExitingResp")], DaemonExiting, "exiting"),
        ([line("HelloResp", 1), line("ConnectedResp", VpnType=5)], ProtocolError, "VpnType"),
        ([line("HelloResp", 1), line("ConnectedResp", ServerIP=7)], ProtocolError, "ServerIP"),
        ([line("HelloResp", 1), line("VpnStateResp", State="NAP", StateVal=99)], ProtocolError, "unknown state"),
        ([line("HelloResp", 1, Dns={"DnsHost": "x", "Encryption": 9})], ProtocolError, "Encryption"),
        ([line("HelloResp", 1, Dns={"Servers": "x"})], ProtocolError, "Servers"),
    ],
)
def test_bad_lines_raise_one_line_errors(lines: list[bytes], error: type[Exception], text: str) -> None:
    session = Session()
    with pytest.raises(error) as exc:
        for raw in lines:
            session.feed(raw)
    assert text in str(exc.value) and "\n" not in str(exc.value)


def test_line_splitter_frames_and_limits() -> None:
    splitter = LineSplitter(max_line=16)
    assert splitter.feed(b'{"a":1}\n{"b"') == [b'{"a":1}']
    assert splitter.feed(b":2}\n\n") == [b'{"b":2}']
    with pytest.raises(ProtocolError, match="longer than 16"):
        splitter.feed(b"x" * 17)


def test_the_location_gate_is_closed_exactly_while_ivpn_connects_or_holds_its_tunnel() -> None:
    from dataclasses import replace

    from core.ivpn.protocol import NOT_RUNNING
    from core.ivpn.status import location_gate

    up = replace(NOT_RUNNING, daemon=True)
    for state in ("CONNECTING", "ADDROUTES", "CONNECTED", "RECONNECTING", "TCP_CONNECT"):
        assert location_gate(replace(up, state=state)), state
    for state in ("DISCONNECTED", "EXITING", "INITIALISED", "UNKNOWN"):
        assert not location_gate(replace(up, state=state)), state
    assert not location_gate(replace(up, state="CONNECTED", daemon=False))  # daemon gone: nobody vouches
