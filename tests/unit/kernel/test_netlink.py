"""The shared netlink framing (actors/netlink.py): messages, attributes, the request and event socket.

Bytes in, records out: the walks keep the type they were given (netenv passes memoryviews so its
dumps are never copied), and a broken length ends a walk instead of raising. The socket is exercised
with a fake kernel that answers with prepared datagrams.
"""

from __future__ import annotations

import errno
import socket
import struct

import pytest

from kernel.netlink import (
    NLA_F_NESTED,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_MULTI,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_HDR,
    NetlinkError,
    NetlinkSocket,
    error_code,
    iter_messages,
    nla,
    nla_nested,
    nlmsg,
    parse_attrs,
)
from tests.support.netlink import FakeKernel, error, install

# --- framing ----------------------------------------------------------------------------------------


def test_attributes_are_padded_and_nested() -> None:
    assert nla(3, b"eth0\0") == b"\x09\x00\x03\x00eth0\0\0\0\0"
    assert nla_nested(1, nla(2, b"ab")) == b"\x0c\x00\x01\x80" + b"\x06\x00\x02\x00ab\0\0"
    assert NLA_F_NESTED == 0x8000
    assert nlmsg(18, NLM_F_REQUEST | NLM_F_DUMP, 7, b"xyzw") == NLMSG_HDR.pack(20, 18, 0x301, 7, 0) + b"xyzw"


def test_walks_keep_the_type_they_were_given() -> None:
    payload = bytes(4) + nla(1, b"\x01\x02\x03\x04") + nla_nested(2, nla(5, b"x")) + nla(9, b"")
    datagram = nlmsg(16, NLM_F_MULTI, 1, payload) + nlmsg(NLMSG_DONE, NLM_F_MULTI, 1, bytes(4))
    for data, kind in ((datagram, bytes), (memoryview(datagram), memoryview)):
        messages = list(iter_messages(data))
        assert [(t, f, s) for t, f, s, _p in messages] == [(16, NLM_F_MULTI, 1), (NLMSG_DONE, NLM_F_MULTI, 1)]
        body = messages[0][3]
        assert type(body) is kind and bytes(body) == payload
        attrs = parse_attrs(body, 4)
        assert sorted(attrs) == [1, 2, 9]  # the nested flag is masked off the type
        assert all(type(v) is kind for v in attrs.values())
        assert bytes(attrs[1]) == b"\x01\x02\x03\x04" and bytes(attrs[9]) == b""
        assert {t: bytes(v) for t, v in parse_attrs(attrs[2]).items()} == {5: b"x"}


def test_walks_survive_garbage() -> None:
    for wrap in (bytes, memoryview):
        assert list(iter_messages(wrap(b"\x10\x00\x00"))) == []
        assert list(iter_messages(wrap(b"\xff\xff\x00\x00" + b"\0" * 12))) == []  # length beyond the data
        assert list(iter_messages(wrap(NLMSG_HDR.pack(4, 1, 0, 0, 0)))) == []  # length below the header
        good = nlmsg(16, 0, 1, b"abcd")
        assert [bytes(p) for _t, _f, _s, p in iter_messages(wrap(good + b"\xff\xff\x00\x00"))] == [b"abcd"]
        assert parse_attrs(wrap(nla(1, b"ok") + b"\xff\xff\x01\x00")) == {1: wrap(b"ok")}  # beyond the end
        assert parse_attrs(wrap(b"\x02\x00\x01\x00" + nla(1, b"x"))) == {}  # length below the header
    assert error_code(struct.pack("=i", -errno.EPERM)) == errno.EPERM
    assert error_code(bytes(4)) == 0 and error_code(b"\x01") == errno.EIO


# --- the socket, against a fake kernel ------------------------------------------------------------------


def fake_socket(*answers: bytes | OSError, last_seq: int = 0) -> tuple[NetlinkSocket, FakeKernel]:
    nl = NetlinkSocket(socket.NETLINK_ROUTE, rcvbuf=None)
    return nl, install(nl, *answers, last_seq=last_seq)


def test_a_dump_collects_every_answer_until_done_and_skips_stale_ones() -> None:
    stale = nlmsg(16, NLM_F_MULTI, 4, b"old!")  # the tail of an earlier request that timed out
    first = nlmsg(16, NLM_F_MULTI, 5, b"one.") + nlmsg(16, NLM_F_MULTI, 5, b"two.")
    last = nlmsg(16, NLM_F_MULTI, 5, b"3...") + nlmsg(NLMSG_DONE, NLM_F_MULTI, 5, bytes(4))
    nl, kernel = fake_socket(stale, first, last, nlmsg(16, NLM_F_MULTI, 5, b"late"), last_seq=4)
    answers = nl.request(18, NLM_F_DUMP, b"body")
    assert answers == [b"one.", b"two.", b"3..."] and all(type(a) is bytes for a in answers)
    assert kernel.sent == [nlmsg(18, NLM_F_REQUEST | NLM_F_DUMP, 5, b"body")]
    assert len(kernel.answers) == 1  # nothing read after DONE

    nl, _ = fake_socket(first, last, last_seq=4)
    views = nl.request(18, NLM_F_DUMP, b"body", views=True)
    assert [bytes(v) for v in views] == [b"one.", b"two.", b"3..."] and all(type(v) is memoryview for v in views)


