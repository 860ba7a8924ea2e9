"""The lab's shape as data (splittun/lab/plan.py): checked without root, like the interceptor's rule set."""

from __future__ import annotations

import pytest

from splittun.lab import plan
from splittun.lab import topology as T


def test_the_laptop_does_not_forward_and_the_routers_do_with_strict_reverse_path_checks() -> None:
    host, isp = plan.sysctls("host"), plan.sysctls("isp")
    assert host["net.ipv4.ip_forward"] == 0 and host["net.ipv4.conf.all.rp_filter"] == T.HOST_RP_FILTER
    assert plan.sysctls("host", host_rp_filter=1)["net.ipv4.conf.default.rp_filter"] == 1
    assert isp["net.ipv4.ip_forward"] == 1 and isp["net.ipv6.conf.all.forwarding"] == 1
    assert isp["net.ipv4.conf.all.rp_filter"] == 1
    for role in T.ROLES:  # no proxy ARP/NDP anywhere: on-link guesses get no answer
        settings = plan.sysctls(role)
        assert settings["net.ipv4.conf.all.proxy_arp"] == settings["net.ipv6.conf.all.proxy_ndp"] == 0


def test_veths_go_straight_between_lab_namespaces_with_fixed_indexes() -> None:
    assert len(plan.veths()) == 3 and len(plan.veths(second_uplink=True)) == 4
    argv = plan.veths()[0].argv("ns-host", "ns-isp")
    assert argv[:5] == ["ip", "-n", "ns-host", "link", "add"] and argv[-2:] == ["netns", "ns-isp"]
    assert str(T.IFINDEX["host:eth0"]) in argv and str(T.IFINDEX["isp:lan0"]) in argv
    assert plan.veth_interfaces()["isp"] == {T.ISP_LAN_IF, T.ISP_VPNSRV_IF, T.ISP_INET_IF}
    assert T.HOST2_IF in plan.veth_interfaces(second_uplink=True)["host"]


def test_every_role_gets_its_addresses_and_the_second_uplink_only_when_asked() -> None:
    lines = {b.role: " ".join(b.lines) for b in plan.addresses() if not b.family}
    assert f"{T.HOST_V4}/{T.HOST_PLEN_V4}" in lines["host"] and f"tuntap add dev {T.TUN_HOST_IF}" in lines["host"]
    assert all(addr in lines["inet"] for addr in (*T.SERVER_V4, *T.SERVER_V6))
    assert T.HOST2_IF not in str(plan.addresses())
    assert T.HOST2_IF in str(plan.addresses(second_uplink=True))
    routes = [b for b in plan.addresses() if b.family]
    assert {(b.role, b.family) for b in routes} == {("vpnsrv", "-4"), ("vpnsrv", "-6"), ("inet", "-4"), ("inet", "-6")}


def test_the_replaced_style_sends_everything_into_the_tunnel_but_the_transport() -> None:
    style = plan.style("replaced")
    v4 = next(b for b in style.batches if b.family == "-4").lines
    assert v4 == [
        f"route add {T.VPNSRV_V4}/32 via {T.ISP_LAN_V4} dev {T.HOST_IF}",
        f"route add default dev {T.TUN_HOST_IF}",
    ]
    assert style.nft == "" and style.src_valid_mark == 0
    assert "fib saddr type != local drop" in plan.style("replaced", antispoof=True).nft


def test_the_wgquick_style_adds_the_physical_default_last_so_a_switch_leaks_nothing() -> None:
    style = plan.style("wgquick", second_uplink=True)
    for batch in style.batches[:2]:
        assert batch.lines[-1].startswith("route add default via") and T.HOST_IF in batch.lines[-1]
        assert any(f"not fwmark {T.WG_FWMARK}" in line for line in batch.lines[:-1])
    assert any(T.HOST2_IF in line and f"metric {T.SECOND_UPLINK_METRIC}" in b.lines[0] for b in style.batches
               for line in b.lines)  # fmt: skip
    assert style.src_valid_mark == 1 and "ct mark set mark" in style.nft and "preraw iifname" not in style.nft
    removals = plan.style_removals()
    assert removals[0] == ["-4", "route", "del", "default", "dev", T.HOST_IF]  # uplink defaults go first
    with pytest.raises(ValueError, match="style must be one of"):
        plan.style("openvpn")


def test_the_forced_isp_path_is_a_marked_rule_to_its_own_table() -> None:
    batches = plan.isp_path()
    assert [b.family for b in batches] == ["-4", "-6"]
    assert f"pref {T.ISP_PATH_RULE_PREF}" in batches[0].lines[1] and f"table {T.ISP_PATH_TABLE}" in batches[0].lines[0]
    assert f"{T.ISP_PATH_MARK:#x}" in plan.ISP_PATH_NFT
