"""sock_diag (NETLINK_SOCK_DIAG): which local socket a connection belongs to, and which sockets went away.

Shared by the interceptor (a connection's socket: its uid, inode and cookie, for attribution and for telling a
new socket on a reused port from the one a verdict was given for) and the UDP proxy (is a session's datagram
still coming from the socket its flow was decided for?).

- `SockDiag.lookup` finds the socket of a 5-tuple (`messages.flows.FiveTuple`). TCP is an exact lookup; UDP
  too (the kernel matches it like an incoming datagram, so unconnected sockets are found), with a dump of that
  port as fallback.
This is the first of attribution's three layers: sock_diag (a 5-tuple → its socket), `kernel/procfs.py` (a
socket → the process holding it, a process's description), and the interceptor's process cache and
attributor (`actors/interceptor/attribution.py`: a 5-tuple → `ProcessInfo`).
- Each answer carries the socket's cgroup id (INET_DIAG_CGROUP_ID, kernel 5.7+; 0 when the kernel does not
  send it): attribution prefers the processes last seen owning sockets of that cgroup.
- `SocketEvents` reads the kernel's "UDP socket destroyed" broadcasts.
Encoding and decoding are pure functions (tested with kernel bytes); only the two classes do I/O.
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

from messages.flows import FiveTuple, IpProtocol

from .netlink import NLM_F_DUMP, NetlinkError, NetlinkSocket, iter_messages

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
#: sock_diag's multicast groups announcing destroyed sockets (SKNLGRP_INET_TCP_DESTROY, ..._INET_UDP_..., ...).
SKNLGRP_INET_TCP_DESTROY, SKNLGRP_INET_UDP_DESTROY, SKNLGRP_INET6_TCP_DESTROY, SKNLGRP_INET6_UDP_DESTROY = 1, 2, 3, 4
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
_REQ = struct.Struct("=BBBxI")  # family, protocol, ext, pad, states
_SOCKID = struct.Struct("!HH16s16s")  # sport, dport, src, dst (then if and cookie, host order)
_SOCKID_TAIL = struct.Struct("=III")
_MSG = struct.Struct("=BBBB")  # family, state, timer, retrans
_MSG_TAIL = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode
_MSG_SIZE = _MSG.size + _SOCKID.size + _SOCKID_TAIL.size + _MSG_TAIL.size  # 72
_ALL_STATES = 0xFFFFFFFF
INET_DIAG_CGROUP_ID = 21  # u64 attribute after the message, sent unasked since kernel 5.7
_NLA = struct.Struct("=HH")  # nla_len, nla_type
_U64 = struct.Struct("=Q")


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
    cookie: int = 0  # the socket's cookie: unique for the kernel's lifetime, unlike a port or an inode
    cgroup: int = 0  # the cgroup (v2) id of the process that created it; 0 when the kernel does not say


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
    _if, cookie_lo, cookie_hi = _SOCKID_TAIL.unpack_from(payload, _MSG.size + _SOCKID.size)
    off = _MSG.size + _SOCKID.size + _SOCKID_TAIL.size
    _exp, _rq, _wq, uid, inode = _MSG_TAIL.unpack_from(payload, off)
    cookie = cookie_lo | cookie_hi << 32
    return DiagSocket(family, state, src, sport, dst, dport, uid, inode, cookie, cgroup_id(payload, _MSG_SIZE))


def cgroup_id(payload: bytes, offset: int) -> int:
    """The INET_DIAG_CGROUP_ID attribute among the netlink attributes from `offset` on, 0 when absent."""
    while offset + _NLA.size <= len(payload):
        length, kind = _NLA.unpack_from(payload, offset)
        if length < _NLA.size or offset + length > len(payload):
            return 0
        if kind & 0x3FFF == INET_DIAG_CGROUP_ID and length >= _NLA.size + _U64.size:
            return _U64.unpack_from(payload, offset + _NLA.size)[0]
        offset += (length + 3) & ~3
    return 0


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

    def _exact(
        self, family: int, protocol: int, src: bytes, sport: int, dst: bytes, dport: int, strict: bool = False
    ) -> DiagSocket | None:
        try:
            replies = self.nl.request(SOCK_DIAG_BY_FAMILY, 0, diag_request(family, protocol, src, sport, dst, dport))
        except NetlinkError as exc:
            if strict and exc.errno != errno.ENOENT:
                raise
            return None
        for payload in replies:
            found = parse_diag_message(payload)
            if found is not None:
                return found
        return None

    def _dump(self, family: int, protocol: int, strict: bool = False) -> list[DiagSocket]:
        self.dumps += 1
        try:
            replies = self.nl.request(
                SOCK_DIAG_BY_FAMILY, NLM_F_DUMP, diag_request(family, protocol, bytes(16), 0, bytes(16), 0)
            )
        except NetlinkError:
            if strict:
                raise
            return []
        return [s for p in replies if (s := parse_diag_message(p)) is not None]

    def lookup(self, flow: FiveTuple, strict: bool = False) -> DiagSocket | None:
        """The local socket that sent the flow's packets (src → dst), or None when there is none.

        A kernel error or no answer in time also gives None, unless `strict`: then it raises NetlinkError, for
        callers to whom "cannot tell" must not mean "no socket" (the UDP proxy's socket check)."""
        self.lookups += 1
        protocol, sport, dport = flow.protocol, flow.src_port, flow.dst_port
        family, src = ip_bytes(flow.src_ip)
        _, dst = ip_bytes(flow.dst_ip)
        if protocol == IpProtocol.TCP:
            return self._exact(family, protocol, src, sport, dst, dport, strict)
        # UDP: the kernel's udp_dump_one takes the peer as "src" ("swapped for historical reasons").
        found = self._exact(family, protocol, dst, dport, src, sport, strict)
        if found is not None:
            return found
        candidates = self._dump(socket.AF_INET6, protocol, strict)
        if family == socket.AF_INET:
            candidates += self._dump(socket.AF_INET, protocol, strict)
        return best_udp_match(candidates, family, src, sport, dst, dport)


class SocketEvents(NetlinkSocket):
    """Non-blocking reader of "UDP socket destroyed" notifications (register `fileno()` with the loop).

    A UDP conntrack entry outlives the socket that made it: another app's new socket on the same port,
    talking to the same peer, would follow the old entry (its mark, its DNAT to the proxy) without ever
    being queued. The interceptor deletes the entries of a socket that is gone, so the next socket's first
    datagram is queued and decided for its own app. Needs CAP_NET_ADMIN in the namespace.
    With `tcp`, destroyed TCP sockets too (attribution: which fd numbers of a process were freed). A closed
    socket is destroyed once it no longer needs its full state (TCP: after the FIN exchange, about a round
    trip after close()); its inode is 0 by then, its cookie is the one sock_diag gave while it was open.
    """

    def __init__(self, tcp: bool = False) -> None:
        groups = (1 << (SKNLGRP_INET_UDP_DESTROY - 1)) | (1 << (SKNLGRP_INET6_UDP_DESTROY - 1))
        if tcp:
            groups |= (1 << (SKNLGRP_INET_TCP_DESTROY - 1)) | (1 << (SKNLGRP_INET6_TCP_DESTROY - 1))
        super().__init__(NETLINK_SOCK_DIAG, groups=groups, rcvbuf=4 << 20, timeout=0.0)

    def read(self, limit: int = 256) -> list[DiagSocket]:
        """UDP sockets destroyed since the last read. An overrun (ENOBUFS) is counted, not raised."""
        out: list[DiagSocket] = []
        for data in self.pending(limit):
            for msg_type, _flags, _seq, payload in iter_messages(data):
                if msg_type == SOCK_DIAG_BY_FAMILY and (found := parse_diag_message(payload)) is not None:
                    out.append(found)
        return out
