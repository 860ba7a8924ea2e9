"""ctnetlink: delete a connection's conntrack entry, flush entries by mark, hear when entries end.

- Re-evaluation after a policy change deletes a live connection's entry: its next packet is NEW
  again, so the rules queue it to us and the new verdict applies.
- Cleanup flushes every entry carrying one of our marks (the kernel filters by mark; on kernels that
  cannot, we dump and delete one by one).
- `conn.end` comes from conntrack destroy events (NFNLGRP_CONNTRACK_DESTROY), which carry the original
  tuple (client → original destination, before DNAT) and the mark.
Building and parsing messages are pure functions; `Conntrack` and `ConntrackEvents` do the I/O.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from .netlink import (
    NLM_F_ACK,
    NLM_F_DUMP,
    NetlinkError,
    NetlinkSocket,
    iter_messages,
    nla,
    nla_nested,
    parse_attrs,
)
from .packet import ICMP, ICMPV6, TCP, UDP

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = 0, 1, 2
MSG_GET = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
MSG_DELETE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
NFNLGRP_CONNTRACK_DESTROY = 3
NFGEN = struct.Struct("!BBH")  # family, version, res_id

CTA_TUPLE_ORIG, CTA_MARK, CTA_ID, CTA_MARK_MASK = 1, 8, 12, 21
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE = 4, 5, 6
CTA_PROTO_ICMPV6_ID, CTA_PROTO_ICMPV6_TYPE, CTA_PROTO_ICMPV6_CODE = 7, 8, 9

ICMP_ECHO_REQUEST = {ICMP: 8, ICMPV6: 128}


@dataclass(frozen=True, slots=True)
class CtTuple:
    """A conntrack original tuple. For ICMP echo, `src_port` holds the echo id and `dst_port` is 0."""

    protocol: int
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.src_ip else socket.AF_INET


@dataclass(frozen=True, slots=True)
class CtEntry:
    tuple: CtTuple
    mark: int = 0
    ct_id: int = 0


def _ip_attrs(t: CtTuple) -> bytes:
    if t.family == socket.AF_INET6:
        return nla(CTA_IP_V6_SRC, socket.inet_pton(socket.AF_INET6, t.src_ip)) + nla(
            CTA_IP_V6_DST, socket.inet_pton(socket.AF_INET6, t.dst_ip)
        )
    return nla(CTA_IP_V4_SRC, socket.inet_pton(socket.AF_INET, t.src_ip)) + nla(
        CTA_IP_V4_DST, socket.inet_pton(socket.AF_INET, t.dst_ip)
    )


def tuple_attr(t: CtTuple) -> bytes:
    """CTA_TUPLE_ORIG for `t`."""
    proto = [nla(CTA_PROTO_NUM, bytes([t.protocol]))]
    if t.protocol in (TCP, UDP):
        proto += [
            nla(CTA_PROTO_SRC_PORT, struct.pack("!H", t.src_port)),
            nla(CTA_PROTO_DST_PORT, struct.pack("!H", t.dst_port)),
        ]
    elif t.protocol == ICMP:
        proto += [
            nla(CTA_PROTO_ICMP_ID, struct.pack("!H", t.src_port)),
            nla(CTA_PROTO_ICMP_TYPE, bytes([ICMP_ECHO_REQUEST[ICMP]])),
            nla(CTA_PROTO_ICMP_CODE, b"\0"),
        ]
    elif t.protocol == ICMPV6:
        proto += [
            nla(CTA_PROTO_ICMPV6_ID, struct.pack("!H", t.src_port)),
            nla(CTA_PROTO_ICMPV6_TYPE, bytes([ICMP_ECHO_REQUEST[ICMPV6]])),
            nla(CTA_PROTO_ICMPV6_CODE, b"\0"),
        ]
    return nla_nested(CTA_TUPLE_ORIG, nla_nested(CTA_TUPLE_IP, _ip_attrs(t)), nla_nested(CTA_TUPLE_PROTO, *proto))


def delete_payload(t: CtTuple) -> bytes:
    return NFGEN.pack(t.family, 0, 0) + tuple_attr(t)


def flush_mark_payload(mark: int, mask: int = 0xFFFFFFFF, family: int = socket.AF_UNSPEC) -> bytes:
    """Delete every entry whose mark & `mask` equals `mark` (AF_UNSPEC: both IP versions)."""
    return (
        NFGEN.pack(family, 0, 0) + nla(CTA_MARK, struct.pack("!I", mark)) + nla(CTA_MARK_MASK, struct.pack("!I", mask))
    )


def _parse_tuple(data: bytes) -> CtTuple | None:
    attrs = parse_attrs(data)
    ip = parse_attrs(attrs.get(CTA_TUPLE_IP, b""))
    proto = parse_attrs(attrs.get(CTA_TUPLE_PROTO, b""))
    if CTA_IP_V4_SRC in ip and CTA_IP_V4_DST in ip:
        src = socket.inet_ntop(socket.AF_INET, ip[CTA_IP_V4_SRC][:4])
        dst = socket.inet_ntop(socket.AF_INET, ip[CTA_IP_V4_DST][:4])
    elif CTA_IP_V6_SRC in ip and CTA_IP_V6_DST in ip:
        from .packet import ipv6_text

        src, dst = ipv6_text(ip[CTA_IP_V6_SRC][:16]), ipv6_text(ip[CTA_IP_V6_DST][:16])
    else:
        return None
    number = proto.get(CTA_PROTO_NUM, b"\0")[0]

    def u16(key: int) -> int:
        raw = proto.get(key, b"")
        return struct.unpack("!H", raw[:2])[0] if len(raw) >= 2 else 0

    if number in (TCP, UDP):
        return CtTuple(number, src, u16(CTA_PROTO_SRC_PORT), dst, u16(CTA_PROTO_DST_PORT))
    if number == ICMP:
        return CtTuple(number, src, u16(CTA_PROTO_ICMP_ID), dst, 0)
    if number == ICMPV6:
        return CtTuple(number, src, u16(CTA_PROTO_ICMPV6_ID), dst, 0)
    return CtTuple(number, src, 0, dst, 0)


def parse_entry(payload: bytes) -> CtEntry | None:
    """One ctnetlink message payload (nfgenmsg + attributes) → CtEntry, None when unreadable."""
    if len(payload) < NFGEN.size:
        return None
    attrs = parse_attrs(payload, NFGEN.size)
    if CTA_TUPLE_ORIG not in attrs:
        return None
    t = _parse_tuple(attrs[CTA_TUPLE_ORIG])
    if t is None:
        return None
    mark = struct.unpack("!I", attrs[CTA_MARK][:4])[0] if len(attrs.get(CTA_MARK, b"")) >= 4 else 0
    ct_id = struct.unpack("!I", attrs[CTA_ID][:4])[0] if len(attrs.get(CTA_ID, b"")) >= 4 else 0
    return CtEntry(t, mark, ct_id)


class Conntrack:
    """Requests to the conntrack table of this network namespace."""

    def __init__(self) -> None:
        self.nl = NetlinkSocket(NETLINK_NETFILTER, timeout=2.0)

    def close(self) -> None:
        self.nl.close()

    def delete(self, t: CtTuple) -> bool:
        """Delete one entry; False when it was already gone."""
        try:
            self.nl.request(MSG_DELETE, NLM_F_ACK, delete_payload(t))
        except NetlinkError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def dump(self) -> list[CtEntry]:
        replies = self.nl.request(MSG_GET, NLM_F_DUMP, NFGEN.pack(socket.AF_UNSPEC, 0, 0))
        return [e for _t, p in replies if (e := parse_entry(p)) is not None]

    def flush_marks(self, marks: Iterable[int], mask: int = 0xFFFFFFFF) -> int:
        """Delete every entry whose mark & `mask` is one of `marks`; returns how many were left to delete
        one by one (kernels without masked deletes)."""
        marks = set(marks)
        try:
            for mark in sorted(marks):
                self.nl.request(MSG_DELETE, NLM_F_ACK, flush_mark_payload(mark, mask))
        except NetlinkError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
        left = [e for e in self.dump() if e.mark & mask in marks]
        for entry in left:
            try:
                self.delete(entry.tuple)
            except NetlinkError:
                continue
        return len(left)


class ConntrackEvents:
    """Non-blocking reader of conntrack destroy events (register `fileno()` with the loop)."""

    def __init__(self) -> None:
        self.nl = NetlinkSocket(NETLINK_NETFILTER, groups=1 << (NFNLGRP_CONNTRACK_DESTROY - 1), rcvbuf=4 << 20)
        self.nl.sock.setblocking(False)
        self.overruns = 0

    def fileno(self) -> int:
        return self.nl.fileno()

    def close(self) -> None:
        self.nl.close()

    def read(self, limit: int = 256) -> list[CtEntry]:
        """Entries destroyed since the last read. An overrun (ENOBUFS) is counted, not raised."""
        out: list[CtEntry] = []
        for _ in range(limit):
            try:
                data = self.nl.sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overruns += 1
                    continue
                raise
            for msg_type, _flags, _seq, payload in iter_messages(data):
                if msg_type == MSG_DELETE:
                    entry = parse_entry(payload)
                    if entry is not None:
                        out.append(entry)
        return out
