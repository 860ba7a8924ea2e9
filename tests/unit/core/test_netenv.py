"""netenv library: fixture trees, the pure decisions, the cache, Windows parsing, the CLI.

Fixture trees (tests/fixtures/netenv/<case>/, rebuilt by make_trees.py) are real recordings of
namespaces; each test reads them through the same code the live system uses.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import struct
import sys
import threading
import time

import pytest

import core.netenv as netenv
from actors.netenv.actor import refresh_delay
from core.netenv import cache as cache_mod
from core.netenv import rtnl, windows
from core.netenv.info import FROM_DEFAULT, FROM_GATEWAY_ROUTE, FROM_OTHER_FAMILY, FROM_REMEMBERED
from core.netenv.linux import LinuxSource, RecordedNetlink, parse_proc_ipv6_route, parse_proc_route
from core.netenv.raw import (
    ARPHRD_NONE,
    ARPHRD_PPP,
    IFA_F_DEPRECATED,
    IFA_F_TENTATIVE,
    IFF_LOWER_UP,
    IFF_NOARP,
    IFF_POINTOPOINT,
    IFF_RUNNING,
    IFF_UP,
    Addr,
    Link,
    RawState,
    Route,
)
from core.netenv.uplink import Memory, classify, decide, first_routable, route_for
from kernel.netlink import NLM_F_DUMP, NLM_F_MULTI, NLM_F_REQUEST, NLMSG_DONE, NetlinkError, nla, nlmsg
from messages import decode
from tests.support import FIXTURES_DIR
from tests.support.netlink import error, install

FIXTURES = FIXTURES_DIR / "netenv"
UP = IFF_UP | IFF_RUNNING | IFF_LOWER_UP


def tree(case: str) -> RawState:
    return LinuxSource.from_tree(FIXTURES / case).read()


def snap_of(case: str, memory: Memory | None = None) -> netenv.Snapshot:
    return decide(tree(case), memory)[0]


def uplink_view(snap: netenv.Snapshot, family: int) -> tuple[str, str, str] | None:
    up = snap.uplink(family)
    return (up.interface.name, up.gateway, up.origin) if up else None


# --- fixture trees: what a user would see as "the uplink" -------------------------------------------

#: case -> (IPv4 uplink, IPv6 uplink, default route now {4, 6}); uplink = (name, gateway, found by)
EXPECTED = {
    "physical_nic": (("eth0", "198.51.100.1", FROM_DEFAULT), ("eth0", "fe80::1", FROM_DEFAULT), ("eth0", "eth0")),
    "wifi": (("wlan0", "192.0.2.1", FROM_DEFAULT), ("wlan0", "fe80::1", FROM_DEFAULT), ("wlan0", "wlan0")),
    "veth_container": (
        ("eth0", "203.0.113.1", FROM_DEFAULT),
        ("eth0", "2001:db8:3::1", FROM_DEFAULT),
        ("eth0", "eth0"),
    ),
    "wireguard": (("eth0", "198.51.100.1", FROM_DEFAULT), ("eth0", "fe80::1", FROM_DEFAULT), ("wg0", "wg0")),
    "tun_openvpn": (("eth0", "198.51.100.1", FROM_DEFAULT), None, ("tun0", "")),
    "bridge_docker0": (("eth0", "198.51.100.1", FROM_DEFAULT), None, ("eth0", "")),
    "bridge_uplink": (("br0", "198.51.100.1", FROM_DEFAULT), ("br0", "2001:db8:1::1", FROM_DEFAULT), ("br0", "br0")),
    "ipv6_only": (None, ("eth0", "fe80::1", FROM_DEFAULT), ("", "eth0")),
    "no_default": (None, None, ("", "")),
    "vpn_replaced": (
        ("eth0", "192.0.2.1", FROM_GATEWAY_ROUTE),
        ("eth0", "2001:db8:10::1", FROM_OTHER_FAMILY),
        ("wgivpn", "wgivpn"),
    ),
    "wgquick": (
        ("eth0", "192.0.2.1", FROM_DEFAULT),
        ("eth0", "2001:db8:10::1", FROM_DEFAULT),
        ("wg0", "wg0"),
    ),
}


def test_every_fixture_tree_has_an_expectation() -> None:
    cases = {p.name for p in FIXTURES.iterdir() if p.is_dir()}
    assert cases == set(EXPECTED)


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_uplink_per_family_and_current_default(case: str) -> None:
    v4, v6, (default4, default6) = EXPECTED[case]
    snap = snap_of(case)
    assert uplink_view(snap, 4) == v4
    assert uplink_view(snap, 6) == v6
    assert dict(snap.default_route) == {4: default4, 6: default6}
    assert snap.problems == ()


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_never_a_tunnel_never_loopback_as_uplink(case: str) -> None:
    for family in (4, 6):
        up = snap_of(case).uplink(family)
        if up is not None:
            assert up.interface.kind not in ("tunnel", "loopback")
            assert up.interface.ip(family)


def test_kinds_and_physical_flag() -> None:
    kinds = {
        case: {i.name: (i.kind, i.is_physical) for i in snap_of(case).all_interfaces}
        for case in ("wifi", "bridge_docker0", "wgquick", "tun_openvpn", "veth_container", "bridge_uplink")
    }
    assert kinds["wifi"] == {"lo": ("loopback", False), "eth0": ("physical", True), "wlan0": ("wifi", True)}
    assert kinds["bridge_docker0"]["docker0"] == ("bridge", False)
    assert kinds["bridge_docker0"]["vethc0"] == ("virtual", False)
    assert kinds["wgquick"]["wg0"] == ("tunnel", False)
    assert kinds["tun_openvpn"]["tun0"] == ("tunnel", False)
    assert kinds["veth_container"]["eth0"] == ("virtual", False)
    assert kinds["bridge_uplink"]["br0"] == ("bridge", False)


def test_veth_uplink_says_it_is_not_physical() -> None:
    assert snap_of("veth_container").uplink(4).interface.is_physical is False
    assert snap_of("physical_nic").uplink(4).interface.is_physical is True


def test_cache_keeps_only_usable_interfaces() -> None:
    # wifi: eth0 is admin-up without carrier; lo is loopback; both are left out of lookups.
    snap = snap_of("wifi")
    assert [i.name for i in snap.interfaces] == ["wlan0"]
    assert snap.lookup("eth0") is None and snap.lookup("lo") is None
    # docker0's member veth has no address at all.
    assert "vethc0" not in {i.name for i in snap_of("bridge_docker0").interfaces}


def test_first_routable_addresses_are_precomputed() -> None:
    eth0 = snap_of("vpn_replaced").by_name["eth0"]
    assert (eth0.ipv4, eth0.ipv6) == ("192.0.2.10", "2001:db8:10::10")
    assert any(a.startswith("fe80::") for a in eth0.addresses)  # all addresses are listed
    assert snap_of("ipv6_only").by_name["eth0"].ipv4 == ""


def test_gateways_info_lists_routes_via_next_hops() -> None:
    gws = {(g.gateway, g.interface, g.prefix, g.family, g.origin) for g in snap_of("tun_openvpn").gateways}
    assert ("198.51.100.1", "eth0", "default", 4, "route") in gws
    assert ("198.51.100.1", "eth0", "203.0.113.50/32", 4, "route") in gws
    assert ("192.0.2.69", "tun0", "0.0.0.0/1", 4, "route") in gws
    replaced = {(g.gateway, g.interface, g.prefix, g.family, g.origin) for g in snap_of("vpn_replaced").gateways}
    assert ("2001:db8:10::1", "eth0", "default", 6, "neighbour") in replaced  # an IPv6 router on the uplink


def test_wgquick_tables_and_marks() -> None:
    raw = tree("wgquick")
    assert route_for(raw, 4, "203.0.113.80").oif == next(x.index for x in raw.links if x.name == "wg0")
    # The VPN's own transport (marked 51820) still leaves through the physical default in main.
    assert route_for(raw, 4, "203.0.113.80", mark=51820).gateway == "192.0.2.1"
    assert route_for(raw, 6, "2001:db8:30::80", mark=51820).gateway == "2001:db8:10::1"


# --- memory: the physical gateway seen before the VPN came up ---------------------------------------


def _without(raw: RawState, **drop: object) -> RawState:
    routes = [r for r in raw.routes if not (r.dst == drop.get("dst") and r.family == drop.get("family", 4))]
    return dataclasses.replace(raw, routes=routes, neighbours=[] if drop.get("neighbours") is False else raw.neighbours)


def test_remembers_the_physical_gateway_from_before_the_vpn() -> None:
    vpn_on = _without(tree("vpn_replaced"), dst="198.51.100.2", neighbours=False)  # no host route, no router seen
    assert decide(vpn_on)[0].uplink(4) is None  # nothing in the tables names the physical gateway any more
    eth0 = next(link.index for link in vpn_on.links if link.name == "eth0")
    before = dataclasses.replace(
        vpn_on,
        routes=[r for r in vpn_on.routes if r.dst_len != 0]
        + [Route(4, "", 0, eth0, "192.0.2.1"), Route(6, "", 0, eth0, "2001:db8:10::1", metric=1024)],
    )
    _, memory = decide(before)
    snap, memory = decide(vpn_on, memory)
    assert uplink_view(snap, 4) == ("eth0", "192.0.2.1", FROM_REMEMBERED)
    assert uplink_view(snap, 6) == ("eth0", "2001:db8:10::1", FROM_REMEMBERED)
    assert ("192.0.2.1", "remembered") in {(g.gateway, g.origin) for g in snap.gateways}
    # Still remembered on the next refresh, and forgotten once eth0 moved to another network.
    assert uplink_view(decide(vpn_on, memory)[0], 4) == ("eth0", "192.0.2.1", FROM_REMEMBERED)
    moved_addrs = [
        dataclasses.replace(a, address="203.0.113.9") if a.address == "192.0.2.10" else a for a in vpn_on.addrs
    ]
    moved = decide(dataclasses.replace(vpn_on, addrs=moved_addrs), memory)[0]
    assert uplink_view(moved, 4) == ("eth0", "", FROM_OTHER_FAMILY)  # 192.0.2.1 is not on-link any more


# --- classification and addresses (hand-made states) -------------------------------------------------


def test_classify_links() -> None:
    assert (
        classify(Link(5, "wwan0", flags=UP | IFF_POINTOPOINT | IFF_NOARP, arptype=ARPHRD_NONE, has_device=True))
        == "physical"
    )
    assert classify(Link(6, "ppp0", flags=UP | IFF_POINTOPOINT, arptype=ARPHRD_PPP, kind="ppp")) == "tunnel"
    assert classify(Link(7, "tap0", kind="tun")) == "tunnel"
    assert classify(Link(8, "wg1", arptype=1)) == "tunnel"  # no kind, no device: the name says VPN
    assert classify(Link(9, "vlan10", kind="vlan")) == "virtual"
    assert classify(Link(10, "gre1", arptype=778)) == "tunnel"


def test_ppp_default_is_never_the_uplink() -> None:
    raw = RawState(
        links=[
            Link(2, "eth0", flags=UP, has_device=True),
            Link(3, "ppp0", flags=UP | IFF_POINTOPOINT, kind="ppp", arptype=ARPHRD_PPP),
        ],
        addrs=[Addr(3, 4, "203.0.113.7", 32, peer="203.0.113.1")],
        routes=[Route(4, "", 0, 3)],
    )
    snap = decide(raw)[0]
    assert snap.uplink(4) is None and snap.default_route[4] == "ppp0"


def test_a_modem_with_a_device_is_an_uplink() -> None:
    raw = RawState(
        links=[Link(4, "wwan0", flags=UP | IFF_POINTOPOINT | IFF_NOARP, arptype=ARPHRD_NONE, has_device=True)],
        addrs=[Addr(4, 4, "198.51.100.44", 30)],
        routes=[Route(4, "", 0, 4)],
    )
    assert uplink_view(decide(raw)[0], 4) == ("wwan0", "", FROM_DEFAULT)


def test_address_selection() -> None:
    addrs = [
        Addr(2, 6, "fe80::1", 64, scope=253),
        Addr(2, 6, "2001:db8::a", 64, flags=IFA_F_TENTATIVE),
        Addr(2, 6, "2001:db8::b", 64, flags=IFA_F_DEPRECATED),
        Addr(2, 6, "2001:db8::c", 64),
        Addr(2, 4, "169.254.3.4", 16),
        Addr(2, 4, "127.0.0.2", 8),
        Addr(2, 4, "192.0.2.44", 24),
    ]
    assert first_routable(addrs, 6) == "2001:db8::c"
    assert first_routable(addrs, 4) == "192.0.2.44"
    assert first_routable(addrs[:3], 6) == "2001:db8::b"  # deprecated beats nothing
    assert first_routable(addrs[:2], 6) == ""


def test_link_local_only_interface_is_left_out() -> None:
    raw = RawState(links=[Link(2, "eth1", flags=UP, has_device=True)], addrs=[Addr(2, 6, "fe80::5", 64, scope=253)])
    assert decide(raw)[0].interfaces == ()


# --- lookups ----------------------------------------------------------------------------------------


@pytest.fixture
def fixture_netenv(monkeypatch: pytest.MonkeyPatch) -> netenv.Netenv:
    """The library's process-wide cache, reading the vpn_replaced tree."""
    env = netenv.Netenv(LinuxSource.from_tree(FIXTURES / "vpn_replaced"))
    monkeypatch.setattr(netenv, "default", env)
    return env


