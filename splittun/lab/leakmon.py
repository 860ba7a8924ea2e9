"""The lab's leak monitor: every packet the host sends out of its physical uplink, classified.

splittun must never let a connection that should stay in the VPN leave through the physical link. This
watches that link from the far end. A daemon in the lab's ``isp`` namespace (one more lab daemon:
``Lab.up()`` starts it and waits until it captures, ``Lab.down()`` kills it) reads every frame the host
sends to ``lan0`` (and ``lan1`` with a second uplink) through an AF_PACKET socket, before isp routes it
(so before isp decrements the TTL), parses Ethernet, IPv4/IPv6 and TCP/UDP/ICMP headers and sorts each
packet into a class:

- ``carrier``: the VPN's own transport, UDP to the VPN server (``VPNSRV_V4``:``VPN_SERVER_PORT``), and ICMP
  errors the host sends the server about that transport;
- ``housekeeping``: ARP, ICMPv6 router/neighbour discovery (133-137) and MLD (130-132, 143), and anything
  to link-local multicast (ff02::/16, 224.0.0.0/24): nothing a router forwards;
- ``probe``: the lab's own deliberate ISP-path probes (``Lab.whoami(path="isp")``, ``Lab.wait_ready``),
  recognisable on the wire by their TTL / hop limit ``PROBE_TTL``;
- ``sync``: the harness's sync frames (below);
- ``other``: frames that are neither IP nor ARP;
- ``candidate``: every other IP packet. A candidate is a leak unless the test declared its destination
  split (the allow-list lives in the harness, not here).

The daemon writes one JSON object a line to ``<state dir>/leakmon.jsonl``: a ``ready`` event once it
captures, one record per new flow (class, interface, protocol, addresses, ports, TTL, first-seen time),
and a ``sync`` event with its cumulative packet counters per class for every sync frame. Flows are
de-duplicated by 5-tuple and class in a bounded LRU; a TCP SYN always starts a new record (a reused port
is a new connection), and every sync forgets the UDP/ICMP flows, so each window between two syncs lists
every datagram flow it saw.

The harness, :class:`LeakMonitor` (the tests' fixtures and the demo use it), injects a sync frame with a
nonce on each watched host uplink through AF_PACKET (never routed, so nothing in the host can divert
it; addressed to a MAC nobody owns, so isp drops it) and waits until the daemon logged it: everything
the host sent earlier has been seen by then. It then reads the flows since its mark, matches candidates
against its allow-list and reports leaks.

    python -m splittun.lab.leakmon --log PATH --iface lan0 [--iface lan1] [--lab NAME]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ipaddress
import json
import os
import secrets
import signal
import socket
import struct
import sys
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splittun.lab import topology as T

if TYPE_CHECKING:
    from splittun.lab.lab import Lab

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_ARP = 0x0806
VLAN_TYPES = (0x8100, 0x88A8)
PACKET_OUTGOING = 4
SOL_PACKET = 263
PACKET_STATISTICS = 6
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
SKF_AD_OFF = -0x1000
SKF_AD_PKTTYPE = 4
SKF_AD_IFINDEX = 8
CLONE_NEWNET = 0x40000000

#: Bytes kept of each frame: Ethernet + IPv6 + extension headers + TCP, or an ICMP error and its quote.
SNAPLEN = 256
RCVBUF = 32 << 20
MAX_FLOWS = 100_000
MAX_FRAGMENTS = 10_000

CLASSES = ("carrier", "housekeeping", "probe", "sync", "other", "candidate")
SYNC_MAGIC = b"splittun-leakmon-sync "
#: Destination MAC of sync frames: locally administered, owned by nobody, so isp drops them unrouted.
SYNC_MAC = bytes.fromhex("02005e1ea4c0")
#: Watched isp-side interface -> the host uplink at its other end, and what a sync frame claims as source.
UPLINKS = {T.ISP_LAN_IF: T.HOST_IF, T.ISP_LAN2_IF: T.HOST2_IF}
SYNC_ADDRESSES = {T.HOST_IF: (T.HOST_V4, T.ISP_LAN_V4), T.HOST2_IF: (T.HOST2_V4, T.ISP_LAN2_V4)}

HOUSEKEEPING_ICMP6 = frozenset({130, 131, 132, 133, 134, 135, 136, 137, 143})
ICMP4_ERRORS = frozenset({3, 4, 5, 11, 12})
ICMP6_ERRORS = frozenset({1, 2, 3, 4})
PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
IP6_EXTENSIONS = frozenset({0, 43, 44, 51, 60})
TCP_FLAGS = ((0x02, "S"), (0x10, "A"), (0x01, "F"), (0x04, "R"), (0x08, "P"))


# ------------------------------------------------------------------------------------------ parsing


@dataclass
class Packet:
    """What the monitor needs to know of one frame."""

    family: int = 0  # 4 or 6; 0: not IP
    proto: str = ""  # tcp, udp, icmp, icmpv6, ip-N; arp, ether-0xNNNN, malformed
    src: str = ""
    dst: str = ""
    sport: int | None = None
    dport: int | None = None
    ttl: int | None = None  # TTL or hop limit
    flags: str = ""  # TCP flags, e.g. "S", "SA", "AF"
    isn: int | None = None  # sequence number of a SYN (without ACK): a new connection
    icmp: tuple[int, int] | None = None  # type, code
    #: proto, src, sport, dst, dport of the packet an ICMP error quotes (the one that caused it).
    inner: tuple[str, str, int | None, str, int | None] | None = None
    payload: bytes = b""  # the start of a UDP payload
    frag: tuple[int, int, bool] | None = None  # id, offset, more fragments: a fragment


def parse_frame(frame: bytes) -> Packet:
    """An Ethernet frame (VLAN tags skipped) as a Packet; never raises."""
    if len(frame) < 14:
        return Packet(proto="malformed")
    etype, off = int.from_bytes(frame[12:14], "big"), 14
    while etype in VLAN_TYPES and len(frame) >= off + 4:
        etype, off = int.from_bytes(frame[off + 2 : off + 4], "big"), off + 4
    if etype == ETH_P_ARP:
        arp = frame[off:]
        if len(arp) >= 28 and arp[4:6] == b"\x06\x04":
            return Packet(proto="arp", src=socket.inet_ntoa(arp[14:18]), dst=socket.inet_ntoa(arp[24:28]))
        return Packet(proto="arp")
    if etype in (ETH_P_IP, ETH_P_IPV6):
        pkt = parse_ip(frame[off:])
        if not pkt.family:  # an IP ethertype with a broken header is still an IP packet out of the link
            pkt.family = 4 if etype == ETH_P_IP else 6
        return pkt
    return Packet(proto=f"ether-{etype:#06x}")


def parse_ip(data: bytes) -> Packet:
    """An IPv4 or IPv6 packet (possibly cut short) as a Packet; ``family`` stays 0 when it is not one."""
    version = data[0] >> 4 if data else 0
    frag: tuple[int, int, bool] | None = None
    if version == 4 and len(data) >= 20:
        ihl = (data[0] & 0x0F) * 4
        total = int.from_bytes(data[2:4], "big")
        fo = int.from_bytes(data[6:8], "big")
        if fo & 0x3FFF:
            frag = (int.from_bytes(data[4:6], "big"), (fo & 0x1FFF) * 8, bool(fo & 0x2000))
        proto = data[9]
        pkt = Packet(4, src=socket.inet_ntop(socket.AF_INET, data[12:16]),
                     dst=socket.inet_ntop(socket.AF_INET, data[16:20]), ttl=data[8])  # fmt: skip
        l4 = data[ihl:total] if total > ihl else data[ihl:]
    elif version == 6 and len(data) >= 40:
        proto, rest = data[6], data[40 : 40 + int.from_bytes(data[4:6], "big")]
        while proto in IP6_EXTENSIONS and len(rest) >= 8:
            if proto == 44:
                fo = int.from_bytes(rest[2:4], "big")
                frag = (int.from_bytes(rest[4:8], "big"), fo & 0xFFF8, bool(fo & 1))
                length = 8
            else:
                length = (rest[1] + 2) * 4 if proto == 51 else (rest[1] + 1) * 8
            proto, rest = rest[0], rest[length:]
        pkt = Packet(6, src=socket.inet_ntop(socket.AF_INET6, data[8:24]),
                     dst=socket.inet_ntop(socket.AF_INET6, data[24:40]), ttl=data[7])  # fmt: skip
        l4 = rest
    else:
        return Packet(proto="malformed")
    pkt.proto = PROTO_NAMES.get(proto, f"ip-{proto}")
    pkt.frag = frag
    if frag and frag[1]:
        return pkt  # a later fragment: no transport header
    if proto in (6, 17) and len(l4) >= 4:
        pkt.sport, pkt.dport = int.from_bytes(l4[0:2], "big"), int.from_bytes(l4[2:4], "big")
    if proto == 6 and len(l4) >= 14:
        bits = l4[13]
        pkt.flags = "".join(name for bit, name in TCP_FLAGS if bits & bit)
        if bits & 0x12 == 0x02:
            pkt.isn = int.from_bytes(l4[4:8], "big")
    elif proto == 17:
        pkt.payload = l4[8:72]
    elif proto in (1, 58) and len(l4) >= 2:
        pkt.icmp = (l4[0], l4[1])
        if l4[0] in (ICMP4_ERRORS if proto == 1 else ICMP6_ERRORS):
            quoted = parse_ip(l4[8:])
            if quoted.family:
                pkt.inner = (quoted.proto, quoted.src, quoted.sport, quoted.dst, quoted.dport)
    return pkt


def is_carrier(pkt: Packet) -> bool:
    """The VPN transport to the server, or an ICMP error to the server about a transport datagram."""
    if pkt.dst != T.VPNSRV_V4:
        return False
    if pkt.proto == "udp":
        return pkt.dport == T.VPN_SERVER_PORT
    if pkt.inner is not None:
        proto, src, sport, _dst, _dport = pkt.inner
        return proto == "udp" and src == T.VPNSRV_V4 and sport == T.VPN_SERVER_PORT
    return False


def is_sync(pkt: Packet) -> bool:
    return (pkt.proto == "udp" and pkt.dport == T.LEAKMON_SYNC_PORT and pkt.ttl == T.PROBE_TTL
            and pkt.payload.startswith(SYNC_MAGIC))  # fmt: skip


def classify(pkt: Packet) -> str:
    """One of CLASSES (see the module docstring)."""
    if not pkt.family:
        return "housekeeping" if pkt.proto == "arp" else "other"
    if is_sync(pkt):
        return "sync"
    if is_carrier(pkt):
        return "carrier"
    if pkt.proto == "icmpv6" and pkt.icmp is not None and pkt.icmp[0] in HOUSEKEEPING_ICMP6:
        return "housekeeping"
    if pkt.dst.startswith("ff02:") or (pkt.family == 4 and pkt.dst.startswith("224.0.0.")):
        return "housekeeping"
    if pkt.ttl == T.PROBE_TTL:
        return "probe"
    return "candidate"


# ------------------------------------------------------------------------------------------ the daemon


class Monitor:
    """The daemon's state: counters, the flow LRU, fragments' transport ports. No I/O."""

    def __init__(self, max_flows: int = MAX_FLOWS) -> None:
        self.max_flows = max_flows
        self.counts: Counter[str] = Counter()
        self.tcp_flows: OrderedDict[tuple[Any, ...], None] = OrderedDict()
        self.other_flows: OrderedDict[tuple[Any, ...], None] = OrderedDict()
        self.fragments: OrderedDict[tuple[Any, ...], tuple[int | None, int | None]] = OrderedDict()
        self.drops = 0

    def handle(self, frame: bytes, iface: str, now: float) -> dict[str, Any] | None:
        """Count one frame; returns the record to log (a new flow or a sync event) or None."""
        pkt = parse_frame(frame)
        if pkt.frag is not None:
            self._fragment(pkt)
        cls = classify(pkt)
        self.counts[cls] += 1
        if cls == "sync":
            self.other_flows.clear()  # each window between syncs lists every datagram flow again
            nonce = pkt.payload[len(SYNC_MAGIC) :].split(b"\0")[0].decode(errors="replace").strip()
            return {"ts": round(now, 6), "event": "sync", "nonce": nonce, "iface": iface,
                    "counts": dict(self.counts), "drops": self.drops}  # fmt: skip
        key = (cls, pkt.family, pkt.proto, pkt.src, pkt.sport, pkt.dst, pkt.dport, pkt.icmp, pkt.inner)
        flows = self.tcp_flows if pkt.proto == "tcp" else self.other_flows
        if pkt.isn is not None:  # a SYN: a new connection even when the 5-tuple was seen before
            if not self._remember(flows, (*key, pkt.isn)):
                return None
            self._remember(flows, key)
        elif not self._remember(flows, key):
            return None
        record: dict[str, Any] = {"ts": round(now, 6), "class": cls, "iface": iface, "family": pkt.family,
                                  "proto": pkt.proto, "src": pkt.src, "sport": pkt.sport, "dst": pkt.dst,
                                  "dport": pkt.dport, "ttl": pkt.ttl}  # fmt: skip
        if pkt.flags:
            record["flags"] = pkt.flags
        if pkt.icmp is not None:
            record["icmp"] = list(pkt.icmp)
        if pkt.inner is not None:
            record["inner"] = dict(zip(("proto", "src", "sport", "dst", "dport"), pkt.inner, strict=True))
        if pkt.frag is not None:
            record["fragment"] = True
        return record

    def _remember(self, flows: OrderedDict[tuple[Any, ...], None], key: tuple[Any, ...]) -> bool:
        """True when ``key`` is new (and now remembered); the least recently seen key goes past the bound."""
        if key in flows:
            flows.move_to_end(key)
            return False
        flows[key] = None
        if len(flows) > self.max_flows:
            flows.popitem(last=False)
        return True

    def _fragment(self, pkt: Packet) -> None:
        """Later fragments carry no ports: give them the first fragment's, so they classify alike."""
        assert pkt.frag is not None
        fid = (pkt.family, pkt.src, pkt.dst, pkt.proto, pkt.frag[0])
        if pkt.frag[1] == 0:
            self.fragments[fid] = (pkt.sport, pkt.dport)
            if len(self.fragments) > MAX_FRAGMENTS:
                self.fragments.popitem(last=False)
        elif fid in self.fragments:
            pkt.sport, pkt.dport = self.fragments[fid]


