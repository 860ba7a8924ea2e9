"""Reading the Windows network state: GetAdaptersAddresses through ctypes, filtered by IfType.

Windows has no /proc and no rules; one call lists every adapter with its addresses and its default
gateways (GAA_FLAG_INCLUDE_GATEWAYS). That becomes the same `RawState` the Linux reader produces —
links pre-classified from IfType, a default route per gateway with the adapter's metric — so the uplink
choice is the same code on both systems:
- Ethernet (6) and Wi-Fi (71) adapters are physical, except VPN adapters that pose as Ethernet
  (TAP-Windows, Wintun, WireGuard… recognised by their description);
- tunnel (131), PPP (23) and proprietary virtual (53, Wintun/WireGuard) are tunnels: never an uplink;
- loopback (24) is left out; anything else is virtual.

The OS call sits behind `AdapterCall` so tests drive the walker with adapter lists built in memory
(this module imports and runs on Linux; only `WindowsSource()` itself needs Windows).
"""

from __future__ import annotations

import ctypes
import ipaddress
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .info import LOOPBACK, PHYSICAL, TUNNEL, VIRTUAL, WIFI
from .raw import IFF_LOWER_UP, IFF_POINTOPOINT, IFF_RUNNING, IFF_UP, Addr, Link, RawState, Route

AF_UNSPEC, AF_INET, AF_INET6 = 0, 2, 23  # Windows values (AF_INET6 is 23 there, not 10)
GAA_FLAG_SKIP_ANYCAST = 0x2
GAA_FLAG_SKIP_MULTICAST = 0x4
GAA_FLAG_SKIP_DNS_SERVER = 0x8
GAA_FLAG_INCLUDE_GATEWAYS = 0x80
GAA_FLAGS = GAA_FLAG_SKIP_ANYCAST | GAA_FLAG_SKIP_MULTICAST | GAA_FLAG_SKIP_DNS_SERVER | GAA_FLAG_INCLUDE_GATEWAYS
ERROR_SUCCESS, ERROR_BUFFER_OVERFLOW, ERROR_NO_DATA = 0, 111, 232

IF_TYPE_ETHERNET_CSMACD = 6
IF_TYPE_PPP = 23
IF_TYPE_SOFTWARE_LOOPBACK = 24
IF_TYPE_PROP_VIRTUAL = 53
IF_TYPE_IEEE80211 = 71
IF_TYPE_TUNNEL = 131
IF_OPER_STATUS_UP = 1
IP_DAD_STATE_PREFERRED = 4
IP_DAD_STATE_DEPRECATED = 3

#: Descriptions of VPN adapters that report IfType Ethernet.
VPN_DESCRIPTION_WORDS = ("tap-windows", "wintun", "wireguard", "openvpn", "vpn", "tap adapter")


class SOCKADDR(ctypes.Structure):
    _fields_ = (("sa_family", ctypes.c_ushort), ("sa_data", ctypes.c_ubyte * 14))


class SOCKADDR_IN6(ctypes.Structure):
    _fields_ = (
        ("sin6_family", ctypes.c_ushort),
        ("sin6_port", ctypes.c_ushort),
        ("sin6_flowinfo", ctypes.c_ulong),
        ("sin6_addr", ctypes.c_ubyte * 16),
        ("sin6_scope_id", ctypes.c_ulong),
    )


class SOCKET_ADDRESS(ctypes.Structure):
    _fields_ = (("lpSockaddr", ctypes.POINTER(SOCKADDR)), ("iSockaddrLength", ctypes.c_int))


class IP_ADAPTER_UNICAST_ADDRESS(ctypes.Structure):
    pass


IP_ADAPTER_UNICAST_ADDRESS._fields_ = (
    ("Length", ctypes.c_ulong),
    ("Flags", ctypes.c_ulong),
    ("Next", ctypes.POINTER(IP_ADAPTER_UNICAST_ADDRESS)),
    ("Address", SOCKET_ADDRESS),
    ("PrefixOrigin", ctypes.c_int),
    ("SuffixOrigin", ctypes.c_int),
    ("DadState", ctypes.c_int),
    ("ValidLifetime", ctypes.c_ulong),
    ("PreferredLifetime", ctypes.c_ulong),
    ("LeaseLifetime", ctypes.c_ulong),
    ("OnLinkPrefixLength", ctypes.c_ubyte),
)


class IP_ADAPTER_GATEWAY_ADDRESS(ctypes.Structure):
    pass


IP_ADAPTER_GATEWAY_ADDRESS._fields_ = (
    ("Length", ctypes.c_ulong),
    ("Reserved", ctypes.c_ulong),
    ("Next", ctypes.POINTER(IP_ADAPTER_GATEWAY_ADDRESS)),
    ("Address", SOCKET_ADDRESS),
)


