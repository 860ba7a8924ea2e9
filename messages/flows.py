"""One vocabulary for a connection: its protocol number, its 5-tuple, and the flow key built from it.

- `IpProtocol`: the IP protocol numbers splittun deals with, defined here once (IANA numbers).
- `FiveTuple`: one direction of a connection (protocol, source address and port, destination address and
  port). The interceptor's parsed packets and live table, conntrack entries, sock_diag and /proc
  attribution, the policy and the external handler all speak it.
- `flow_key`: how the interceptor and the proxies name the same connection. The interceptor sees the
  app's packet before DNAT (client → original destination); the proxy sees the client's address and
  recovers the original destination from the kernel. Both build the key from those five values with this
  one function, so the controller can join `conn.verdict` to `proxy.session.*`.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from enum import IntEnum


class IpProtocol(IntEnum):
    """IP protocol numbers (IANA). Values compare equal to the plain numbers the kernel and packets carry."""

    ICMP = 1
    TCP = 6
    UDP = 17
    ICMPV6 = 58


_PROTO_NAMES = {p.value: p.name.lower() for p in IpProtocol}


@dataclass(frozen=True, slots=True)
class FiveTuple:
    """One direction of a connection: what conntrack calls a tuple and sock_diag a socket id.

    `protocol` is the IANA number (`IpProtocol`; other protocols keep their number and ports 0). ICMP echo:
    where it is a conntrack key, `src_port` holds the echo id and `dst_port` is 0, as conntrack keys it.
    Addresses are text; IPv6 as `ipaddress` writes it (RFC 5952, hex groups throughout, also for IPv4-mapped
    addresses: `ipv6_text`), so a tuple read from the kernel equals the one built from the connection's
    packet. Hashable: the interceptor keys its live connections by it.
    """

    protocol: int
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int

    @property
    def ip_version(self) -> int:
        return 6 if ":" in self.src_ip else 4

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.src_ip else socket.AF_INET

    @property
    def src(self) -> tuple[str, int]:
        return self.src_ip, self.src_port

    @property
    def dst(self) -> tuple[str, int]:
        return self.dst_ip, self.dst_port

    def reversed(self) -> FiveTuple:
        """The other direction (an answer's tuple)."""
        return FiveTuple(self.protocol, self.dst_ip, self.dst_port, self.src_ip, self.src_port)

    def key(self) -> str:
        """`flow_key` of this tuple."""
        return flow_key(self.protocol, self.src_ip, self.src_port, self.dst_ip, self.dst_port)


def ipv6_text(raw: bytes) -> str:
    """IPv6 address bytes → the text `FiveTuple` uses (what `ipaddress` writes: `::ffff:c000:242`, never
    `::ffff:192.0.2.66`), so strings built from packets and from the kernel compare equal."""
    return str(ipaddress.IPv6Address(bytes(raw)))


def canonical_ip(address: str) -> str:
    """Compressed text form; IPv4-mapped IPv6 (::ffff:a.b.c.d) becomes the IPv4 address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def protocol_name(protocol: int | str) -> str:
    if isinstance(protocol, str):
        return protocol.lower()
    return _PROTO_NAMES.get(protocol, str(protocol))


def endpoint_text(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def flow_key(protocol: int | str, src_ip: str, src_port: int, dst_ip: str, dst_port: int) -> str:
    """`tcp 192.0.2.10:43210 203.0.113.80:80` — client first, original destination second."""
    src = endpoint_text(canonical_ip(src_ip), src_port)
    dst = endpoint_text(canonical_ip(dst_ip), dst_port)
    return f"{protocol_name(protocol)} {src} {dst}"
