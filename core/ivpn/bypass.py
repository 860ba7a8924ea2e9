"""Bypass routes for other tunnels, and the pre-connect hooks they run from. Pure: plans, no I/O.

Some hosts must stay reachable outside the VPN while IVPN connects: another tunnel's or overlay network's
servers, whose packets may come from the kernel (a kernel WireGuard peer) with no process for the split tunnel
to attribute. `splittun/bypassHosts` lists them; while IVPN connects or holds its tunnel they are routed via
the physical gateway (netenv's uplink per family) through table 717 and its rule (kernel/routing.py
`BypassRouting`), kept through reconnects, removed on disconnect and on `splittun down`.

They are installed by the first user of a small, generic hook mechanism: `PreConnectHooks` run, in order and
synchronously, when IVPN starts connecting (before anything else hears of it); a hook may cancel the rest by
raising `PreConnectCancelled` with a one-line reason (then the caller says why and nothing further runs).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from core.egress import resolve_egress
from kernel.routing import HostRoute
from messages import NetenvChanged


class PreConnectCancelled(RuntimeError):
    """A pre-connect hook refuses; `str()` is one line saying why."""


@dataclass(frozen=True, slots=True)
class Refused:
    """A bypass plan that cannot be made: why, in one line."""

    reason: str


PreConnectHook = Callable[[], None]


class PreConnectHooks:
    """Named hooks run in registration order when a VPN starts connecting; the first that cancels stops them."""

    def __init__(self) -> None:
        self._hooks: list[tuple[str, PreConnectHook]] = []

    def register(self, name: str, hook: PreConnectHook) -> None:
        if any(n == name for n, _ in self._hooks):
            raise ValueError(f"pre-connect hook {name!r} is registered already")
        self._hooks.append((name, hook))

    def run(self) -> str:
        """Run every hook; "" when all ran, else "<hook>: <reason>" of the one that cancelled."""
        for name, hook in self._hooks:
            try:
                hook()
            except PreConnectCancelled as exc:
                return f"{name}: {exc}"
        return ""


def plan_bypass(hosts: Sequence[str], netenv: NetenvChanged | None) -> list[HostRoute] | Refused:
    """Host routes for `hosts` via the physical gateway of their IP version. Refused when the network is not
    known, when a family has more than one physical default gateway (which one would be "outside the VPN"
    is a guess), or when a host's family has no physical gateway at all."""
    if not hosts:
        return []
    if netenv is None:
        return Refused("the network is not known yet")
    egress = resolve_egress(netenv, "")
    routes = []
    for host in hosts:
        family = ipaddress.ip_network(host, strict=False).version
        defaults = sorted({(g.gateway, g.interface) for g in netenv.gateways
                           if g.family == family and g.prefix == "default" and g.gateway})  # fmt: skip
        if len(defaults) > 1:
            listed = ", ".join(f"{gw} on {iface}" for gw, iface in defaults)
            return Refused(f"IPv{family} has {len(defaults)} default gateways ({listed}): bypassHosts needs one")
        out = egress.for_family(family)
        if out is None or not out.gateway:
            return Refused(f"no physical IPv{family} gateway for {host}")
        routes.append(HostRoute(family, host, out.gateway, out.interface))
    return routes
