"""Where a DNS query goes (core/dns/route.py): the asking app's path from its mark, split servers, vpnDomains."""

from __future__ import annotations

from core.dns.route import SPLIT, VPN, DnsRoute, NoRoute, Server, family, in_domains, route
from messages.marks import nameserver_mark, split_mark

VPN_APP = nameserver_mark()
SPLIT_APP = nameserver_mark(True)
ASKED = "192.0.2.65"  # the VPN's DNS server, tunnel-internal, as resolv.conf names it


def test_a_vpn_apps_query_goes_to_the_server_it_asked_through_the_vpn() -> None:
    assert route("geo.example", VPN_APP, ASKED, split_servers=["192.0.2.1"]) == DnsRoute(
        VPN, (ASKED,), reason="the app stays in the VPN"
    )


def test_the_vpns_own_servers_win_over_the_asked_one_on_the_vpn_path() -> None:
    found = route("geo.example", VPN_APP, ASKED, vpn_servers=["10.0.0.1"])
    assert isinstance(found, DnsRoute) and found.servers == ("10.0.0.1",)


def test_a_split_apps_query_goes_to_the_split_servers_with_its_rules_interface() -> None:
    found = route("geo.example", nameserver_mark(True, 5), ASKED, split_servers=["192.0.2.1", "2001:db8:10::1"])
    assert found == DnsRoute(SPLIT, ("192.0.2.1", "2001:db8:10::1"), 5,
                             "the app is split: the split interface's DNS servers")  # fmt: skip


def test_split_servers_of_a_family_without_egress_are_skipped() -> None:
    found = route("geo.example", SPLIT_APP, ASKED, split_servers=["192.0.2.1", "2001:db8:10::1"], split_families=[6])
    assert isinstance(found, DnsRoute) and found.servers == ("2001:db8:10::1",)


def test_a_split_app_without_known_split_servers_asks_its_own_server_out_of_the_split_interface() -> None:
    found = route("geo.example", SPLIT_APP, "203.0.113.53")
    assert isinstance(found, DnsRoute) and (found.path, found.servers) == (SPLIT, ("203.0.113.53",))


def test_a_split_app_with_no_reachable_server_gets_no_route_never_the_vpn() -> None:
    assert isinstance(route("geo.example", SPLIT_APP, "2001:db8::53", split_families=[4]), NoRoute)
    assert isinstance(route("geo.example", SPLIT_APP, "127.0.0.53"), NoRoute)


def test_vpn_domains_resolve_through_the_vpn_even_for_a_split_app() -> None:
    found = route("Wiki.Corp.Example.", SPLIT_APP, ASKED, split_servers=["192.0.2.1"], vpn_domains=[".corp.example"])
    assert found == DnsRoute(VPN, (ASKED,), reason="vpnDomains: .corp.example")
    assert in_domains("corp.example", ["corp.example"]) and not in_domains("notcorp.example", ["corp.example"])


def test_queries_splittun_did_not_reroute_get_no_route() -> None:
    assert isinstance(route("geo.example", 0, ASKED), NoRoute)
    assert isinstance(route("geo.example", split_mark(), ASKED), NoRoute)
    assert isinstance(route("geo.example", VPN_APP, ""), NoRoute)


def test_routes_with_other_servers_or_paths_have_other_cache_keys() -> None:
    a = route("x", VPN_APP, ASKED)
    b = route("x", VPN_APP, "203.0.113.53")
    c = route("x", SPLIT_APP, ASKED, split_servers=[ASKED])
    assert isinstance(a, DnsRoute) and isinstance(b, DnsRoute) and isinstance(c, DnsRoute)
    assert len({a.key, b.key, c.key}) == 3


def test_tls_servers_parse_and_keep_their_family() -> None:
    assert Server.parse("tls://2001:db8::53#dns.example") == Server("2001:db8::53", True, "dns.example")
    assert str(Server.parse("TLS://192.0.2.1")) == "tls://192.0.2.1" and str(Server.parse("192.0.2.1")) == "192.0.2.1"
    assert family("tls://2001:db8::53#dns.example") == 6 and family("tls://192.0.2.1") == 4
    found = route("x", SPLIT_APP, ASKED, split_servers=["tls://2001:db8::53"], split_families=[4])
    assert isinstance(found, DnsRoute) and found.servers == (ASKED,)  # no IPv6 egress: the asked one instead
