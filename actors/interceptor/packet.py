"""Parsing the raw packets NFQUEUE hands us: IPv4/IPv6, then TCP, UDP, ICMP or ICMPv6.

Pure functions over bytes, so they are tested with real packet bytes and never touch a socket.
Only what the verdict needs is extracted: the 5-tuple (`FiveTuple`: addresses, ports), TCP flags (is this
the connection's first packet?), ICMP type/code/echo id, and where the L4 payload starts (DNS answers).

Malformed packets raise `MalformedPacket` with a short, stable reason. The interceptor's rule for
them (see README.md): accept the packet unsplit, this packet only (mark 1700), log the reason once —
a packet we cannot read is never sent to the proxy, and it is never dropped either, so traffic we do
not understand keeps flowing through the VPN as it would without splittun.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from messages.flows import FiveTuple, IpProtocol, ipv6_text

TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10

#: IPv6 extension headers we walk through to reach the transport header.
_IPV6_EXT_HOP, _IPV6_EXT_ROUTING, _IPV6_EXT_FRAGMENT, _IPV6_EXT_DSTOPTS, _IPV6_EXT_AH = 0, 43, 44, 60, 51
_IPV6_NO_NEXT = 59
_MAX_IPV6_EXT_HEADERS = 8

#: ICMP echo request/reply types (v4 and v6): their identifier is part of the conntrack tuple.
ICMP_ECHO_TYPES = {IpProtocol.ICMP: (8, 0), IpProtocol.ICMPV6: (128, 129)}


class MalformedPacket(ValueError):
    """The bytes are not a packet we can read. `reason` is short and stable (used to log once)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ParsedPacket:
    """One packet's headers: its connection's 5-tuple (ports 0 for protocols without ports, ICMP included)
    and what else the verdict needs."""

    ip_version: int
    flow: FiveTuple
    tcp_flags: int = 0
    icmp_type: int = -1
    icmp_code: int = -1
    icmp_id: int = 0  # echo identifier (part of conntrack's ICMP tuple)
    payload_offset: int = 0  # where the L4 payload starts (0 when there is no L4 header)
    fragment: bool = False  # a non-first fragment: no transport header to read

    @property
    def tcp_first(self) -> bool:
        """The first packet of a TCP connection: SYN without ACK. Only such a packet can be split."""
        return self.flow.protocol == IpProtocol.TCP and self.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN

    @property
    def first_packet(self) -> bool:
        """Could this be a connection's first packet? TCP: a SYN without ACK; other protocols: always."""
        return self.flow.protocol != IpProtocol.TCP or self.tcp_first

    def conntrack_tuple(self) -> FiveTuple:
        """The original tuple of the packet's conntrack entry: the 5-tuple, for ICMP echo with the echo id as
        conntrack keys it (in `src_port`). The interceptor keys its live connections by it."""
        flow = self.flow
        if flow.protocol in (IpProtocol.ICMP, IpProtocol.ICMPV6):
            return FiveTuple(flow.protocol, flow.src_ip, self.icmp_id, flow.dst_ip, 0)
        return flow


def parse_packet(data: bytes) -> ParsedPacket:
    """Read the IP and transport headers of one packet; raise MalformedPacket when they are broken."""
    if not data:
        raise MalformedPacket("empty packet")
    version = data[0] >> 4
    if version == 4:
        return _parse_ipv4(data)
    if version == 6:
        return _parse_ipv6(data)
    raise MalformedPacket(f"IP version {version}")


def _parse_ipv4(data: bytes) -> ParsedPacket:
    if len(data) < 20:
        raise MalformedPacket("IPv4 header truncated")
    ihl = (data[0] & 0x0F) * 4
    if ihl < 20:
        raise MalformedPacket("IPv4 header length below 20")
    total = struct.unpack_from("!H", data, 2)[0]
    if total < ihl or len(data) < ihl:
        raise MalformedPacket("IPv4 total length shorter than its header")
    end = total
    frag = struct.unpack_from("!H", data, 6)[0] & 0x1FFF
    protocol = data[9]
    src = socket.inet_ntop(socket.AF_INET, data[12:16])
    dst = socket.inet_ntop(socket.AF_INET, data[16:20])
    if frag:
        return ParsedPacket(4, FiveTuple(protocol, src, 0, dst, 0), fragment=True)
    return _parse_l4(4, protocol, src, dst, data, ihl, end)


