"""From a `RawState` to a `Snapshot`: classify links, pick addresses, list gateways, choose uplinks.

Pure: no I/O, no clock. The only state carried between refreshes is `Memory`, the last uplink per
family that carried a real default route, so a VPN that replaces the default route does not make us
forget the physical gateway.

How the uplink of one family is chosen, first rule that yields an interface wins. Candidates are usable
(up, with a routable address of that family), never tunnels (tun/tap, WireGuard, PPP, GRE…, anything
point-to-point) and never loopback:
1. a default route through a candidate, in main or in a table a policy rule uses (wg-quick keeps the
   physical default in main behind `suppress_prefixlength 0`); physical before virtual, then with a
   gateway, main first, lowest metric;
2. the remembered default-route uplink, if it is still a candidate and its gateway still on-link;
3. another route via a gateway through a candidate (an OpenVPN-style VPN that replaced the default
   leaves a host route to its server via the physical gateway); physical first, longest prefix;
4. the other family's uplink, if it has a routable address of this family.
A missing IPv6 gateway is then filled from a neighbour that announced itself as a router.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field

from .info import (
    BRIDGE,
    FROM_DEFAULT,
    FROM_GATEWAY_ROUTE,
    FROM_NEIGHBOUR,
    FROM_OTHER_FAMILY,
    FROM_REMEMBERED,
    LOOPBACK,
    PHYSICAL,
    TUNNEL,
    VIRTUAL,
    WIFI,
    GatewayInfo,
    InterfaceInfo,
    Snapshot,
    Uplink,
)
from .raw import (
    ARPHRD_IP6GRE,
    ARPHRD_IPGRE,
    ARPHRD_LOOPBACK,
    ARPHRD_NONE,
    ARPHRD_PPP,
    ARPHRD_SIT,
    ARPHRD_TUNNEL,
    ARPHRD_TUNNEL6,
    FR_ACT_BLACKHOLE,
    FR_ACT_PROHIBIT,
    FR_ACT_TO_TBL,
    FR_ACT_UNREACHABLE,
    IFA_F_DADFAILED,
    IFA_F_DEPRECATED,
    IFA_F_TENTATIVE,
    IFF_LOOPBACK,
    IFF_POINTOPOINT,
    IFF_RUNNING,
    IFF_UP,
    RTN_BLACKHOLE,
    RTN_PROHIBIT,
    RTN_THROW,
    RTN_UNICAST,
    RTN_UNREACHABLE,
    TABLE_LOCAL,
    TABLE_MAIN,
    Addr,
    Link,
    Neighbour,
    RawState,
    Route,
    Rule,
    flag_names,
)

#: rtnetlink link kinds that are tunnels or VPNs (tap too: user-space VPNs use it; VMs bridge it).
TUNNEL_KINDS = frozenset(
    {"tun", "wireguard", "ppp", "ipip", "gre", "sit", "ip6tnl", "ip6gre", "vti", "vti6", "xfrm", "gtp", "l2tp"}
)
TUNNEL_ARPHRD = frozenset(
    {ARPHRD_PPP, ARPHRD_TUNNEL, ARPHRD_TUNNEL6, ARPHRD_SIT, ARPHRD_IPGRE, ARPHRD_IP6GRE, ARPHRD_NONE}
)
#: Name prefixes of VPN links, consulted only when the kernel names no link kind and no device backs it.
TUNNEL_NAME_PREFIXES = ("tun", "tap", "wg", "ppp", "utun", "ipsec", "vpn", "nordlynx", "proton")

#: Where "the internet" is, for working out which interface unmarked traffic takes now. Only looked up
#: in our own copy of the routing tables: nothing is ever sent there.
PROBE = {4: "8.8.8.8", 6: "2001:4860:4860::8888"}
_BITS = {4: 32, 6: 128}
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}


@dataclass(frozen=True, slots=True)
class Memory:
    """Last default-route uplink per family: {family: (interface name, gateway)}."""

    uplinks: dict[int, tuple[str, str]] = field(default_factory=dict)


# --- interfaces -------------------------------------------------------------------------------------


def classify(link: Link) -> str:
    """Kind of a link. The kernel's link kind wins; a backing device beats link-layer guesses (an LTE
    modem is raw-IP and point-to-point but is the machine's real uplink)."""
    if link.category:
        return link.category
    if link.flags & IFF_LOOPBACK or link.arptype == ARPHRD_LOOPBACK:
        return LOOPBACK
    if link.kind in TUNNEL_KINDS:
        return TUNNEL
    if link.kind == "bridge":
        return BRIDGE
    if link.has_device:
        return WIFI if link.wireless else PHYSICAL
    if link.arptype in TUNNEL_ARPHRD or link.flags & IFF_POINTOPOINT:
        return TUNNEL
    if not link.kind and link.name.startswith(TUNNEL_NAME_PREFIXES):
        return TUNNEL
    return VIRTUAL