def test_lookups_by_ip_mac_name(fixture_netenv: netenv.Netenv) -> None:
    eth0 = netenv.get_interface_by_name("eth0")
    assert eth0 is not None and eth0.mac
    assert netenv.get_interface("192.0.2.10") is eth0
    assert netenv.get_interface("2001:DB8:10:0::10") is eth0  # not canonical text
    assert netenv.get_interface(eth0.mac.upper().replace(":", "-")) is eth0
    assert netenv.get_interface_by_mac(eth0.mac.upper()) is eth0
    assert netenv.get_interface("wgivpn").kind == "tunnel"
    assert netenv.get_interface_by_ip("192.0.2.66").name == "wgivpn"
    assert netenv.get_interface_by_ip("eth0") is None
    assert netenv.get_interface("nosuch0") is None and netenv.get_interface("203.0.113.200") is None
    assert netenv.best_physical_default_interfaces() == {"ipv4": eth0, "ipv6": eth0}
    assert {g.interface for g in netenv.gateways_info()} == {"eth0"}


def test_lookup_tries_ip_before_mac_before_name() -> None:
    raw = RawState(
        links=[Link(2, "192.0.2.9", flags=UP, has_device=True), Link(3, "eth3", "02:00:00:00:00:03", flags=UP)],
        addrs=[Addr(2, 4, "198.51.100.9", 24), Addr(3, 4, "192.0.2.9", 24)],
    )
    snap = decide(raw)[0]
    assert snap.lookup("192.0.2.9").name == "eth3"  # the address wins over an interface named like it


