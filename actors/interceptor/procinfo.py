"""Which process owns a connection: netlink sock_diag finds the socket, /proc finds its process.

1. sock_diag (NETLINK_SOCK_DIAG) looks the packet's 5-tuple up and returns the socket's inode and uid.
   TCP is an exact lookup; UDP too (the kernel matches it like an incoming datagram, so unconnected
   sockets are found), with a dump of that port as fallback.
2. The inode is mapped to a pid by scanning /proc/<pid>/fd, newest process first (cached).
3. The pid is described from /proc: executable, command line, uid, parent chain (for "children"
   rules). Cached per (pid, start time, comm): a reused pid or an exec gives a fresh description.

A socket or process that is not visible yet (a process that was just started, a scan that raced
with it) gives None: the caller retries a few times within milliseconds, then decides without it.
Everything reading /proc takes the proc root as a parameter, so tests run on fake /proc trees.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from messages import ProcessInfo
from splittun.policy import AppFacts

from .netlink import NLM_F_DUMP, NetlinkError, NetlinkSocket

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
_REQ = struct.Struct("=BBBxI")  # family, protocol, ext, pad, states
_SOCKID = struct.Struct("!HH16s16s")  # sport, dport, src, dst (then if and cookie, host order)
_SOCKID_TAIL = struct.Struct("=III")
_MSG = struct.Struct("=BBBB")  # family, state, timer, retrans
_MSG_TAIL = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode
_MSG_SIZE = _MSG.size + _SOCKID.size + _SOCKID_TAIL.size + _MSG_TAIL.size  # 72
_ALL_STATES = 0xFFFFFFFF
MAX_ANCESTORS = 16
MAX_CACHED_SOCKETS = 65536
RECENT_OWNERS = 16


# --- sock_diag: pure encode/decode -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DiagSocket:
    family: int
    state: int
    src: bytes  # 16 bytes as the kernel gives them (IPv4 in the first 4)
    sport: int
    dst: bytes
    dport: int
    uid: int
    inode: int


def ip_bytes(address: str) -> tuple[int, bytes]:
    """(family, 16 bytes padded) for a sockid field."""
    if ":" in address:
        return socket.AF_INET6, socket.inet_pton(socket.AF_INET6, address)
    return socket.AF_INET, socket.inet_pton(socket.AF_INET, address) + bytes(12)


def diag_request(family: int, protocol: int, src: bytes, sport: int, dst: bytes, dport: int) -> bytes:
    """inet_diag_req_v2 payload (the nlmsg header is added by the socket)."""
    return (
        _REQ.pack(family, protocol, 0, _ALL_STATES)
        + _SOCKID.pack(sport, dport, src, dst)
        + _SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    )


def parse_diag_message(payload: bytes) -> DiagSocket | None:
    """One inet_diag_msg → DiagSocket, None when too short."""
    if len(payload) < _MSG_SIZE:
        return None
    family, state, _timer, _retrans = _MSG.unpack_from(payload, 0)
    sport, dport, src, dst = _SOCKID.unpack_from(payload, _MSG.size)
    off = _MSG.size + _SOCKID.size + _SOCKID_TAIL.size
    _exp, _rq, _wq, uid, inode = _MSG_TAIL.unpack_from(payload, off)
    return DiagSocket(family, state, src, sport, dst, dport, uid, inode)


def _same_ip(raw: bytes, family: int, want: bytes, want_family: int) -> bool:
    """Kernel address (maybe IPv4-mapped in an AF_INET6 socket) equals `want`."""
    if family == want_family:
        return raw[: 4 if family == socket.AF_INET else 16] == want[: 4 if family == socket.AF_INET else 16]
    if family == socket.AF_INET6 and want_family == socket.AF_INET:
        return raw[:12] == b"\0" * 10 + b"\xff\xff" and raw[12:16] == want[:4]
    return False


def _unspecified(raw: bytes, family: int) -> bool:
    n = 4 if family == socket.AF_INET else 16
    return raw[:n] == bytes(n) or (
        family == socket.AF_INET6 and raw[:12] == b"\0" * 10 + b"\xff\xff" and not any(raw[12:16])
    )


def best_udp_match(
    candidates: list[DiagSocket], src_family: int, src: bytes, sport: int, dst: bytes, dport: int
) -> DiagSocket | None:
    """The socket that sent a datagram: local port equal, local address equal or wildcard, and the peer
    equal or unconnected. More specific beats less specific, like the kernel's own lookup."""
    best, best_score = None, -1
    for cand in candidates:
        if cand.sport != sport:
            continue
        score = 0
        if _same_ip(cand.src, cand.family, src, src_family):
            score += 2
        elif not _unspecified(cand.src, cand.family):
            continue
        if cand.dport == dport and _same_ip(cand.dst, cand.family, dst, src_family):
            score += 4
        elif cand.dport != 0:
            continue
        if score > best_score:
            best, best_score = cand, score
    return best


