"""What the operating system tells us, before any decision: links, addresses, routes, rules, neighbours.

Every platform reader (linux.py, windows.py) fills these plain records; everything after that
(decide.py) is pure, so the whole decision is tested with hand-made or recorded `RawState`s.
A `RawState` also round-trips through JSON: that is the `netlink.json` of the fixture trees.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Link flags (IFF_*, linux/if.h) that decisions look at.
IFF_UP = 0x1
IFF_BROADCAST = 0x2
IFF_LOOPBACK = 0x8
IFF_POINTOPOINT = 0x10
IFF_RUNNING = 0x40
IFF_NOARP = 0x80
IFF_MULTICAST = 0x1000
IFF_LOWER_UP = 0x10000
IFF_DORMANT = 0x20000

FLAG_NAMES: tuple[tuple[int, str], ...] = (
    (IFF_UP, "UP"),
    (IFF_BROADCAST, "BROADCAST"),
    (IFF_LOOPBACK, "LOOPBACK"),
    (IFF_POINTOPOINT, "POINTOPOINT"),
    (IFF_RUNNING, "RUNNING"),
    (IFF_NOARP, "NOARP"),
    (IFF_MULTICAST, "MULTICAST"),
    (IFF_LOWER_UP, "LOWER_UP"),
    (IFF_DORMANT, "DORMANT"),
)

# ARPHRD_* link types (linux/if_arp.h) that say "tunnel" or "loopback" on their own.
ARPHRD_ETHER = 1
ARPHRD_PPP = 512
ARPHRD_TUNNEL = 768
ARPHRD_TUNNEL6 = 769
ARPHRD_LOOPBACK = 772
ARPHRD_SIT = 776
ARPHRD_IPGRE = 778
ARPHRD_IEEE80211 = 801
ARPHRD_IP6GRE = 823
ARPHRD_NONE = 0xFFFE  # tun, WireGuard: no link-layer header at all

# IFA_F_* address flags.
IFA_F_TEMPORARY = 0x01
IFA_F_NODAD = 0x02
IFA_F_DADFAILED = 0x08
IFA_F_DEPRECATED = 0x20
IFA_F_TENTATIVE = 0x40
IFA_F_PERMANENT = 0x80

# Route types (RTN_*) and the tables with fixed meaning.
RTN_UNICAST = 1
RTN_LOCAL = 2
RTN_BROADCAST = 3
RTN_ANYCAST = 4
RTN_MULTICAST = 5
RTN_BLACKHOLE = 6
RTN_UNREACHABLE = 7
RTN_PROHIBIT = 8
RTN_THROW = 9
TABLE_UNSPEC = 0
TABLE_DEFAULT = 253
TABLE_MAIN = 254
TABLE_LOCAL = 255

# Policy rule actions (FR_ACT_*).
FR_ACT_TO_TBL = 1
FR_ACT_GOTO = 2
FR_ACT_NOP = 3
FR_ACT_BLACKHOLE = 6
FR_ACT_UNREACHABLE = 7
FR_ACT_PROHIBIT = 8


@dataclass(slots=True)
class Link:
    """One network interface as the kernel (or Windows) describes it."""

    index: int
    name: str
    mac: str = ""
    mtu: int = 0
    flags: int = 0  # IFF_*
    arptype: int = ARPHRD_ETHER
    operstate: str = ""  # up, down, unknown, dormant, lowerlayerdown… ("" = not reported)
    kind: str = ""  # rtnetlink IFLA_INFO_KIND: veth, bridge, wireguard, tun, vlan… ("" = none: real hardware)
    master: int = 0  # index of the bridge/bond this link is enslaved to
    has_device: bool = False  # /sys/class/net/NAME/device exists: backed by hardware (or a VM's virtual NIC)
    wireless: bool = False
    category: str = ""  # pre-classified by the platform reader (Windows IfType); "" = classify here


@dataclass(slots=True)
class Addr:
    index: int
    family: int  # 4 | 6
    address: str
    prefixlen: int
    scope: int = 0  # RT_SCOPE_*: 0 universe, 200 site, 253 link, 254 host
    flags: int = 0  # IFA_F_*
    peer: str = ""  # the other end of a point-to-point address


@dataclass(slots=True)
class Route:
    family: int
    dst: str  # network address, "" for a default route
    dst_len: int
    oif: int  # output interface index (0 = none, e.g. blackhole)
    gateway: str = ""
    table: int = TABLE_MAIN
    metric: int = 0
    type: int = RTN_UNICAST
    prefsrc: str = ""


@dataclass(slots=True)
class Rule:
    family: int
    priority: int
    table: int = TABLE_MAIN
    action: int = FR_ACT_TO_TBL
    invert: bool = False  # "not …"
    fwmark: int = 0
    fwmask: int = 0
    suppress_prefixlen: int = -1  # -1 = none
    src: str = ""
    src_len: int = 0
    dst: str = ""
    dst_len: int = 0
    iif: str = ""
    oif: str = ""
    #: Selectors a generic "any local app" packet cannot be judged against (uid range, ports, tos…).
    specific: bool = False


@dataclass(slots=True)
class Neighbour:
    """An IPv6 neighbour that said it is a router (NDP "R" flag): a gateway of last resort."""

    index: int
    family: int
    address: str
    router: bool = False


@dataclass(slots=True)
class RawState:
    links: list[Link] = field(default_factory=list)
    addrs: list[Addr] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)
    neighbours: list[Neighbour] = field(default_factory=list)
    #: One-line problems met while reading (odd lines, failed dumps); logged by whoever reads.
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            key: [dataclasses.asdict(item) for item in getattr(self, key)]
            for key in ("links", "addrs", "routes", "rules", "neighbours")
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RawState:
        """Fixture loader: unknown keys inside a record are an error (a typo must not pass silently)."""
        return cls(
            links=[Link(**d) for d in data.get("links", [])],
            addrs=[Addr(**d) for d in data.get("addrs", [])],
            routes=[Route(**d) for d in data.get("routes", [])],
            rules=[Rule(**d) for d in data.get("rules", [])],
            neighbours=[Neighbour(**d) for d in data.get("neighbours", [])],
        )


def flag_names(flags: int) -> list[str]:
    return [name for bit, name in FLAG_NAMES if flags & bit]