def bpf_program(indexes: Iterable[int], snaplen: int = SNAPLEN) -> list[tuple[int, int, int, int]]:
    """Classic BPF: keep frames received (not sent) on one of the interfaces ``indexes``, cut to snaplen."""
    ld_abs_w, jeq_k, ret_k = 0x20, 0x15, 0x06
    indexes = list(indexes)
    drop, accept = 3 + len(indexes), 4 + len(indexes)
    prog = [
        (ld_abs_w, 0, 0, (SKF_AD_OFF + SKF_AD_PKTTYPE) & 0xFFFFFFFF),
        (jeq_k, drop - 2, 0, PACKET_OUTGOING),
        (ld_abs_w, 0, 0, (SKF_AD_OFF + SKF_AD_IFINDEX) & 0xFFFFFFFF),
    ]
    prog += [(jeq_k, accept - pc - 1, 0, index) for pc, index in enumerate(indexes, start=3)]
    prog += [(ret_k, 0, 0, 0), (ret_k, 0, 0, snaplen)]
    return prog


def open_capture(ifaces: list[str]) -> socket.socket:
    """An AF_PACKET socket seeing what arrives on ``ifaces`` (filtered in the kernel), with a big buffer."""
    indexes = [socket.if_nametoindex(name) for name in ifaces]
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        prog = bpf_program(indexes)
        code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *ins) for ins in prog))
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, struct.pack("HL", len(prog), ctypes.addressof(code)))
    except BaseException:
        sock.close()
        raise
    return sock


