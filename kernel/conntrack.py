"""ctnetlink: the conntrack table over netlink, for the interceptor and the proxies.

- The interceptor deletes a live connection's entry when a policy change re-evaluates it (its next
  packet is NEW again, so the rules queue it and the new verdict applies); cleanup flushes every entry
  carrying one of our marks (the kernel filters by mark & mask; on kernels that cannot, we dump and
  delete one by one); `conn.end` comes from destroy events (NFNLGRP_CONNTRACK_DESTROY), which carry
  the original tuple (client → original destination, before DNAT) and the mark.
- The proxies look an entry up by its REPLY tuple (proxy address → client address as the proxy sees
  it): one IPCTNL_MSG_CT_GET, which the kernel answers with a hash lookup (`nf_conntrack_find_get`),
  so the cost does not grow with the table. The answer's original tuple holds the app's real address
  and its original destination (UDP has no SO_ORIGINAL_DST), its mark the interface a rule chose.
Not pyroute2 (or the conntrack tool): these are single small requests on the verdict and data paths,
see kernel/netlink.py. An entry's tuples are `messages.flows.FiveTuple`s (for ICMP echo the id in
`src_port`), the same keys the interceptor tracks connections by. Building and parsing messages are pure
functions tested with captured kernel bytes; `Conntrack` and `ConntrackEvents` do the I/O.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from messages.flows import FiveTuple, IpProtocol, ipv6_text

from .netlink import (
    NLM_F_ACK,
    NLM_F_DUMP,
    Buffer,
    NetlinkError,
    NetlinkSocket,
    attach_filter,
    iter_messages,
    nla,
    nla_nested,
    parse_attrs,
)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = 0, 1, 2
MSG_NEW = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
MSG_GET = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
MSG_DELETE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
NFNLGRP_CONNTRACK_UPDATE = 2
NFNLGRP_CONNTRACK_DESTROY = 3
NFGEN = struct.Struct("!BBH")  # family, version, res_id

CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_PROTOINFO, CTA_MARK, CTA_ID, CTA_MARK_MASK = 1, 2, 3, 4, 8, 12, 21
CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_STATE = 1, 1
CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY = 9, 10  # only while net.netfilter.nf_conntrack_acct is 1
CTA_COUNTERS_PACKETS, CTA_COUNTERS_BYTES = 1, 2  # u64, big endian
IPS_CONFIRMED = 1 << 3
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE = 4, 5, 6
CTA_PROTO_ICMPV6_ID, CTA_PROTO_ICMPV6_TYPE, CTA_PROTO_ICMPV6_CODE = 7, 8, 9

#: conntrack's TCP states (enum tcp_conntrack) that a closed connection's entry lingers in.
TCP_CONNTRACK_TIME_WAIT, TCP_CONNTRACK_CLOSE = 7, 8
IPS_SEEN_REPLY = 1 << 1  # enum ip_conntrack_status
ICMP_ECHO_REQUEST = {IpProtocol.ICMP: 8, IpProtocol.ICMPV6: 128}
_U16, _U32, _U64 = struct.Struct("!H"), struct.Struct("!I"), struct.Struct("!Q")


@dataclass(frozen=True, slots=True)
class CtCounters:
    """Bytes and packets each way, as conntrack accounting counted them (original = the app's direction)."""

    packets_orig: int = 0
    bytes_orig: int = 0
    packets_reply: int = 0
    bytes_reply: int = 0


def _parse_counters(orig: Buffer | None, reply: Buffer | None) -> CtCounters | None:
    if orig is None and reply is None:
        return None

    def pair(data: Buffer | None) -> tuple[int, int]:
        attrs = parse_attrs(data or b"")
        packets, octets = attrs.get(CTA_COUNTERS_PACKETS, b""), attrs.get(CTA_COUNTERS_BYTES, b"")
        return (
            _U64.unpack(packets[:8])[0] if len(packets) >= 8 else 0,
            _U64.unpack(octets[:8])[0] if len(octets) >= 8 else 0,
        )

    po, bo = pair(orig)
    pr, br = pair(reply)
    return CtCounters(po, bo, pr, br)


@dataclass(frozen=True, slots=True)
class CtEntry:
    """One conntrack entry: its original tuple (the app's view: client → original destination, before NAT)."""

    orig: FiveTuple
    mark: int = 0
    id: int = 0  # the kernel's identity of the entry (CTA_ID): a new connection on the same tuple has another
    reply: FiveTuple | None = None  # parsed on request only (parse_entry's with_reply; lookup_reply)
    tcp_state: int = -1  # conntrack's TCP state (TCP_CONNTRACK_*), -1 when not TCP or not told
    counters: CtCounters | None = None  # with conntrack accounting on (the kernel data path turns it on)
    status: int = 0  # CTA_STATUS bits (IPS_*): e.g. IPS_SEEN_REPLY once a reply went the other way


# --- building ---------------------------------------------------------------------------------------


def _ip_attrs(t: FiveTuple) -> bytes:
    if t.family == socket.AF_INET6:
        return nla(CTA_IP_V6_SRC, socket.inet_pton(socket.AF_INET6, t.src_ip)) + nla(
            CTA_IP_V6_DST, socket.inet_pton(socket.AF_INET6, t.dst_ip)
        )
    return nla(CTA_IP_V4_SRC, socket.inet_pton(socket.AF_INET, t.src_ip)) + nla(
        CTA_IP_V4_DST, socket.inet_pton(socket.AF_INET, t.dst_ip)
    )


def tuple_attr(t: FiveTuple, direction: int = CTA_TUPLE_ORIG) -> bytes:
    """CTA_TUPLE_ORIG (or CTA_TUPLE_REPLY) for `t`."""
    proto = [nla(CTA_PROTO_NUM, bytes([t.protocol]))]
    if t.protocol in (IpProtocol.TCP, IpProtocol.UDP):
        proto += [nla(CTA_PROTO_SRC_PORT, _U16.pack(t.src_port)), nla(CTA_PROTO_DST_PORT, _U16.pack(t.dst_port))]
    elif t.protocol == IpProtocol.ICMP:
        proto += [
            nla(CTA_PROTO_ICMP_ID, _U16.pack(t.src_port)),
            nla(CTA_PROTO_ICMP_TYPE, bytes([ICMP_ECHO_REQUEST[IpProtocol.ICMP]])),
            nla(CTA_PROTO_ICMP_CODE, b"\0"),
        ]
    elif t.protocol == IpProtocol.ICMPV6:
        proto += [
            nla(CTA_PROTO_ICMPV6_ID, _U16.pack(t.src_port)),
            nla(CTA_PROTO_ICMPV6_TYPE, bytes([ICMP_ECHO_REQUEST[IpProtocol.ICMPV6]])),
            nla(CTA_PROTO_ICMPV6_CODE, b"\0"),
        ]
    return nla_nested(direction, nla_nested(CTA_TUPLE_IP, _ip_attrs(t)), nla_nested(CTA_TUPLE_PROTO, *proto))


def delete_payload(t: FiveTuple) -> bytes:
    """IPCTNL_MSG_CT_DELETE of the entry whose original tuple is `t`."""
    return NFGEN.pack(t.family, 0, 0) + tuple_attr(t)


def get_by_reply_payload(reply: FiveTuple) -> bytes:
    """IPCTNL_MSG_CT_GET of the entry whose reply tuple is `reply`."""
    return NFGEN.pack(reply.family, 0, 0) + tuple_attr(reply, CTA_TUPLE_REPLY)


def get_payload(orig: FiveTuple) -> bytes:
    """IPCTNL_MSG_CT_GET of the entry whose original tuple is `orig`."""
    return NFGEN.pack(orig.family, 0, 0) + tuple_attr(orig)


def flush_mark_payload(mark: int, mask: int = 0xFFFFFFFF, family: int = socket.AF_UNSPEC) -> bytes:
    """Delete every entry whose mark & `mask` equals `mark` (AF_UNSPEC: both IP versions)."""
    return NFGEN.pack(family, 0, 0) + nla(CTA_MARK, _U32.pack(mark)) + nla(CTA_MARK_MASK, _U32.pack(mask))


# --- parsing ----------------------------------------------------------------------------------------


def _ip_text(family: int, raw: Buffer) -> str:
    text = socket.inet_ntop(family, raw)
    if family == socket.AF_INET6 and "." in text:  # ::a.b.c.d, ::ffff:a.b.c.d: hex groups, as FiveTuple has it
        return ipv6_text(raw)
    return text


def parse_tuple(data: Buffer) -> FiveTuple | None:
    """The contents of CTA_TUPLE_ORIG / CTA_TUPLE_REPLY; None when unreadable."""
    attrs = parse_attrs(data)
    ip = parse_attrs(attrs.get(CTA_TUPLE_IP, b""))
    proto = parse_attrs(attrs.get(CTA_TUPLE_PROTO, b""))
    if CTA_IP_V4_SRC in ip and CTA_IP_V4_DST in ip:
        src = _ip_text(socket.AF_INET, ip[CTA_IP_V4_SRC][:4])
        dst = _ip_text(socket.AF_INET, ip[CTA_IP_V4_DST][:4])
    elif CTA_IP_V6_SRC in ip and CTA_IP_V6_DST in ip:
        src = _ip_text(socket.AF_INET6, ip[CTA_IP_V6_SRC][:16])
        dst = _ip_text(socket.AF_INET6, ip[CTA_IP_V6_DST][:16])
    else:
        return None
    number = proto.get(CTA_PROTO_NUM, b"\0")[0]

    def u16(key: int) -> int:
        raw = proto.get(key, b"")
        return _U16.unpack(raw[:2])[0] if len(raw) >= 2 else 0

    if number in (IpProtocol.TCP, IpProtocol.UDP):
        return FiveTuple(number, src, u16(CTA_PROTO_SRC_PORT), dst, u16(CTA_PROTO_DST_PORT))
    if number == IpProtocol.ICMP:
        return FiveTuple(number, src, u16(CTA_PROTO_ICMP_ID), dst, 0)
    if number == IpProtocol.ICMPV6:
        return FiveTuple(number, src, u16(CTA_PROTO_ICMPV6_ID), dst, 0)
    return FiveTuple(number, src, 0, dst, 0)


def parse_entry(payload: Buffer, with_reply: bool = False) -> CtEntry | None:
    """One ctnetlink message payload (nfgenmsg + attributes) → CtEntry, None when unreadable.
    The reply tuple only `with_reply` (it costs as much again, and destroy events do not need it)."""
    if len(payload) < NFGEN.size:
        return None
    attrs = parse_attrs(payload, NFGEN.size)
    if CTA_TUPLE_ORIG not in attrs:
        return None
    orig = parse_tuple(attrs[CTA_TUPLE_ORIG])
    if orig is None:
        return None
    reply = parse_tuple(attrs[CTA_TUPLE_REPLY]) if with_reply and CTA_TUPLE_REPLY in attrs else None
    mark = _U32.unpack(attrs[CTA_MARK][:4])[0] if len(attrs.get(CTA_MARK, b"")) >= 4 else 0
    ct_id = _U32.unpack(attrs[CTA_ID][:4])[0] if len(attrs.get(CTA_ID, b"")) >= 4 else 0
    tcp_state = -1
    if orig.protocol == IpProtocol.TCP and CTA_PROTOINFO in attrs:
        tcp = parse_attrs(parse_attrs(attrs[CTA_PROTOINFO]).get(CTA_PROTOINFO_TCP, b""))
        state = tcp.get(CTA_PROTOINFO_TCP_STATE, b"")
        tcp_state = state[0] if len(state) >= 1 else -1
    counters = _parse_counters(attrs.get(CTA_COUNTERS_ORIG), attrs.get(CTA_COUNTERS_REPLY))
    status = _U32.unpack(attrs[CTA_STATUS][:4])[0] if len(attrs.get(CTA_STATUS, b"")) >= 4 else 0
    return CtEntry(orig, mark, ct_id, reply, tcp_state, counters, status)


# --- I/O --------------------------------------------------------------------------------------------


class Conntrack:
    """Requests to the conntrack table of this network namespace (needs CAP_NET_ADMIN there).

    `rcvbuf=None` keeps the kernel's default receive buffer (enough for single-entry lookups)."""

    def __init__(self, timeout: float = 2.0, rcvbuf: int | None = 1 << 20) -> None:
        self.nl = NetlinkSocket(NETLINK_NETFILTER, rcvbuf=rcvbuf, timeout=timeout)
        self.lookups = 0

    def close(self) -> None:
        self.nl.close()

    def lookup_reply(self, reply: FiveTuple, with_reply: bool = True) -> CtEntry | None:
        """The entry whose reply direction is `reply`, or None when there is none; its reply tuple is parsed
        `with_reply` only (the caller knows it: it asked by it).
        Raises NetlinkError (other kernel errors, no answer in time) or ValueError (unreadable answer)."""
        self.lookups += 1
        try:
            answers = self.nl.request(MSG_GET, 0, get_by_reply_payload(reply), single=True)
        except NetlinkError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        if not answers:
            return None
        entry = parse_entry(answers[0], with_reply=with_reply)
        if entry is None:
            raise ValueError("unreadable conntrack answer")
        return entry

    def get(self, orig: FiveTuple) -> CtEntry | None:
        """The entry whose original tuple is `orig` (a hash lookup in the kernel), None when there is none.
        Raises NetlinkError (other kernel errors, no answer in time)."""
        self.lookups += 1
        try:
            answers = self.nl.request(MSG_GET, 0, get_payload(orig), single=True)
        except NetlinkError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return parse_entry(answers[0]) if answers else None

    def delete(self, t: FiveTuple) -> bool:
        """Delete the entry whose original tuple is `t`; False when it was already gone."""
        try:
            self.nl.request(MSG_DELETE, NLM_F_ACK, delete_payload(t))
        except NetlinkError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def dump(self) -> list[CtEntry]:
        replies = self.nl.request(MSG_GET, NLM_F_DUMP, NFGEN.pack(socket.AF_UNSPEC, 0, 0))
        return [e for p in replies if (e := parse_entry(p)) is not None]

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
                self.delete(entry.orig)
            except NetlinkError:
                continue
        return len(left)


def mark_filter(mark: int, mask: int) -> list[tuple[int, int, int, int]]:
    """A classic BPF socket filter passing only ctnetlink messages whose CTA_MARK & `mask` == `mark`.

    The kernel finds the attribute itself (the SKF_AD_NLATTR extension), so a busy host's other connections
    never wake the reader up: the UDP proxy hears only of split entries going away."""
    ld_imm, ldx_imm, ld_b_abs, ld_w_ind = 0x00, 0x01, 0x30, 0x40
    jeq_k, and_k, tax, ret_k = 0x15, 0x54, 0x07, 0x06
    skf_nlattr = (-0x1000 + 12) & 0xFFFFFFFF  # SKF_AD_OFF + SKF_AD_NLATTR
    attrs_at = 16 + NFGEN.size  # nlmsghdr, nfgenmsg
    return [
        (ld_imm, 0, 0, attrs_at),
        (ldx_imm, 0, 0, CTA_MARK),
        (ld_b_abs, 0, 0, skf_nlattr),  # A = offset of CTA_MARK, 0 when there is none
        (jeq_k, 5, 0, 0),
        (tax, 0, 0, 0),
        (ld_w_ind, 0, 0, 4),  # the mark (network order, as BPF loads it)
        (and_k, 0, 0, mask),
        (jeq_k, 0, 1, mark),
        (ret_k, 0, 0, 0xFFFF),
        (ret_k, 0, 0, 0),
    ]


class ConntrackEvents(NetlinkSocket):
    """Non-blocking reader of conntrack destroy events (register `fileno()` with the loop); with `mark`, only
    of entries whose mark & `mask` equals it (filtered in the kernel). With `updates`, of update events
    instead (state changes such as a TCP connection entering TIME_WAIT: they carry the TCP state, no
    counters) — only ever with a mark filter, there are many."""

    def __init__(self, mark: int | None = None, mask: int = 0xFFFFFFFF, updates: bool = False) -> None:
        if updates and mark is None:
            raise ValueError("update events need a mark filter")
        groups = 1 << ((NFNLGRP_CONNTRACK_UPDATE if updates else NFNLGRP_CONNTRACK_DESTROY) - 1)
        self.msg_type = MSG_NEW if updates else MSG_DELETE
        super().__init__(NETLINK_NETFILTER, groups=groups, rcvbuf=4 << 20, timeout=0.0)
        if mark is not None:
            attach_filter(self.sock, mark_filter(mark, mask))

    def read(self, limit: int = 256) -> list[CtEntry]:
        """Entries destroyed since the last read. An overrun (ENOBUFS) is counted, not raised."""
        out: list[CtEntry] = []
        for data in self.pending(limit):
            for msg_type, _flags, _seq, payload in iter_messages(data):
                if msg_type == self.msg_type:
                    entry = parse_entry(payload)
                    if entry is not None:
                        out.append(entry)
        return out