def test_location_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = RawState(
        links=[Link(2, "eth0", flags=UP, has_device=True)],
        addrs=[Addr(2, 4, "23.0.0.10", 24), Addr(2, 4, "192.0.2.10", 24)],
        routes=[Route(4, "", 0, 2, "23.0.0.1")],
    )
    monkeypatch.setattr(netenv, "default", netenv.Netenv(RecordedSource(raw)))
    assert netenv.interface_location_addresses() == ["23.0.0.10"]  # public ones only
    try:
        netenv.disable_network_derived_location(True)
        assert netenv.network_derived_location_disabled()
        assert netenv.interface_location_addresses() == []
    finally:
        netenv.disable_network_derived_location(False)
    assert netenv.interface_location_addresses() == ["23.0.0.10"]


# --- the cache --------------------------------------------------------------------------------------


class RecordedSource:
    """A source returning a fixed state, counting reads; optionally slow or failing."""

    def __init__(self, raw: RawState, delay: float = 0.0) -> None:
        self.raw, self.delay, self.reads, self.fail = raw, delay, 0, False

    def read(self) -> RawState:
        self.reads += 1
        if self.delay:
            time.sleep(self.delay)
        if self.fail:
            raise OSError("netlink went away")
        return self.raw

    def close(self) -> None:
        pass


