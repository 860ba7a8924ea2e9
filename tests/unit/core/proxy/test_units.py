"""The proxy library's pure parts, with plain objects and bytes: egress choice, deciders, the session
cache, sockaddr parsing, the route plan. (The conntrack lookup's kernel answers:
tests/unit/kernel/test_conntrack.py.)"""

from __future__ import annotations

import socket
import struct

import pytest

from core.egress import plan_routes
from core.proxy import (
    ProxyConfig,
    Refusal,
    Session,
    SessionRequest,
    SessionTable,
    SplitDecider,
    UpstreamPlan,
    parse_address,
    resolve_egress,
    static_egress,
    to_original_destination,
)
from core.proxy.origdst import parse_sockaddr
from core.proxy.session import split_key
from core.proxy.udp import DatagramBatch
from kernel.routing import SplitRoute
from messages import Mark, flow_key
from messages.events import GatewayRecord, InterfaceRecord, NetenvChanged
from messages.flows import FiveTuple, IpProtocol

# --- egress -------------------------------------------------------------------------------------------


def netenv(**kw: object) -> NetenvChanged:
    base: dict[str, object] = {
        "seq": 1,
        "ts": 0.0,
        "interfaces": [
            InterfaceRecord(
                name="eth0",
                index=2,
                mac="52:54:00:AA:BB:CC",
                is_physical=True,
                addresses=["192.0.2.10/26", "2001:db8:10::10/64"],
                ipv4="192.0.2.10",
                ipv6="2001:db8:10::10",
            ),
            InterfaceRecord(
                name="wlan0",
                index=3,
                mac="52:54:00:11:22:33",
                is_physical=True,
                addresses=["198.51.100.7/24"],
                ipv4="198.51.100.7",
            ),
            InterfaceRecord(
                name="wgivpn",
                index=9,
                kind="tunnel",
                flags=["UP", "POINTOPOINT", "NOARP"],
                addresses=["192.0.2.66/32"],
                ipv4="192.0.2.66",
            ),
        ],
        "gateways": [
            GatewayRecord(gateway="192.0.2.1", interface="eth0", family=4),
            GatewayRecord(gateway="2001:db8:10::1", interface="eth0", family=6),
            GatewayRecord(gateway="198.51.100.1", interface="wlan0", family=4),
        ],
        "uplink_ipv4": "eth0",
        "uplink_ipv6": "eth0",
    }
    base.update(kw)
    return NetenvChanged(**base)  # type: ignore[arg-type]


def test_auto_egress_is_the_uplink_per_family() -> None:
    egress = resolve_egress(netenv(), "")
    assert egress.v4 is not None and egress.v6 is not None
    assert (egress.v4.interface, egress.v4.source, egress.v4.gateway) == ("eth0", "192.0.2.10", "192.0.2.1")
    assert (egress.v6.interface, egress.v6.source, egress.v6.gateway) == ("eth0", "2001:db8:10::10", "2001:db8:10::1")


@pytest.mark.parametrize("choice", ["wlan0", "198.51.100.7", "52-54-00-11-22-33", "52:54:00:11:22:33"])
def test_configured_interface_by_name_ip_or_mac(choice: str) -> None:
    egress = resolve_egress(netenv(), choice)
    assert egress.v4 is not None and egress.v4.interface == "wlan0" and egress.v4.gateway == "198.51.100.1"
    assert egress.v6 is None and egress.why(6) == "wlan0 has no IPv6 address"


def test_chosen_ip_is_the_source_address() -> None:
    env = netenv()
    env.interfaces[0].addresses.append("192.0.2.11/26")
    egress = resolve_egress(env, "192.0.2.11")
    assert egress.v4 is not None and egress.v4.source == "192.0.2.11"


def test_missing_pieces_are_named() -> None:
    assert resolve_egress(None, "").why(4) == "no network environment yet"
    assert resolve_egress(netenv(), "eth9").why(4) == "split interface 'eth9' not found"
    no_uplink = resolve_egress(netenv(uplink_ipv6=""), "")
    assert no_uplink.v6 is None and no_uplink.why(6) == "no physical IPv6 uplink"
    no_gw = resolve_egress(netenv(gateways=[]), "")
    assert no_gw.v4 is None and no_gw.why(4) == "no IPv4 gateway on eth0"  # never the on-link guess


def test_uplink_gateway_known_while_the_vpn_owns_the_default() -> None:
    """The VPN replaced the default route: no gateway record for eth0, but netenv remembers the next hop."""
    egress = resolve_egress(netenv(gateways=[], uplink_gateway_ipv4="192.0.2.1", uplink_gateway_ipv6="fe80::1"), "")
    assert egress.v4 is not None and egress.v4.gateway == "192.0.2.1"
    assert egress.v6 is not None and egress.v6.gateway == "fe80::1"


def test_point_to_point_interface_needs_no_gateway() -> None:
    egress = resolve_egress(netenv(), "wgivpn")
    assert egress.v4 is not None and egress.v4.point_to_point and egress.v4.gateway == ""
    assert plan_routes(egress.all()) == [SplitRoute(4, "wgivpn", "", 9)]


