"""Which interface, source address and gateway split traffic leaves through (pure: snapshot in, answer out).

Shared by the proxies (how an upstream socket leaves), the interceptor (whether a split connection has
somewhere to go, and the interface index it puts in the split mark) and the controller (does a named
interface exist).

The choice is Portmaster's `splittun/interface`: "" = auto (the interface carrying the physical default
route, per family), otherwise an interface name, one of its IP addresses or its MAC. It is resolved
against the latest netenv snapshot; for standalone use `static_egress` takes the values directly.
`split_egresses` adds the interfaces rules choose for themselves: what the proxies bind to and what the
interceptor routes (kernel/routing.py) come from that one function.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from core.netenv.info import normalize_mac
from kernel.routing import SplitRoute
from messages.events import InterfaceRecord, NetenvChanged, PolicySnapshot


@dataclass(frozen=True, slots=True)
class Egress:
    family: int  # 4 | 6
    interface: str
    source: str = ""  # the interface's address to bind; "" = let the kernel pick on that device
    gateway: str = ""  # next hop for the split routing table; "" only for point-to-point devices
    ifindex: int = 0
    point_to_point: bool = False


@dataclass(frozen=True, slots=True)
class EgressSet:
    """The egress per address family, plus why a family has none (for refusals and logs)."""

    v4: Egress | None = None
    v6: Egress | None = None
    reason: str = ""  # why v4/v6 is missing when no family-specific reason is given
    reasons: dict[int, str] = field(default_factory=dict)

    def for_family(self, family: int) -> Egress | None:
        return self.v4 if family == 4 else self.v6

    def why(self, family: int) -> str:
        return self.reasons.get(family) or self.reason or f"no split interface for IPv{family}"

    def all(self) -> list[Egress]:
        return [e for e in (self.v4, self.v6) if e is not None]


def static_egress(
    interface: str, *, source4: str = "", gateway4: str = "", source6: str = "", gateway6: str = ""
) -> EgressSet:
    """An egress given by hand (library use without netenv); a family without a gateway is left out."""
    v4 = Egress(4, interface, source4, gateway4) if gateway4 else None
    v6 = Egress(6, interface, source6, gateway6) if gateway6 else None
    reasons = {f: f"no IPv{f} gateway given for {interface}" for f, e in ((4, v4), (6, v6)) if e is None}
    return EgressSet(v4=v4, v6=v6, reasons=reasons)


def find_interface(netenv: NetenvChanged, choice: str) -> InterfaceRecord | None:
    """The interface named by `choice`: its name, one of its addresses or its MAC."""
    choice = choice.strip()
    for iface in netenv.interfaces:
        if iface.name == choice:
            return iface
    try:
        wanted_ip = ipaddress.ip_address(choice.split("%", 1)[0])
    except ValueError:
        wanted_ip = None
    if wanted_ip is not None:
        for iface in netenv.interfaces:
            addrs = [a.split("/", 1)[0] for a in iface.addresses] + [iface.ipv4, iface.ipv6]
            for addr in addrs:
                try:
                    if addr and ipaddress.ip_address(addr.split("%", 1)[0]) == wanted_ip:
                        return iface
                except ValueError:
                    continue
        return None
    mac = normalize_mac(choice)
    for iface in netenv.interfaces:
        if iface.mac and normalize_mac(iface.mac) == mac:
            return iface
    return None


def _gateway(netenv: NetenvChanged, interface: str, family: int) -> str:
    found = [g for g in netenv.gateways if g.interface == interface and g.family == family and g.gateway]
    found.sort(key=lambda g: (g.prefix not in ("default", "0.0.0.0/0", "::/0"), g.table != 254))
    return found[0].gateway if found else ""


def _source(iface: InterfaceRecord, family: int, chosen_ip: str) -> str:
    if chosen_ip and (":" in chosen_ip) == (family == 6):
        return chosen_ip
    return iface.ipv4 if family == 4 else iface.ipv6


def resolve_egress(netenv: NetenvChanged | None, choice: str = "") -> EgressSet:
    """Resolve the configured interface choice against a netenv snapshot, per family."""
    if netenv is None:
        return EgressSet(reason="no network environment yet")
    chosen_ip = ""
    per_family: dict[int, InterfaceRecord | None] = {}
    reasons: dict[int, str] = {}
    if choice.strip():
        iface = find_interface(netenv, choice)
        if iface is None:
            return EgressSet(reason=f"split interface {choice!r} not found")
        try:
            ipaddress.ip_address(choice.strip().split("%", 1)[0])
            chosen_ip = choice.strip()
        except ValueError:
            pass
        per_family = {4: iface, 6: iface}
    else:
        for family, name in ((4, netenv.uplink_ipv4), (6, netenv.uplink_ipv6)):
            per_family[family] = next((i for i in netenv.interfaces if i.name == name), None) if name else None
            if per_family[family] is None:
                reasons[family] = f"no physical IPv{family} uplink"
    out: dict[int, Egress | None] = {4: None, 6: None}
    for family, iface in per_family.items():
        if iface is None:
            continue
        source = _source(iface, family, chosen_ip)
        if not source:
            reasons[family] = f"{iface.name} has no IPv{family} address"
            continue
        p2p = "POINTOPOINT" in {f.upper() for f in iface.flags}
        gateway = ""
        if iface.name == (netenv.uplink_ipv4 if family == 4 else netenv.uplink_ipv6):
            # netenv knows the uplink's next hop even while a VPN owns the default route
            gateway = netenv.uplink_gateway_ipv4 if family == 4 else netenv.uplink_gateway_ipv6
        gateway = gateway or _gateway(netenv, iface.name, family)
        if not gateway and not p2p:
            reasons[family] = f"no IPv{family} gateway on {iface.name}"
            continue
        out[family] = Egress(family, iface.name, source, gateway, iface.index, p2p)
    return EgressSet(v4=out[4], v6=out[6], reasons=reasons)


@dataclass(frozen=True, slots=True)
class SplitEgresses:
    """Every egress split traffic may use under one policy: the global choice's, every interface's by index
    (a split mark may name any of them), and the indexes of the interfaces rules name."""

    chosen: EgressSet
    by_index: dict[int, EgressSet] = field(default_factory=dict)
    used: frozenset[int] = frozenset()

    def in_use(self) -> list[Egress]:
        """The egresses split connections leave through: the global choice's, then the rules' interfaces'."""
        return [*self.chosen.all(), *(e for index in sorted(self.used) for e in self.by_index[index].all())]


