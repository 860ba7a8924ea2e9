"""ctnetlink (actors/conntrack.py), shared by the interceptor and the proxies: messages built and parsed as
bytes (kernel answers captured from a real namespace), and the requests against a fake kernel."""

from __future__ import annotations

import errno
import socket
import struct

import pytest

from kernel import conntrack as ct
from kernel.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkError, iter_messages, nla, nla_nested, nlmsg
from messages.flows import FiveTuple
from tests.support.netlink import FakeKernel, error, install

# --- building and parsing -------------------------------------------------------------------------------


def test_delete_payload_round_trips_through_the_parser() -> None:
    for t in (
        FiveTuple(6, "192.0.2.66", 40000, "203.0.113.80", 80),
        FiveTuple(17, "fd00:5717::2", 5353, "2001:db8:30::80", 53),
        FiveTuple(1, "192.0.2.66", 0x1234, "203.0.113.80", 0),
        FiveTuple(58, "fd00:5717::2", 0x1234, "2001:db8:30::80", 0),
    ):
        payload = ct.delete_payload(t)
        assert payload[0] == t.family
        assert ct.parse_entry(payload) == ct.CtEntry(t)


def test_destroy_event_with_mark_and_id() -> None:
    t = FiveTuple(6, "192.0.2.66", 40000, "203.0.113.81", 80)
    payload = ct.delete_payload(t) + nla(ct.CTA_MARK, struct.pack("!I", 1719)) + nla(ct.CTA_ID, struct.pack("!I", 77))
    datagram = nlmsg(ct.MSG_DELETE, 0, 0, payload) + nlmsg(ct.MSG_DELETE, 0, 0, b"\x02")  # second: unreadable
    entries = [ct.parse_entry(p) for _t, _f, _s, p in iter_messages(datagram)]
    assert entries == [ct.CtEntry(t, 1719, 77), None]


def test_flush_by_mark_payload() -> None:
    payload = ct.flush_mark_payload(1719)
    assert payload[:4] == bytes([socket.AF_UNSPEC, 0, 0, 0])
    assert struct.pack("!I", 1719) in payload and struct.pack("!I", 0xFFFFFFFF) in payload


def test_attribute_walk_survives_broken_lengths() -> None:
    broken = nla_nested(ct.CTA_TUPLE_ORIG, b"\xff\xff\x01\x00")
    assert ct.parse_entry(b"\x02\x00\x00\x00" + broken) is None
    assert ct.parse_entry(b"\x02\x00") is None  # shorter than nfgenmsg
    assert ct.parse_entry(b"\x02\x00\x00\x00" + nla(ct.CTA_MARK, bytes(4))) is None  # no original tuple


def test_ipv6_text_is_the_canonical_form() -> None:
    """Hex groups for IPv4-compatible and -mapped addresses too (as the packet parser and the flow keys
    write them), so a destroy event's tuple equals the one the interceptor keyed the connection by."""
    t = FiveTuple(17, "::ffff:c000:242", 5353, "::c633:6450", 53)
    assert ct.parse_entry(ct.delete_payload(t)) == ct.CtEntry(t)
    wide = FiveTuple(6, "2001:db8:0:1::1", 1, "2001:db8::1:0:0:1", 2)
    assert ct.parse_entry(ct.delete_payload(wide)) == ct.CtEntry(wide)