def _parse_ipv6(data: bytes) -> ParsedPacket:
    if len(data) < 40:
        raise MalformedPacket("IPv6 header truncated")
    payload_len = struct.unpack_from("!H", data, 4)[0]
    end = 40 + payload_len if payload_len else len(data)  # 0 = jumbogram
    src = ipv6_text(data[8:24])
    dst = ipv6_text(data[24:40])
    next_header = data[6]
    offset = 40
    readable = min(end, len(data))
    for _ in range(_MAX_IPV6_EXT_HEADERS):
        if next_header in (_IPV6_EXT_HOP, _IPV6_EXT_ROUTING, _IPV6_EXT_DSTOPTS):
            if offset + 2 > readable:
                raise MalformedPacket("IPv6 extension header truncated")
            next_header, length = data[offset], (data[offset + 1] + 1) * 8
        elif next_header == _IPV6_EXT_FRAGMENT:
            if offset + 8 > readable:
                raise MalformedPacket("IPv6 fragment header truncated")
            frag_offset = struct.unpack_from("!H", data, offset + 2)[0] >> 3
            if frag_offset:
                return ParsedPacket(6, FiveTuple(data[offset], src, 0, dst, 0), fragment=True)
            next_header, length = data[offset], 8
        elif next_header == _IPV6_EXT_AH:
            if offset + 2 > readable:
                raise MalformedPacket("IPv6 AH header truncated")
            next_header, length = data[offset], (data[offset + 1] + 2) * 4
        else:
            break
        offset += length
        if offset > end:
            raise MalformedPacket("IPv6 extension header beyond the packet")
    else:
        raise MalformedPacket("too many IPv6 extension headers")
    if next_header == _IPV6_NO_NEXT:
        return ParsedPacket(6, FiveTuple(next_header, src, 0, dst, 0))
    return _parse_l4(6, next_header, src, dst, data, offset, end)


def _parse_l4(version: int, protocol: int, src: str, dst: str, data: bytes, offset: int, end: int) -> ParsedPacket:
    """`end` is where the IP header says the packet ends; NFQUEUE's copy range may give us fewer bytes,
    so header fields are checked against what we have and lengths against what the header declares."""
    have = len(data) - offset
    declared = end - offset
    if protocol == IpProtocol.TCP:
        if have < 20 or declared < 20:
            raise MalformedPacket("TCP header truncated")
        sport, dport = struct.unpack_from("!HH", data, offset)
        data_offset = (data[offset + 12] >> 4) * 4
        if data_offset < 20 or data_offset > declared:
            raise MalformedPacket("TCP data offset out of range")
        flags = data[offset + 13]
        return ParsedPacket(
            version, FiveTuple(protocol, src, sport, dst, dport), tcp_flags=flags, payload_offset=offset + data_offset
        )
    if protocol == IpProtocol.UDP:
        if have < 8 or declared < 8:
            raise MalformedPacket("UDP header truncated")
        sport, dport, length = struct.unpack_from("!HHH", data, offset)
        if length and (length < 8 or length > declared):
            raise MalformedPacket("UDP length out of range")
        return ParsedPacket(version, FiveTuple(protocol, src, sport, dst, dport), payload_offset=offset + 8)
    if protocol in (IpProtocol.ICMP, IpProtocol.ICMPV6):
        if (protocol == IpProtocol.ICMP) != (version == 4):
            raise MalformedPacket("ICMP of the other IP version")
        if have < 4 or declared < 4:
            raise MalformedPacket("ICMP header truncated")
        icmp_type, code = data[offset], data[offset + 1]
        ident = 0
        if icmp_type in ICMP_ECHO_TYPES[protocol]:
            if have < 8 or declared < 8:
                raise MalformedPacket("ICMP echo header truncated")
            ident = struct.unpack_from("!H", data, offset + 4)[0]
        return ParsedPacket(
            version,
            FiveTuple(protocol, src, 0, dst, 0),
            icmp_type=icmp_type,
            icmp_code=code,
            icmp_id=ident,
            payload_offset=offset + 4,
        )
    return ParsedPacket(version, FiveTuple(protocol, src, 0, dst, 0))  # other protocols: addresses are all we need
