"""The divert backend's redirect logic, driven with packets eBPFDivert captured in a lab namespace (bytes
recorded by tests/fixtures/divert/probe.py: the app 192.0.2.1 / 2001:db8::1 talking to 192.0.2.2 / 2001:db8::2,
the probe's proxy on port 7190) and a fake diverter: what the app and the proxy would see after each rewrite."""

from __future__ import annotations

from typing import Any

import pydivert
import pytest

from actors.interceptor.divert import UDP_IDLE, DivertPath, Redirector, Step
from core.redirect import RedirectTable
from messages.flows import IpProtocol
from messages.marks import Mark, split_mark
from messages.verdict import KextVerdict, kext_verdict

PROXY4, PROXY6 = ("127.0.0.17", 7190), ("::1", 7190)

# outbound on the physical interface (ifindex 2), as captured
TCP4_SYN = (
    "4500003c0dd740004006a8e1c0000201c0000202e6d61f9024ca492f00000000a002faf084320000020405b40402080abb9af35f"
    "000000000103030a"
)
# the proxy's SYN-ACK to the app over loopback (127.0.0.17:7190 → 192.0.2.1:59094)
TCP4_PROXY_SYNACK = (
    "4500003c000040004006f9a97f000011c00002011c16e6d6fab9b0d924ca4930a012ffcb414100000204ffd70402080aa89923c1"
    "bb9af35f0103030a"
)
TCP6_SYN = (
    "6003afe80028064020010db800000000000000000000000120010db8000000000000000000000002bd081f90d7c382a600000000"
    "a002fd205ba30000020405a00402080a0f02c48e000000000103030a"
)
TCP6_PROXY_SYNACK = (
    "6008247c002806400000000000000000000000000000000120010db80000000000000000000000011c16bd0873d4638cd7c382a7"
    "a012ffb82de900000204ffc40402080a1f9624de0f02c48e0103030a"
)
UDP4 = "4500001edd9440004011d936c0000201c0000202dd901f75000a841f6869"  # 192.0.2.1:56720 → 192.0.2.2:8053 "hi"
UDP4_REPLY = (  # from the probe's proxy (bound to the wildcard) back to the app
    "4500003ddfbe40004011d6eec0000201c00002011c16dd900029843d70726f7879207361772028273139322e302e322e31272c20"
    "353637323029206869"
)


def packet(hexbytes: str, *, loopback: bool = False, interface: int = 2) -> pydivert.Packet:
    return pydivert.Packet(bytes.fromhex(hexbytes), interface=(interface, 0), loopback=loopback)


def proxy_reply(hexbytes: str, src: str | None = None) -> pydivert.Packet:
    pkt = packet(hexbytes, loopback=True, interface=1)
    if src is not None:
        pkt.src_addr = src
    return pkt


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def table() -> RedirectTable:
    return RedirectTable(None, slots=256)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def redirector(table: RedirectTable, clock: Clock) -> Redirector:
    return Redirector(table, proxy4=PROXY4, proxy6=PROXY6, clock=clock)  # the table's expiry: wall clock


def addresses(pkt: pydivert.Packet) -> tuple[str, int, str, int]:
    return pkt.src_addr, pkt.src_port, pkt.dst_addr, pkt.dst_port


def sent_valid(pkt: pydivert.Packet) -> bool:
    """What pydivert does on send: checksums recomputed, and they hold."""
    pkt.recalculate_checksums()
    return bool(pkt.is_checksum_valid)


# --- TCP -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("syn", "synack", "app", "peer", "proxy"),
    [
        (TCP4_SYN, TCP4_PROXY_SYNACK, ("192.0.2.1", 59094), ("192.0.2.2", 8080), PROXY4),
        (TCP6_SYN, TCP6_PROXY_SYNACK, ("2001:db8::1", 48392), ("2001:db8::2", 8080), PROXY6),
    ],
    ids=["ipv4", "ipv6"],
)
def test_a_split_tcp_connection_goes_to_the_proxy_and_its_replies_come_from_the_peer(
    redirector: Redirector, table: RedirectTable, clock: Clock, syn: str, synack: str, app: Any, peer: Any, proxy: Any
) -> None:
    first = packet(syn)
    assert redirector.outbound(first) == Step.DECIDE
    assert redirector.decided(first, split_mark(3)) == Step.SEND
    # the app's SYN now goes to the proxy, from the app's own address and port, on loopback
    assert addresses(first) == (*app, *proxy)
    assert first.interface == (1, 0) and first.is_loopback and sent_valid(first)
    # the proxy finds where it was going, and the interface the rule chose
    found = table.lookup(IpProtocol.TCP, app[0], app[1])
    assert found is not None and found.flow.dst == peer and found.mark == split_mark(3)
    # the proxy's answer reaches the app from the peer it called
    reply = proxy_reply(synack)
    assert redirector.outbound(reply) == Step.SEND
    assert addresses(reply) == (*peer, *app)
    assert reply.is_loopback and sent_valid(reply)
    # a retransmitted SYN is not a new connection; later packets are rewritten without asking the engine
    assert redirector.outbound(packet(syn)) == Step.DECIDE  # answered: a SYN now is a new connection
    assert table.lookup(IpProtocol.TCP, app[0], app[1]) is None


