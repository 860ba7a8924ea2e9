"""The flow key: how the interceptor and the proxies name the same connection.

The interceptor sees the app's packet before DNAT (client → original destination); the proxy sees the
client's address and recovers the original destination from the kernel. Both build the key from those
five values with this one function, so the controller can join `conn.verdict` to `proxy.session.*`.
"""

from __future__ import annotations

import ipaddress

_PROTO_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}


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