# Captured from Linux 6.18: two UDP flows from one socket (port 5000) DNAT'd to 127.0.0.17:7190; the
# second was seen by the proxy as port 33384 (the kernel's clash-avoiding source NAT).
KERNEL_V4 = bytes.fromhex(
    "a40000000001020007000000dc72000002000000340001801400018008000100c000020a08000200cb0071511c000280050001"
    "001100000006000200138800000600030014b400003400028014000180080001007f00001108000200c000020a1c0002800500"
    "010011000000060002001c160000060003008268000008000300000001b8080008000000000008000c00966d792c08000b0000"
    "000002080007000000001e"
)
KERNEL_V6 = bytes.fromhex(
    "d40000000001020009000000ed7200000a0000004c0001802c0001801400030020010db8001000000000000000000010140004"
    "0020010db80030000000000000000000811c000280050001001100000006000200138800000600030014b400004c0002802c00"
    "018014000300000000000000000000000000000000011400040020010db80010000000000000000000101c0002800500010011"
    "000000060002001c160000060003006ccc000008000300000001b8080008000000000008000c00b556ee3408000b0000000002"
    "080007000000001e"
)
KERNEL_ENOENT = bytes.fromhex(
    "74000000020000000a000000ed720000feffffff60000000010101000a000000000000000a0000004c0002802c000180140003"
    "00000000000000000000000000000000011400040020010db80010000000000000000000101c00028005000100110000000600"
    "02001c1600000600030000010000"
)
REQUEST_V6 = bytes.fromhex(
    "600000000101010009000000000000000a0000004c0002802c00018014000300000000000000000000000000000000011400"
    "040020010db80010000000000000000000101c0002800500010011000000060002001c160000060003006ccc0000"
)
REPLY_V6 = FiveTuple(17, "::1", 7190, "2001:db8:10::10", 27852)


def test_lookup_request_bytes() -> None:
    assert nlmsg(ct.MSG_GET, NLM_F_REQUEST, 9, ct.get_by_reply_payload(REPLY_V6)) == REQUEST_V6


def only_entry(datagram: bytes, seq: int) -> ct.CtEntry | None:
    messages = list(iter_messages(datagram))
    assert [(t, s) for t, _f, s, _p in messages] == [(ct.MSG_NEW, seq)]
    without = ct.parse_entry(messages[0][3])
    entry = ct.parse_entry(messages[0][3], with_reply=True)
    assert without is not None and entry is not None and without.reply is None
    assert without == ct.CtEntry(entry.orig, entry.mark, entry.id, status=entry.status)
    assert entry.status == 0x1B8 and not entry.status & ct.IPS_SEEN_REPLY  # confirmed, NATed, no reply yet
    return entry


def test_kernel_answer_gives_the_apps_port_and_original_peer() -> None:
    entry = only_entry(KERNEL_V4, 7)
    assert entry is not None
    assert entry.orig.src == ("192.0.2.10", 5000) and entry.orig.dst == ("203.0.113.81", 5300)
    assert entry.reply is not None
    assert entry.reply.src == ("127.0.0.17", 7190) and entry.reply.dst == ("192.0.2.10", 33384)
    assert entry.orig.protocol == 17 and entry.id == 2523756844 and entry.mark == 0
    entry6 = only_entry(KERNEL_V6, 9)
    assert entry6 is not None and entry6.orig.dst == ("2001:db8:30::81", 5300)
    assert entry6.orig.src == ("2001:db8:10::10", 5000)
    assert entry6.reply == REPLY_V6


# --- requests, against a fake kernel --------------------------------------------------------------------


def conntrack(*answers: bytes | OSError, last_seq: int = 0) -> tuple[ct.Conntrack, FakeKernel]:
    c = ct.Conntrack(rcvbuf=None)
    return c, install(c.nl, *answers, last_seq=last_seq)


def test_lookup_by_reply_tuple() -> None:
    c, kernel = conntrack(KERNEL_V6, last_seq=8)
    entry = c.lookup_reply(REPLY_V6)  # the answer is flagged NLM_F_MULTI, but no DONE follows: not waited for
    assert kernel.sent == [REQUEST_V6]
    assert entry is not None and entry.orig.src == ("2001:db8:10::10", 5000) and c.lookups == 1
    assert entry.reply == REPLY_V6