def _ip_obj(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(address)
    except ValueError:
        return None


#: Text prefixes of addresses that never leave the link or the host (checked on canonical text: fast).
_NOT_ROUTABLE = {
    4: ("127.", "169.254.", "0."),
    6: ("fe8", "fe9", "fea", "feb", "ff", "::1", "::ffff:127."),
}
RT_SCOPE_LINK = 253


def routable(addr: Addr) -> bool:
    """Can this address be the source of traffic beyond the link? (Documentation and ULA ranges count.)

    Runs for every address at every refresh, so it looks at the kernel's scope and at text prefixes
    instead of building `ipaddress` objects.
    """
    if addr.scope >= RT_SCOPE_LINK or addr.address.startswith(_NOT_ROUTABLE.get(addr.family, ())):
        return False
    if addr.family == 6:
        return addr.address != "::" and not addr.flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED)
    return addr.family == 4


def first_routable(addrs: list[Addr], family: int) -> str:
    """First routable address of `family` in kernel order; a deprecated IPv6 address only as a last resort."""
    fallback = ""
    for a in addrs:
        if a.family != family or not routable(a):
            continue
        if family == 6 and a.flags & IFA_F_DEPRECATED:
            fallback = fallback or a.address
            continue
        return a.address
    return fallback


def build_interfaces(raw: RawState) -> list[InterfaceInfo]:
    per_link: dict[int, list[Addr]] = {}
    for a in raw.addrs:
        per_link.setdefault(a.index, []).append(a)
    out = []
    for link in sorted(raw.links, key=lambda x: x.index):
        addrs = per_link.get(link.index, [])
        kind = classify(link)
        up = bool(link.flags & IFF_UP) and bool(link.flags & IFF_RUNNING)
        out.append(
            InterfaceInfo(
                name=link.name,
                index=link.index,
                mac="" if link.mac in ("", "00:00:00:00:00:00") else link.mac.lower(),
                flags=tuple(flag_names(link.flags)),
                mtu=link.mtu,
                kind=kind,
                is_physical=kind in (PHYSICAL, WIFI),
                addresses=tuple(f"{a.address}/{a.prefixlen}" for a in addrs),
                ipv4=first_routable(addrs, 4),
                ipv6=first_routable(addrs, 6),
                up=up,
                operstate=link.operstate,
                link_kind=link.kind,
            )
        )
    return out


# --- routes and rules -------------------------------------------------------------------------------


def _to_int(family: int, address: str) -> int:
    return int.from_bytes(socket.inet_pton(_AF[family], address), "big")


def _covers(route: Route, family: int, target: int) -> bool:
    if route.dst_len == 0:
        return True
    shift = _BITS[family] - route.dst_len
    try:
        return _to_int(family, route.dst) >> shift == target >> shift
    except (OSError, ValueError):
        return False


def _rule_matches(rule: Rule, family: int, target: int, mark: int) -> bool:
    """Does a rule select a locally generated packet to `target` carrying `mark`?"""
    if rule.specific or rule.src_len or (rule.iif and rule.iif != "lo") or rule.oif:
        match = False  # judged on things a generic packet does not have
    else:
        match = (mark & rule.fwmask) == rule.fwmark if rule.fwmask else rule.fwmark == 0
        if match and rule.dst_len:
            match = _covers(Route(family, rule.dst, rule.dst_len, 0), family, target)
    return match != rule.invert


def lookup_table(routes: list[Route], table: int, family: int, target: int) -> Route | None:
    """Longest-prefix match in one table, lowest metric on a tie."""
    best: Route | None = None
    for r in routes:
        if r.table != table or r.family != family or not _covers(r, family, target):
            continue
        if best is None or (r.dst_len, -r.metric) > (best.dst_len, -best.metric):
            best = r
    return best


def default_rules(family: int) -> list[Rule]:
    return [Rule(family, 0, TABLE_LOCAL), Rule(family, 32766, TABLE_MAIN), Rule(family, 32767, 253)]


def route_for(raw: RawState, family: int, destination: str, mark: int = 0) -> Route | None:
    """The route the kernel would pick for a locally generated packet (policy rules applied)."""
    target = _to_int(family, destination)
    rules = sorted((r for r in raw.rules if r.family == family), key=lambda r: r.priority) or default_rules(family)
    for rule in rules:
        if not _rule_matches(rule, family, target, mark):
            continue
        if rule.action in (FR_ACT_BLACKHOLE, FR_ACT_UNREACHABLE, FR_ACT_PROHIBIT):
            return None
        if rule.action != FR_ACT_TO_TBL or rule.table == TABLE_LOCAL:
            continue
        found = lookup_table(raw.routes, rule.table, family, target)
        if found is None or found.type == RTN_THROW:
            continue
        if rule.suppress_prefixlen >= 0 and found.dst_len <= rule.suppress_prefixlen:
            continue
        if found.type in (RTN_UNREACHABLE, RTN_PROHIBIT, RTN_BLACKHOLE):
            return None
        return found
    return None


def reachable_tables(raw: RawState, family: int) -> set[int]:
    tables = {r.table for r in raw.rules if r.family == family and r.action == FR_ACT_TO_TBL}
    return (tables | {TABLE_MAIN}) - {TABLE_LOCAL}


