"""Packet marks, NFQUEUE numbers and proxy addresses: the numbers the firewall, the proxies and the
routing share, defined once.

The Portmaster marks keep their values so rule sets read the same to its users. The split-egress mark
and routing table are ours: the proxies' upstream sockets carry SPLIT_EGRESS, which the interceptor treats
as accept-final (never queued) and which an `ip rule fwmark` sends to SPLIT_ROUTE_TABLE, holding a default
route via each split interface's gateway (SO_BINDTODEVICE then picks the right one).
"""

from __future__ import annotations

from enum import IntEnum


class Mark(IntEnum):
    ACCEPT = 1700  # accept this packet only
    BLOCK = 1701
    DROP = 1702
    ACCEPT_FINAL = 1709  # our own connections: no later rule of other software overrides it
    ACCEPT_ALWAYS = 1710
    BLOCK_ALWAYS = 1711
    DROP_ALWAYS = 1712
    REROUTE_TO_TUNNEL = 1717  # SPN
    REROUTE_TO_SPLIT_TUN = 1719
    REROUTE_TO_NAMESERVER = 1799
    SPLIT_EGRESS = 1720  # ours: proxies' upstream sockets (accept-final + split routing)


#: A split connection's mark carries, above the verdict's 16 bits, the index of the interface its rule
#: chose (0 = the global choice). The rules match 1719 under VERDICT_MASK; the proxies read the index
#: back from the connection's conntrack mark, so no process has to ask another one per connection.
VERDICT_MASK = 0xFFFF
INTERFACE_SHIFT = 16
MAX_INTERFACE_INDEX = 0xFFFF


def split_mark(interface_index: int = 0) -> int:
    if not 0 <= interface_index <= MAX_INTERFACE_INDEX:
        raise ValueError(f"interface index {interface_index} does not fit in a split mark")
    return int(Mark.REROUTE_TO_SPLIT_TUN) | (interface_index << INTERFACE_SHIFT)


def split_interface_index(mark: int) -> int | None:
    """The interface index in a split mark (0 = the global choice); None when `mark` is not a split mark."""
    if mark & VERDICT_MASK != Mark.REROUTE_TO_SPLIT_TUN:
        return None
    return mark >> INTERFACE_SHIFT


#: A DNS query the interceptor rerouted to the resolver carries RerouteToNameserver (1799) in the verdict's
#: 16 bits and, above them, the path the asking app's connections take: bit 16 set = split (the app's rules
#: split it), bits 17-31 the interface index its rule chose (0 = the global choice). The rules match 1799
#: under VERDICT_MASK; the resolver reads the rest back from the query's conntrack entry, so it knows which
#: path to resolve on without asking the interceptor per query.
NAMESERVER_SPLIT = 1 << 16
NAMESERVER_INTERFACE_SHIFT = 17
MAX_NAMESERVER_INTERFACE_INDEX = 0x7FFF


def nameserver_mark(split: bool = False, interface_index: int = 0) -> int:
    """The mark of a rerouted DNS query: VPN path (`split` False) or split path through an interface."""
    if not 0 <= interface_index <= MAX_NAMESERVER_INTERFACE_INDEX:
        raise ValueError(f"interface index {interface_index} does not fit in a nameserver mark")
    if not split and interface_index:
        raise ValueError("only a split query names an interface")
    path = (NAMESERVER_SPLIT | interface_index << NAMESERVER_INTERFACE_SHIFT) if split else 0
    return int(Mark.REROUTE_TO_NAMESERVER) | path


def nameserver_path(mark: int) -> tuple[bool, int] | None:
    """(split, interface index) of a rerouted query's mark; None when `mark` is not a nameserver mark."""
    if mark & VERDICT_MASK != Mark.REROUTE_TO_NAMESERVER:
        return None
    return bool(mark & NAMESERVER_SPLIT), (mark & 0xFFFFFFFF) >> NAMESERVER_INTERFACE_SHIFT


#: Queue groups are 20 apart (17040 v4 out, 17060 v6 out…): one slot per interceptor worker, so at most 20.
MAX_INTERCEPTOR_WORKERS = 20


class Queue(IntEnum):
    IPV4_OUT = 17040
    IPV4_IN = 17140
    IPV6_OUT = 17060
    IPV6_IN = 17160


SPLIT_ROUTE_TABLE = 1720
SPLIT_RULE_PRIORITY = 1720  # ahead of wg-quick (32764/32765) and other VPN clients' rules
#: Bypass routes (splittun/bypassHosts, the IVPN interop): `lookup 717` at priority 717, host routes via the
#: non-VPN gateway, while IVPN connects or holds its tunnel.
BYPASS_ROUTE_TABLE = 717
BYPASS_RULE_PRIORITY = 717
#: The kernel data path: split marks (1719 | interface index << 16) are routed by rules at this priority
#: to table KERNEL_TABLE_BASE + interface index (0 = the global choice), one per interface in use.
KERNEL_RULE_PRIORITY = 1719
KERNEL_TABLE_BASE = 1719 << 16

PROXY_IPV4 = "127.0.0.17"
PROXY_IPV6 = "::1"
SPLIT_PROXY_PORT = 719
TUNNEL_PROXY_PORT = 717
NAMESERVER_PORT = 53  # the resolver listens on PROXY_IPV4 / PROXY_IPV6 at this port
