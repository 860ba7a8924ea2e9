"""Interceptor parsers: packets (real bytes captured in the lab) and DNS answers (built byte by byte)."""

from __future__ import annotations

import contextlib
import json
import random
import struct

import pytest

from actors.interceptor.packet import MalformedPacket, parse_packet
from core.dns.answers import DnsError, parse_response, read_name
from messages.flows import FiveTuple, IpProtocol
from tests.support import FIXTURES_DIR

TCP, UDP, ICMP, ICMPV6 = IpProtocol.TCP, IpProtocol.UDP, IpProtocol.ICMP, IpProtocol.ICMPV6

FIXTURES = FIXTURES_DIR / "interceptor"
PACKETS = {k: bytes.fromhex(v) for k, v in json.loads((FIXTURES / "packets.json").read_text()).items() if k[0] != "_"}


# --- packets ------------------------------------------------------------------------------------------


def test_tcp_syn_v4_is_a_first_packet() -> None:
    info = parse_packet(PACKETS["tcp4_syn"])
    assert (info.ip_version, info.flow.protocol) == (4, TCP)
    assert (info.flow.src_ip, info.flow.dst_ip, info.flow.dst_port) == ("192.0.2.66", "203.0.113.80", 80)
    assert info.flow.src_port > 1024
    assert info.tcp_first


@pytest.mark.parametrize("name", ["tcp4_ack", "tcp4_data", "tcp6_data"])
def test_mid_stream_tcp_is_not_a_first_packet(name: str) -> None:
    assert not parse_packet(PACKETS[name]).tcp_first


def test_tcp_syn_v6() -> None:
    info = parse_packet(PACKETS["tcp6_syn"])
    assert (info.ip_version, info.flow.protocol, info.flow.src_ip, info.flow.dst_ip) == (
        6,
        TCP,
        "fd00:5717::2",
        "2001:db8:30::80",
    )
    assert info.tcp_first


@pytest.mark.parametrize(("name", "version", "dst"), [("udp4", 4, "203.0.113.80"), ("udp6", 6, "2001:db8:30::80")])
def test_udp(name: str, version: int, dst: str) -> None:
    info = parse_packet(PACKETS[name])
    assert (info.ip_version, info.flow.protocol, info.flow.dst_ip, info.flow.dst_port) == (version, UDP, dst, 5300)
    assert PACKETS[name][info.payload_offset :] == b"json"


@pytest.mark.parametrize(("name", "proto", "echo_type"), [("icmp4_echo", ICMP, 8), ("icmp6_echo", ICMPV6, 128)])
def test_icmp_echo_carries_its_identifier(name: str, proto: int, echo_type: int) -> None:
    info = parse_packet(PACKETS[name])
    assert (info.flow.protocol, info.icmp_type, info.icmp_code, info.icmp_id) == (proto, echo_type, 0, 0x1234)
    assert (info.flow.src_port, info.flow.dst_port) == (0, 0)
    # Its conntrack entry is keyed with the echo id in place of the source port.
    assert info.conntrack_tuple() == FiveTuple(proto, info.flow.src_ip, 0x1234, info.flow.dst_ip, 0)


def test_copy_range_cut_packet_still_parses() -> None:
    """NFQUEUE gives us the first 256 bytes only: a longer packet is not malformed for that."""
    data = PACKETS["tcp4_data"]
    info = parse_packet(data[:60])
    assert (info.flow.dst_port, info.tcp_flags & 0x18) == (80, 0x18)


def test_ipv4_non_first_fragment_has_no_ports() -> None:
    data = bytearray(PACKETS["udp4"])
    struct.pack_into("!H", data, 6, 185)  # fragment offset 185*8
    info = parse_packet(bytes(data))
    assert info.fragment and info.flow.src_port == 0 and info.flow.protocol == UDP


