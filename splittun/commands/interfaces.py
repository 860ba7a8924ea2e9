"""`splittun interfaces`: the interfaces, their gateways, and which one split traffic leaves through.

Answered by the netenv library in this process, so it works without the actors running (and without
root): it reads the network namespace the command runs in.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from splittun.output import table

from . import FAILED, OK, UserError

FAMILIES = (("ipv4", 4), ("ipv6", 6))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "interfaces", help="network interfaces, gateways, and the uplink split traffic leaves through per family"
    )
    p.add_argument("--all", action="store_true", help="also down, loopback and address-less links")
    p.add_argument("--json", action="store_true", help='{"interfaces": [...], "uplink": {"ipv4": …, "ipv6": …}, …}')
    p.set_defaults(func=cmd_interfaces)


def _snapshot() -> Any:
    from core.netenv import NetenvError, snapshot

    try:
        return snapshot()
    except NetenvError as exc:
        raise UserError(str(exc), FAILED) from None


def _gateways_of(snap: Any, name: str) -> list[str]:
    """Next hops on one interface: the uplink's own first, then default routes, then other routes."""
    out: list[str] = []
    for _, family in FAMILIES:
        up = snap.uplink(family)
        if up and up.interface.name == name and up.gateway:
            out.append(up.gateway)
    for g in snap.gateways:
        if g.interface == name and g.gateway not in out and g.prefix == "default":
            out.append(g.gateway)
    return out


def _uplink_families(snap: Any) -> dict[str, list[str]]:
    """Interface name → the families ("ipv4", "ipv6") it is the uplink of."""
    uplink_of: dict[str, list[str]] = {}
    for key, family in FAMILIES:
        up = snap.uplink(family)
        if up:
            uplink_of.setdefault(up.interface.name, []).append(key)
    return uplink_of


def to_json(snap: Any, show_all: bool) -> dict[str, Any]:
    uplink_of = _uplink_families(snap)
    rows = []
    for info in snap.all_interfaces if show_all else snap.interfaces:
        row = info.to_record().to_wire()
        row.update(usable=info.usable, up=info.up, uplink=uplink_of.get(info.name, []))
        rows.append(row)
    uplink, gateway, origin = {}, {}, {}
    for key, family in FAMILIES:
        up = snap.uplink(family)
        uplink[key] = up.interface.name if up else None
        gateway[key] = (up.gateway or None) if up else None
        origin[key] = up.origin if up else None
    return {
        "interfaces": rows,
        "uplink": uplink,
        "uplink_gateway": gateway,
        "uplink_found_by": origin,
        "default_route": {key: snap.default_route.get(family) or None for key, family in FAMILIES},
        "gateways": [g.to_record().to_wire() for g in snap.gateways],
    }


def render(snap: Any, show_all: bool) -> str:
    uplink_of = _uplink_families(snap)
    rows = []
    for info in snap.all_interfaces if show_all else snap.interfaces:
        rows.append(
            [
                info.name,
                info.kind,
                "yes" if info.is_physical else "no",
                ("up" if info.up else "down") if show_all else None,
                " ".join(info.addresses) or "-",
                " ".join(_gateways_of(snap, info.name)) or "-",
                ",".join(uplink_of.get(info.name, [])) or "-",
            ]
        )
    headers = ["NAME", "KIND", "PHYSICAL", "STATE", "ADDRESSES", "GATEWAY", "UPLINK"]
    if not show_all:
        headers.pop(3)
        rows = [r[:3] + r[4:] for r in rows]
    lines = [table(headers, rows) if rows else "no usable interfaces (up, with a routable address)"]
    lines.append("")
    for key, family in FAMILIES:
        up = snap.uplink(family)
        label = f"uplink {key}:"
        if up is None:
            lines.append(f"{label:<13} none")
            continue
        via = f" via {up.gateway}" if up.gateway else " (no gateway known)"
        how = up.origin
        for g in snap.gateways:
            if (g.family, g.interface, g.gateway) == (family, up.interface.name, up.gateway) and g.origin != "route":
                how += f", gateway: {g.origin}"  # remembered, or an IPv6 router neighbour
                break
        lines.append(f"{label:<13} {up.interface.name}{via}  [{how}]")
    now = ", ".join(f"{key} {snap.default_route.get(family) or 'none'}" for key, family in FAMILIES)
    lines.append(f"default now:  {now}")
    return "\n".join(lines)


def cmd_interfaces(args: argparse.Namespace) -> int:
    snap = _snapshot()
    if args.json:
        print(json.dumps(to_json(snap, args.all)))
    else:
        print(render(snap, args.all))
    return OK