def test_route_plan_one_route_per_family_and_interface() -> None:
    routes = plan_routes([*resolve_egress(netenv(), "").all(), *resolve_egress(netenv(), "wlan0").all()])
    assert [str(r) for r in routes] == [
        "IPv4 default via 192.0.2.1 dev eth0",
        "IPv4 default via 198.51.100.1 dev wlan0",
        "IPv6 default via 2001:db8:10::1 dev eth0",
    ]


# --- deciders -----------------------------------------------------------------------------------------


def request(dst: tuple[str, int] | None = ("203.0.113.80", 80), ct_mark: int = 0) -> SessionRequest:
    """A TCP session from 192.0.2.66:40000 (as the proxy sees it, and as the app made it) to `dst`."""
    seen = FiveTuple(IpProtocol.TCP, "192.0.2.66", 40000, "127.0.0.17", 719)
    flow = FiveTuple(IpProtocol.TCP, "192.0.2.66", 40000, *dst) if dst is not None else None
    return SessionRequest(seen, flow, ct_mark)


def test_split_decider_binds_to_the_family_egress() -> None:
    decider = SplitDecider(static_egress("eth0", source4="192.0.2.10", gateway4="192.0.2.1"))
    decision = decider(request())
    assert isinstance(decision, UpstreamPlan)
    assert decision.remote == ("203.0.113.80", 80)
    assert (decision.binding.interface, decision.binding.source_ip) == ("eth0", "192.0.2.10")
    assert decision.binding.mark == Mark.SPLIT_EGRESS
    assert decider(request(("2001:db8:30::80", 80))) == Refusal("no IPv6 gateway given for eth0")
    assert decider(request(None)) == Refusal("no original destination")


def test_split_decider_follows_updates() -> None:
    decider = SplitDecider()
    assert decider(request()) == Refusal("no network environment yet")
    decider.update(resolve_egress(netenv(), "wlan0"))
    decision = decider(request())
    assert isinstance(decision, UpstreamPlan) and decision.binding.interface == "wlan0"


def test_plain_transparent_decider() -> None:
    assert to_original_destination(request()) == UpstreamPlan(("203.0.113.80", 80))
    assert isinstance(to_original_destination(request(None)), Refusal)


# --- sessions -----------------------------------------------------------------------------------------


def make_session(table: SessionTable, remote: tuple[str, int], client_port: int = 40000) -> Session:
    s = Session(table.new_id(), "tcp", ("192.0.2.66", client_port), ("127.0.0.17", 719), ("203.0.113.80", 80))
    s.remote = remote
    return s


def test_table_metrics_and_upstream_index() -> None:
    table = SessionTable(max_sessions=2, id_prefix="t0-")
    a = make_session(table, ("203.0.113.80", 80))
    b = make_session(table, ("203.0.113.80", 80), 40001)
    table.add(a)
    table.add(b)
    assert table.full()
    assert {s.id for s in table.by_upstream("203.0.113.80", 80)} == {"t0-1", "t0-2"}
    assert table.by_upstream("::ffff:203.0.113.80", 80) == table.by_upstream("203.0.113.80", 80)
    assert table.by_upstream("203.0.113.80", 443) == []
    table.set_remote(b, ("203.0.113.81", 80))
    assert table.by_upstream("203.0.113.81", 80) == [b]
    assert table.remove(a) and not table.remove(a)
    table.refuse()
    assert table.by_upstream("203.0.113.80", 80) == []
    assert table.metrics() == {"active": 1, "created": 2, "closed": 1, "refused": 1}


def test_split_key_uses_the_apps_own_address() -> None:
    """UDP: the proxy may see a NAT-remapped port; the interceptor saw the app's port."""
    s = Session("x", "udp", ("192.0.2.10", 33384), ("127.0.0.17", 719), ("203.0.113.81", 5300), ("192.0.2.10", 5000))
    assert s.split_key == "udp 192.0.2.10:5000 203.0.113.81:5300"
    assert s.to_dict()["client"] == ["192.0.2.10", 5000]


@pytest.mark.parametrize(
    ("proto", "src", "dst"),
    [
        ("tcp", ("192.0.2.66", 40000), ("203.0.113.80", 80)),
        ("udp", ("2001:db8:10::10", 5000), ("2001:DB8:30:0:0:0:0:80", 5300)),
        ("udp", ("::ffff:192.0.2.10", 5000), ("fe80::1%eth0", 53)),
    ],
)
def test_cached_split_key_is_the_interceptors_flow_key(proto: str, src: tuple[str, int], dst: tuple[str, int]) -> None:
    for _ in range(2):  # cold and cached
        assert split_key(proto, src, dst) == flow_key(proto, src[0], src[1], dst[0], dst[1])


