"""The resolver's query path with fakes (actors/resolver/engine.py): the app's path from its conntrack mark,
upstream bindings, names before the answer, cache, truncation, malformed queries."""

from __future__ import annotations

from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rrset

from actors.resolver.engine import Pending, Query, ResolverEngine, Settings, formerr
from core.dns.names import NameTable
from core.proxy.decider import Binding
from kernel.conntrack import CtEntry
from messages import DnsQuery, GatewayRecord, InterfaceRecord, Mark, NetenvChanged, PolicySnapshot
from messages.flows import FiveTuple, IpProtocol
from messages.marks import nameserver_mark

UDP, TCP = IpProtocol.UDP, IpProtocol.TCP
CLIENT = ("192.0.2.66", 40000)
LOCAL = ("127.0.0.17", 53)
ASKED = "192.0.2.65"
NETENV = NetenvChanged(
    seq=1,
    ts=0.0,
    interfaces=[InterfaceRecord(name="eth0", index=2, addresses=["192.0.2.10/26"], ipv4="192.0.2.10")],
    gateways=[GatewayRecord(gateway="192.0.2.1", interface="eth0", family=4)],
    uplink_ipv4="eth0",
)
POLICY = PolicySnapshot(version=1, ts=0.0, enabled=True, split_dns=["192.0.2.1"], vpn_domains=["corp.example"])


class World:
    """The engine with a fake conntrack entry per client and fake upstream servers."""

    def __init__(self, mark: int = nameserver_mark()) -> None:
        self.mark = mark
        self.asked: list[tuple[str, Binding]] = []
        self.events: list[DnsQuery] = []
        self.names = NameTable(None, slots=64)
        self.answers: dict[str, str] = {ASKED: "203.0.113.81", "192.0.2.1": "203.0.113.80"}
        self.truncated = False
        self.engine = ResolverEngine(origin=self.origin, upstream=self.upstream, names=self.names,
                                     publish=self.events.append)  # fmt: skip
        self.engine.settings = Settings.of(POLICY, NETENV)

    def origin(self, seen: FiveTuple) -> CtEntry | None:
        assert (seen.src, seen.dst) == (LOCAL, CLIENT)  # the reply tuple: the resolver → the app
        return CtEntry(FiveTuple(seen.protocol, *CLIENT, ASKED, 53), self.mark, 1)

    def upstream(self, query: dns.message.Message, server: str, binding: Binding, timeout: float) -> Any:
        self.asked.append((server, binding))
        # the app's answer must not exist yet when the upstream is asked: names are learned from its answer
        response = dns.message.make_response(query)
        name = query.question[0].name
        response.answer.append(dns.rrset.from_text(name, 60, "IN", "CNAME", "edge.cdn.example."))
        response.answer.append(dns.rrset.from_text("edge.cdn.example.", 60, "IN", "A", self.answers[server]))
        return response, "tcp" if self.truncated else "udp"

    def ask(self, name: str = "geo.example.", protocol: int = UDP, **kw: Any) -> dns.message.Message:
        wire = self.engine.answer(Query(dns.message.make_query(name, "A", **kw).to_wire(), protocol, CLIENT, LOCAL))
        assert wire is not None
        return dns.message.from_wire(wire)


def addresses(answer: dns.message.Message) -> list[str]:
    return [rd.address for rrset in answer.answer if rrset.rdtype == 1 for rd in rrset]


def test_a_vpn_apps_query_asks_the_server_it_asked_with_the_accept_final_mark() -> None:
    w = World()
    assert addresses(w.ask()) == ["203.0.113.81"]
    assert w.asked == [(ASKED, Binding(mark=int(Mark.ACCEPT_FINAL)))]
    [event] = w.events
    assert (event.path, event.upstream, event.flow, event.answers) == (
        "vpn",
        ASKED,
        "udp 192.0.2.66:40000 192.0.2.65:53",
        2,
    )


def test_a_split_apps_query_asks_the_split_server_out_of_the_split_interface() -> None:
    w = World(nameserver_mark(True))
    assert addresses(w.ask()) == ["203.0.113.80"]
    assert w.asked == [("192.0.2.1", Binding(interface="eth0", source_ip="192.0.2.10", mark=int(Mark.SPLIT_EGRESS)))]
    assert w.events[0].interface == "eth0" and w.engine.counters["split"] == 1


def test_a_vpn_domain_resolves_through_the_vpn_even_for_a_split_app() -> None:
    w = World(nameserver_mark(True))
    w.ask("wiki.corp.example.")
    assert w.asked[0][0] == ASKED and w.events[0].path == "vpn"


def test_the_names_of_the_whole_chain_are_learned_before_the_answer_and_cached_answers_skip_the_upstream() -> None:
    w = World()
    w.ask("www.shop.example.")
    assert w.names.lookup("203.0.113.81") == "www.shop.example edge.cdn.example"
    again = w.ask("www.shop.example.")
    assert addresses(again) == ["203.0.113.81"] and len(w.asked) == 1
    assert w.events[-1].cached and w.engine.counters["cache_hits"] == 1


def test_the_do_bit_and_edns_reach_the_upstream() -> None:
    seen: list[dns.message.Message] = []
    w = World()
    upstream = w.upstream
    w.engine.upstream = lambda q, s, b, t: (seen.append(q), upstream(q, s, b, t))[1]
    w.ask(use_edns=0, want_dnssec=True, payload=1232)
    assert seen[0].edns == 0 and seen[0].ednsflags & dns.flags.DO and seen[0].payload == 1232


