"""Where was the app going? The original destination the kernel's NAT rewrote, for TCP and UDP.

TCP: `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` on the accepted socket (the kernel looks up the
connection's conntrack entry by its hash: O(1)).

UDP has no per-flow socket, so the proxy asks conntrack over netlink for the entry whose REPLY tuple is
(proxy address → client address as seen): a single IPCTNL_MSG_CT_GET, which the kernel answers with a
hash lookup (`nf_conntrack_find_get`), so the cost does not grow with the size of the conntrack table.
The answer's ORIGINAL tuple holds the app's real source port and its original destination. (When one
app socket talks to several peers, the kernel's implicit source NAT gives each flow a different port
as the proxy sees it, which is why the REPLY tuple identifies the flow; see README.md.)

Message building and parsing are plain functions over bytes, tested without a kernel.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct
from dataclasses import dataclass

from .decider import Address

SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)

# --- SO_ORIGINAL_DST ----------------------------------------------------------------------------------


def parse_sockaddr(data: bytes) -> Address:
    """A kernel sockaddr_in / sockaddr_in6 (host byte order family, network byte order port)."""
    if len(data) < 8:
        raise ValueError(f"sockaddr too short ({len(data)} bytes)")
    family = struct.unpack_from("=H", data)[0]
    port = struct.unpack_from("!H", data, 2)[0]
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, data[4:8]), port
    if family == socket.AF_INET6 and len(data) >= 24:
        return socket.inet_ntop(socket.AF_INET6, data[8:24]), port
    raise ValueError(f"unexpected sockaddr family {family}")


def original_dst(sock: socket.socket) -> Address | None:
    """The pre-NAT destination of an accepted TCP connection; None when it was not NAT'd."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        else:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise
    return parse_sockaddr(raw)


# --- conntrack over netlink -----------------------------------------------------------------------------

NETLINK_NETFILTER = 12
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 1
NLA_F_NESTED = 0x8000
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_MARK = 8
CTA_ID = 12
CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("=BBH")
_NLATTR = struct.Struct("=HH")


class ConntrackError(OSError):
    """The kernel answered with an error (ENOENT = no such entry)."""


@dataclass(frozen=True, slots=True)
class Tuple:
    src: Address
    dst: Address
    proto: int


@dataclass(frozen=True, slots=True)
class CtEntry:
    orig: Tuple
    reply: Tuple
    id: int = 0
    mark: int = 0


def _attr(kind: int, payload: bytes, nested: bool = False) -> bytes:
    length = _NLATTR.size + len(payload)
    head = _NLATTR.pack(length, kind | (NLA_F_NESTED if nested else 0))
    return head + payload + b"\0" * (-length % 4)


def _tuple_attrs(proto: int, src: Address, dst: Address) -> bytes:
    if ":" in src[0]:
        fam, a_src, a_dst = socket.AF_INET6, CTA_IP_V6_SRC, CTA_IP_V6_DST
    else:
        fam, a_src, a_dst = socket.AF_INET, CTA_IP_V4_SRC, CTA_IP_V4_DST
    ip = _attr(a_src, socket.inet_pton(fam, src[0])) + _attr(a_dst, socket.inet_pton(fam, dst[0]))
    l4 = (
        _attr(CTA_PROTO_NUM, bytes([proto]))
        + _attr(CTA_PROTO_SRC_PORT, struct.pack("!H", src[1]))
        + _attr(CTA_PROTO_DST_PORT, struct.pack("!H", dst[1]))
    )
    return _attr(CTA_TUPLE_IP, ip, nested=True) + _attr(CTA_TUPLE_PROTO, l4, nested=True)


def build_get_by_reply(seq: int, proto: int, reply_src: Address, reply_dst: Address) -> bytes:
    """IPCTNL_MSG_CT_GET for the entry whose reply tuple is reply_src → reply_dst."""
    family = socket.AF_INET6 if ":" in reply_src[0] else socket.AF_INET
    body = _NFGENMSG.pack(family, 0, 0) + _attr(CTA_TUPLE_REPLY, _tuple_attrs(proto, reply_src, reply_dst), nested=True)
    kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST, seq, 0) + body


def _attrs(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = 0
    while pos + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, pos)
        if length < _NLATTR.size or pos + length > len(data):
            raise ValueError(f"bad netlink attribute length {length} at {pos}")
        out[kind & 0x3FFF] = data[pos + _NLATTR.size : pos + length]
        pos += (length + 3) & ~3
    return out