def test_udp_batches_equal_sizes_for_one_gso_send() -> None:
    batch = DatagramBatch(memoryview(b"a" * 64))
    assert batch.add(memoryview(b"b" * 64)) and batch.add(memoryview(b"c" * 10))  # the last may be shorter
    assert not batch.add(memoryview(b"d" * 10))  # nothing after a short one: GSO could not split it right
    assert (batch.count, batch.size, len(batch.data)) == (3, 64, 138)
    assert [bytes(d) for d in batch.datagrams()] == [b"a" * 64, b"b" * 64, b"c" * 10]
    assert not DatagramBatch(memoryview(b"x" * 10)).add(memoryview(b"y" * 11))  # a bigger one starts a new batch
    big = DatagramBatch(memoryview(bytes(1400)))
    while big.add(memoryview(bytes(1400))):
        pass
    assert big.count == 42 and len(big.data) <= 60_000  # one GSO send stays one IP packet


def test_config_tick_follows_shortest_timeout() -> None:
    assert ProxyConfig().tick() == 1.0
    assert ProxyConfig(dial_timeout=0.2).tick() == pytest.approx(0.05)
    assert ProxyConfig(read_timeout=0.0001).tick() == 0.01


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.17:719", ("127.0.0.17", 719)), ("[::1]:719", ("::1", 719)), (" 0.0.0.0:1 ", ("0.0.0.0", 1))],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["127.0.0.17", "::1:719", "[::1]", "host:x"])
def test_parse_address_refuses_bad_input(text: str) -> None:
    with pytest.raises(ValueError, match="bad listen address"):
        parse_address(text)


# --- kernel data --------------------------------------------------------------------------------------


def test_sockaddr_parsing() -> None:
    v4 = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 80) + socket.inet_aton("203.0.113.80") + bytes(8)
    assert parse_sockaddr(v4) == ("203.0.113.80", 80)
    v6 = (
        struct.pack("=H", socket.AF_INET6)
        + struct.pack("!HI", 443, 0)
        + socket.inet_pton(socket.AF_INET6, "2001:db8:30::80")
        + bytes(4)
    )
    assert parse_sockaddr(v6) == ("2001:db8:30::80", 443)
    with pytest.raises(ValueError):
        parse_sockaddr(b"\x00")


def test_session_counters_are_first_reported_early_then_every_interval() -> None:
    from core.proxy.session import Session

    s = Session("s1", "udp", ("192.0.2.66", 5000), ("127.0.0.17", 719), ("203.0.113.80", 5300), now=100.0)
    assert not s.report_due(100.5, moved=4, busy=True, first=1.0, every=10.0)
    assert s.report_due(101.0, moved=6, busy=True, first=1.0, every=10.0)  # after 1 s: tables show live bytes
    assert not s.report_due(105.0, moved=9, busy=True, first=1.0, every=10.0)
    assert s.report_due(111.0, moved=9, busy=False, first=1.0, every=10.0)  # then every interval
    assert not s.report_due(121.0, moved=9, busy=False, first=1.0, every=10.0)  # nothing new: no report
    assert s.report_due(123.0, moved=10, busy=True, first=1.0, every=10.0)  # news, once the interval is over


def test_a_session_quiet_after_its_first_exchange_is_not_reported_early() -> None:
    """A DNS query and its answer: its counters wait for the regular interval (or its close), instead of a
    report one second in that nobody needs; a session that never moved is never reported."""
    from core.proxy.session import Session

    s = Session("s1", "udp", ("192.0.2.66", 5000), ("127.0.0.17", 719), ("203.0.113.80", 53), now=100.0)
    assert not s.report_due(101.5, moved=2, busy=False, first=1.0, every=10.0)
    assert s.report_due(110.0, moved=2, busy=False, first=1.0, every=10.0)
    idle = Session("s2", "udp", ("192.0.2.66", 5001), ("127.0.0.17", 719), ("203.0.113.80", 53), now=100.0)
    assert not idle.report_due(130.0, moved=0, busy=False, first=1.0, every=10.0)


def test_split_decider_uses_the_interface_the_split_mark_names() -> None:
    from messages.marks import split_mark

    eth0 = static_egress("eth0", source4="192.0.2.10", gateway4="192.0.2.1")
    eth1 = static_egress("eth1", source4="192.0.2.130", gateway4="192.0.2.129")
    decider = SplitDecider(eth0)
    decider.update(eth0, {2: eth0, 5: eth1}, wants_ct_mark=True)
    assert decider.wants_ct_mark

    def ask(mark: int) -> UpstreamPlan | Refusal:
        return decider(request(("203.0.113.80", 80), ct_mark=mark))

    assert ask(split_mark(0)).binding.interface == "eth0"  # type: ignore[union-attr]  # the global choice
    chosen = ask(split_mark(5))
    assert isinstance(chosen, UpstreamPlan)
    assert (chosen.binding.interface, chosen.binding.source_ip) == ("eth1", "192.0.2.130")
    refused = ask(split_mark(9))
    assert isinstance(refused, Refusal) and "index 9" in refused.reason
    decider.update(eth0)
    assert not decider.wants_ct_mark