class IP_ADAPTER_ADDRESSES(ctypes.Structure):
    """IP_ADAPTER_ADDRESSES_LH up to the metrics: the walker never reads past them, and every adapter is
    reached through `Next`, so the rest of the (longer) real structure does not need declaring."""


IP_ADAPTER_ADDRESSES._fields_ = (
    ("Length", ctypes.c_ulong),
    ("IfIndex", ctypes.c_ulong),
    ("Next", ctypes.POINTER(IP_ADAPTER_ADDRESSES)),
    ("AdapterName", ctypes.c_char_p),
    ("FirstUnicastAddress", ctypes.POINTER(IP_ADAPTER_UNICAST_ADDRESS)),
    ("FirstAnycastAddress", ctypes.c_void_p),
    ("FirstMulticastAddress", ctypes.c_void_p),
    ("FirstDnsServerAddress", ctypes.c_void_p),
    ("DnsSuffix", ctypes.c_wchar_p),
    ("Description", ctypes.c_wchar_p),
    ("FriendlyName", ctypes.c_wchar_p),
    ("PhysicalAddress", ctypes.c_ubyte * 8),
    ("PhysicalAddressLength", ctypes.c_ulong),
    ("Flags", ctypes.c_ulong),
    ("Mtu", ctypes.c_ulong),
    ("IfType", ctypes.c_ulong),
    ("OperStatus", ctypes.c_int),
    ("Ipv6IfIndex", ctypes.c_ulong),
    ("ZoneIndices", ctypes.c_ulong * 16),
    ("FirstPrefix", ctypes.c_void_p),
    ("TransmitLinkSpeed", ctypes.c_uint64),
    ("ReceiveLinkSpeed", ctypes.c_uint64),
    ("FirstWinsServerAddress", ctypes.c_void_p),
    ("FirstGatewayAddress", ctypes.POINTER(IP_ADAPTER_GATEWAY_ADDRESS)),
    ("Ipv4Metric", ctypes.c_ulong),
    ("Ipv6Metric", ctypes.c_ulong),
)


@dataclass(slots=True)
class Adapter:
    """One adapter as read from the OS structures (plain Python, for the pure part)."""

    index: int
    name: str  # FriendlyName ("Wi-Fi", "Ethernet 2"): what users see and type
    description: str
    if_type: int
    oper_up: bool
    mtu: int
    mac: str
    ipv6_index: int = 0
    ipv4_metric: int = 0
    ipv6_metric: int = 0
    addresses: list[tuple[str, int, int]] = field(default_factory=list)  # (address, prefix len, DAD state)
    gateways: list[str] = field(default_factory=list)


# --- walking the structures (pure over memory) ------------------------------------------------------


def sockaddr_text(sa: SOCKET_ADDRESS) -> str:
    """Text of a SOCKET_ADDRESS (IPv4 or IPv6, Windows family numbers); "" for anything else."""
    if not sa.lpSockaddr:
        return ""
    base = sa.lpSockaddr.contents
    if base.sa_family == AF_INET:
        return str(ipaddress.IPv4Address(bytes(base.sa_data[2:6])))
    if base.sa_family == AF_INET6:
        six = ctypes.cast(sa.lpSockaddr, ctypes.POINTER(SOCKADDR_IN6)).contents
        return str(ipaddress.IPv6Address(bytes(six.sin6_addr)))
    return ""


def _chain(first: object) -> Iterator[object]:
    node = first
    while node:
        item = node.contents  # type: ignore[attr-defined]
        yield item
        node = item.Next


def walk_adapters(first: ctypes._Pointer[IP_ADAPTER_ADDRESSES]) -> list[Adapter]:  # type: ignore[name-defined]
    out = []
    for a in _chain(first):
        mac_len = min(int(a.PhysicalAddressLength), 8)  # type: ignore[attr-defined]
        adapter = Adapter(
            index=int(a.IfIndex) or int(a.Ipv6IfIndex),  # type: ignore[attr-defined]  # 0 when IPv4 is off
            name=a.FriendlyName or (a.AdapterName or b"").decode(errors="replace"),  # type: ignore[attr-defined]
            description=a.Description or "",  # type: ignore[attr-defined]
            if_type=int(a.IfType),  # type: ignore[attr-defined]
            oper_up=a.OperStatus == IF_OPER_STATUS_UP,  # type: ignore[attr-defined]
            mtu=int(a.Mtu),  # type: ignore[attr-defined]
            mac=bytes(a.PhysicalAddress[:mac_len]).hex(":") if mac_len == 6 else "",  # type: ignore[attr-defined]
            ipv6_index=int(a.Ipv6IfIndex),  # type: ignore[attr-defined]
            ipv4_metric=int(a.Ipv4Metric),  # type: ignore[attr-defined]
            ipv6_metric=int(a.Ipv6Metric),  # type: ignore[attr-defined]
        )
        for u in _chain(a.FirstUnicastAddress):  # type: ignore[attr-defined]
            text = sockaddr_text(u.Address)  # type: ignore[attr-defined]
            if text:
                adapter.addresses.append((text, int(u.OnLinkPrefixLength), int(u.DadState)))  # type: ignore[attr-defined]
        for g in _chain(a.FirstGatewayAddress):  # type: ignore[attr-defined]
            text = sockaddr_text(g.Address)  # type: ignore[attr-defined]
            if text:
                adapter.gateways.append(text)
        out.append(adapter)
    return out