class _Stop(Exception):
    pass


def _on_signal(signum: int, _frame: Any) -> None:
    raise _Stop(signum)


def run(log_path: Path, ifaces: list[str], lab: str = "") -> None:
    """Capture until SIGTERM/SIGINT, appending records to ``log_path``."""
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    sock = open_capture(ifaces)
    watched = set(ifaces)
    monitor = Monitor()
    with open(log_path, "a", encoding="utf-8") as out:

        def write(record: dict[str, Any]) -> None:
            out.write(json.dumps(record, separators=(",", ":")) + "\n")
            out.flush()

        write({"ts": round(time.time(), 6), "event": "ready", "pid": os.getpid(), "lab": lab, "ifaces": ifaces,
               "probe_ttl": T.PROBE_TTL})  # fmt: skip
        try:
            while True:
                frame, addr = sock.recvfrom(SNAPLEN)
                if addr[0] not in watched or addr[2] == PACKET_OUTGOING:  # frames from before the filter
                    continue
                now = time.time()
                record = monitor.handle(frame, addr[0], now)
                if record is None:
                    continue
                if record.get("event") == "sync":
                    _packets, drops = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
                    monitor.drops += drops  # reading the statistics resets them
                    record["drops"] = monitor.drops
                write(record)
        except _Stop:
            pass
        finally:
            write({"ts": round(time.time(), 6), "event": "stop", "counts": dict(monitor.counts),
                   "drops": monitor.drops})  # fmt: skip
            sock.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m splittun.lab.leakmon", description=__doc__.split("\n")[0])
    ap.add_argument("--log", required=True, help="JSON-lines file to append to")
    ap.add_argument("--iface", action="append", required=True, help="interface to watch (repeatable)")
    ap.add_argument("--lab", default="", help="lab name (only to make the process identifiable)")
    args = ap.parse_args(argv)
    try:
        run(Path(args.log), args.iface, args.lab)
    except OSError as exc:
        print(f"leakmon: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)


# ------------------------------------------------------------------------------------------ the harness


class LeakMonitorError(AssertionError):
    """The monitor cannot vouch for the link: not running, not answering a sync, or it lost packets."""


@dataclass(frozen=True)
class Allowance:
    """A destination a test deliberately splits: a network (an address is a /32 or /128), optionally a
    protocol (tcp, udp, icmp, icmpv6), a destination port, and the host uplink it must leave through."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    proto: str | None = None
    port: int | None = None
    via: str | None = None  # a host uplink (eth0, eth1)

    @classmethod
    def of(cls, dest: str, proto: str | None = None, port: int | None = None, via: str | None = None) -> Allowance:
        network = ipaddress.ip_network(dest, strict=False)
        if proto not in (None, "tcp", "udp", "icmp", "icmpv6"):
            raise ValueError(f"proto must be tcp, udp, icmp or icmpv6, not {proto!r}")
        if port is not None and (proto not in ("tcp", "udp") or not 0 < port < 65536):
            raise ValueError(f"a port needs proto tcp or udp and 1-65535, got {proto!r}/{port!r}")
        if via is not None and via not in UPLINKS.values():
            raise ValueError(f"via must be one of the host's uplinks {sorted(UPLINKS.values())}, not {via!r}")
        return cls(network, proto, port, via)

    def _matches(self, addr: str, proto: str, port: int | None) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return (ip.version == self.network.version and ip in self.network
                and self.proto in (None, proto) and self.port in (None, port))  # fmt: skip

    def covers(self, record: dict[str, Any]) -> bool:
        """The flow goes to this destination, or is an ICMP error about a flow that came from it."""
        if self.via is not None and UPLINKS.get(record.get("iface", "")) != self.via:
            return False
        if self._matches(record["dst"], record["proto"], record.get("dport")):
            return True
        inner = record.get("inner")
        return bool(inner) and self._matches(inner["src"], inner["proto"], inner["sport"])

    def __str__(self) -> str:
        net = self.network
        text = str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
        text += (f" {self.proto}" if self.proto else "") + (f"/{self.port}" if self.port is not None else "")
        return text + (f" via {self.via}" if self.via else "")


@dataclass(frozen=True)
class Position:
    """A point in a monitor's log: after a sync line (or the start), with the counters at that point."""

    inode: int = 0
    offset: int = 0
    ts: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    drops: int = 0


def describe_flow(record: dict[str, Any], since: float = 0.0) -> str:
    def end(addr: str, port: int | None) -> str:
        shown = f"[{addr}]" if ":" in addr and port is not None else addr
        return f"{shown}:{port}" if port is not None else shown

    text = f"{record['proto']} {end(record['src'], record.get('sport'))} -> {end(record['dst'], record.get('dport'))}"
    extra = [f"ttl {record.get('ttl')}", f"on {record.get('iface')}"]
    if record.get("flags"):
        extra.append(f"flags {record['flags']}")
    if record.get("icmp"):
        extra.append("type {} code {}".format(*record["icmp"]))
    if record.get("inner"):
        inner = record["inner"]
        quoted = f"{end(inner['src'], inner['sport'])} -> {end(inner['dst'], inner['dport'])}"
        extra.append(f"about {inner['proto']} {quoted}")
    if record.get("fragment"):
        extra.append("fragment")
    if since:
        extra.append(f"at {record['ts'] - since:+.3f}s")
    return f"{text} ({', '.join(extra)})"


@dataclass
class LeakReport:
    """What left the physical link between two points of one lab's monitor log."""

    lab: str
    leaks: list[dict[str, Any]]
    allowed: list[dict[str, Any]]
    flows: dict[str, int]  # new flows per class in the window
    packets: dict[str, int]  # packets per class in the window
    drops: int  # packets the capture socket lost in the window
    allowances: list[Allowance]
    start: Position
    end: Position
    restarted: bool = False  # the log was replaced (the lab rebuilt) since the start position

    @property
    def carrier(self) -> int:
        return self.packets.get("carrier", 0)

    @property
    def probes(self) -> int:
        return self.packets.get("probe", 0)

    @property
    def housekeeping(self) -> int:
        return self.packets.get("housekeeping", 0)

    def summary(self) -> str:
        leaked = f"{len(self.leaks)} flow{'s' if len(self.leaks) != 1 else ''} outside the VPN"
        counts = (f"{self.carrier} carrier, {self.probes} probe, {self.housekeeping} housekeeping packets; "
                  f"{len(self.allowed)} split flow{'s' if len(self.allowed) != 1 else ''} allowed")  # fmt: skip
        lost = f"; {self.drops} packets LOST by the capture" if self.drops else ""
        return f"{leaked} ({counts}{lost})"

    def describe(self, limit: int = 20, since: float = 0.0) -> str:
        lines = [f"leak monitor of lab {self.lab!r}: {self.summary()}"]
        for record in self.leaks[:limit]:
            lines.append("  LEAK " + describe_flow(record, since or self.start.ts))
        if len(self.leaks) > limit:
            lines.append(f"  … and {len(self.leaks) - limit} more")
        allow = ", ".join(map(str, self.allowances)) or "nothing"
        lines.append(f"  allowed as split: {allow}")
        return "\n".join(lines)

    def assert_no_leaks(self) -> None:
        if self.drops:
            raise LeakMonitorError(self.describe() + "\n  the capture lost packets: it cannot vouch for this window")
        if self.leaks:
            raise AssertionError(self.describe())


class LeakMonitor:
    """The harness for one lab's monitor: ``mark()``, ``allow(...)``, ``sync()``, ``report()``.

    Without ``mark()`` a report covers the log from its start (the lab's ``up``).
    """

    def __init__(self, lab: Lab, allow: Iterable[Allowance] = ()) -> None:
        self.lab = lab
        self.allowances: list[Allowance] = list(allow)
        self.start: Position | None = None

    @property
    def log_path(self) -> Path:
        return self.lab.state_dir / T.LEAKMON_LOG

    def allow(self, dest: str, proto: str | None = None, port: int | None = None, via: str | None = None) -> Allowance:
        allowance = Allowance.of(dest, proto, port, via)
        self.allowances.append(allowance)
        return allowance

    def mark(self) -> Position:
        """Sync, and let reports start here."""
        self.start = self.sync()
        return self.start

    def watched(self) -> list[str]:
        """Host uplinks the daemon watches (from its ready line)."""
        ready = next((r for r in self._records(0) if r.get("event") == "ready"), None)
        if ready is None:
            raise LeakMonitorError(f"lab {self.lab.name!r}: no leak monitor is running ({self.log_path})")
        return [UPLINKS[i] for i in ready["ifaces"] if i in UPLINKS]

    def sync(self, timeout: float = 5.0) -> Position:
        """Inject a sync frame on every watched uplink and wait until the daemon logged each: every packet
        the host sent before this call has been counted and logged by then."""
        uplinks = self.watched()
        nonce = secrets.token_hex(8)
        try:
            st = self.log_path.stat()
        except OSError as exc:
            raise LeakMonitorError(f"lab {self.lab.name!r}: no leak monitor log: {exc}") from exc
        offset = st.st_size
        inject(self.lab.ns_host, uplinks, nonce)
        pending, deadline = set(uplinks), time.monotonic() + timeout
        while True:
            for record, end in self._lines(offset):
                offset = end
                if record.get("event") == "sync" and record.get("nonce") == nonce:
                    pending.discard(UPLINKS.get(record.get("iface", ""), ""))
                    if not pending:
                        return Position(st.st_ino, end, record["ts"], dict(record["counts"]), record["drops"])
            if time.monotonic() >= deadline:
                raise LeakMonitorError(f"lab {self.lab.name!r}: the leak monitor did not log sync {nonce} on "
                                       f"{sorted(pending)} within {timeout}s{self._tail()}")  # fmt: skip
            time.sleep(0.002)

    def report(self, allow: Iterable[Allowance] = (), advance: bool = False, timeout: float = 5.0) -> LeakReport:
        """Sync, then what left the link since the mark (or the log's start); ``allow`` adds to the
        monitor's own allowances. ``advance`` moves the mark to the end of this report."""
        end = self.sync(timeout)
        start = self.start or Position(inode=end.inode)
        restarted = start.inode != end.inode or start.offset > end.offset  # the lab was rebuilt: a new log
        if restarted:
            start = Position(inode=end.inode)
        allowances = [*self.allowances, *allow]
        leaks, allowed, flows = [], [], Counter[str]()
        with open(self.log_path, "rb") as f:
            f.seek(start.offset)
            chunk = f.read(end.offset - start.offset)
        for line in chunk.splitlines():
            record = json.loads(line)
            cls = record.get("class")
            if cls is None:
                continue
            flows[cls] += 1
            if cls == "candidate":
                (allowed if any(a.covers(record) for a in allowances) else leaks).append(record)
        packets = {k: n - start.counts.get(k, 0) for k, n in end.counts.items() if n != start.counts.get(k, 0)}
        report = LeakReport(self.lab.name, leaks, allowed, dict(flows), packets, end.drops - start.drops,
                            allowances, start, end, restarted)  # fmt: skip
        if advance:
            self.start = end
        return report

    def assert_no_leaks(self, allow: Iterable[Allowance] = ()) -> LeakReport:
        """Sync and raise AssertionError listing what leaked since the mark; returns the report otherwise."""
        report = self.report(allow)
        report.assert_no_leaks()
        return report

    # -- reading the log --

    def _lines(self, offset: int) -> list[tuple[dict[str, Any], int]]:
        """Complete lines from ``offset``: (record, offset after the line)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except OSError:
            return []
        out = []
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            offset += len(line)
            with contextlib.suppress(ValueError):
                out.append((json.loads(line), offset))
        return out

    def _records(self, offset: int) -> list[dict[str, Any]]:
        return [record for record, _ in self._lines(offset)]

    def _tail(self) -> str:
        try:
            tail = (self.lab.state_dir / "leakmon.log").read_text(errors="replace").splitlines()[-8:]
        except OSError:
            return ""
        return "\n--- leakmon.log ---\n" + "\n".join(tail) if tail else ""


def sync_frame(mac: bytes, uplink: str, nonce: str) -> bytes:
    """Ethernet + IPv4 + UDP, TTL PROBE_TTL, payload SYNC_MAGIC + nonce, to SYNC_MAC."""
    src, dst = SYNC_ADDRESSES[uplink]
    payload = SYNC_MAGIC + nonce.encode()
    udp = struct.pack("!HHHH", T.LEAKMON_SYNC_PORT, T.LEAKMON_SYNC_PORT, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, T.PROBE_TTL, 17, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))  # fmt: skip
    words = sum(struct.unpack("!10H", header))
    while words > 0xFFFF:
        words = (words & 0xFFFF) + (words >> 16)
    header = header[:10] + struct.pack("!H", ~words & 0xFFFF) + header[12:]
    return SYNC_MAC + mac + struct.pack("!H", ETH_P_IP) + header + udp


def inject(ns: str, uplinks: list[str], nonce: str) -> None:
    """Send a sync frame out of each of ``uplinks`` in namespace ``ns`` (AF_PACKET: no routing, no
    firewall), from a short-lived thread that entered the namespace; nothing of ours stays in it."""
    errors: list[BaseException] = []

    def work() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {ns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            for uplink in uplinks:
                with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as sock:  # protocol 0: receives nothing
                    sock.bind((uplink, 0))
                    sock.send(sync_frame(sock.getsockname()[4], uplink, nonce))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=work, name=f"leakmon-sync-{ns}", daemon=True)
    thread.start()
    thread.join(10)
    if errors:
        raise LeakMonitorError(f"cannot send a sync frame in {ns}: {errors[0]}")


if __name__ == "__main__":
    main()