def _with_ipv6_ext(packet: bytes, ext_type: int, ext: bytes) -> bytes:
    """Insert an extension header after the IPv6 header (fixing next-header and payload length)."""
    hdr = bytearray(packet[:40])
    inner_next = hdr[6]
    hdr[6] = ext_type
    struct.pack_into("!H", hdr, 4, struct.unpack_from("!H", hdr, 4)[0] + len(ext))
    return bytes(hdr) + bytes([inner_next]) + ext[1:] + packet[40:]


def test_ipv6_hop_by_hop_then_tcp() -> None:
    hop = bytes([0, 0]) + bytes([1, 4, 0, 0, 0, 0])  # next (patched), len 0 (8 bytes), PadN
    info = parse_packet(_with_ipv6_ext(PACKETS["tcp6_syn"], 0, hop))
    assert (info.flow.protocol, info.flow.dst_port) == (TCP, 80) and info.tcp_first


def test_ipv6_first_fragment_parses_and_later_fragment_has_no_ports() -> None:
    first = bytes([0, 0]) + struct.pack("!HI", 0x0001, 7)  # offset 0, more fragments
    later = bytes([0, 0]) + struct.pack("!HI", 0x00A8, 7)  # offset 21*8
    assert parse_packet(_with_ipv6_ext(PACKETS["udp6"], 44, first)).flow.dst_port == 5300
    info = parse_packet(_with_ipv6_ext(PACKETS["udp6"], 44, later))
    assert info.fragment and info.flow.dst_port == 0


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty packet"),
        (bytes([0x50]) + bytes(39), "IP version 5"),
        (PACKETS["tcp4_syn"][:12], "IPv4 header truncated"),
        (bytes([0x44]) + PACKETS["tcp4_syn"][1:], "IPv4 header length below 20"),
        (PACKETS["tcp4_syn"][:30], "TCP header truncated"),
        (PACKETS["tcp6_syn"][:30], "IPv6 header truncated"),
        (PACKETS["udp4"][:24], "UDP header truncated"),
        (PACKETS["icmp4_echo"][:22], "ICMP header truncated"),
    ],
)
def test_malformed_packets_name_their_problem(data: bytes, reason: str) -> None:
    with pytest.raises(MalformedPacket) as err:
        parse_packet(data)
    assert err.value.reason == reason


def test_tcp_data_offset_beyond_packet_is_malformed() -> None:
    data = bytearray(PACKETS["tcp4_ack"])
    data[20 + 12] = 0xF0  # 60-byte TCP header in a 52-byte packet
    with pytest.raises(MalformedPacket, match="data offset"):
        parse_packet(bytes(data))


def test_random_bytes_never_raise_anything_but_malformed() -> None:
    rng = random.Random(1719)
    seeds = list(PACKETS.values())
    for _ in range(3000):
        base = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 6)):
            base[rng.randrange(len(base))] = rng.randrange(256)
        data = bytes(base[: rng.randint(0, len(base))])
        with contextlib.suppress(MalformedPacket):
            parse_packet(data)


# --- DNS ----------------------------------------------------------------------------------------------