def test_cache_is_lazy_and_refreshes_at_most_once_per_second() -> None:
    now = [100.0]
    source = RecordedSource(tree("physical_nic"))
    env = netenv.Netenv(source, clock=lambda: now[0])
    assert source.reads == 0
    first = env.snapshot()
    for _ in range(50):
        assert env.snapshot() is first
        now[0] += 0.01
    assert source.reads == 1
    now[0] += 0.6  # 1.1 s after the first read
    assert env.snapshot() is not first and source.reads == 2


def test_a_burst_of_callers_costs_one_refresh() -> None:
    source = RecordedSource(tree("physical_nic"), delay=0.05)
    env = netenv.Netenv(source)
    start = threading.Barrier(16)
    results: list[object] = []

    def ask() -> None:
        start.wait()
        results.append(env.snapshot())

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert source.reads == 1 and len({id(r) for r in results}) == 1


def test_failed_refresh_keeps_the_last_snapshot() -> None:
    now = [0.0]
    source = RecordedSource(tree("physical_nic"))
    env = netenv.Netenv(source, clock=lambda: now[0])
    good = env.snapshot()
    source.fail = True
    now[0] += 2
    assert env.snapshot() is good and env.failures == 1
    assert env.snapshot() is good and source.reads == 2  # no retry storm within the second
    fresh = netenv.Netenv(source)
    with pytest.raises(netenv.NetenvError, match="netlink went away"):
        fresh.snapshot()