def split_egresses(netenv: NetenvChanged | None, choice: str, rule_interfaces: Iterable[str] = ()) -> SplitEgresses:
    """The egresses for the global interface `choice` and the interfaces rules name, against `netenv`."""
    chosen = resolve_egress(netenv, choice)
    if netenv is None:
        return SplitEgresses(chosen)
    by_index = {iface.index: resolve_egress(netenv, iface.name) for iface in netenv.interfaces}
    used = frozenset(iface.index for spec in rule_interfaces if (iface := find_interface(netenv, spec)))
    return SplitEgresses(chosen, by_index, used)


# --- the split routing table for these egresses (installed by kernel/routing.py) --------------------


def plan_routes(egresses: Iterable[Egress]) -> list[SplitRoute]:
    """The split table's routes for these egresses (one per family and interface)."""
    routes: dict[tuple[int, str], SplitRoute] = {}
    for e in egresses:
        if e.gateway or e.point_to_point:
            routes[(e.family, e.interface)] = SplitRoute(e.family, e.interface, e.gateway, e.ifindex)
    return sorted(routes.values(), key=lambda r: (r.family, r.interface))


def split_routes(netenv: NetenvChanged | None, policy: PolicySnapshot | None) -> list[SplitRoute] | None:
    """The split table for this network and policy: a route for the global interface choice and for every
    interface a rule names (the proxies resolve the same egresses: `split_egresses`).
    None while the network or the policy is not known yet: then nothing is to be changed."""
    if netenv is None or policy is None:
        return None
    rule_interfaces = [r.interface for r in policy.rules if r.interface]
    return plan_routes(split_egresses(netenv, policy.interface, rule_interfaces).in_use())


def kernel_routes(netenv: NetenvChanged | None, policy: PolicySnapshot | None) -> list[SplitRoute] | None:
    """The kernel data path's tables for this network and policy: the global choice's routes for split
    marks with index 0, and each rule interface's routes for marks with its index (kernel/routing.py
    `KernelPathRouting`). None while the network or the policy is not known yet."""
    if netenv is None or policy is None:
        return None
    rule_interfaces = [r.interface for r in policy.rules if r.interface]
    egresses = split_egresses(netenv, policy.interface, rule_interfaces)
    routes = [dataclasses.replace(r, mark_index=0) for r in plan_routes(egresses.chosen.all())]
    for index in sorted(egresses.used):
        routes += [dataclasses.replace(r, mark_index=index) for r in plan_routes(egresses.by_index[index].all())]
    return routes
