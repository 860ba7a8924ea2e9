"""netenv: interfaces, addresses, routes and gateways, and which physical link is the uplink.

Where it sits in the data path: a split connection leaves through the "uplink" (ARCHITECTURE.md, "Data paths"):
the proxies bind the upstream socket to that interface and the policy routing table sends it via that
interface's gateway. netenv is what knows both, per address family, also while a VPN owns the default
route. Two ways to ask:

- the library (this package; no actor needed, as the CLI and the proxies use it): `get_interface(x)`,
  `best_physical_default_interfaces()`, `gateways_info()`, `snapshot()`, backed by a cache refreshed at
  most once per second (cache.py);
- the actor (`python -m actors.netenv`, actors/netenv/actor.py): watches netlink and publishes `netenv.changed` with
  the whole snapshot after every change, so subscribers never have to ask.

Modules: raw.py (what the OS says) → linux.py / windows.py (reading it) → uplink.py (pure decisions) →
info.py (the answers) → cache.py (the shared snapshot); rtnl.py parses rtnetlink (its framing and socket
are kernel/netlink.py, shared with the other kernel interfaces). Split egress (which interface, source and
gateway split traffic uses) is core/egress.py.
"""

from __future__ import annotations

import ipaddress

from .cache import (
    Netenv,
    NetenvError,
    NotSupportedError,
    disable_network_derived_location,
    network_derived_location_disabled,
)
from .info import GatewayInfo, InterfaceInfo, Snapshot, Uplink

__all__ = [
    "GatewayInfo",
    "InterfaceInfo",
    "Netenv",
    "NetenvError",
    "NotSupportedError",
    "Snapshot",
    "Uplink",
    "best_physical_default_interfaces",
    "disable_network_derived_location",
    "gateways_info",
    "get_interface",
    "get_interface_by_ip",
    "get_interface_by_mac",
    "get_interface_by_name",
    "interface_location_addresses",
    "interfaces",
    "network_derived_location_disabled",
    "snapshot",
    "uplinks",
]

#: The process-wide cache every function below reads; nothing happens until the first call.
default = Netenv()


def snapshot() -> Snapshot:
    return default.snapshot()


def interfaces() -> tuple[InterfaceInfo, ...]:
    """Usable interfaces: up, with a routable address (loopback and link-local-only ones left out)."""
    return default.snapshot().interfaces


def get_interface(text: str) -> InterfaceInfo | None:
    """The usable interface with this IP address, else this MAC, else this name."""
    return default.snapshot().lookup(text)


def get_interface_by_ip(ip: str) -> InterfaceInfo | None:
    return default.snapshot().by_ip_text(ip)


def get_interface_by_mac(mac: str) -> InterfaceInfo | None:
    return default.snapshot().by_mac.get(mac.strip().lower().replace("-", ":"))


def get_interface_by_name(name: str) -> InterfaceInfo | None:
    return default.snapshot().by_name.get(name)


def gateways_info() -> tuple[GatewayInfo, ...]:
    """Every gateway: routes via a next hop (main and policy tables), plus inferred uplink gateways."""
    return default.snapshot().gateways


def uplinks() -> dict[str, Uplink | None]:
    """The uplink per family with its gateway and how it was found: {"ipv4": …, "ipv6": …}."""
    snap = default.snapshot()
    return {"ipv4": snap.uplink(4), "ipv6": snap.uplink(6)}


def best_physical_default_interfaces() -> dict[str, InterfaceInfo | None]:
    """Per family, the interface carrying the physical default route: {"ipv4": …, "ipv6": …}.

    Never a VPN or tunnel link; a physical adapter when one carries a gateway, else a non-tunnel
    virtual one (a container's or VM's veth) — `is_physical` says which.
    """
    snap = default.snapshot()
    return {key: (up.interface if up else None) for key, up in (("ipv4", snap.uplink(4)), ("ipv6", snap.uplink(6)))}


def interface_location_addresses() -> list[str]:
    """Public addresses on the uplinks: where the device is, as far as its interfaces tell.

    Empty while `disable_network_derived_location(True)` is in force (a VPN is connecting, and its
    addresses must not be taken for the device's location).
    """
    if network_derived_location_disabled():
        return []
    found: list[str] = []
    for up in uplinks().values():
        if up is None:
            continue
        for text in up.interface.addresses:
            address = text.split("/", 1)[0]
            if ipaddress.ip_address(address).is_global and address not in found:
                found.append(address)
    return found