def test_other_platforms_get_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_mod.sys, "platform", "darwin")
    with pytest.raises(netenv.NotSupportedError, match="darwin"):
        netenv.Netenv().snapshot()


# --- /proc and netlink parsing ----------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_proc_routes_agree_with_netlink(case: str) -> None:
    """The /proc fallback reads the same main table (IPv4) and routes (IPv6) the kernel dumped."""
    source = LinuxSource.from_tree(FIXTURES / case)
    raw = source.read()
    names = {link.name: link.index for link in raw.links}
    problems: list[str] = []
    proc = source.proc_routes(names, problems)
    assert problems == []

    def key(r: Route) -> tuple[object, ...]:
        return (r.family, r.dst, r.dst_len, r.oif, r.gateway, r.metric)

    netlink4 = {key(r) for r in raw.routes if r.family == 4 and r.table == 254 and r.type == 1}
    assert {key(r) for r in proc if r.family == 4} == netlink4
    netlink6 = {key(r) for r in raw.routes if r.family == 6}
    assert {key(r) for r in proc if r.family == 6 and not r.dst.startswith("ff")} <= netlink6


def test_proc_fallback_when_the_route_dump_fails() -> None:
    for case in ("physical_nic", "vpn_replaced"):
        state = RawState.from_json(json.loads((FIXTURES / case / "netlink.json").read_text()))
        state.routes = []  # RecordedNetlink then fails the route dump, as a broken netlink would
        source = LinuxSource(FIXTURES / case / "proc", FIXTURES / case / "sys", RecordedNetlink(state), "little")
        raw = source.read()
        assert any("route dump failed" in p for p in raw.problems)
        assert uplink_view(decide(raw)[0], 4) == EXPECTED[case][0]