# --- adapters → RawState (pure) ---------------------------------------------------------------------


def category(adapter: Adapter) -> str:
    if adapter.if_type == IF_TYPE_SOFTWARE_LOOPBACK:
        return LOOPBACK
    if adapter.if_type in (IF_TYPE_TUNNEL, IF_TYPE_PPP, IF_TYPE_PROP_VIRTUAL):
        return TUNNEL
    if adapter.if_type in (IF_TYPE_ETHERNET_CSMACD, IF_TYPE_IEEE80211):
        if any(word in adapter.description.lower() for word in VPN_DESCRIPTION_WORDS):
            return TUNNEL
        return WIFI if adapter.if_type == IF_TYPE_IEEE80211 else PHYSICAL
    return VIRTUAL


def to_raw(adapters: list[Adapter]) -> RawState:
    raw = RawState()
    for ad in adapters:
        kind = category(ad)
        flags = (IFF_UP | IFF_RUNNING | IFF_LOWER_UP) if ad.oper_up else 0
        if kind == TUNNEL:
            flags |= IFF_POINTOPOINT
        link = Link(ad.index, ad.name, ad.mac, ad.mtu, flags, operstate="up" if ad.oper_up else "down")
        link.has_device, link.wireless, link.category = kind in (PHYSICAL, WIFI), kind == WIFI, kind
        raw.links.append(link)
        for address, prefixlen, dad in ad.addresses:
            family = 6 if ":" in address else 4
            flags_a = 0 if dad in (IP_DAD_STATE_PREFERRED, IP_DAD_STATE_DEPRECATED) else 0x40  # not yet usable
            if dad == IP_DAD_STATE_DEPRECATED:
                flags_a |= 0x20
            raw.addrs.append(Addr(ad.index, family, address, prefixlen, 0, flags_a))
        for gw in ad.gateways:
            family = 6 if ":" in gw else 4
            metric = ad.ipv6_metric if family == 6 else ad.ipv4_metric
            raw.routes.append(Route(family, "", 0, ad.index, gw, 254, metric))
    return raw


# --- the OS call ------------------------------------------------------------------------------------

#: (family, flags, buffer or None, size in/out) -> Windows error code; `GetAdaptersAddresses` itself.
AdapterCall = Callable[[int, int, object, object], int]


def get_adapters(call: AdapterCall) -> list[Adapter]:
    """Call GetAdaptersAddresses with a growing buffer (the documented retry on ERROR_BUFFER_OVERFLOW)."""
    size = ctypes.c_ulong(16 * 1024)
    for _ in range(4):
        buf = ctypes.create_string_buffer(size.value)
        err = call(AF_UNSPEC, GAA_FLAGS, buf, ctypes.byref(size))
        if err == ERROR_SUCCESS:
            return walk_adapters(ctypes.cast(buf, ctypes.POINTER(IP_ADAPTER_ADDRESSES)))
        if err == ERROR_NO_DATA:
            return []
        if err != ERROR_BUFFER_OVERFLOW:
            raise OSError(err, f"GetAdaptersAddresses failed with error {err}")
    raise OSError(ERROR_BUFFER_OVERFLOW, "GetAdaptersAddresses: adapter list kept growing")


class WindowsSource:
    def __init__(self, call: AdapterCall | None = None) -> None:
        if call is None:
            iphlpapi = ctypes.WinDLL("iphlpapi")  # type: ignore[attr-defined]
            fn = iphlpapi.GetAdaptersAddresses
            fn.restype = ctypes.c_ulong

            def call(family: int, flags: int, buf: object, size: object) -> int:
                return fn(family, flags, None, buf, size)

        self.call = call

    def read(self) -> RawState:
        return to_raw(get_adapters(self.call))

    def close(self) -> None:
        pass