def test_an_unanswered_syn_retransmission_keeps_its_redirect(redirector: Redirector) -> None:
    first = packet(TCP4_SYN)
    redirector.outbound(first)
    redirector.decided(first, split_mark())
    again = packet(TCP4_SYN)
    assert redirector.outbound(again) == Step.SEND
    assert addresses(again) == ("192.0.2.1", 59094, *PROXY4)


def test_a_connection_kept_in_the_vpn_passes_unchanged_and_is_decided_once(redirector: Redirector) -> None:
    first = packet(TCP4_SYN)
    assert redirector.outbound(first) == Step.DECIDE
    assert redirector.decided(first, int(Mark.ACCEPT_ALWAYS)) == Step.SEND
    assert bytes(first.raw) == bytes.fromhex(TCP4_SYN) and first.interface == (2, 0)
    data = packet(TCP4_SYN)
    data.tcp.syn, data.tcp.ack = False, True
    assert redirector.outbound(data) == Step.SEND
    assert addresses(data) == ("192.0.2.1", 59094, "192.0.2.2", 8080)


def test_block_always_drops_every_packet_and_a_one_packet_verdict_is_not_remembered(redirector: Redirector) -> None:
    first = packet(TCP4_SYN)
    assert redirector.decided(first, int(Mark.DROP_ALWAYS)) == Step.DROP
    assert redirector.outbound(packet(UDP4)) == Step.DECIDE
    assert redirector.outbound(packet(TCP4_SYN)) == Step.DECIDE  # a SYN on a dropped tuple: decided again
    assert redirector.decided(packet(UDP4), int(Mark.ACCEPT)) == Step.SEND  # this packet only
    assert redirector.outbound(packet(UDP4)) == Step.DECIDE


def test_fin_ends_a_split_flow_after_a_linger(redirector: Redirector, table: RedirectTable, clock: Clock) -> None:
    first = packet(TCP4_SYN)
    redirector.decided(first, split_mark())
    fin = packet(TCP4_SYN)
    fin.tcp.syn, fin.tcp.fin, fin.tcp.ack = False, True, True
    assert redirector.outbound(fin) == Step.SEND
    clock.t += 11
    assert redirector.outbound(packet(TCP4_SYN)) == Step.DECIDE
    assert table.lookup(IpProtocol.TCP, "192.0.2.1", 59094) is None


# --- UDP -------------------------------------------------------------------------------------------------


def test_one_udp_socket_two_peers_get_two_seen_ports_and_answers_from_each_peer(
    redirector: Redirector, table: RedirectTable
) -> None:
    to_p, to_q = packet(UDP4), packet(UDP4)
    to_q.dst_addr = "192.0.2.3"
    for pkt in (to_p, to_q):
        assert redirector.outbound(pkt) == Step.DECIDE
        assert redirector.decided(pkt, split_mark()) == Step.SEND
    assert addresses(to_p) == ("192.0.2.1", 56720, *PROXY4)
    alias = to_q.src_port
    assert alias != 56720 and addresses(to_q) == ("192.0.2.1", alias, *PROXY4) and sent_valid(to_q)
    p, q = table.lookup(IpProtocol.UDP, "192.0.2.1", 56720), table.lookup(IpProtocol.UDP, "192.0.2.1", alias)
    assert p is not None and q is not None
    assert (p.flow.src_port, p.flow.dst_ip, q.flow.src_port, q.flow.dst_ip) == (56720, "192.0.2.2", 56720, "192.0.2.3")
    # the proxy answers each seen address; the app gets each answer on its own port, from the right peer
    from_p = proxy_reply(UDP4_REPLY, src="127.0.0.17")
    from_q = proxy_reply(UDP4_REPLY, src="127.0.0.17")
    from_q.dst_port = alias
    assert redirector.outbound(from_p) == redirector.outbound(from_q) == Step.SEND
    assert addresses(from_p) == ("192.0.2.2", 8053, "192.0.2.1", 56720)
    assert addresses(from_q) == ("192.0.2.3", 8053, "192.0.2.1", 56720) and sent_valid(from_q)