def qname(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"


def rr(owner: bytes, rtype: int, ttl: int, rdata: bytes) -> bytes:
    return owner + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata


def response(question: str, answers: list[bytes], flags: int = 0x8180, qtype: int = 1) -> bytes:
    header = struct.pack("!HHHHHH", 0x1234, flags, 1, len(answers), 0, 0)
    return header + qname(question) + struct.pack("!HH", qtype, 1) + b"".join(answers)


QPTR = b"\xc0\x0c"  # pointer to the question name at offset 12


def test_a_record_with_compressed_owner() -> None:
    msg = response("www.example.com", [rr(QPTR, 1, 300, bytes([203, 0, 113, 80]))])
    answer = parse_response(msg)
    assert answer is not None
    assert answer.qname == "www.example.com"
    assert answer.addresses == (("203.0.113.80", 300),)


def test_aaaa_record() -> None:
    addr = bytes.fromhex("20010db8003000000000000000000080")
    answer = parse_response(response("v6.example.com", [rr(QPTR, 28, 60, addr)], qtype=28))
    assert answer is not None and answer.addresses == (("2001:db8:30::80", 60),)


def test_cname_chain_maps_addresses_to_the_question_with_smallest_ttl() -> None:
    # www.example.com CNAME cdn.example.net (TTL 300); cdn.example.net CNAME edge.example.org (TTL 60)
    # edge.example.org A 203.0.113.80 (TTL 3600). Names after the first are compressed where possible.
    q_len = 12 + len(qname("www.example.com")) + 4
    first = rr(QPTR, 5, 300, qname("cdn.example.net"))
    cdn_offset = q_len + 2 + 10  # owner pointer (2) + rr header (10): where the rdata name starts
    second = rr(struct.pack("!H", 0xC000 | cdn_offset), 5, 60, b"\x04edge\x07example\x03org\x00")
    edge_offset = q_len + len(first) + 2 + 10
    third = rr(struct.pack("!H", 0xC000 | edge_offset), 1, 3600, bytes([203, 0, 113, 80]))
    answer = parse_response(response("WWW.Example.com", [first, second, third]))
    assert answer is not None
    assert answer.qname == "www.example.com"
    assert answer.chain == ("www.example.com", "cdn.example.net", "edge.example.org")
    assert answer.addresses == (("203.0.113.80", 60),)


def test_records_outside_the_chain_are_ignored() -> None:
    other = rr(qname("tracker.example.org"), 1, 300, bytes([203, 0, 113, 81]))
    mine = rr(QPTR, 1, 300, bytes([203, 0, 113, 80]))
    answer = parse_response(response("www.example.com", [other, mine]))
    assert answer is not None and answer.addresses == (("203.0.113.80", 300),)


def test_cname_loop_ends_the_chain() -> None:
    a = rr(QPTR, 5, 60, qname("b.example.com"))
    b = rr(qname("b.example.com"), 5, 60, qname("www.example.com"))
    addr = rr(qname("b.example.com"), 1, 60, bytes([203, 0, 113, 80]))
    answer = parse_response(response("www.example.com", [a, b, addr]))
    assert answer is not None and answer.addresses == (("203.0.113.80", 60),)


@pytest.mark.parametrize(
    "msg",
    [
        response("www.example.com", [rr(QPTR, 1, 300, bytes(4))], flags=0x0100),  # a query, not an answer
        response("nx.example.com", [], flags=0x8183),  # NXDOMAIN
        response("www.example.com", [rr(QPTR, 16, 300, b"\x03txt")]),  # TXT only
    ],
)
def test_answers_that_teach_nothing(msg: bytes) -> None:
    assert parse_response(msg) is None


@pytest.mark.parametrize(
    ("msg", "reason"),
    [
        (b"\x12\x34\x81\x80", "header truncated"),
        (response("www.example.com", [rr(QPTR, 1, 300, bytes([203, 0, 113, 80]))])[:-2], "record data truncated"),
        (response("www.example.com", [])[:20], "label runs past the end"),
        (response("www.example.com", [rr(b"\xc0\xff", 1, 300, bytes(4))]), "name pointer loops or points forward"),
    ],
)
def test_broken_dns_messages_raise_one_error_type(msg: bytes, reason: str) -> None:
    with pytest.raises(DnsError) as err:
        parse_response(msg)
    assert err.value.reason == reason


def test_pointer_to_itself_is_a_loop() -> None:
    data = bytes(12) + b"\xc0\x0c"
    with pytest.raises(DnsError, match="loops"):
        read_name(data, 12)


def test_random_dns_bytes_never_raise_anything_but_dns_error() -> None:
    rng = random.Random(53)
    base = response("www.example.com", [rr(QPTR, 5, 60, qname("cdn.example.net")), rr(QPTR, 1, 60, bytes(4))])
    for _ in range(3000):
        data = bytearray(base)
        for _ in range(rng.randint(1, 5)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        with contextlib.suppress(DnsError):
            parse_response(bytes(data[: rng.randint(0, len(data))]))
