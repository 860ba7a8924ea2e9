"""The IVPN verdict handler with plain objects: IVPN's processes, its carrier (both directions, also while the
daemon is away) and its daemon's port are accept-final and never split; before any status nothing without a
process is split; everything else is left to the user's rules."""

from __future__ import annotations

import pytest

from actors.interceptor.verdict import decide
from core.ivpn.interop import LINUX_EXECUTABLES, IvpnVerdictHandler, ivpn_executables
from core.policy import CompiledPolicy
from core.verdict_handler import AcceptFinal, ConnectionView
from messages import IvpnStatus, Mark, PolicyRule, PolicySnapshot, ProcessInfo, Verdict
from messages.flows import FiveTuple, IpProtocol

HANDLER = IvpnVerdictHandler(LINUX_EXECUTABLES)
CONNECTED = IvpnStatus(ts=0.0, daemon=True, state="CONNECTED", connected=True, server_ip="198.51.100.2",
                       server_port=51820, daemon_port=41234)  # fmt: skip
SPLIT_ALL = CompiledPolicy(
    PolicySnapshot(version=1, ts=0.0, enabled=True, rules=[PolicyRule(id="all", action="split")])
)
CURL = ProcessInfo(pid=10, uid=1000, name="curl", exe="/usr/bin/curl")
WG = ProcessInfo(pid=11, uid=0, name="wg-quick", exe="/opt/ivpn/wireguard-tools/wg-quick")
DAEMON = ProcessInfo(pid=12, uid=0, name="ivpn-service", exe="/usr/bin/ivpn-service")


def flow(proto: int = IpProtocol.UDP, src: str = "192.0.2.10", sport: int = 51821, dst: str = "198.51.100.2",
         dport: int = 51820) -> FiveTuple:  # fmt: skip
    return FiveTuple(proto, src, sport, dst, dport)


def view(f: FiveTuple, process: ProcessInfo | None = None, status: IvpnStatus | None = CONNECTED,
         inbound: bool = False) -> ConnectionView:  # fmt: skip
    return ConnectionView(f, inbound, process, "", status)


def test_ivpn_processes_are_accept_final_others_are_left_to_the_rules() -> None:
    assert isinstance(HANDLER(view(flow(dst="203.0.113.80", dport=443), DAEMON)), AcceptFinal)
    assert isinstance(HANDLER(view(flow(dst="203.0.113.80", dport=443), WG, status=None)), AcceptFinal)
    assert HANDLER(view(flow(dst="203.0.113.80", dport=443), CURL)) is None


def test_the_carrier_is_accept_final_both_ways_udp_and_tcp_also_while_the_daemon_is_away() -> None:
    for proto in (IpProtocol.UDP, IpProtocol.TCP):
        assert isinstance(HANDLER(view(flow(proto))), AcceptFinal)
        inbound = FiveTuple(proto, "198.51.100.2", 51820, "192.0.2.10", 51821)
        assert isinstance(HANDLER(view(inbound, inbound=True)), AcceptFinal)
    away = IvpnStatus(ts=0.0, daemon=False, state="CONNECTED", server_ip="198.51.100.2", server_port=51820)
    assert isinstance(HANDLER(view(flow(), status=away)), AcceptFinal)
    assert HANDLER(view(flow(dport=51821))) is None  # the server's other ports are not the carrier
    assert HANDLER(view(flow(dst="198.51.100.3"))) is None
    mapped = flow(dst="::ffff:198.51.100.2")
    assert isinstance(HANDLER(view(mapped)), AcceptFinal)


def test_the_daemons_control_port_is_accept_final_to_and_from() -> None:
    to = FiveTuple(IpProtocol.TCP, "127.0.0.1", 50000, "127.0.0.1", 41234)
    back = FiveTuple(IpProtocol.TCP, "127.0.0.1", 41234, "127.0.0.1", 50000)
    assert isinstance(HANDLER(view(to)), AcceptFinal) and isinstance(HANDLER(view(back, inbound=True)), AcceptFinal)
    assert HANDLER(view(FiveTuple(IpProtocol.TCP, "127.0.0.1", 50000, "127.0.0.1", 41235))) is None


def test_before_the_first_status_nothing_without_a_process_is_split() -> None:
    answer = HANDLER(view(flow(), status=None))
    assert isinstance(answer, tuple) and answer[0] == Verdict.REROUTE_TO_TUNNEL
    assert HANDLER(view(flow(), CURL, status=None)) is None  # an app's connection: the rules decide
    assert HANDLER(view(flow(), status=None, inbound=True)) is None
    not_looked_for = ConnectionView(flow(), False, None, "", None, attributed=False)
    assert HANDLER(not_looked_for) is None  # the verdict comes first: the engine looks it up before a split
    no_ivpn = IvpnStatus(ts=0.0, daemon=False)  # the ivpn actor answered: no IVPN here at all
    assert HANDLER(view(flow(), status=no_ivpn)) is None


def test_through_decide_a_split_rule_never_splits_ivpn_and_its_connections_carry_1709() -> None:
    carrier = decide(flow(), SPLIT_ALL, handler=HANDLER, ivpn=CONNECTED)
    assert (carrier.verdict, carrier.mark, carrier.split) == (Verdict.ACCEPT, Mark.ACCEPT_FINAL, False)
    assert "carrier" in carrier.reason
    own = decide(flow(dst="203.0.113.80", dport=443), SPLIT_ALL, process=DAEMON, handler=HANDLER, ivpn=CONNECTED)
    assert (own.mark, own.split) == (Mark.ACCEPT_FINAL, False)
    app = decide(flow(dst="203.0.113.80", dport=443), SPLIT_ALL, process=CURL, handler=HANDLER, ivpn=CONNECTED)
    assert app.split
    early = decide(flow(), SPLIT_ALL, handler=HANDLER, ivpn=None)
    assert (early.verdict, early.split) == (Verdict.REROUTE_TO_TUNNEL, False)


def test_executables_per_platform_and_from_the_environment() -> None:
    win = ivpn_executables("win32", r"D:\IVPN")
    assert r"D:\IVPN\IVPN Service.exe" in win and r"D:\IVPN\WireGuard\x86_64\wg.exe" in win
    handler = IvpnVerdictHandler(win)
    service = ProcessInfo(pid=1, exe=r"d:\ivpn\ivpn service.exe")
    assert isinstance(handler(view(flow(dst="203.0.113.80"), service)), AcceptFinal)
    env = {"SPLITTUN_IVPN_EXECUTABLES": "/tmp/x/ivpn-service:/tmp/x/wg"}
    assert IvpnVerdictHandler.from_env(env).executables == {"/tmp/x/ivpn-service", "/tmp/x/wg"}
    assert IvpnVerdictHandler.from_env({}, "linux").executables == set(LINUX_EXECUTABLES)


def test_on_windows_the_executables_are_under_the_installation_directory_the_registry_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from core.ivpn import interop

    monkeypatch.setattr(interop, "windows_install_dir", lambda: r"E:\Apps\IVPN Client")
    handler = IvpnVerdictHandler.from_env({}, "win32")
    assert r"e:\apps\ivpn client\ivpn service.exe" in handler.executables