class SockDiag:
    """sock_diag lookups on one netlink socket (in the interceptor's network namespace)."""

    def __init__(self) -> None:
        self.nl = NetlinkSocket(NETLINK_SOCK_DIAG, timeout=0.2)
        self.lookups = 0
        self.dumps = 0

    def close(self) -> None:
        self.nl.close()

    def _exact(self, family: int, protocol: int, src: bytes, sport: int, dst: bytes, dport: int) -> DiagSocket | None:
        try:
            replies = self.nl.request(SOCK_DIAG_BY_FAMILY, 0, diag_request(family, protocol, src, sport, dst, dport))
        except NetlinkError:
            return None
        for _type, payload in replies:
            found = parse_diag_message(payload)
            if found is not None:
                return found
        return None

    def _dump(self, family: int, protocol: int) -> list[DiagSocket]:
        self.dumps += 1
        try:
            replies = self.nl.request(
                SOCK_DIAG_BY_FAMILY, NLM_F_DUMP, diag_request(family, protocol, bytes(16), 0, bytes(16), 0)
            )
        except NetlinkError:
            return []
        return [s for _t, p in replies if (s := parse_diag_message(p)) is not None]

    def lookup(self, protocol: int, src_ip: str, sport: int, dst_ip: str, dport: int) -> DiagSocket | None:
        """The local socket that sent src→dst, or None."""
        self.lookups += 1
        family, src = ip_bytes(src_ip)
        _, dst = ip_bytes(dst_ip)
        if protocol == 6:
            return self._exact(family, protocol, src, sport, dst, dport)
        # UDP: the kernel's udp_dump_one takes the peer as "src" ("swapped for historical reasons").
        found = self._exact(family, protocol, dst, dport, src, sport)
        if found is not None:
            return found
        candidates = self._dump(socket.AF_INET6, protocol)
        if family == socket.AF_INET:
            candidates += self._dump(socket.AF_INET, protocol)
        return best_udp_match(candidates, family, src, sport, dst, dport)


# --- /proc --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcStat:
    pid: int
    ppid: int
    uid: int
    name: str
    start: int  # start time in clock ticks since boot: tells a reused pid apart


def parse_status(text: str) -> tuple[str, int, int]:
    """(Name, PPid, effective Uid) from /proc/<pid>/status."""
    name, ppid, uid = "", -1, -1
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "Name":
            name = value.strip()
        elif key == "PPid":
            ppid = int(value.split()[0])
        elif key == "Uid":
            fields = value.split()
            uid = int(fields[1] if len(fields) > 1 else fields[0])
    return name, ppid, uid


def parse_stat_start(text: str) -> int:
    """Field 22 (starttime) of /proc/<pid>/stat; the comm field may contain spaces and parentheses."""
    rest = text.rpartition(")")[2].split()
    return int(rest[19]) if len(rest) > 19 else 0


def socket_inode(link: str) -> int:
    """`socket:[12345]` → 12345, anything else → 0."""
    if link.startswith("socket:[") and link.endswith("]"):
        with contextlib.suppress(ValueError):
            return int(link[8:-1])
    return 0


class ProcReader:
    """Reads processes from a /proc tree (the real one, or a fake one in tests)."""

    def __init__(self, root: str | Path = "/proc") -> None:
        self.root = str(root)

    def pids(self) -> list[int]:
        try:
            return sorted(int(e) for e in os.listdir(self.root) if e.isdigit())
        except OSError:
            return []

    def socket_inodes(self, pid: int) -> list[int]:
        """Inodes of the sockets process `pid` holds open ([] when it is gone or unreadable)."""
        base = f"{self.root}/{pid}/fd"
        try:
            entries = os.listdir(base)
        except OSError:
            return []
        inodes = []
        for fd in entries:
            try:
                inode = socket_inode(os.readlink(f"{base}/{fd}"))
            except OSError:
                continue
            if inode:
                inodes.append(inode)
        return inodes

    def exe(self, pid: int) -> str:
        try:
            target = os.readlink(f"{self.root}/{pid}/exe")
        except OSError:
            return ""
        return target.removesuffix(" (deleted)")

    def stat(self, pid: int) -> ProcStat | None:
        try:
            with open(f"{self.root}/{pid}/status") as f:
                name, ppid, uid = parse_status(f.read())
            with open(f"{self.root}/{pid}/stat") as f:
                start = parse_stat_start(f.read())
        except (OSError, ValueError, IndexError):
            return None
        return ProcStat(pid, ppid, uid, name, start)

    def identity(self, pid: int) -> tuple[int, str] | None:
        """(start time, comm) from /proc/<pid>/stat alone: one read tells whether a cached description
        still holds (a reused pid has another start time, an exec another comm)."""
        try:
            with open(f"{self.root}/{pid}/stat") as f:
                text = f.read()
        except OSError:
            return None
        head = text.rpartition(")")[0]
        try:
            return parse_stat_start(text), head.partition("(")[2]
        except (ValueError, IndexError):
            return None

    def cmdline(self, pid: int) -> list[str]:
        try:
            with open(f"{self.root}/{pid}/cmdline", "rb") as f:
                raw = f.read()
        except OSError:
            return []
        return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