def test_single_answers_acks_and_errors() -> None:
    nl, _ = fake_socket(nlmsg(20, 0, 1, b"only"), nlmsg(20, 0, 1, b"more"))
    assert nl.request(22, 0, b"") == [b"only"]  # one answer without NLM_F_MULTI ends a plain request
    nl, _ = fake_socket(nlmsg(20, NLM_F_MULTI, 1, b"1st."), nlmsg(20, NLM_F_MULTI, 1, b"2nd."))
    assert nl.request(22, 0, b"", single=True) == [b"1st."]  # ctnetlink's GET: flagged multi, never DONE
    nl, _ = fake_socket(nlmsg(20, 0, 1, b"data"), error(1, 0))
    assert nl.request(22, NLM_F_ACK, b"") == [b"data"]  # with NLM_F_ACK: until the ACK
    nl, _ = fake_socket(error(1, errno.ENOENT))
    with pytest.raises(NetlinkError) as exc:
        nl.request(22, NLM_F_ACK, b"")
    assert exc.value.errno == errno.ENOENT
    nl, _ = fake_socket(error(1, errno.EPERM))
    with pytest.raises(NetlinkError) as exc:
        nl.request(22, 0, b"")
    assert exc.value.errno == errno.EPERM


def test_no_answer_in_time_and_broken_answers() -> None:
    nl, _ = fake_socket()
    with pytest.raises(NetlinkError) as exc:
        nl.request(22, 0, b"")
    assert exc.value.errno == errno.ETIMEDOUT
    good = nlmsg(20, 0, 1, b"good")
    nl, _ = fake_socket(good[:12], good[:-1])  # cut answers are never taken for answers
    with pytest.raises(NetlinkError) as exc:
        nl.request(22, 0, b"")
    assert exc.value.errno == errno.ETIMEDOUT
    nl, _ = fake_socket(OSError(errno.EBADF, "bad"))
    with pytest.raises(OSError) as exc:
        nl.request(22, 0, b"")
    assert exc.value.errno == errno.EBADF and not isinstance(exc.value, NetlinkError)


def test_pending_reads_what_is_there_and_counts_overruns() -> None:
    nl, _ = fake_socket(b"a", OSError(errno.ENOBUFS, "no buffer space"), b"b", BlockingIOError(), b"c")
    assert list(nl.pending()) == [b"a", b"b"] and nl.overruns == 1
    nl, kernel = fake_socket(b"a", OSError(errno.ENOBUFS, "lost"), b"b", b"c")
    assert list(nl.pending(limit=2)) == [b"a"] and nl.overruns == 1  # an overrun counts as a read
    assert kernel.answers == [b"b", b"c"]
    nl, _ = fake_socket(OSError(errno.EBADF, "bad"))
    with pytest.raises(OSError):
        list(nl.pending())


def test_a_real_socket_binds_and_is_non_blocking_with_no_timeout() -> None:
    nl = NetlinkSocket(socket.NETLINK_ROUTE, timeout=0.0)
    try:
        assert nl.fileno() >= 0 and nl.sock.gettimeout() == 0.0
        assert list(nl.pending()) == []  # nothing subscribed, nothing waiting
    finally:
        nl.close()


def test_an_answer_not_yet_queued_is_waited_for_up_to_the_timeout() -> None:
    """The kernel normally queues a request's answer before send() returns (read at once, no poll); one that
    comes later is still waited for, and none at all is a timeout, not a hang."""
    import threading
    import time

    nl = NetlinkSocket(socket.NETLINK_ROUTE, timeout=0.5)
    nl.sock.close()
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    nl.sock = ours
    try:
        later = threading.Timer(0.1, lambda: kernel.send(nlmsg(20, 0, 1, b"late")))
        later.start()
        assert nl.request(22, 0, b"") == [b"late"]  # read at once, it would have been EAGAIN: an error
        later.join()
        started = time.monotonic()
        with pytest.raises(NetlinkError) as exc:
            nl.request(22, 0, b"")
        assert exc.value.errno == errno.ETIMEDOUT and 0.45 <= time.monotonic() - started < 30  # not a hang
    finally:
        ours.close()
        kernel.close()
