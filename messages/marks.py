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


#: Marks saved to the conntrack mark so later packets of the connection never reach user space.
PERMANENT_MARKS = frozenset(
    {
        Mark.ACCEPT_FINAL,
        Mark.ACCEPT_ALWAYS,
        Mark.BLOCK_ALWAYS,
        Mark.DROP_ALWAYS,
        Mark.REROUTE_TO_TUNNEL,
        Mark.REROUTE_TO_SPLIT_TUN,
        Mark.REROUTE_TO_NAMESERVER,
        Mark.SPLIT_EGRESS,
    }
)


class Queue(IntEnum):
    IPV4_OUT = 17040
    IPV4_IN = 17140
    IPV6_OUT = 17060
    IPV6_IN = 17160


SPLIT_ROUTE_TABLE = 1720
SPLIT_RULE_PRIORITY = 1720  # ahead of wg-quick (32764/32765) and other VPN clients' rules

PROXY_IPV4 = "127.0.0.17"
PROXY_IPV6 = "::1"
SPLIT_PROXY_PORT = 719
TUNNEL_PROXY_PORT = 717
NAMESERVER_PORT = 53