@dataclass(frozen=True, slots=True)
class Owner:
    """A connection's process as the events and the policy need it."""

    info: ProcessInfo
    app: AppFacts


class ProcessCache:
    """pid → Owner, cached per (pid, start time, comm): a hit costs one read of /proc/<pid>/stat."""

    def __init__(self, reader: ProcReader, max_entries: int = 4096) -> None:
        self.reader = reader
        self.max_entries = max_entries
        self._cache: OrderedDict[int, tuple[tuple[int, str], Owner]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def describe(self, pid: int) -> Owner | None:
        ident = self.reader.identity(pid)
        if ident is None:
            return None
        cached = self._cache.get(pid)
        if cached is not None and cached[0] == ident:
            self.hits += 1
            self._cache.move_to_end(pid)
            return cached[1]
        stat = self.reader.stat(pid)
        if stat is None:
            return None
        self.misses += 1
        exe = self.reader.exe(pid)
        ancestors: list[tuple[str, str]] = []
        parent, seen = stat.ppid, {pid}
        while parent > 0 and parent not in seen and len(ancestors) < MAX_ANCESTORS:
            seen.add(parent)
            pstat = self.reader.stat(parent)
            if pstat is None:
                break
            ancestors.append((self.reader.exe(parent), pstat.name))
            parent = pstat.ppid
        info = ProcessInfo(
            pid=pid,
            ppid=stat.ppid,
            uid=stat.uid,
            name=stat.name,
            exe=exe,
            cmdline=self.reader.cmdline(pid),
            ancestors=[a_exe or a_name for a_exe, a_name in ancestors],
        )
        owner = Owner(info, AppFacts(pid=pid, exe=exe, name=stat.name, uid=stat.uid, ancestors=tuple(ancestors)))
        self._cache[pid] = (ident, owner)
        if len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return owner


class Attributor:
    """5-tuple → Owner: sock_diag, the cached inode→pid map, the process cache."""

    def __init__(self, diag: SockDiag | None, reader: ProcReader) -> None:
        self.diag = diag
        self.reader = reader
        self.processes = ProcessCache(reader)
        self._owners: dict[int, int] = {}
        self._recent: OrderedDict[int, None] = OrderedDict()
        self.scans = 0

    def pid_of_inode(self, inode: int) -> int | None:
        """The process holding socket `inode`.

        Looked for first in the processes that owned the last connections (an app making one connection
        usually makes more), then in all processes, newest first (a new connection's socket mostly
        belongs to a process started a moment ago: curl, a browser's new helper). Either way the scan
        stops at the owner, and every socket read on the way is cached.
        """
        pid = self._owners.get(inode)
        if pid is not None and os.path.exists(f"{self.reader.root}/{pid}"):
            return self._remember(pid)
        self.scans += 1
        if len(self._owners) > MAX_CACHED_SOCKETS:
            self._owners.clear()
        checked: set[int] = set()
        for candidates in (lambda: list(reversed(self._recent)), lambda: reversed(self.reader.pids())):
            for pid in candidates():  # listing /proc only when the recent owners do not have it
                if pid in checked:
                    continue
                checked.add(pid)
                for found in self.reader.socket_inodes(pid):
                    self._owners[found] = pid
                if self._owners.get(inode) == pid:
                    return self._remember(pid)
        return None

    def _remember(self, pid: int) -> int:
        self._recent.pop(pid, None)
        self._recent[pid] = None
        if len(self._recent) > RECENT_OWNERS:
            self._recent.popitem(last=False)
        return pid

    def attribute(self, protocol: int, src_ip: str, sport: int, dst_ip: str, dport: int) -> Owner | None:
        if self.diag is None:
            return None
        found = self.diag.lookup(protocol, src_ip, sport, dst_ip, dport)
        if found is None or not found.inode:
            return None
        pid = self.pid_of_inode(found.inode)
        if pid is None:
            return None
        return self.processes.describe(pid)
