"""The DNS servers a network interface was given, as the host's network software recorded them.

Split apps' queries go to the split interface's own DNS servers (the resolver, actors/resolver), unless
`splittun/splitDNS` names them. A VPN rewrites /etc/resolv.conf, so the interface's servers are read from
what configured the link, per interface, first source that has any:

1. systemd-resolved, per link: /run/systemd/resolve/netif/<ifindex> (`SERVERS=`), which is also where
   NetworkManager puts them on systemd-resolved hosts;
2. systemd-networkd, per link: /run/systemd/netif/links/<ifindex> (`DNS=`);
3. NetworkManager's internal DHCP client: /var/lib/NetworkManager/internal-*-<name>.lease (`DNS=`);
4. dhclient (ISC) leases: /var/lib/dhcp/dhclient*.leases and /var/lib/dhclient/*.lease[s], the last lease
   of the interface (`option domain-name-servers`).
Pure parsers plus one reader over a root directory (tests give a temporary one). Loopback, link-local
without a zone and unparsable entries are skipped.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

_DHCLIENT_GLOBS = ("var/lib/dhcp/dhclient*.leases", "var/lib/dhclient/*.lease", "var/lib/dhclient/*.leases")


def _address(entry: str) -> str:
    """One server entry ("192.0.2.1", "fe80::1%2", "[2001:db8::1]:53", "9.9.9.9#dns.quad9.net") → address."""
    text = entry.strip().split("#", 1)[0]
    if text.startswith("["):
        text = text[1:].split("]", 1)[0]
    elif text.count(":") == 1:  # a.b.c.d:port
        text = text.split(":", 1)[0]
    text = text.split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return ""
    if ip.is_loopback or ip.is_unspecified or ip.is_multicast or ip.is_link_local:
        return ""
    return str(ip)


def _servers(entries: list[str]) -> tuple[str, ...]:
    out: list[str] = []
    for entry in entries:
        address = _address(entry)
        if address and address not in out:
            out.append(address)
    return tuple(out)


def parse_key_file(text: str, key: str) -> tuple[str, ...]:
    """`KEY=a b c` lines of systemd's state files and NetworkManager's leases (commas allowed too)."""
    entries: list[str] = []
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() == key:
            entries += value.replace(",", " ").split()
    return _servers(entries)


def parse_dhclient_leases(text: str, interface: str) -> tuple[str, ...]:
    """The servers of the interface's last lease in a dhclient lease file."""
    found: tuple[str, ...] = ()
    for block in re.findall(r"lease\s*\{(.*?)\}", text, flags=re.S):
        if re.search(rf'interface\s+"{re.escape(interface)}"\s*;', block) is None:
            continue
        option = re.search(r"option\s+domain-name-servers\s+([^;]+);", block)
        if option:
            found = _servers(option.group(1).replace(",", " ").split())
    return found


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def link_dns_servers(ifindex: int, name: str, root: Path = Path("/")) -> tuple[tuple[str, ...], str]:
    """(servers, where they were found) for one interface; ((), "") when no source has any."""
    resolved = root / "run/systemd/resolve/netif" / str(ifindex)
    if servers := parse_key_file(_read(resolved), "SERVERS"):
        return servers, "systemd-resolved"
    networkd = root / "run/systemd/netif/links" / str(ifindex)
    if servers := parse_key_file(_read(networkd), "DNS"):
        return servers, "systemd-networkd"
    for lease in sorted((root / "var/lib/NetworkManager").glob(f"internal-*-{name}.lease")):
        if servers := parse_key_file(_read(lease), "DNS"):
            return servers, "NetworkManager"
    for pattern in _DHCLIENT_GLOBS:
        for lease in sorted(root.glob(pattern)):
            if servers := parse_dhclient_leases(_read(lease), name):
                return servers, "dhclient"
    return (), ""
