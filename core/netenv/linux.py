"""Reading the Linux network state: rtnetlink, /sys and /proc, with injectable roots.

Where each fact comes from, and why:
- links, addresses, policy rules, IPv6 router neighbours: rtnetlink (rtnl.py). /proc has no IPv4
  addresses and no rules at all.
- routes: rtnetlink too, every table but `local`, each route with its table. A wg-quick or policy-routed
  VPN is only visible through rules and their tables, and /proc/net/ipv6_route lists the routes of
  every table as if they were one (a VPN's private default looks like the main default there).
  /proc/net/route (main table) and /proc/net/ipv6_route are the fallback when the route dump fails,
  and tests check them against the netlink view of every recorded fixture tree.
- physical or not: /sys/class/net/NAME/device exists only for links backed by a (possibly virtual)
  hardware device; /sys/class/net/NAME/wireless or phy80211 marks Wi-Fi. Nothing else has it.

A fixture tree is a directory with proc/, sys/ and netlink.json (a `RawState` in JSON standing for
the netlink answers); `LinuxSource.from_tree(path)` reads it through exactly the same code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sys
from pathlib import Path
from typing import Protocol

from kernel.netlink import NetlinkError

from . import rtnl
from .raw import (
    TABLE_MAIN,
    Addr,
    Link,
    Neighbour,
    RawState,
    Route,
    Rule,
)

RTF_GATEWAY = 0x0002
RTF_REJECT = 0x0200
RTF_ANYCAST = 0x00100000
RTF_CACHE = 0x01000000
RTF_LOCAL = 0x80000000


# --- /proc parsers (pure) ---------------------------------------------------------------------------


def _hex_ipv4(text: str, byteorder: str) -> str:
    """/proc/net/route prints the network-order address as a host-order u32 in hex."""
    return socket.inet_ntoa(int(text, 16).to_bytes(4, byteorder))  # type: ignore[arg-type]


def _prefix_len(mask: int) -> int | None:
    """Prefix length of a netmask given in network byte order as an int; None when not contiguous."""
    length = bin(mask).count("1")
    return length if mask == ((0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF) else None


def parse_proc_route(text: str, names: dict[str, int], byteorder: str = sys.byteorder) -> tuple[list[Route], list[str]]:
    """/proc/net/route → main-table IPv4 routes (reject routes left out), plus one note per odd line."""
    routes: list[Route] = []
    problems: list[str] = []
    for number, line in enumerate(text.splitlines()[1:], start=2):
        fields = line.split()
        if not fields:
            continue
        try:
            iface, dst, gw, flags, _ref, _use, metric, mask = fields[:8]
            flag_bits = int(flags, 16)
            if flag_bits & RTF_REJECT:
                continue
            mask_net = int.from_bytes(int(mask, 16).to_bytes(4, byteorder), "big")  # type: ignore[arg-type]
            dst_len = _prefix_len(mask_net)
            if dst_len is None:
                raise ValueError(f"netmask {mask} is not contiguous")
            index = names.get(iface)
            if index is None:
                problems.append(f"/proc/net/route line {number}: unknown interface {iface!r}")
                continue
            gateway = _hex_ipv4(gw, byteorder) if flag_bits & RTF_GATEWAY else ""
            network = "" if dst_len == 0 else _hex_ipv4(dst, byteorder)
            routes.append(Route(4, network, dst_len, index, gateway, TABLE_MAIN, int(metric)))
        except (ValueError, OverflowError) as exc:
            problems.append(f"/proc/net/route line {number}: {exc}: {line.strip()[:80]!r}")
    return routes, problems


def _hex_ipv6(text: str) -> str:
    if len(text) != 32:
        raise ValueError(f"bad IPv6 address {text!r}")
    return socket.inet_ntop(socket.AF_INET6, bytes.fromhex(text))


def parse_proc_ipv6_route(text: str, names: dict[str, int]) -> tuple[list[Route], list[str]]:
    """/proc/net/ipv6_route → IPv6 routes of every table, all labelled main (the file cannot tell).

    Left out: reject routes (including the kernel's per-table "no route" placeholder), local and
    anycast entries, and cached clones.
    """
    routes: list[Route] = []
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 10:
                raise ValueError(f"{len(fields)} fields, expected 10")
            dst, dst_len, _src, _src_len, nexthop, metric, _ref, _use, flags, iface = fields
            flag_bits = int(flags, 16)
            if flag_bits & (RTF_REJECT | RTF_LOCAL | RTF_ANYCAST | RTF_CACHE):
                continue
            index = names.get(iface)
            if index is None:
                problems.append(f"/proc/net/ipv6_route line {number}: unknown interface {iface!r}")
                continue
            length = int(dst_len, 16)
            if length > 128:
                raise ValueError(f"prefix length {length}")
            gateway = _hex_ipv6(nexthop) if flag_bits & RTF_GATEWAY else ""
            routes.append(
                Route(6, "" if length == 0 else _hex_ipv6(dst), length, index, gateway, TABLE_MAIN, int(metric, 16))
            )
        except ValueError as exc:
            problems.append(f"/proc/net/ipv6_route line {number}: {exc}: {line.strip()[:80]!r}")
    return routes, problems


# --- netlink side -----------------------------------------------------------------------------------


class NetlinkReader(Protocol):
    def links(self) -> list[Link]: ...
    def addrs(self) -> list[Addr]: ...
    def rules(self) -> list[Rule]: ...
    def routes(self) -> list[Route]: ...
    def neighbours(self) -> list[Neighbour]: ...


class LiveNetlink:
    """Dumps from the kernel of the network namespace this process is in."""

    def __init__(self) -> None:
        self._sock: rtnl.Rtnl | None = None

    def _dump(self, msg_type: int, family: int = 0) -> list[memoryview]:
        if self._sock is None:
            self._sock = rtnl.Rtnl()
        try:
            return self._sock.dump(msg_type, family)
        except NetlinkError:
            self.close()  # a half-read dump leaves the socket unusable: start clean next time
            raise

    def links(self) -> list[Link]:
        return [rtnl.parse_link(p) for p in self._dump(rtnl.RTM_GETLINK)]

    def addrs(self) -> list[Addr]:
        return [a for p in self._dump(rtnl.RTM_GETADDR) if (a := rtnl.parse_addr(p)) is not None]

    def rules(self) -> list[Rule]:
        return [r for p in self._dump(rtnl.RTM_GETRULE) if (r := rtnl.parse_rule(p)) is not None]

    def routes(self) -> list[Route]:
        """Every table but local (its host and broadcast entries are skipped before parsing)."""
        return [r for p in self._dump(rtnl.RTM_GETROUTE) if (r := rtnl.parse_route(p)) is not None]

    def neighbours(self) -> list[Neighbour]:
        dump = self._dump(rtnl.RTM_GETNEIGH, socket.AF_INET6)
        return [n for p in dump if (n := rtnl.parse_neighbour(p)) is not None]

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


class RecordedNetlink:
    """The netlink answers of a fixture tree (netlink.json)."""

    def __init__(self, state: RawState) -> None:
        self.state = state

    def links(self) -> list[Link]:
        return [dataclasses.replace(link) for link in self.state.links]  # read() fills in sysfs facts

    def addrs(self) -> list[Addr]:
        return list(self.state.addrs)

    def rules(self) -> list[Rule]:
        return list(self.state.rules)

    def routes(self) -> list[Route]:
        if not self.state.routes:
            raise OSError("no routes recorded")  # a tree without them exercises the /proc fallback
        return list(self.state.routes)

    def neighbours(self) -> list[Neighbour]:
        return list(self.state.neighbours)

    def close(self) -> None:
        pass


# --- the source -------------------------------------------------------------------------------------


class LinuxSource:
    """Reads one `RawState`. Links and addresses are required; everything else degrades with a note."""

    def __init__(
        self,
        proc_root: str | Path = "/proc",
        sys_root: str | Path = "/sys",
        netlink: NetlinkReader | None = None,
        byteorder: str = sys.byteorder,
    ) -> None:
        self.proc = str(proc_root).rstrip("/")
        self.net_class = str(sys_root).rstrip("/") + "/class/net/"
        self.netlink: NetlinkReader = netlink if netlink is not None else LiveNetlink()
        self.byteorder = byteorder

    @classmethod
    def from_tree(cls, root: str | Path) -> LinuxSource:
        """A fixture tree: ROOT/proc, ROOT/sys and ROOT/netlink.json (recorded on a little-endian host)."""
        root = Path(root)
        state = RawState.from_json(json.loads((root / "netlink.json").read_text()))
        return cls(root / "proc", root / "sys", RecordedNetlink(state), byteorder="little")

    def _read(self, path: str, problems: list[str]) -> str:
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                return f.read()
        except OSError as exc:
            problems.append(f"cannot read {path}: {exc.strerror or exc}")
            return ""

    def read(self) -> RawState:
        problems: list[str] = []
        links = self.netlink.links()
        base = self.net_class
        exists = os.path.exists
        for link in links:
            path = base + link.name
            link.has_device = exists(path + "/device")
            if link.has_device:
                link.wireless = exists(path + "/wireless") or exists(path + "/phy80211")
        addrs = self.netlink.addrs()
        try:
            rules = self.netlink.rules()
        except OSError as exc:
            problems.append(f"policy rules unavailable: {exc}")
            rules = []
        try:
            routes = self.netlink.routes()
        except OSError as exc:
            problems.append(f"route dump failed ({exc}): main table from /proc only")
            routes = self.proc_routes({link.name: link.index for link in links}, problems)
        try:
            neighbours = self.netlink.neighbours()
        except OSError as exc:
            problems.append(f"neighbours unavailable: {exc}")
            neighbours = []
        return RawState(links, addrs, routes, rules, neighbours, problems)

    def proc_routes(self, names: dict[str, int], problems: list[str]) -> list[Route]:
        """Routes from /proc: IPv4 main table, IPv6 from every table (which this cannot tell apart)."""
        routes, notes = parse_proc_route(self._read(self.proc + "/net/route", problems), names, self.byteorder)
        routes6, notes6 = parse_proc_ipv6_route(self._read(self.proc + "/net/ipv6_route", problems), names)
        problems += notes + notes6
        return routes + routes6

    def close(self) -> None:
        self.netlink.close()


# --- recording a fixture tree -----------------------------------------------------------------------


def record_tree(dest: str | Path, proc_root: str = "/proc", sys_root: str = "/sys") -> None:
    """Write this namespace's state as a fixture tree (for tests, or to attach to a bug report)."""
    dest = Path(dest)
    (dest / "proc/net").mkdir(parents=True, exist_ok=True)
    for name in ("route", "ipv6_route"):
        (dest / "proc/net" / name).write_text(Path(proc_root, "net", name).read_text())
    live = LiveNetlink()
    try:
        links = live.links()
        state = RawState(
            links=links,
            addrs=live.addrs(),
            rules=live.rules(),
            routes=live.routes(),
            neighbours=live.neighbours(),
        )
    finally:
        live.close()
    for link in links:
        d = dest / "sys/class/net" / link.name
        d.mkdir(parents=True, exist_ok=True)
        src = Path(sys_root, "class/net", link.name)
        if (src / "device").exists():
            (d / "device").write_text("")
        for marker in ("wireless", "phy80211"):
            if (src / marker).exists():
                (d / marker).write_text("")  # only existence is read; a file, so git keeps it
    (dest / "netlink.json").write_text(json.dumps(state.to_json(), indent=1) + "\n")