def _parse_tuple(data: bytes) -> Tuple:
    top = _attrs(data)
    ip = _attrs(top[CTA_TUPLE_IP])
    l4 = _attrs(top[CTA_TUPLE_PROTO])
    if CTA_IP_V4_SRC in ip:
        fam, raw_src, raw_dst = socket.AF_INET, ip[CTA_IP_V4_SRC], ip[CTA_IP_V4_DST]
    else:
        fam, raw_src, raw_dst = socket.AF_INET6, ip[CTA_IP_V6_SRC], ip[CTA_IP_V6_DST]
    sport = struct.unpack("!H", l4.get(CTA_PROTO_SRC_PORT, b"\0\0"))[0]
    dport = struct.unpack("!H", l4.get(CTA_PROTO_DST_PORT, b"\0\0"))[0]
    return Tuple((socket.inet_ntop(fam, raw_src), sport), (socket.inet_ntop(fam, raw_dst), dport), l4[CTA_PROTO_NUM][0])


def parse_response(data: bytes, seq: int) -> CtEntry | None:
    """The entry in a kernel answer to request `seq`; None for ENOENT; ConntrackError for other errors."""
    pos = 0
    while pos + _NLMSGHDR.size <= len(data):
        length, kind, _flags, msg_seq, _pid = _NLMSGHDR.unpack_from(data, pos)
        if length < _NLMSGHDR.size or pos + length > len(data):
            raise ValueError(f"bad netlink message length {length}")
        body = data[pos + _NLMSGHDR.size : pos + length]
        pos += (length + 3) & ~3
        if msg_seq != seq:
            continue  # a stale answer to an earlier, timed-out request
        if kind == NLMSG_ERROR:
            code = -struct.unpack_from("=i", body)[0]
            if code == 0:
                continue
            if code == errno.ENOENT:
                return None
            raise ConntrackError(code, os.strerror(code))
        if kind == NLMSG_DONE:
            return None
        if kind & 0xFF == IPCTNL_MSG_CT_NEW and kind >> 8 == NFNL_SUBSYS_CTNETLINK:
            top = _attrs(body[_NFGENMSG.size :])
            ct_id = struct.unpack("!I", top[CTA_ID])[0] if CTA_ID in top else 0
            mark = struct.unpack("!I", top[CTA_MARK])[0] if CTA_MARK in top else 0
            return CtEntry(_parse_tuple(top[CTA_TUPLE_ORIG]), _parse_tuple(top[CTA_TUPLE_REPLY]), ct_id, mark)
    raise ValueError("no answer for this request in the netlink data")


class Conntrack:
    """A ctnetlink socket for single-entry lookups (needs CAP_NET_ADMIN in the network namespace)."""

    def __init__(self, timeout: float = 1.0) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.sock.settimeout(timeout)
        self._seq = itertools.count(1)
        self.lookups = 0

    def lookup_reply(self, proto: int, reply_src: Address, reply_dst: Address) -> CtEntry | None:
        """The entry whose reply direction is reply_src → reply_dst, or None."""
        seq = next(self._seq) & 0xFFFFFFFF
        self.lookups += 1
        self.sock.send(build_get_by_reply(seq, proto, reply_src, reply_dst))
        while True:
            data = self.sock.recv(65536)
            try:
                return parse_response(data, seq)
            except ValueError:
                if _only_other_seqs(data, seq):
                    continue
                raise

    def close(self) -> None:
        self.sock.close()


def _only_other_seqs(data: bytes, seq: int) -> bool:
    pos = 0
    while pos + _NLMSGHDR.size <= len(data):
        length, _kind, _flags, msg_seq, _pid = _NLMSGHDR.unpack_from(data, pos)
        if msg_seq == seq or length < _NLMSGHDR.size:
            return False
        pos += (length + 3) & ~3
    return True


class ConntrackResolver:
    """UDP original destination by conntrack reply-tuple lookup: (orig_client, orig_dst, mark) or None.

    None means the kernel has no NAT record for the flow; other failures raise (OSError, ValueError)."""

    def __init__(self, conntrack: Conntrack | None = None, protocol: int = socket.IPPROTO_UDP) -> None:
        self.ct = conntrack or Conntrack()
        self.protocol = protocol

    def __call__(self, client: Address, listen: Address) -> tuple[Address, Address, int] | None:
        entry = self.ct.lookup_reply(self.protocol, (listen[0], listen[1]), (client[0], client[1]))
        if entry is None:
            return None
        return entry.orig.src, entry.orig.dst, entry.mark

    def close(self) -> None:
        self.ct.close()
