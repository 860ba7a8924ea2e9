"""What netenv answers with: interfaces, gateways, the uplink per family, and the whole snapshot.

Everything here is immutable and pre-computed at refresh time, so a lookup is a dict access: the
proxies and the interceptor ask on their own paths and must not pay for parsing or sorting there.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from messages.events import GatewayRecord, InterfaceRecord, NetenvChanged

# Interface kinds.
PHYSICAL = "physical"  # wired NIC (or a VM's virtual NIC: it is the machine's hardware as far as it knows)
WIFI = "wifi"
VIRTUAL = "virtual"  # veth, vlan, bond, dummy, macvlan…: not a VPN, may be a container's or VM's uplink
BRIDGE = "bridge"
TUNNEL = "tunnel"  # tun/tap, WireGuard, PPP, GRE/IPIP…, anything point-to-point: never an uplink
LOOPBACK = "loopback"
KINDS = (PHYSICAL, WIFI, VIRTUAL, BRIDGE, TUNNEL, LOOPBACK)

# Where an uplink's gateway came from.
FROM_DEFAULT = "default-route"  # a default route through it, in main or a table a rule uses
FROM_REMEMBERED = "remembered"  # the last default-route gateway seen before a VPN took the default
FROM_GATEWAY_ROUTE = "gateway-route"  # another route via a gateway on it (OpenVPN's route to its server)
FROM_OTHER_FAMILY = "other-family"  # the other family's uplink, which has an address of this family too
FROM_NEIGHBOUR = "neighbour"  # gateway only: an IPv6 neighbour that announced itself as a router


@dataclass(frozen=True, slots=True)
class InterfaceInfo:
    name: str
    index: int
    mac: str  # lower-case "aa:bb:…", "" when the link has none (tun, WireGuard)
    flags: tuple[str, ...]  # UP, RUNNING, POINTOPOINT…
    mtu: int
    kind: str  # one of KINDS
    is_physical: bool  # backed by a device (/sys/class/net/NAME/device; Windows: Ethernet/Wi-Fi IfType)
    addresses: tuple[str, ...]  # every address, "addr/prefix", kernel order (link-local included)
    ipv4: str  # first routable IPv4, "" when none
    ipv6: str  # first routable IPv6 (not tentative; non-deprecated preferred), "" when none
    up: bool = True  # administratively up and with carrier
    operstate: str = ""
    link_kind: str = ""  # the kernel's own word: veth, bridge, wireguard, tun… ("" for hardware)

    @property
    def usable(self) -> bool:
        """Up, not loopback, and with an address that can reach beyond the link."""
        return self.up and self.kind != LOOPBACK and bool(self.ipv4 or self.ipv6)

    @property
    def is_tunnel(self) -> bool:
        return self.kind == TUNNEL

    def ip(self, family: int) -> str:
        return self.ipv4 if family == 4 else self.ipv6

    def to_record(self) -> InterfaceRecord:
        return InterfaceRecord(
            name=self.name,
            index=self.index,
            mac=self.mac,
            kind=self.kind,
            is_physical=self.is_physical,
            mtu=self.mtu,
            flags=list(self.flags),
            addresses=list(self.addresses),
            ipv4=self.ipv4,
            ipv6=self.ipv6,
            operstate=self.operstate,
            link_kind=self.link_kind,
        )


@dataclass(frozen=True, slots=True)
class GatewayInfo:
    gateway: str
    interface: str
    prefix: str  # "default" or the destination network, e.g. "198.51.100.2/32"
    family: int  # 4 | 6
    table: int = 254  # 0 for gateways inferred without a route (remembered, neighbour)
    metric: int = 0
    origin: str = "route"  # route | remembered | neighbour

    def to_record(self) -> GatewayRecord:
        return GatewayRecord(
            gateway=self.gateway,
            interface=self.interface,
            family=self.family,
            prefix=self.prefix,
            table=self.table,
            metric=self.metric,
            origin=self.origin,
        )


@dataclass(frozen=True, slots=True)
class Uplink:
    """The interface split traffic of one family leaves through, and the next hop to use there."""

    family: int
    interface: InterfaceInfo
    gateway: str  # "" when none is known (then only a point-to-point link could be used)
    origin: str  # FROM_* saying how the interface was found


def normalize_mac(text: str) -> str:
    """A MAC address as we compare them: lower case, colons (Windows writes dashes)."""
    return text.strip().lower().replace("-", ":")


def _empty() -> MappingProxyType[Any, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One consistent view. `interfaces` holds the usable ones only; `all_interfaces` everything."""

    interfaces: tuple[InterfaceInfo, ...] = ()
    all_interfaces: tuple[InterfaceInfo, ...] = ()
    gateways: tuple[GatewayInfo, ...] = ()
    uplinks: MappingProxyType[int, Uplink | None] = field(default_factory=_empty)  # {4: …, 6: …}
    #: {4: ifname, 6: ifname}: where unmarked traffic goes now, after policy rules (the VPN, when on).
    default_route: MappingProxyType[int, str] = field(default_factory=_empty)
    problems: tuple[str, ...] = ()
    taken: float = field(default_factory=time.time)
    by_ip: MappingProxyType[str, InterfaceInfo] = field(default_factory=_empty)
    by_mac: MappingProxyType[str, InterfaceInfo] = field(default_factory=_empty)
    by_name: MappingProxyType[str, InterfaceInfo] = field(default_factory=_empty)

    @classmethod
    def build(
        cls,
        all_interfaces: list[InterfaceInfo],
        gateways: list[GatewayInfo],
        uplinks: dict[int, Uplink | None],
        default_route: dict[int, str],
        problems: list[str] | tuple[str, ...] = (),
    ) -> Snapshot:
        usable = [i for i in all_interfaces if i.usable]
        by_ip: dict[str, InterfaceInfo] = {}
        by_mac: dict[str, InterfaceInfo] = {}
        # Physical first, so a MAC shared by a NIC and its VLANs or bridge finds the NIC.
        for info in sorted(usable, key=lambda i: (not i.is_physical, i.index)):
            for addr in info.addresses:
                by_ip.setdefault(addr.split("/", 1)[0], info)
            if info.mac:
                by_mac.setdefault(info.mac, info)
        return cls(
            interfaces=tuple(usable),
            all_interfaces=tuple(all_interfaces),
            gateways=tuple(gateways),
            uplinks=MappingProxyType(dict(uplinks)),
            default_route=MappingProxyType(dict(default_route)),
            problems=tuple(problems),
            by_ip=MappingProxyType(by_ip),
            by_mac=MappingProxyType(by_mac),
            by_name=MappingProxyType({i.name: i for i in usable}),
        )

    # --- lookups (usable interfaces only) ---------------------------------------------------------

    def by_ip_text(self, text: str) -> InterfaceInfo | None:
        found = self.by_ip.get(text)
        if found is not None:
            return found
        canonical = _canonical_ip(text)
        return self.by_ip.get(canonical) if canonical and canonical != text else None

    def lookup(self, text: str) -> InterfaceInfo | None:
        """An interface by one of its IP addresses, else its MAC, else its name."""
        found = self.by_ip.get(text)  # the common case: a canonical address, one dict access
        if found is not None:
            return found
        # A MAC is never valid IP text, so asking the MAC table before parsing keeps the order's meaning
        # and spares MAC lookups the (slow) address parse.
        found = self.by_mac.get(normalize_mac(text))
        if found is not None:
            return found
        found = self.by_ip_text(text) if (":" in text or "." in text) else None
        if found is not None:
            return found
        return self.by_name.get(text)

    def uplink(self, family: int) -> Uplink | None:
        return self.uplinks.get(family)

    # --- the bus message --------------------------------------------------------------------------

    def to_message(self, seq: int, ts: float | None = None, location_disabled: bool = False) -> NetenvChanged:
        up4, up6 = self.uplinks.get(4), self.uplinks.get(6)
        return NetenvChanged(
            seq=seq,
            ts=time.time() if ts is None else ts,
            interfaces=[i.to_record() for i in self.interfaces],
            gateways=[g.to_record() for g in self.gateways],
            uplink_ipv4=up4.interface.name if up4 else "",
            uplink_ipv6=up6.interface.name if up6 else "",
            uplink_gateway_ipv4=up4.gateway if up4 else "",
            uplink_gateway_ipv6=up6.gateway if up6 else "",
            default_ipv4=self.default_route.get(4, ""),
            default_ipv6=self.default_route.get(6, ""),
            location_disabled=location_disabled,
        )

    def same_as(self, other: Snapshot | None) -> bool:
        """Equal as subscribers see it (the time taken and reading problems aside)."""
        if other is None:
            return False
        return (
            self.interfaces == other.interfaces
            and self.gateways == other.gateways
            and dict(self.uplinks) == dict(other.uplinks)
            and dict(self.default_route) == dict(other.default_route)
        )


def _canonical_ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.split("%", 1)[0].strip().strip("[]")))
    except ValueError:
        return ""