def test_odd_proc_lines_are_noted_and_skipped() -> None:
    text = (
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
        "eth0\tZZZZ\n"
        "ghost\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
        "eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FF00FF\t0\t0\t0\n"
    )
    routes, problems = parse_proc_route(text, {"eth0": 2}, "little")
    assert [(r.dst_len, r.gateway) for r in routes] == [(0, "192.0.2.1")]
    assert len(problems) == 3 and "ghost" in problems[1] and "not contiguous" in problems[2]
    routes6, problems6 = parse_proc_ipv6_route("nonsense\n" + "0" * 32 + " 00 " + "0" * 32 + " 00 x y z w v eth0\n", {})
    assert routes6 == [] and len(problems6) == 2


def test_netlink_parsers_survive_garbage() -> None:
    """(The framing's own walks: tests/unit/kernel/test_netlink.py.)"""
    link = rtnl.parse_link(rtnl.IFINFOMSG.pack(0, 1, 7, 1, 0) + b"\x05\x00\x03\x00")  # truncated attribute
    assert link.index == 7 and link.name == "if7"
    assert rtnl.parse_addr(rtnl.IFADDRMSG.pack(99, 24, 0, 0, 2)) is None  # unknown family


def test_dumps_hand_out_memoryviews_and_errors_name_the_dump() -> None:
    """A refresh parses hundreds of messages: the dump gives views into the datagrams, never copies."""
    link = rtnl.IFINFOMSG.pack(0, 1, 7, 1, 0) + nla(rtnl.IFLA_IFNAME, b"eth0\0")
    answer = nlmsg(rtnl.RTM_NEWLINK, NLM_F_MULTI, 1, link) + nlmsg(NLMSG_DONE, NLM_F_MULTI, 1, bytes(4))
    sock = rtnl.Rtnl()
    try:
        kernel = install(sock.nl, answer)
        payloads = sock.dump(rtnl.RTM_GETLINK)
        assert [type(p) for p in payloads] == [memoryview] and rtnl.parse_link(payloads[0]).name == "eth0"
        assert kernel.sent[0][4:8] == struct.pack("=HH", rtnl.RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP)
        install(sock.nl, error(1, errno.EPERM))
        with pytest.raises(NetlinkError, match=r"netlink dump 26: Operation not permitted") as exc:
            sock.dump(rtnl.RTM_GETROUTE)
        assert exc.value.errno == errno.EPERM
        with pytest.raises(NetlinkError, match=r"netlink dump 26: no answer") as exc:
            sock.dump(rtnl.RTM_GETROUTE)
        assert exc.value.errno == errno.ETIMEDOUT
        install(sock.nl, OSError(errno.EBADF, "Bad file descriptor"))
        with pytest.raises(NetlinkError, match=r"netlink dump 26: \[Errno 9\] Bad file descriptor"):
            sock.dump(rtnl.RTM_GETROUTE)
    finally:
        sock.close()


def test_the_monitor_counts_changes_and_overruns() -> None:
    change = nlmsg(rtnl.RTM_NEWROUTE, 0, 0, bytes(12)) + nlmsg(rtnl.RTM_NEWADDR, 0, 0, bytes(8))
    monitor = rtnl.Monitor()
    try:
        install(
            monitor, change, OSError(errno.ENOBUFS, "lost"), nlmsg(NLMSG_DONE, 0, 0, bytes(4)), *[BlockingIOError()] * 2
        )
        assert monitor.drain() == 3  # two changes and an overrun (it means "refresh" too); DONE is no change
        assert (monitor.events, monitor.overruns) == (3, 1)
        assert monitor.drain() == 0
    finally:
        monitor.close()


