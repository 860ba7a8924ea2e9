"""Bypass routes' plan and the pre-connect hooks, with plain objects (no routes are touched here)."""

from __future__ import annotations

import pytest

from core.config import BYPASS_HOSTS, OPTIONS, ConfigError
from core.ivpn.bypass import PreConnectCancelled, PreConnectHooks, Refused, plan_bypass
from kernel.routing import HostRoute
from messages import GatewayRecord, InterfaceRecord, NetenvChanged

ETH0 = InterfaceRecord(name="eth0", index=2, addresses=["192.0.2.10/26", "2001:db8:10::10/64"],
                       ipv4="192.0.2.10", ipv6="2001:db8:10::10")  # fmt: skip
GW4 = GatewayRecord(gateway="192.0.2.1", interface="eth0", family=4)
GW6 = GatewayRecord(gateway="2001:db8:10::1", interface="eth0", family=6)


def netenv(*gateways: GatewayRecord, interfaces: tuple[InterfaceRecord, ...] = (ETH0,)) -> NetenvChanged:
    return NetenvChanged(seq=1, ts=0.0, interfaces=list(interfaces), gateways=list(gateways),
                         uplink_ipv4="eth0", uplink_ipv6="eth0")  # fmt: skip


def test_hosts_go_via_the_physical_gateway_of_their_family() -> None:
    plan = plan_bypass(["203.0.113.81/32", "2001:db8:30::/64"], netenv(GW4, GW6))
    assert plan == [
        HostRoute(4, "203.0.113.81/32", "192.0.2.1", "eth0"),
        HostRoute(6, "2001:db8:30::/64", "2001:db8:10::1", "eth0"),
    ]
    assert plan_bypass([], None) == []


def test_more_than_one_default_gateway_is_refused_with_a_clear_reason() -> None:
    eth1 = InterfaceRecord(name="eth1", index=5, addresses=["192.0.2.130/26"], ipv4="192.0.2.130")
    two = netenv(GW4, GatewayRecord(gateway="192.0.2.129", interface="eth1", family=4), interfaces=(ETH0, eth1))
    refused = plan_bypass(["203.0.113.81/32"], two)
    assert isinstance(refused, Refused)
    assert refused.reason == (
        "IPv4 has 2 default gateways (192.0.2.1 on eth0, 192.0.2.129 on eth1): bypassHosts needs one"
    )
    assert isinstance(plan_bypass(["203.0.113.81/32"], None), Refused)
    assert "no physical IPv6 gateway" in plan_bypass(["2001:db8:30::80/128"], netenv(GW4)).reason  # type: ignore[union-attr]


def test_pre_connect_hooks_run_in_order_and_the_first_cancel_stops_the_rest() -> None:
    ran: list[str] = []
    hooks = PreConnectHooks()
    hooks.register("a", lambda: ran.append("a"))

    def refuse() -> None:
        ran.append("b")
        raise PreConnectCancelled("no way")

    hooks.register("b", refuse)
    hooks.register("c", lambda: ran.append("c"))
    assert hooks.run() == "b: no way" and ran == ["a", "b"]
    with pytest.raises(ValueError, match="registered already"):
        hooks.register("a", lambda: None)


def test_the_bypass_hosts_option_takes_addresses_and_cidrs_and_refuses_the_rest() -> None:
    option = OPTIONS[BYPASS_HOSTS]
    assert option.level == "expert"
    assert option.check(BYPASS_HOSTS, ["203.0.113.81", "2001:db8:30::/64", "203.0.113.81"]) == [
        "203.0.113.81/32", "2001:db8:30::/64"]  # fmt: skip
    for bad in (["example.com"], ["127.0.0.1"], ["0.0.0.0/0"], "203.0.113.81"):
        with pytest.raises(ConfigError, match="splittun/bypassHosts"):
            option.check(BYPASS_HOSTS, bad)
