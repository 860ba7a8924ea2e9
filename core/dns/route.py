"""Where one DNS query goes: the path (VPN or split) and the upstream servers, decided from plain values.

The interceptor reroutes every DNS query of a local app to the resolver and puts in its mark the path the
app's own connections take (messages/marks.py: `nameserver_mark`). The resolver reads that mark and the
address the app asked from the query's conntrack entry and calls `route()`:

- a query of an app that stays in the VPN goes to the server it asked, through the VPN (or to the VPN's own
  servers when the VPN software reports them);
- a query of a split app goes to the split interface's DNS servers (`splittun/splitDNS`, else those netenv
  learned), out of the split interface; when none is known for a usable family, to the server the app asked,
  still out of the split interface — never into the VPN;
- a name under `splittun/vpnDomains` (an intranet behind the VPN) always resolves through the VPN.
A configured server may be `tls://ADDRESS[#NAME]`: DNS over TLS (`Server`).
Never: a VPN app's query outside the VPN, a split app's query inside it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from messages.marks import nameserver_path

VPN = "vpn"
SPLIT = "split"


@dataclass(frozen=True, slots=True)
class DnsRoute:
    """The path a query takes and the servers asked on it, in order (port 53)."""

    path: str  # VPN | SPLIT
    servers: tuple[str, ...]
    interface_index: int = 0  # split only: the interface the app's rule chose (0 = the global choice)
    reason: str = ""

    @property
    def key(self) -> tuple[str, int, tuple[str, ...]]:
        """What makes two routes give the same answers (the cache keeps them apart)."""
        return self.path, self.interface_index, self.servers


@dataclass(frozen=True, slots=True)
class NoRoute:
    """The query cannot be sent anywhere safe; why (answered SERVFAIL or REFUSED)."""

    reason: str


TLS_PREFIX = "tls://"
DOT_PORT = 853


@dataclass(frozen=True, slots=True)
class Server:
    """An upstream server as configured: an address (plain DNS, port 53), or `tls://ADDRESS[#NAME]`: DNS over
    TLS (port 853), the certificate checked for NAME (default: the address itself)."""

    address: str
    tls: bool = False
    name: str = ""

    @classmethod
    def parse(cls, text: str) -> Server:
        """ValueError (saying why) for anything but an IP address, optionally as tls://ADDRESS[#NAME]."""
        text = text.strip()
        tls = text.lower().startswith(TLS_PREFIX)
        rest = text[len(TLS_PREFIX) :] if tls else text
        address, _, name = rest.partition("#") if tls else (rest, "", "")
        try:
            ip = ipaddress.ip_address(address.strip("[]"))
        except ValueError:
            raise ValueError(f"{text!r} is not an IP address (or tls://ADDRESS[#NAME])") from None
        if name and not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", name):
            raise ValueError(f"{name!r} is not a host name")
        return cls(str(ip), tls, name.lower())

    def __str__(self) -> str:
        return f"{TLS_PREFIX}{self.address}" + (f"#{self.name}" if self.name else "") if self.tls else self.address


def family(server: str) -> int:
    """The IP version of a server (an address, or a tls:// one)."""
    return 6 if ":" in (server[len(TLS_PREFIX) :].partition("#")[0] if server.startswith(TLS_PREFIX) else server) else 4


def in_domains(name: str, domains: Iterable[str]) -> str:
    """The entry of `domains` that `name` is (or is under); "" for none. Names are compared lower case,
    without the trailing dot; an entry's leading dot is optional."""
    name = name.lower().rstrip(".")
    for domain in domains:
        base = domain.lower().strip(".")
        if base and (name == base or name.endswith("." + base)):
            return domain
    return ""


def route(
    qname: str,
    mark: int,
    asked: str,
    *,
    split_servers: Iterable[str] = (),
    split_families: Iterable[int] = (4, 6),
    vpn_servers: Iterable[str] = (),
    vpn_domains: Iterable[str] = (),
) -> DnsRoute | NoRoute:
    """The route of one query: `mark` is its conntrack mark (the interceptor's nameserver mark), `asked` the
    address the app sent it to ("" when unknown: someone asked the resolver directly), `split_families` the
    IP versions the split interface can send now."""
    where = nameserver_path(mark)
    if where is None or not asked:
        return NoRoute("not a query splittun rerouted (no nameserver mark or original destination)")
    split, index = where
    vpn = tuple(vpn_servers) or (asked,)
    if split and (domain := in_domains(qname, vpn_domains)):
        return DnsRoute(VPN, vpn, reason=f"vpnDomains: {domain}")
    if not split:
        return DnsRoute(VPN, vpn, reason="the app stays in the VPN")
    usable = set(split_families)
    servers = tuple(s for s in split_servers if family(s) in usable)
    if servers:
        return DnsRoute(SPLIT, servers, index, "the app is split: the split interface's DNS servers")
    if family(asked) in usable and not _local(asked):
        return DnsRoute(SPLIT, (asked,), index, "the app is split; no split DNS server known: the server it asked")
    return NoRoute("the app is split but no DNS server is reachable through the split interface")


def _local(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return True
    return ip.is_loopback or ip.is_link_local or ip.is_unspecified