def test_raw_state_round_trips_through_json() -> None:
    raw = tree("wgquick")
    again = RawState.from_json(json.loads(json.dumps(raw.to_json())))
    assert again.to_json() == raw.to_json()
    with pytest.raises(TypeError):
        RawState.from_json({"links": [{"index": 1, "name": "x", "colour": "red"}]})


# --- the bus message --------------------------------------------------------------------------------


def test_snapshot_message_round_trip() -> None:
    snap = snap_of("vpn_replaced")
    msg = snap.to_message(7, ts=1.0, location_disabled=True)
    back = decode(msg.encode())
    assert back == msg
    assert (back.uplink_ipv4, back.uplink_gateway_ipv4) == ("eth0", "192.0.2.1")
    assert (back.uplink_ipv6, back.uplink_gateway_ipv6) == ("eth0", "2001:db8:10::1")
    assert (back.default_ipv4, back.default_ipv6, back.location_disabled) == ("wgivpn", "wgivpn", True)
    assert {i.name: i.kind for i in back.interfaces} == {"eth0": "physical", "wgivpn": "tunnel"}


def test_same_as_ignores_time_but_not_content() -> None:
    a, b = snap_of("wgquick"), snap_of("wgquick")
    assert a.same_as(b) and not a.same_as(snap_of("vpn_replaced")) and not a.same_as(None)


def test_refresh_timing_policy() -> None:
    assert refresh_delay(10.0, None) == pytest.approx(0.1)  # first change: read soon, with the burst
    assert refresh_delay(10.0, 5.0) == pytest.approx(0.1)
    assert refresh_delay(10.0, 9.7) == pytest.approx(0.7)  # never two reads within a second


# --- Windows ----------------------------------------------------------------------------------------


class FakeAdapters:
    """Adapter structures in our own memory, and a stand-in for GetAdaptersAddresses that hands them out."""

    def __init__(self) -> None:
        self.keep: list[object] = []
        self.adapters: list[windows.IP_ADAPTER_ADDRESSES] = []
        self.calls = 0

    def _sockaddr(self, text: str) -> windows.SOCKET_ADDRESS:
        if ":" in text:
            six = windows.SOCKADDR_IN6(sin6_family=windows.AF_INET6)
            six.sin6_addr[:] = list(__import__("ipaddress").IPv6Address(text).packed)
            self.keep.append(six)
            ptr = ctypes.cast(ctypes.pointer(six), ctypes.POINTER(windows.SOCKADDR))
            return windows.SOCKET_ADDRESS(ptr, ctypes.sizeof(six))
        sa = windows.SOCKADDR(sa_family=windows.AF_INET)
        sa.sa_data[2:6] = list(__import__("ipaddress").IPv4Address(text).packed)
        self.keep.append(sa)
        return windows.SOCKET_ADDRESS(ctypes.pointer(sa), ctypes.sizeof(sa))

    def add(
        self,
        index: int,
        name: str,
        desc: str,
        if_type: int,
        up: bool,
        mac: bytes,
        addrs: list[tuple[str, int, int]],
        gateways: list[str],
        metric: int = 25,
    ) -> None:
        a = windows.IP_ADAPTER_ADDRESSES(IfIndex=index, FriendlyName=name, Description=desc, IfType=if_type)
        a.OperStatus, a.Mtu, a.Ipv4Metric, a.Ipv6Metric = (1 if up else 2), 1500, metric, metric
        a.PhysicalAddress[: len(mac)], a.PhysicalAddressLength = list(mac), len(mac)
        a.AdapterName = b"{GUID}"
        prev = None
        for text, plen, dad in reversed(addrs):
            u = windows.IP_ADAPTER_UNICAST_ADDRESS(Address=self._sockaddr(text), OnLinkPrefixLength=plen, DadState=dad)
            u.Next = prev
            prev = ctypes.pointer(u)
            self.keep.append(u)
        a.FirstUnicastAddress = prev
        prevg = None
        for text in reversed(gateways):
            g = windows.IP_ADAPTER_GATEWAY_ADDRESS(Address=self._sockaddr(text))
            g.Next = prevg
            prevg = ctypes.pointer(g)
            self.keep.append(g)
        a.FirstGatewayAddress = prevg
        if self.adapters:
            self.adapters[-1].Next = ctypes.pointer(a)
        self.adapters.append(a)

    def call(self, family: int, flags: int, buf: object, size: object) -> int:
        self.calls += 1
        assert flags & windows.GAA_FLAG_INCLUDE_GATEWAYS
        need = ctypes.sizeof(windows.IP_ADAPTER_ADDRESSES) * 64
        size_ptr = ctypes.cast(size, ctypes.POINTER(ctypes.c_ulong))
        if size_ptr.contents.value < need:
            size_ptr.contents.value = need
            return windows.ERROR_BUFFER_OVERFLOW
        ctypes.memmove(buf, ctypes.addressof(self.adapters[0]), ctypes.sizeof(windows.IP_ADAPTER_ADDRESSES))
        return windows.ERROR_SUCCESS


