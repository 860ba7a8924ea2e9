"""Transparent TCP proxy: accept, ask the decider, dial, then pipe bytes both ways until both sides are done.

Per session the lifecycle follows the peers exactly (a client must not be able to tell it is proxied):
- half-close: EOF from one side (its FIN) becomes shutdown(SHUT_WR) on the other once every byte is
  delivered; the other direction keeps flowing until it ends too;
- reset: an RST (read/write error) on one side becomes an RST on the other (SO_LINGER 0, then close);
- deadlines: dial timeout; rolling read timeout (no byte either way → close); write timeout (bytes waiting
  and the peer takes none → reset);
- refusal (decider, session limit): the client gets an RST before any upstream exists.

Bytes start on the copy path (recv_into one shared buffer, send): for requests and answers that is the
fewest syscalls. A direction whose read fills the buffer carries bulk data and moves to os.splice through
kernel pipes on Linux (zero copy: socket → pipe → socket). It borrows the loop's shared scratch pipe and
only keeps a pipe of its own while its peer is slow to take the bytes, so idle sessions hold no pipes and
no buffers; only the unsent remainder of a slow peer is kept per direction. Without splice (other systems,
splice=False) everything stays on the copy path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import struct
import sys
import time
from typing import Any

from messages.flows import FiveTuple, IpProtocol

from .base import ProxyBase
from .decider import Address, Refusal, SessionRequest
from .loop import ERROR, HANGUP, RDHUP, READ, WRITE
from .origdst import original_dst
from .session import Session
from .upstream import open_upstream

HAS_SPLICE = hasattr(os, "splice")
HAS_TCP_INFO = sys.platform.startswith("linux")
_SPLICE_FLAGS = (getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)) if HAS_SPLICE else 0
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_LINGER_RST = struct.pack("ii", 1, 0)
_TCP_INFO = getattr(socket, "TCP_INFO", 11)
_TCPI_DATA_SEGS_IN = 152  # offset of tcpi_data_segs_in in struct tcp_info (Linux ≥ 4.6)
_PAUSE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

CONNECTING, OPEN, CLOSED = 0, 1, 2


class PipePool:
    """Kernel pipes for splice: one shared scratch pipe plus spares, all of one capacity."""

    def __init__(self, size: int, keep: int = 64) -> None:
        self.wanted = size
        self.keep = keep
        self.size = size
        self.free: list[tuple[int, int]] = []
        self.created = 0
        self.shared = self._make()

    def _make(self) -> tuple[int, int]:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, _F_SETPIPE_SZ, self.wanted)
        try:
            actual = fcntl.fcntl(w, _F_GETPIPE_SZ)
        except OSError:
            actual = 65536
        self.size = actual if not self.created else min(self.size, actual)
        self.created += 1
        return r, w

    def detach_shared(self) -> None:
        """The shared pipe now belongs to a direction with bytes in it; take a fresh one as shared."""
        self.shared = self.free.pop() if self.free else self._make()

    def release(self, pipe: tuple[int, int]) -> None:
        """An empty pipe goes back to the pool (the shared one simply stays shared)."""
        if pipe is self.shared:
            return
        if len(self.free) < self.keep:
            self.free.append(pipe)
        else:
            _close_pipe(pipe)

    def discard(self, pipe: tuple[int, int]) -> None:
        """A pipe with stale bytes in it: never reuse it."""
        if pipe is self.shared:
            self.detach_shared()
        _close_pipe(pipe)

    def close(self) -> None:
        for pipe in [self.shared, *self.free]:
            _close_pipe(pipe)
        self.free = []


def _close_pipe(pipe: tuple[int, int]) -> None:
    for fd in pipe:
        with contextlib.suppress(OSError):
            os.close(fd)


class _Direction:
    """Bytes from `src` to `dst`."""

    __slots__ = ("buf", "bulk", "dst", "dst_fd", "eof", "pending", "pipe", "shut", "src", "src_fd", "stalled_at", "up")

    def __init__(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.up = up  # client → upstream
        self.pipe: tuple[int, int] | None = None  # splice: the pipe holding `pending` bytes
        self.pending = 0
        self.buf: memoryview | None = None  # copy: bytes read but not yet sent
        self.eof = False  # src sent FIN (read returned 0)
        self.shut = False  # FIN passed on: dst.shutdown(SHUT_WR) done
        self.stalled_at = 0.0  # when dst stopped taking bytes (0 = it takes them)
        self.bulk = False  # moved to the splice path after a full buffer (small exchanges stay on copy)

    def waiting(self) -> bool:
        return bool(self.pending or self.buf is not None)


class TcpConn:
    """One proxied TCP connection: client socket, upstream socket, two directions."""

    __slots__ = ("client", "down", "early", "proxy", "seen", "session", "state", "up", "upstream")

    def __init__(self, proxy: TcpProxy, session: Session, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.session = session
        self.client = client
        self.upstream = upstream
        self.up = _Direction(client, upstream, True)
        self.down = _Direction(upstream, client, False)
        self.state = CONNECTING
        self.seen = 0  # bytes moved at the last sweep (rolling read deadline)
        self.early = 0  # the client's readiness seen while the upstream was still connecting

    # --- events -------------------------------------------------------------------------------------

    def on_client(self, events: int) -> None:
        if self.state == OPEN:
            self._on_side(events, self.up, self.down, self.client, "client")
        elif self.state == CONNECTING:  # until the upstream answers, the client's bytes wait in its socket buffer
            self.early |= events

    def on_upstream(self, events: int) -> None:
        if self.state == CONNECTING:
            self._connected(events)
        elif self.state == OPEN:
            self._on_side(events, self.down, self.up, self.upstream, "upstream")

    def _on_side(self, events: int, reading: _Direction, writing: _Direction, sock: socket.socket, side: str) -> None:
        """One socket's readiness: read what it sent into `reading`, flush `writing` (the bytes waiting
        to go out through it) when it can take more, and notice its error."""
        if events & (READ | RDHUP | HANGUP | ERROR):
            self.pump(reading, events)
        if self.state == OPEN and events & (WRITE | ERROR | HANGUP) and writing.waiting():
            self.pump(writing)
        if self.state == OPEN and events & ERROR:
            self._check_error(sock, side)

    def _connected(self, events: int) -> None:
        if events & (ERROR | HANGUP) or not events & WRITE:  # writable without error = connected
            err = self.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.close(f"dial failed: {os.strerror(err)}", rst=True)
                return
            if not events & WRITE:
                return
        self.state = OPEN
        with contextlib.suppress(OSError):
            self.session.local = tuple(self.upstream.getsockname()[:2])  # type: ignore[assignment]
        self.proxy._opened(self.session)
        # What the client sent meanwhile: with its readiness known (edge-triggered: a request, no FIN yet), one
        # short read drains it and saves a read that would say EAGAIN; the upstream is read only if it said
        # it has something (a later arrival is a new edge).
        self.pump(self.up, self.early)
        if self.state == OPEN and (not self.proxy.edge or events & (READ | RDHUP | HANGUP | ERROR)):
            self.pump(self.down, events)

    def _check_error(self, sock: socket.socket, side: str) -> None:
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.close(f"reset by {side}: {os.strerror(err)}", rst=True)

    # --- moving bytes -------------------------------------------------------------------------------

    def pump(self, d: _Direction, events: int = 0) -> None:
        """Move what can be moved now. `events` = the readiness that woke us for d's source, if any."""
        if d.bulk:
            self._pump_splice(d)
        else:
            self._pump_copy(d, events)
        if not self.proxy.edge and self.state == OPEN:
            self._update_interest()

    def _pump_splice(self, d: _Direction) -> None:
        pipes = self.proxy.pipes
        splice = os.splice
        session = self.session
        while True:
            if d.pending:
                assert d.pipe is not None
                try:
                    n = splice(d.pipe[0], d.dst_fd, d.pending, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    if d.pipe is pipes.shared:
                        pipes.detach_shared()
                    if not d.stalled_at:
                        d.stalled_at = time.monotonic()
                    return
                except OSError as exc:
                    self._broken(d, exc, writing=True)
                    return
                d.pending -= n
                d.stalled_at = 0.0
                if d.pending:
                    continue
                pipes.release(d.pipe)
                d.pipe = None
            if d.eof:
                self._shut(d)
                return
            pipe = pipes.shared
            try:
                n = splice(d.src_fd, pipe[1], pipes.size, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return
            except OSError as exc:
                self._broken(d, exc, writing=False)
                return
            if n == 0:
                d.eof = True
                continue
            d.pipe = pipe
            d.pending = n
            if d.up:
                session.bytes_up += n
            else:
                session.bytes_down += n

    def _pump_copy(self, d: _Direction, events: int) -> None:
        """Copy through the shared buffer. Small exchanges (requests, answers) cost fewest syscalls here:
        a short read means the socket is drained, so unless the peer also closed or erred (then we read on
        to see it) we wait for the next readiness instead of paying for one more read that says EAGAIN.
        When the peer had already sent its FIN as this readiness was reported (RDHUP, no error), a short read
        took everything before it (the kernel queues a FIN behind all of its data), so it is the end too:
        no read that returns 0 (an answer arriving with its FIN, as `Connection: close` servers send them).
        A read that fills the buffer means bulk data: the direction moves to the splice path."""
        buf = self.proxy.buffer
        view = self.proxy.view
        size = len(buf)
        session = self.session
        stop_short = bool(events & READ) and not events & (RDHUP | HANGUP | ERROR)
        fin_seen = bool(events & RDHUP) and not events & (HANGUP | ERROR)
        while True:
            if d.buf is not None:
                try:
                    n = d.dst.send(d.buf)
                except BlockingIOError:
                    if not d.stalled_at:
                        d.stalled_at = time.monotonic()
                    return
                except OSError as exc:
                    self._broken(d, exc, writing=True)
                    return
                d.stalled_at = 0.0
                d.buf = d.buf[n:] if n < len(d.buf) else None
                continue
            if d.eof:
                self._shut(d)
                return
            if d.bulk:
                self._pump_splice(d)
                return
            try:
                n = d.src.recv_into(buf)
            except BlockingIOError:
                return
            except OSError as exc:
                self._broken(d, exc, writing=False)
                return
            if n == 0:
                d.eof = True
                continue
            if fin_seen and n < size:
                d.eof = True  # handled at the top of the loop once these bytes are out
            if d.up:
                session.bytes_up += n
                session.packets_up += 1
            else:
                session.bytes_down += n
                session.packets_down += 1
            try:
                sent = d.dst.send(view[:n])
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._broken(d, exc, writing=True)
                return
            if sent < n:
                d.buf = memoryview(bytes(view[sent:n]))
            elif n == size:
                if self.proxy.use_splice:
                    d.bulk = True
                    self.proxy._count("spliced_directions")
            elif stop_short:
                return

    def _broken(self, d: _Direction, exc: OSError, writing: bool) -> None:
        """A read or write error means that peer is gone (normally: it sent RST): reset the other one."""
        side = ("upstream" if d.up else "client") if writing else ("client" if d.up else "upstream")
        self.close(f"reset by {side}: {exc.strerror or exc}", rst=True)

    def _shut(self, d: _Direction) -> None:
        if d.shut:
            return
        d.shut = True
        other = self.down if d.up else self.up
        if other.shut:
            # Both sides sent FIN and both were read to EOF: close() sends dst's FIN itself (nothing unread
            # turns it into an RST), one shutdown() less per session.
            self.close("closed")
            return
        with contextlib.suppress(OSError):
            d.dst.shutdown(socket.SHUT_WR)

    def _update_interest(self) -> None:
        """Level-triggered loops: watch exactly what each socket is needed for."""
        up, down, loop = self.up, self.down, self.proxy.loop
        loop.interest(self.up.src_fd, (0 if up.eof or up.waiting() else READ) | (WRITE if down.waiting() else 0))
        loop.interest(self.down.src_fd, (0 if down.eof or down.waiting() else READ) | (WRITE if up.waiting() else 0))

    # --- the end ------------------------------------------------------------------------------------

    def packets(self) -> None:
        """Data segments each way, from the kernel's TCP_INFO, once splice moved bytes (splice never sees
        packets; on the copy path each read counted as one, which is what small exchanges are)."""
        if not (HAS_TCP_INFO and (self.up.bulk or self.down.bulk)):
            return
        for sock, attr in ((self.client, "packets_up"), (self.upstream, "packets_down")):
            with contextlib.suppress(OSError, struct.error):
                info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCPI_DATA_SEGS_IN + 4)
                setattr(self.session, attr, struct.unpack_from("=I", info, _TCPI_DATA_SEGS_IN)[0])

    def close(self, reason: str, rst: bool = False) -> None:
        if self.state == CLOSED:
            return
        was_open = self.state == OPEN
        self.state = CLOSED
        if was_open:
            self.packets()
        loop = self.proxy.loop
        for sock in (self.client, self.upstream):
            loop.forget(sock.fileno())
            if rst:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            sock.close()
        if self.proxy.use_splice:
            pipes = self.proxy.pipes
            for d in (self.up, self.down):
                if d.pipe is not None:
                    (pipes.discard if d.pending else pipes.release)(d.pipe)
                    d.pipe = None
        self.proxy._closed(self, reason)


class TcpProxy(ProxyBase):
    """Transparent TCP proxy on one or more listen addresses (see module docstring)."""

    protocol = "tcp"
    kind = socket.SOCK_STREAM

    def __init__(self, *args: Any, orig_dst: bool = True, resolver: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.use_orig_dst = orig_dst
        #: (client, listen) → (app address, original destination, split mark), instead of SO_ORIGINAL_DST and
        #: conntrack: the divert backend's redirect table (origdst.RedirectResolver)
        self.resolver = resolver
        splice = self.config.splice
        self.use_splice = HAS_SPLICE if splice is None else (splice and HAS_SPLICE)
        self.pipes = PipePool(self.config.pipe_size) if self.use_splice else None  # type: ignore[assignment]
        self._conntrack: Any = None  # opened on first use (_ct_mark)
        self.buffer = bytearray(self.config.buffer_size)
        self.view = memoryview(self.buffer)
        self.conns: dict[str, TcpConn] = {}
        self._paused = False

    # --- accepting ----------------------------------------------------------------------------------

    def _tune_listener(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):  # inherited by accepted sockets: one syscall less per session
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_listener(self, sock: socket.socket, listen: Any) -> None:
        for _ in range(self.config.batch):
            try:
                client, addr = sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _PAUSE_ERRNOS:
                    self._pause_accepting(exc)
                    return
                self._count("accept_errors")
                continue
            try:
                self._admit(client, (addr[0], addr[1]), listen)
            except Exception as exc:  # never let one odd connection take the worker down
                self.say(logging.ERROR, "tcp session setup failed: %s: %s", type(exc).__name__, exc)
                _reset(client)

    def _pause_accepting(self, exc: OSError) -> None:
        """Out of fds or memory: stop accepting for 100 ms instead of spinning on a ready listener."""
        self._count("accept_paused")
        self.say(logging.WARNING, "tcp accept paused: %s", exc.strerror)
        if self._paused:
            return
        self._paused = True
        for sock in self.listeners:
            self.loop.remove(sock.fileno())

        def resume() -> None:
            self._paused = False
            if not self.draining:
                for sock in self.listeners:
                    self._register_listener(sock)

        self.loop.call_later(0.1, resume)

    def _ct_mark(self, client: Address, listen: Address) -> int:
        """The connection's conntrack mark (it says which interface a rule chose); 0 when unreadable.
        One netlink lookup, only while some rule names an interface."""
        try:
            if self._conntrack is None:
                from .origdst import ConntrackResolver

                self._conntrack = ConntrackResolver(protocol=IpProtocol.TCP)
            found = self._conntrack(client, listen)
        except (OSError, ValueError) as exc:
            self.say(logging.WARNING, "conntrack mark of %s unreadable: %s", client, exc)
            return 0
        return found[2] if found is not None else 0

    def _admit(self, client: socket.socket, addr: Address, listen: Address) -> None:
        orig = None
        found = None
        if self.resolver is not None:
            found = self.resolver(addr, listen)
            orig = found[1] if found is not None else None
        elif self.use_orig_dst:
            try:
                orig = original_dst(client)
            except (OSError, ValueError) as exc:
                self.say(logging.WARNING, "tcp original destination of %s unreadable: %s", addr, exc)
        session = Session(self.table.new_id(), "tcp", addr, listen, orig)
        if self.table.full():
            _reset(client)
            self._count("refused_session_limit")
            self._refused(session, f"session limit {self.table.max_sessions} reached")
            return
        if found is not None:
            ct_mark = found[2]
        elif self.resolver is None and getattr(self.decider, "wants_ct_mark", False):
            ct_mark = self._ct_mark(addr, listen)
        else:
            ct_mark = 0
        seen = FiveTuple(IpProtocol.TCP, addr[0], addr[1], listen[0], listen[1])
        flow = FiveTuple(IpProtocol.TCP, addr[0], addr[1], orig[0], orig[1]) if orig is not None else None
        plan = self._decide(SessionRequest(seen, flow, ct_mark))
        if isinstance(plan, Refusal):
            _reset(client)
            self._refused(session, plan.reason)
            return
        session.remote = plan.remote
        session.interface = plan.binding.interface
        session.extra = plan.extra
        try:
            upstream = open_upstream(socket.SOCK_STREAM, plan.remote, plan.binding)
            self._announce(upstream, plan.remote)
        except OSError as exc:
            _reset(client)
            self._refused(session, f"upstream socket: {exc.strerror or exc}")
            return
        err = upstream.connect_ex(plan.remote)
        client.setblocking(False)  # TCP_NODELAY came with accept: it is set on the listener
        conn = TcpConn(self, session, client, upstream)
        self._track(session)
        self.conns[session.id] = conn
        session._closer = lambda reason: self.loop.call_soon_threadsafe(lambda: conn.close(reason, rst=True))
        if err not in (0, errno.EINPROGRESS):
            conn.close(f"dial failed: {os.strerror(err)}", rst=True)
            return
        interest = READ | WRITE | RDHUP
        self.loop.add(client.fileno(), interest if self.edge else 0, conn.on_client)
        self.loop.add(upstream.fileno(), interest if self.edge else WRITE, conn.on_upstream)

    # --- sessions -----------------------------------------------------------------------------------

    def _closed(self, conn: TcpConn, reason: str) -> None:
        session = conn.session
        session.ended(reason)
        self.conns.pop(session.id, None)
        self.table.remove(session)
        self._count("closed_" + reason.split(":", 1)[0].replace(" ", "_"))
        self._hook("on_close", session)
        if self.draining:
            self._check_drained()

    def _close_session(self, session: Session, reason: str) -> None:
        conn = self.conns.get(session.id)
        if conn is not None:
            conn.close(reason, rst=reason != "shutdown")

    def _sweep(self) -> None:
        now = time.monotonic()
        cfg = self.config
        for conn in list(self.conns.values()):
            s = conn.session
            if conn.state == CONNECTING:
                if now - s.created >= cfg.dial_timeout:
                    conn.close("dial failed: timed out", rst=True)
                continue
            moved = s.bytes_up + s.bytes_down
            busy = moved != conn.seen
            if busy:
                conn.seen = moved
                s.last_seen = now
            elif now - s.last_seen >= cfg.read_timeout:
                conn.close("idle")
                continue
            for d in (conn.up, conn.down):
                if d.stalled_at and now - d.stalled_at >= cfg.write_timeout:
                    conn.close("write timeout", rst=True)
                    break
            if conn.state == OPEN and s.report_due(now, moved, busy, cfg.first_stats, cfg.stats_interval):
                conn.packets()
                self._hook("on_stats", s)
        if self.draining:
            self._check_drained()

    def _release(self) -> None:
        if self.pipes is not None:
            self.pipes.close()
        if self._conntrack is not None:
            self._conntrack.close()
        if self.resolver is not None:
            with contextlib.suppress(Exception):
                self.resolver.close()


def _reset(sock: socket.socket) -> None:
    """Close with RST: a refused client learns at once, with no half-open connection left behind."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    sock.close()