def test_an_idle_udp_flow_is_forgotten_and_decided_again(
    redirector: Redirector, table: RedirectTable, clock: Clock
) -> None:
    redirector.decided(packet(UDP4), split_mark())
    assert redirector.outbound(packet(UDP4)) == Step.SEND
    clock.t += UDP_IDLE + 1
    assert redirector.outbound(packet(UDP4)) == Step.DECIDE
    assert table.lookup(IpProtocol.UDP, "192.0.2.1", 56720) is None


def test_the_flow_table_is_bounded(table: RedirectTable, clock: Clock) -> None:
    small = Redirector(table, proxy4=PROXY4, max_flows=2, clock=clock)
    pkts = [packet(UDP4) for _ in range(3)]
    for i, pkt in enumerate(pkts):
        pkt.dst_addr = f"192.0.2.{10 + i}"
        small.decided(pkt, int(Mark.ACCEPT_ALWAYS))
    assert len(small.flows) == 2 and small.counters["evicted"] == 1


def test_forget_makes_the_next_datagram_a_new_decision(redirector: Redirector) -> None:
    pkt = packet(UDP4)
    redirector.decided(pkt, int(Mark.ACCEPT_ALWAYS))
    key = next(iter(redirector.flows))
    assert redirector.forget(key) and not redirector.forget(key)
    assert redirector.outbound(packet(UDP4)) == Step.DECIDE


def test_loopback_traffic_of_others_is_left_alone(redirector: Redirector) -> None:
    local = proxy_reply(UDP4_REPLY, src="127.0.0.1")  # from 127.0.0.1:7190: not the proxy's address
    assert redirector.outbound(local) == Step.SEND and local.src_addr == "127.0.0.1"
    stray = proxy_reply(UDP4_REPLY, src="127.0.0.17")  # the proxy, to a flow nobody redirected
    assert redirector.outbound(stray) == Step.SEND and stray.src_addr == "127.0.0.17"
    assert redirector.counters["unknown_reverse"] == 1


# --- the driver verdict and the packet source ------------------------------------------------------------


def test_marks_become_the_windows_drivers_verdicts() -> None:
    assert kext_verdict(split_mark(5)) == KextVerdict.SPLIT_TUN == 11
    assert kext_verdict(int(Mark.ACCEPT_ALWAYS)) == KextVerdict.PERMANENT_ACCEPT
    assert kext_verdict(int(Mark.BLOCK)) == KextVerdict.BLOCK and not KextVerdict.BLOCK.permanent
    assert kext_verdict(int(Mark.DROP_ALWAYS)) == KextVerdict.PERMANENT_DROP
    assert kext_verdict(0) == KextVerdict.UNDECIDED
    assert kext_verdict(4242) == KextVerdict.FAILED


class FakeDiverter:
    def __init__(self, packets: list[pydivert.Packet]) -> None:
        self.waiting = packets
        self.sent: list[pydivert.Packet] = []

    def fileno(self) -> int:
        return 99

    def ready(self) -> list[pydivert.Packet]:
        out, self.waiting = self.waiting, []
        return out

    def send(self, pkt: pydivert.Packet) -> None:
        self.sent.append(pkt)

    def close(self) -> None:
        pass