def test_windows_adapters_filtered_by_iftype() -> None:
    fake = FakeAdapters()
    pref, tentative = windows.IP_DAD_STATE_PREFERRED, 1
    fake.add(3, "Ethernet", "Intel(R) Ethernet", 6, True, b"\x02\0\0\0\0\x03",
             [("192.0.2.10", 24, pref), ("2001:db8::10", 64, tentative), ("2001:db8::11", 64, pref)],
             ["192.0.2.1", "fe80::1"], metric=25)  # fmt: skip
    fake.add(5, "Wi-Fi", "Wireless", 71, False, b"\x02\0\0\0\0\x05", [("198.51.100.5", 24, pref)], ["198.51.100.1"])
    fake.add(7, "IVPN", "Wintun Userspace Tunnel", 53, True, b"", [("192.0.2.66", 32, pref)], ["192.0.2.65"], metric=5)
    fake.add(8, "OpenVPN TAP", "TAP-Windows Adapter V9", 6, True, b"\x02\0\0\0\0\x08", [("203.0.113.8", 24, pref)],
             ["203.0.113.1"], metric=1)  # fmt: skip
    fake.add(1, "Loopback Pseudo-Interface 1", "Software Loopback", 24, True, b"", [("127.0.0.1", 8, pref)], [])
    env = netenv.Netenv(windows.WindowsSource(fake.call))
    snap = env.snapshot()
    assert fake.calls == 2  # the documented grow-and-retry on ERROR_BUFFER_OVERFLOW
    kinds = {i.name: (i.kind, i.is_physical, i.up) for i in snap.all_interfaces}
    assert kinds == {
        "Loopback Pseudo-Interface 1": ("loopback", False, True),
        "Ethernet": ("physical", True, True),
        "Wi-Fi": ("wifi", True, False),
        "IVPN": ("tunnel", False, True),
        "OpenVPN TAP": ("tunnel", False, True),
    }
    assert uplink_view(snap, 4) == ("Ethernet", "192.0.2.1", FROM_DEFAULT)  # not the lower-metric VPNs
    assert uplink_view(snap, 6) == ("Ethernet", "fe80::1", FROM_DEFAULT)
    eth = snap.by_name["Ethernet"]
    assert (eth.ipv4, eth.ipv6, eth.mac) == ("192.0.2.10", "2001:db8::11", "02:00:00:00:00:03")


def test_windows_source_errors_are_clear() -> None:
    with pytest.raises(OSError, match="error 87"):
        windows.get_adapters(lambda *a: 87)
    assert windows.get_adapters(lambda *a: windows.ERROR_NO_DATA) == []


def test_library_imports_without_the_actor_runtime() -> None:
    import subprocess

    code = "import sys, actors.netenv; assert 'zmq' not in sys.modules and 'runtime.actor' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
