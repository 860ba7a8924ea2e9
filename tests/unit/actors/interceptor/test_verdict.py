"""Verdict precedence and scope (verdict.py), the external handler slot (handler.py), re-evaluation rules."""

from __future__ import annotations

import pytest

from actors.interceptor.verdict import VerdictOutcome, decide, never_split_destination, reevaluation_resets
from core import verdict_handler as handlers
from core.policy import CompiledPolicy
from core.verdict_handler import ConnectionView, HandlerAlreadySet, HandlerSlot
from messages import IvpnStatus, Mark, PolicyRule, PolicySnapshot, ProcessInfo, Verdict
from messages.flows import FiveTuple, IpProtocol
from messages.marks import nameserver_mark, nameserver_path, split_interface_index, split_mark

TCP, UDP, ICMP = IpProtocol.TCP, IpProtocol.UDP, IpProtocol.ICMP


def policy(*rules: PolicyRule, enabled: bool = True) -> CompiledPolicy:
    return CompiledPolicy(PolicySnapshot(version=1, ts=0.0, enabled=enabled, rules=list(rules)))


SPLIT_ALL = policy(PolicyRule(id="all", action="split"))
SPLIT_SERVER = policy(PolicyRule(id="srv", action="split", dest="203.0.113.80", interface="eth0"))


def flow(proto: int = TCP, dst: str = "203.0.113.80", port: int = 80) -> FiveTuple:
    return FiveTuple(proto, "192.0.2.66" if ":" not in dst else "fd00:5717::2", 40000, dst, port)


def test_split_rule_gives_split_verdict_mark_and_interface() -> None:
    out = decide(flow(), SPLIT_SERVER)
    assert (out.verdict, out.mark, out.rule, out.interface) == (
        Verdict.REROUTE_TO_SPLIT_TUN,
        Mark.REROUTE_TO_SPLIT_TUN,
        "srv",
        "eth0",
    )
    assert out.split and out.permanent


def test_split_mark_carries_the_rules_interface_index() -> None:
    asked: list[tuple[str, int]] = []

    def egress(interface: str, version: int) -> tuple[int, str]:
        asked.append((interface, version))
        return 7, ""

    out = decide(flow(), SPLIT_SERVER, egress=egress)
    assert asked == [("eth0", 4)]
    assert out.split and out.mark == 1719 | (7 << 16)
    assert split_interface_index(out.mark) == 7
    assert split_interface_index(int(Mark.ACCEPT_ALWAYS)) is None


def test_a_split_with_nowhere_to_go_stays_in_the_vpn() -> None:
    out = decide(flow(dst="2001:db8:30::80"), SPLIT_ALL, egress=lambda i, v: (0, f"no IPv{v} uplink"))
    assert (out.verdict, out.mark, out.rule) == (Verdict.ACCEPT, Mark.ACCEPT_ALWAYS, "all")
    assert out.reason == "no IPv6 uplink: kept in the VPN" and not out.split


def test_split_marks_fit_the_rules_mask() -> None:
    assert split_mark() == Mark.REROUTE_TO_SPLIT_TUN
    assert split_mark(0xFFFF) & 0xFFFF == Mark.REROUTE_TO_SPLIT_TUN
    with pytest.raises(ValueError):
        split_mark(0x10000)


def test_no_matching_rule_keeps_connection_in_the_vpn_permanently() -> None:
    out = decide(flow(dst="203.0.113.81"), SPLIT_SERVER)
    assert (out.verdict, out.mark, out.rule) == (Verdict.ACCEPT, Mark.ACCEPT_ALWAYS, "")


def test_disabled_policy_splits_nothing() -> None:
    rule = PolicyRule(id="all", action="split")
    assert decide(flow(), policy(rule, enabled=False)).verdict == Verdict.ACCEPT


def test_mid_stream_tcp_is_never_split() -> None:
    out = decide(flow(), SPLIT_ALL, first_packet=False)
    assert (out.verdict, out.mark) == (Verdict.ACCEPT, Mark.ACCEPT_ALWAYS)
    assert "mid-stream" in out.reason


def test_udp_is_split_at_any_packet() -> None:
    assert decide(flow(UDP, port=5300), SPLIT_ALL).split