def _prefix_text(route: Route) -> str:
    return "default" if route.dst_len == 0 else f"{route.dst}/{route.dst_len}"


def gateway_routes(raw: RawState, names: dict[int, str]) -> list[GatewayInfo]:
    out = []
    for family in (4, 6):
        tables = reachable_tables(raw, family)
        for r in raw.routes:
            if r.family == family and r.gateway and r.table in tables and r.type == RTN_UNICAST and r.oif in names:
                out.append(GatewayInfo(r.gateway, names[r.oif], _prefix_text(r), family, r.table, r.metric))
    out.sort(key=lambda g: (g.family, g.prefix != "default", g.table != TABLE_MAIN, g.metric, g.interface))
    return out


# --- uplinks ----------------------------------------------------------------------------------------


def _on_link(info: InterfaceInfo, family: int, gateway: str) -> bool:
    """Is `gateway` inside one of the interface's own networks (always true for IPv6 link-local)?"""
    gw = _ip_obj(gateway)
    if gw is None or gw.version != family:
        return False
    if gw.is_link_local:
        return True
    for text in info.addresses:
        try:
            if gw in ipaddress.ip_interface(text).network:
                return True
        except ValueError:
            continue
    return False


def choose_uplink(
    family: int,
    raw: RawState,
    candidates: dict[int, InterfaceInfo],
    memory: Memory,
) -> Uplink | None:
    """Rules 1-3 of the module docstring for one family (rule 4 needs both families: see decide)."""
    tables = reachable_tables(raw, family)
    usable = {i: info for i, info in candidates.items() if info.ip(family)}
    routes = [
        r for r in raw.routes if r.family == family and r.table in tables and r.type == RTN_UNICAST and r.oif in usable
    ]
    defaults = [r for r in routes if r.dst_len == 0]
    if defaults:
        best = min(
            defaults,
            key=lambda r: (not usable[r.oif].is_physical, not r.gateway, r.table != TABLE_MAIN, r.metric, r.oif),
        )
        return Uplink(family, usable[best.oif], best.gateway, FROM_DEFAULT)
    remembered = memory.uplinks.get(family)
    if remembered:
        name, gateway = remembered
        info = next((i for i in usable.values() if i.name == name), None)
        if info is not None and (not gateway or _on_link(info, family, gateway)):
            return Uplink(family, info, gateway, FROM_REMEMBERED)
    via = [r for r in routes if r.gateway]
    if via:
        best = min(via, key=lambda r: (not usable[r.oif].is_physical, -r.dst_len, r.metric, r.oif))
        return Uplink(family, usable[best.oif], best.gateway, FROM_GATEWAY_ROUTE)
    return None


def _router_neighbour(neighbours: list[Neighbour], family: int, index: int) -> str:
    found = [n.address for n in neighbours if n.family == family and n.index == index and n.router]
    # Prefer a link-local router address: that is what router advertisements announce.
    found.sort(key=lambda a: not a.lower().startswith("fe80:"))
    return found[0] if found else ""


def decide(raw: RawState, memory: Memory | None = None) -> tuple[Snapshot, Memory]:
    """The snapshot for `raw`, and the memory to pass to the next call."""
    memory = memory or Memory()
    interfaces = build_interfaces(raw)
    names = {i.index: i.name for i in interfaces}
    candidates = {i.index: i for i in interfaces if i.usable and i.kind not in (TUNNEL, LOOPBACK)}
    uplinks: dict[int, Uplink | None] = {f: choose_uplink(f, raw, candidates, memory) for f in (4, 6)}
    for family, other in ((4, 6), (6, 4)):
        theirs = uplinks[other]
        if uplinks[family] is None and theirs is not None and theirs.interface.ip(family):
            uplinks[family] = Uplink(family, theirs.interface, "", FROM_OTHER_FAMILY)
    gateways = gateway_routes(raw, names)
    remembered = dict(memory.uplinks)
    for family, up in list(uplinks.items()):
        if up is None:
            continue
        if up.origin == FROM_DEFAULT:
            remembered[family] = (up.interface.name, up.gateway)
        gateway, origin = up.gateway, ""
        if not gateway and family == 6:
            gateway = _router_neighbour(raw.neighbours, 6, up.interface.index)
            origin = FROM_NEIGHBOUR if gateway else ""
        if up.origin == FROM_REMEMBERED and gateway:
            origin = FROM_REMEMBERED
        if origin and not any(g.interface == up.interface.name and g.gateway == gateway for g in gateways):
            gateways.append(GatewayInfo(gateway, up.interface.name, "default", family, 0, 0, origin))
        if gateway != up.gateway:
            uplinks[family] = Uplink(family, up.interface, gateway, up.origin)
    default_route = {}
    for family in (4, 6):
        route = route_for(raw, family, PROBE[family])
        default_route[family] = names.get(route.oif, "") if route is not None else ""
    snapshot = Snapshot.build(interfaces, gateways, uplinks, default_route, raw.problems)
    return snapshot, Memory(remembered)
