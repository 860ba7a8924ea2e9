"""Netlink, just the framing: messages and attributes, plus one small socket for requests and events.

Shared by every actor that talks to the kernel over netlink: the interceptor (sock_diag, ctnetlink,
the NFQUEUE config), the proxies (ctnetlink lookups) and netenv (rtnetlink dumps and change events).
Written against the kernel ABI directly (struct) rather than pyroute2: the interceptor's verdict path
needs one small request and a few hundred bytes of parsing, with no extra threads or event loops, and
netenv's whole refresh has a 5 ms budget that pyroute2's dumps alone overshoot (actors/netenv/rtnl.py).

Building and parsing are pure functions over bytes; only `NetlinkSocket` does I/O. `iter_messages` and
`parse_attrs` slice their input, so a payload is whatever the caller passed in: bytes give bytes, a
memoryview gives zero-copy memoryviews (netenv's dumps: hundreds of messages per refresh). A broken
length ends a walk, it never raises.
"""

from __future__ import annotations

import errno as errno_mod
import os
import select
import socket
import struct
import time
from collections.abc import Iterator

NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NLA_HDR = struct.Struct("=HH")  # len, type
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE = 1, 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP = 0x300
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF
SO_RCVBUFFORCE = 33

#: What the walks take and give back: a slice keeps the type it was cut from.
Buffer = bytes | memoryview


class NetlinkError(OSError):
    """The kernel answered a request with an error (errno set), or no answer came in time."""


def align4(n: int) -> int:
    return (n + 3) & ~3


def nlmsg(msg_type: int, flags: int, seq: int, payload: bytes) -> bytes:
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(payload), msg_type, flags, seq, 0) + payload


def nla(attr_type: int, value: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    length = NLA_HDR.size + len(value)
    return NLA_HDR.pack(length, attr_type) + value + b"\0" * (align4(length) - length)


def nla_nested(attr_type: int, *children: bytes) -> bytes:
    return nla(attr_type | NLA_F_NESTED, b"".join(children))


def parse_attrs(data: Buffer, offset: int = 0) -> dict[int, Buffer]:
    """Attributes from `offset` to the end of `data` → {type: value} (values are slices of `data`:
    bytes or memoryview, as given); a broken length stops the walk."""
    out: dict[int, Buffer] = {}
    end = len(data)
    unpack = NLA_HDR.unpack_from
    while offset + 4 <= end:
        length, attr_type = unpack(data, offset)
        if length < 4 or offset + length > end:
            break
        out[attr_type & NLA_TYPE_MASK] = data[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return out


def iter_messages(data: Buffer) -> Iterator[tuple[int, int, int, Buffer]]:
    """(type, flags, seq, payload) of every message in one datagram (payload: a slice of `data`, bytes
    or memoryview as given); a broken length ends the walk."""
    offset, size = 0, len(data)
    unpack = NLMSG_HDR.unpack_from
    while offset + 16 <= size:
        length, msg_type, flags, seq, _pid = unpack(data, offset)
        if length < 16 or offset + length > size:
            return
        yield msg_type, flags, seq, data[offset + 16 : offset + length]
        offset += (length + 3) & ~3


def error_code(payload: Buffer) -> int:
    """errno of an NLMSG_ERROR payload (0 = an ACK)."""
    if len(payload) < 4:
        return errno_mod.EIO
    return -struct.unpack_from("=i", payload, 0)[0]


class NetlinkSocket:
    """A netlink socket for request/response (answers within `timeout` s) or for events (`timeout=0`: register
    `fileno()` with a loop and read with `pending()`).

    The socket itself is always non-blocking: the kernel handles a request in the sender's context, so its
    answer is queued before send() returns and a request costs one send and one recv. (A Python socket
    timeout would poll before every send and recv: two more syscalls per request.) Only when the answer is
    not there yet does `request` wait for it, up to `timeout`.

    `rcvbuf=None` keeps the kernel's default receive buffer; `recv_size` is the largest datagram read.
    """

    def __init__(
        self,
        protocol: int,
        groups: int = 0,
        rcvbuf: int | None = 1 << 20,
        timeout: float = 1.0,
        recv_size: int = 1 << 16,
    ) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
        if rcvbuf is not None:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)  # root only, else
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind((0, groups))
        self.sock.setblocking(False)
        self.timeout = timeout
        self.recv_size = recv_size
        self.overruns = 0
        self._seq = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        return self._seq

    def request(
        self, msg_type: int, flags: int, payload: bytes, views: bool = False, single: bool = False
    ) -> list[Buffer]:
        """Send one request; collect the answers' payloads until DONE, an ACK or a single answer.
        `views`: payloads as memoryviews into the received datagrams (no copies), else bytes.
        `single`: the first answer is the only one (ctnetlink flags its answer to a GET NLM_F_MULTI, yet
        sends no DONE after it).

        Raises NetlinkError with the kernel's errno on an error reply, ETIMEDOUT when no answer comes in
        time; a failing socket raises its OSError.
        """
        seq = self.next_seq()
        self.sock.send(nlmsg(msg_type, flags | NLM_F_REQUEST, seq, payload))
        replies: list[Buffer] = []
        while True:
            try:
                data = self._recv_answer()
            except TimeoutError:
                raise NetlinkError(errno_mod.ETIMEDOUT, "netlink request timed out") from None
            done = False
            for rtype, rflags, rseq, body in iter_messages(memoryview(data) if views else data):
                if rseq != seq:
                    continue  # a late answer to an earlier, timed-out request
                if rtype == NLMSG_ERROR:
                    code = error_code(body)
                    if code:
                        raise NetlinkError(code, os.strerror(code))
                    return replies
                if rtype == NLMSG_DONE:
                    return replies
                replies.append(body)
                if single:
                    return replies
                if not rflags & NLM_F_MULTI and not flags & NLM_F_ACK:
                    done = True
            if done:
                return replies

    def _recv_answer(self) -> bytes:
        """The next datagram: at once when queued (the usual case), else waiting up to `timeout`."""
        try:
            return self.sock.recv(self.recv_size)
        except BlockingIOError:
            pass
        deadline = time.monotonic() + (self.timeout or 0.0)
        poller = select.poll()  # not select(): a proxy's fds go past 1024
        poller.register(self.sock.fileno(), select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise TimeoutError("timed out")
            try:
                return self.sock.recv(self.recv_size)
            except BlockingIOError:
                continue

    def pending(self, limit: int = 0) -> Iterator[bytes]:
        """Datagrams waiting on a non-blocking socket, at most `limit` reads (0: until none is left).
        An overrun (ENOBUFS: the kernel dropped messages for us) is counted in `overruns`, not raised."""
        reads = 0
        while not limit or reads < limit:
            reads += 1
            try:
                data = self.sock.recv(self.recv_size)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno_mod.ENOBUFS:
                    self.overruns += 1
                    continue
                raise
            yield data


SO_ATTACH_FILTER = 26


def attach_filter(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    """Attach a classic BPF filter (code, jt, jf, k per instruction) to a socket: what it rejects is dropped in
    the kernel before it reaches the socket's buffer."""
    import ctypes

    code = b"".join(struct.pack("=HBBI", *insn) for insn in program)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("=HxxxxxxQ" if struct.calcsize("P") == 8 else "=HxxI", len(program), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