def test_the_divert_path_hands_first_packets_to_the_engine_and_acts_on_its_mark(
    table: RedirectTable, redirector: Redirector
) -> None:
    dns_answer = packet(UDP4_REPLY)
    dns_answer.direction = pydivert.Direction.INBOUND
    fake = FakeDiverter([packet(TCP4_SYN), dns_answer])
    path = DivertPath(table, open_diverter=lambda _filter: fake, redirector=redirector)
    seen: list[tuple[bool, Any]] = []
    fds: list[int] = []
    path.open({}, lambda inbound, pkt: seen.append((inbound, pkt)), lambda fd, _cb: fds.append(fd))
    path.drain()
    assert fds == [99] and [inbound for inbound, _ in seen] == [False, True]
    first, answer = seen[0][1], seen[1][1]
    assert first.get_mark() == 0 and first.get_payload() == bytes.fromhex(TCP4_SYN)
    first.set_mark(split_mark())
    first.accept()
    answer.accept()
    assert [addresses(p) for p in fake.sent] == [("192.0.2.1", 59094, *PROXY4), addresses(dns_answer)]
    fake.waiting = [proxy_reply(TCP4_PROXY_SYNACK)]
    path.drain()  # the proxy's answer never reaches the engine
    assert len(seen) == 2 and addresses(fake.sent[-1]) == ("192.0.2.2", 8080, "192.0.2.1", 59094)


def test_a_proxy_upstream_announced_in_the_table_passes_untouched_and_never_reaches_the_engine(
    redirector: Redirector, table: RedirectTable
) -> None:
    from core.proxy.origdst import RedirectResolver

    upstream = packet(TCP4_SYN)  # as if the proxy's upstream socket, bound to 192.0.2.1:59094, sent it
    RedirectResolver(table, IpProtocol.TCP).announce(("192.0.2.1", 59094), ("192.0.2.99", 8080))
    assert redirector.outbound(upstream) == Step.DECIDE  # announced for another remote: not this flow
    RedirectResolver(table, IpProtocol.TCP).announce(("192.0.2.1", 59094), ("192.0.2.2", 8080))
    assert redirector.outbound(upstream) == Step.SEND
    assert bytes(upstream.raw) == bytes.fromhex(TCP4_SYN) and redirector.counters["own_upstreams"] == 1
    assert redirector.outbound(packet(TCP4_SYN)) == Step.SEND  # its retransmitted SYN too


def test_shared_entries_live_only_as_long_as_a_proxy_reads_them(redirector: Redirector, table: RedirectTable) -> None:
    import time

    from core.proxy.origdst import RedirectResolver

    redirector.decided(packet(TCP4_SYN), split_mark())
    redirector.decided(packet(UDP4), split_mark())
    tcp_entry, udp_entry = (known.published_until - time.time() for known in redirector.flows.values())
    assert 25 < tcp_entry <= 30  # read once, when the proxy accepts
    assert 35 < udp_entry <= 40  # read while datagrams flow: refreshed by them
    assert table.lookup(IpProtocol.TCP, "192.0.2.1", 59094, now=time.time() + 31) is None
    # one of our own upstreams is never a proxy client, even if its packets came back to the proxy
    resolver = RedirectResolver(table, IpProtocol.TCP)
    assert resolver.announce(("192.0.2.1", 40000), ("192.0.2.2", 8080))
    assert resolver(("192.0.2.1", 40000), PROXY4) is None
    assert resolver(("192.0.2.1", 59094), PROXY4) == (("192.0.2.1", 59094), ("192.0.2.2", 8080), split_mark(), False)


def test_no_diverter_is_an_oserror_so_the_interceptor_stays_passive_and_retries(table: RedirectTable) -> None:
    def missing(_filter: str) -> None:
        raise ImportError("libebpfdivert not found")

    path = DivertPath(table, open_diverter=missing)
    with pytest.raises(OSError, match="no packet diverter: libebpfdivert not found"):
        path.open({}, lambda inbound, pkt: None, lambda fd, cb: None)


def test_a_split_with_no_room_in_the_shared_table_stays_in_the_vpn(clock: Clock) -> None:
    tiny = RedirectTable(None, slots=1)
    redirector = Redirector(tiny, proxy4=PROXY4, clock=clock)
    first, second = packet(UDP4), packet(UDP4)
    second.dst_addr = "192.0.2.3"  # another peer: another seen port, and the one slot is taken
    assert redirector.decided(first, split_mark()) == Step.SEND and first.dst_addr == PROXY4[0]
    assert redirector.decided(second, split_mark()) == Step.SEND
    assert addresses(second) == ("192.0.2.1", 56720, "192.0.2.3", 8053)  # unchanged: through the VPN
    assert redirector.counters["table_full"] == 1 and len(redirector.by_seen) == 1
    again = packet(UDP4)
    again.dst_addr = "192.0.2.3"
    assert redirector.outbound(again) == Step.SEND and again.dst_addr == "192.0.2.3"  # remembered as kept