def test_lookup_errors() -> None:
    c, _ = conntrack(KERNEL_ENOENT, last_seq=9)
    assert c.lookup_reply(REPLY_V6) is None  # no such entry
    eperm = bytearray(KERNEL_ENOENT)
    eperm[16:20] = struct.pack("=i", -errno.EPERM)
    c, _ = conntrack(bytes(eperm), last_seq=9)
    with pytest.raises(NetlinkError) as exc:
        c.lookup_reply(REPLY_V6)
    assert exc.value.errno == errno.EPERM
    # An answer to an earlier request (7) is not taken for the answer to this one (9).
    c, _ = conntrack(KERNEL_V4, KERNEL_V6, last_seq=8)
    entry = c.lookup_reply(REPLY_V6)
    assert entry is not None and entry.orig.dst == ("2001:db8:30::81", 5300)
    # Neither is a stale or a truncated answer when nothing else comes: the lookup fails.
    for answer, seq in ((KERNEL_V4, 8), (KERNEL_V4[:40], 7)):
        c, _ = conntrack(answer, last_seq=seq - 1)
        with pytest.raises(NetlinkError) as exc:
            c.lookup_reply(REPLY_V6)
        assert exc.value.errno == errno.ETIMEDOUT
    # A readable message that holds no entry is an error, not "no entry".
    c, _ = conntrack(nlmsg(ct.MSG_NEW, 0, 1, b"\x02\x00\x00\x00"))
    with pytest.raises(ValueError):
        c.lookup_reply(REPLY_V6)


def test_delete_and_flush_by_mark() -> None:
    t = FiveTuple(6, "192.0.2.66", 40000, "203.0.113.80", 80)
    c, kernel = conntrack(error(1, 0), error(2, errno.ENOENT))
    assert c.delete(t) and not c.delete(t)
    assert kernel.sent[0] == nlmsg(ct.MSG_DELETE, NLM_F_REQUEST | NLM_F_ACK, 1, ct.delete_payload(t))

    ours = ct.delete_payload(t) + nla(ct.CTA_MARK, struct.pack("!I", 0x10006B7))
    other = ct.delete_payload(FiveTuple(6, "192.0.2.66", 1, "203.0.113.9", 80)) + nla(ct.CTA_MARK, bytes(4))
    dump = nlmsg(ct.MSG_NEW, 2, 2, ours) + nlmsg(ct.MSG_NEW, 2, 2, other) + nlmsg(3, 2, 2, bytes(4))
    # A kernel without masked deletes refuses the flush: the entries are dumped and deleted one by one.
    c, kernel = conntrack(error(1, errno.EINVAL), dump, error(3, 0))
    assert c.flush_marks([1719], 0xFFFF) == 1
    assert kernel.sent[0] == nlmsg(ct.MSG_DELETE, NLM_F_REQUEST | NLM_F_ACK, 1, ct.flush_mark_payload(1719, 0xFFFF))
    assert kernel.sent[1][4:8] == struct.pack("=HH", ct.MSG_GET, NLM_F_REQUEST | NLM_F_DUMP)
    assert kernel.sent[2] == nlmsg(ct.MSG_DELETE, NLM_F_REQUEST | NLM_F_ACK, 3, ct.delete_payload(t))


def test_destroy_events_are_read_and_overruns_counted() -> None:
    t = FiveTuple(17, "fd00:5717::2", 5353, "2001:db8:30::80", 53)
    event = nlmsg(ct.MSG_DELETE, 0, 0, ct.delete_payload(t) + nla(ct.CTA_MARK, struct.pack("!I", 1719)))
    noise = nlmsg(ct.MSG_NEW, 0, 0, ct.delete_payload(t))  # not a destroy event
    events = ct.ConntrackEvents()
    try:
        install(events, event + noise, OSError(errno.ENOBUFS, "lost"), event, BlockingIOError())
        assert events.read() == [ct.CtEntry(t, 1719), ct.CtEntry(t, 1719)]
        assert events.overruns == 1
    finally:
        events.close()


def test_destroy_event_with_accounting_carries_the_counters_each_way() -> None:
    t = FiveTuple(6, "192.0.2.66", 40000, "203.0.113.81", 80)

    def counted(kind: int, packets: int, octets: int) -> bytes:
        pk = nla(ct.CTA_COUNTERS_PACKETS, struct.pack("!Q", packets))
        return nla_nested(kind, pk, nla(ct.CTA_COUNTERS_BYTES, struct.pack("!Q", octets)))

    payload = ct.delete_payload(t) + counted(ct.CTA_COUNTERS_ORIG, 6, 396) + counted(ct.CTA_COUNTERS_REPLY, 5, 5316)
    entry = ct.parse_entry(payload)
    assert entry is not None and entry.counters == ct.CtCounters(6, 396, 5, 5316)
    assert ct.parse_entry(ct.delete_payload(t)) == ct.CtEntry(t)  # accounting off: no counters, not zeros