def test_an_answer_too_big_for_the_apps_udp_goes_out_truncated_and_whole_over_tcp() -> None:
    w = World()
    w.answers[ASKED] = "203.0.113.81"
    big = dns.message.make_response(dns.message.make_query("big.example.", "A"))
    big.answer.append(dns.rrset.from_text_list("big.example.", 60, "IN", "A", [f"198.51.100.{i}" for i in range(60)]))
    w.engine.upstream = lambda q, s, b, t: (dns.message.from_wire(big.to_wire()), "tcp")
    udp = w.ask("big.example.")
    assert udp.flags & dns.flags.TC and not udp.answer
    assert len(addresses(w.ask("big.example.", protocol=TCP))) == 60
    assert w.engine.counters["truncated_retries"] == 1 and w.engine.counters["truncated_answers"] == 1


def test_no_upstream_answering_gives_servfail_and_the_resolver_keeps_serving() -> None:
    w = World()

    def down(*_args: Any) -> Any:
        raise OSError(113, "No route to host")

    w.engine.upstream = down
    assert w.ask().rcode() == dns.rcode.SERVFAIL
    assert w.engine.counters["servfail"] == 1 and w.events[-1].rcode.startswith("SERVFAIL")


def test_a_query_splittun_did_not_reroute_is_refused() -> None:
    w = World(mark=0)
    assert w.ask().rcode() == dns.rcode.REFUSED and not w.asked


def test_malformed_queries_get_formerr_or_are_dropped() -> None:
    w = World()
    assert w.engine.prepare(Query(b"\x12\x34\x01\x00" + b"\xff" * 20, UDP, CLIENT, LOCAL)) == formerr(
        b"\x12\x34\x01\x00" + b"\xff" * 20
    )
    assert formerr(b"\x12\x34\x01\x00" + bytes(8))[:4] == b"\x12\x34\x80\x01"  # type: ignore[index]
    assert w.engine.prepare(Query(b"\x01", UDP, CLIENT, LOCAL)) is None
    assert w.engine.counters["malformed"] == 2
    assert isinstance(w.engine.prepare(Query(dns.message.make_query("x.", "A").to_wire(), UDP, CLIENT, LOCAL)), Pending)


def test_learned_servers_of_the_split_interface_are_used_unless_split_dns_is_configured() -> None:
    learned = {"eth0": (("192.0.2.53",), "systemd-resolved")}
    settings = Settings.of(PolicySnapshot(version=1, ts=0.0), NETENV, learned)
    assert settings.split_servers() == (("192.0.2.53",), "netenv: systemd-resolved (eth0)")
    assert Settings.of(POLICY, NETENV, learned).split_servers() == (("192.0.2.1",), "splittun/splitDNS")
    assert Settings.of(PolicySnapshot(version=1, ts=0.0), NETENV).split_servers() == ((), "none")
    w = World(nameserver_mark(True))
    w.engine.settings = settings
    w.answers["192.0.2.53"] = "203.0.113.80"
    w.ask()
    assert w.asked[0][0] == "192.0.2.53"


def test_ivpns_custom_dns_is_the_upstream_of_vpn_apps_while_connected_and_never_of_split_ones() -> None:
    from core.ivpn.status import delegated_dns
    from messages import IvpnStatus
    from messages.events import IvpnDns

    ivpn = IvpnStatus(ts=0.0, daemon=True, state="CONNECTED", connected=True,
                      dns=[IvpnDns(address="198.51.100.53", encryption="dot")])  # fmt: skip
    w = World()
    w.answers["tls://198.51.100.53"] = "203.0.113.82"
    w.engine.settings = Settings.of(POLICY, NETENV, vpn_servers=delegated_dns(ivpn))
    assert addresses(w.ask()) == ["203.0.113.82"]
    assert w.asked == [("tls://198.51.100.53", Binding(mark=int(Mark.ACCEPT_FINAL)))]  # encrypted, through the VPN
    split = World(nameserver_mark(True))
    split.engine.settings = Settings.of(POLICY, NETENV, vpn_servers=delegated_dns(ivpn))
    split.ask()
    assert [server for server, _ in split.asked] == ["192.0.2.1"]  # a split app's DNS never goes to IVPN's


def test_delegation_follows_ivpns_state_and_never_downgrades_encryption() -> None:
    from dataclasses import replace

    from core.ivpn.status import delegated_dns
    from messages import IvpnStatus
    from messages.events import IvpnDns

    dns = [IvpnDns(address="198.51.100.53"), IvpnDns(address="2001:db8::53", encryption="dot"),
           IvpnDns(address="198.51.100.54", encryption="doh", template="https://dns.example/dns-query"),
           IvpnDns(address="not-an-ip")]  # fmt: skip
    up = IvpnStatus(ts=0.0, daemon=True, state="CONNECTED", connected=True, dns=dns)
    assert delegated_dns(up) == ("198.51.100.53", "tls://2001:db8::53")  # DoH left out, not made plain
    assert delegated_dns(replace(up, state="DISCONNECTED", connected=False)) == ()
    assert delegated_dns(replace(up, dns=[])) == ()  # IVPN's default DNS: nothing to delegate
    assert delegated_dns(None) == ()