@pytest.mark.parametrize(
    ("dst", "why"),
    [
        ("127.0.0.1", "localhost"),
        ("::1", "localhost"),
        ("224.0.0.251", "multicast"),
        ("ff02::fb", "multicast"),
        ("255.255.255.255", "broadcast/unspecified"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("::ffff:127.0.0.1", "localhost"),
    ],
)
def test_destinations_that_are_never_split(dst: str, why: str) -> None:
    assert never_split_destination(dst) == why
    out = decide(flow(UDP, dst=dst, port=53), SPLIT_ALL)
    assert out.verdict == Verdict.ACCEPT and why in out.reason


def test_only_tcp_and_udp_qualify() -> None:
    out = decide(flow(ICMP, port=0), SPLIT_ALL)
    assert out.verdict == Verdict.ACCEPT and "only TCP and UDP" in out.reason


def test_inbound_is_never_split() -> None:
    assert decide(flow(), SPLIT_ALL, inbound=True).verdict == Verdict.ACCEPT


def test_own_process_is_accept_final_and_the_handler_is_not_asked() -> None:
    asked = []
    out = decide(flow(), SPLIT_ALL, own=True, handler=lambda v: asked.append(v) or Verdict.BLOCK)
    assert (out.verdict, out.mark) == (Verdict.ACCEPT, Mark.ACCEPT_FINAL)
    assert asked == []


@pytest.mark.parametrize("mark", [Mark.ACCEPT_FINAL, Mark.SPLIT_EGRESS])
def test_packets_carrying_our_marks_are_ours(mark: Mark) -> None:
    assert decide(flow(), SPLIT_ALL, packet_mark=int(mark)).mark == Mark.ACCEPT_FINAL


def test_tunnel_verdict_from_the_handler_beats_a_split_rule() -> None:
    out = decide(flow(), SPLIT_ALL, handler=lambda v: (Verdict.REROUTE_TO_TUNNEL, "ivpn: keep in tunnel"))
    assert (out.verdict, out.mark, out.rule, out.reason) == (
        Verdict.REROUTE_TO_TUNNEL,
        Mark.REROUTE_TO_TUNNEL,
        "external",
        "ivpn: keep in tunnel",
    )
    assert not out.split


@pytest.mark.parametrize(("verdict", "mark"), [(Verdict.BLOCK, Mark.BLOCK_ALWAYS), (Verdict.DROP, Mark.DROP_ALWAYS)])
def test_handler_can_block_or_drop(verdict: Verdict, mark: Mark) -> None:
    out = decide(flow(), SPLIT_ALL, handler=lambda v: verdict)
    assert (out.verdict, out.mark) == (verdict, mark)


@pytest.mark.parametrize("answer", [None, Verdict.ACCEPT, Verdict.UNDECIDED, Verdict.UNDETERMINABLE])
def test_handler_without_objection_lets_the_policy_decide(answer: Verdict | None) -> None:
    assert decide(flow(), SPLIT_SERVER, handler=lambda v: answer).split


def test_handler_cannot_lower_a_verdict_or_split_what_cannot_be_split() -> None:
    wants_split = lambda v: Verdict.REROUTE_TO_SPLIT_TUN  # noqa: E731
    assert decide(flow(), policy(), handler=wants_split).split  # an accepted TCP SYN: may be split
    assert not decide(flow(ICMP, port=0), policy(), handler=wants_split).split
    assert not decide(flow(dst="127.0.0.1"), policy(), handler=wants_split).split
    assert not decide(flow(), policy(), first_packet=False, handler=wants_split).split


def test_unsupported_handler_verdict_keeps_the_connection_in_the_vpn() -> None:
    out = decide(flow(), SPLIT_ALL, handler=lambda v: Verdict.REROUTE_TO_NAMESERVER)
    assert (out.verdict, out.mark) == (Verdict.ACCEPT, Mark.ACCEPT_ALWAYS)
    assert "does not implement" in out.reason


def test_failing_handler_keeps_the_connection_in_the_vpn_and_reports() -> None:
    def broken(view: ConnectionView) -> Verdict:
        raise RuntimeError("boom")

    errors: list[str] = []
    out = decide(flow(), SPLIT_ALL, handler=broken, errors=errors)
    assert (out.verdict, out.mark, out.split) == (Verdict.ACCEPT, Mark.ACCEPT_ALWAYS, False)
    assert errors == ["RuntimeError: boom"]


def test_handler_sees_process_domain_and_vpn_status() -> None:
    seen: list[ConnectionView] = []
    status = IvpnStatus(ts=0.0, daemon=True, state="CONNECTED", connected=True)
    proc = ProcessInfo(pid=42, exe="/usr/bin/curl", name="curl")
    decide(flow(), SPLIT_ALL, process=proc, domain="www.example.com", ivpn=status, handler=seen.append)
    assert seen[0].process == proc and seen[0].domain == "www.example.com" and seen[0].ivpn == status
    assert (seen[0].flow.dst_ip, seen[0].flow.dst_port, seen[0].flow.protocol) == ("203.0.113.80", 80, TCP)


def test_app_and_domain_facts_reach_the_policy() -> None:
    rule_app = PolicyRule(id="curl", action="split", app_name="curl")
    rule_kids = PolicyRule(id="kids", action="split", app_path="/usr/bin/firefox", children=True)
    rule_dom = PolicyRule(id="dom", action="split", dest=".example.com")
    curl = ProcessInfo(pid=1, exe="/usr/bin/curl", name="curl")
    child = ProcessInfo(
        pid=2,
        exe="/usr/lib/firefox/content",
        name="content",
        ancestors=["/usr/bin/firefox"],
        ancestor_names=["firefox"],
    )
    assert decide(flow(), policy(rule_app), process=curl).rule == "curl"
    assert not decide(flow(), policy(rule_app), process=child).split
    assert decide(flow(), policy(rule_kids), process=child).rule == "kids"
    assert decide(flow(), policy(rule_dom), domain="cdn.example.com").rule == "dom"
    assert not decide(flow(), policy(rule_dom), domain="").split


# --- re-evaluation ----------------------------------------------------------------------------------------

SPLIT = VerdictOutcome(Verdict.REROUTE_TO_SPLIT_TUN, Mark.REROUTE_TO_SPLIT_TUN)
ACCEPT = VerdictOutcome(Verdict.ACCEPT, Mark.ACCEPT_ALWAYS)
BLOCK = VerdictOutcome(Verdict.BLOCK, Mark.BLOCK_ALWAYS)


@pytest.mark.parametrize(
    ("proto", "old", "new", "reset"),
    [
        (UDP, ACCEPT, SPLIT, True),  # a datagram flow moves to the proxy at its next packet
        (UDP, SPLIT, ACCEPT, True),
        (UDP, ACCEPT, ACCEPT, False),
        (TCP, ACCEPT, SPLIT, False),  # cannot hand a running stream to the proxy
        (TCP, SPLIT, ACCEPT, False),  # a split stream keeps working until it closes
        (TCP, ACCEPT, BLOCK, True),  # between non-split verdicts a TCP reset is safe
        (ICMP, ACCEPT, BLOCK, True),
    ],
)
def test_which_live_connections_are_requeued(proto: int, old: VerdictOutcome, new: VerdictOutcome, reset: bool) -> None:
    assert reevaluation_resets(proto, old, new) is reset


# --- the handler slot -------------------------------------------------------------------------------------


def handler_for_tests(view: ConnectionView) -> Verdict | None:
    return None


def test_handler_is_set_once() -> None:
    slot = HandlerSlot()
    slot.set(handler_for_tests, "first")
    with pytest.raises(HandlerAlreadySet, match="first"):
        slot.set(lambda v: None)
    assert slot.get() is handler_for_tests


def test_handler_must_be_callable() -> None:
    with pytest.raises(TypeError):
        HandlerSlot().set("not a function")  # type: ignore[arg-type]


def test_load_registers_a_module_function_and_skips_a_missing_module() -> None:
    slot = HandlerSlot()
    assert handlers.load("actors.no_such_module:handler", slot) is False
    assert slot.get() is None
    assert handlers.load("tests.unit.actors.interceptor.test_verdict:handler_for_tests", slot) is True
    assert slot.get() is handler_for_tests
    with pytest.raises(HandlerAlreadySet):
        handlers.load("tests.unit.actors.interceptor.test_verdict:handler_for_tests", slot)


def test_split_egress_table_answers_from_the_network_snapshot() -> None:
    from actors.interceptor.verdict import SplitEgress
    from messages import GatewayRecord, InterfaceRecord, NetenvChanged

    netenv = NetenvChanged(
        seq=1,
        ts=0.0,
        interfaces=[
            InterfaceRecord(name="eth0", index=2, addresses=["192.0.2.10/26"], ipv4="192.0.2.10"),
            InterfaceRecord(name="eth1", index=5, addresses=["192.0.2.130/26"], ipv4="192.0.2.130",
                            mac="02:00:00:00:00:05"),
        ],
        gateways=[
            GatewayRecord(gateway="192.0.2.1", interface="eth0", family=4),
            GatewayRecord(gateway="192.0.2.129", interface="eth1", family=4),
        ],
        uplink_ipv4="eth0",
        uplink_gateway_ipv4="192.0.2.1",
    )  # fmt: skip
    table = SplitEgress(netenv, "", ["eth1", "02:00:00:00:00:05", "wlan9"])
    assert table.check("", 4) == (0, "")  # the global choice: no index in the mark
    assert table.check("eth1", 4) == (5, "")
    assert table.check("02:00:00:00:00:05", 4) == (5, "")  # a rule may name its interface by MAC
    assert table.check("", 6)[1] == "no physical IPv6 uplink"  # no IPv6 here: such splits stay in the VPN
    assert "wlan9" in table.check("wlan9", 4)[1]
    assert "not known" in table.check("eth7", 4)[1]  # a rule newer than the table: kept, never guessed
    early = SplitEgress(None, "", ["eth1"])
    assert early.check("", 4) == (0, "") and early.check("eth1", 4)[1] == "the network state is not known yet"


# --- DNS: rerouted to the resolver with the asking app's path -------------------------------------------

SPLIT_CURL = policy(PolicyRule(id="curl", action="split", app_name="curl", interface="eth1"))
CURL = ProcessInfo(pid=10, name="curl", exe="/usr/bin/curl")


@pytest.mark.parametrize("proto", [UDP, TCP])
def test_dns_of_a_vpn_app_is_rerouted_on_the_vpn_path(proto: int) -> None:
    out = decide(flow(proto, "192.0.2.65", 53), SPLIT_CURL, process=ProcessInfo(pid=11, name="firefox"),
                 nameserver=True)  # fmt: skip
    assert (out.verdict, out.mark) == (Verdict.REROUTE_TO_NAMESERVER, Mark.REROUTE_TO_NAMESERVER)
    assert nameserver_path(out.mark) == (False, 0) and not out.split and out.permanent


def test_dns_of_a_split_app_carries_its_path_and_interface_in_the_mark() -> None:
    out = decide(flow(UDP, "192.0.2.65", 53), SPLIT_CURL, process=CURL, nameserver=True, egress=lambda i, v: (12, ""))
    assert out.verdict == Verdict.REROUTE_TO_NAMESERVER and out.rule == "curl" and out.interface == "eth1"
    assert out.mark & 0xFFFF == Mark.REROUTE_TO_NAMESERVER
    assert nameserver_path(out.mark) == (True, 12)


def test_dns_of_a_split_app_whose_interface_is_gone_resolves_through_the_vpn() -> None:
    out = decide(flow(UDP, "192.0.2.65", 53), SPLIT_CURL, process=CURL, nameserver=True,
                 egress=lambda i, v: (0, "no IPv4 gateway on eth1"))  # fmt: skip
    assert nameserver_path(out.mark) == (False, 0)
    assert out.reason == "DNS: no IPv4 gateway on eth1: resolved through the VPN"


def test_without_a_ready_resolver_dns_is_never_split() -> None:
    out = decide(flow(UDP, "192.0.2.65", 53), SPLIT_CURL, process=CURL, nameserver=False)
    assert (out.verdict, out.mark) == (Verdict.ACCEPT, Mark.ACCEPT_ALWAYS)
    assert out.reason == "DNS: resolver not ready: kept in the VPN"


def test_localhost_dns_and_our_own_queries_are_never_rerouted() -> None:
    assert decide(flow(UDP, "127.0.0.53", 53), SPLIT_ALL, nameserver=True).mark == Mark.ACCEPT_ALWAYS
    assert decide(flow(UDP, "192.0.2.65", 53), SPLIT_ALL, own=True, nameserver=True).mark == Mark.ACCEPT_FINAL


def test_nameserver_marks_round_trip_and_stay_apart_from_split_marks() -> None:
    assert nameserver_mark() == 1799
    assert nameserver_path(nameserver_mark(True, 0x7FFF)) == (True, 0x7FFF)
    assert nameserver_path(split_mark(3)) is None and split_interface_index(nameserver_mark(True, 3)) is None
    with pytest.raises(ValueError):
        nameserver_mark(True, 0x8000)
    with pytest.raises(ValueError):
        nameserver_mark(False, 1)


def test_accept_final_from_the_handler_is_1709_and_never_split() -> None:
    from core.verdict_handler import AcceptFinal

    out = decide(flow(), SPLIT_ALL, handler=lambda v: AcceptFinal("the VPN's own"))
    assert (out.verdict, out.mark, out.rule, out.reason, out.split) == (
        Verdict.ACCEPT, Mark.ACCEPT_FINAL, "external", "the VPN's own", False)  # fmt: skip


def test_accept_and_tunnel_take_the_same_path_so_moving_between_them_resets_nothing() -> None:
    tunnel = VerdictOutcome(Verdict.REROUTE_TO_TUNNEL, Mark.REROUTE_TO_TUNNEL)
    final = VerdictOutcome(Verdict.ACCEPT, Mark.ACCEPT_FINAL)
    assert not reevaluation_resets(UDP, tunnel, final) and not reevaluation_resets(UDP, final, tunnel)
