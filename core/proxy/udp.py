"""Transparent UDP proxy: one session per (client address, original destination), one upstream socket each.

How a datagram finds its way (Linux, DNAT to the proxy):
- The app's socket sends to peer P; nat OUTPUT DNATs it to the proxy. Its conntrack entry's reply tuple is
  (proxy → client). When the same app socket also sends to peer Q, Q's entry would get the same reply
  tuple, so the kernel's implicit source NAT gives it another client port: the proxy sees the app as
  client:5000 for P and client:34418 for Q. The "client address as seen" therefore names one flow.
- A new seen address → one conntrack lookup by reply tuple (O(1) in the kernel) → the original tuple:
  the app's real address and P. The session key is (seen client, original destination).
- Replies from P arrive on the session's connected upstream socket and are sent from the proxy's listening
  socket to the seen address: that is exactly the flow's reply tuple, so conntrack un-NATs it and the app
  sees the datagram coming from P to its own port, per peer.
- A session must not outlive the kernel's NAT entry (udp_idle_timeout stays below conntrack's UDP
  timeout), and the mapping is re-checked at most every `udp_revalidate` seconds while traffic flows, so
  an entry deleted by the firewall and a seen address reused for another peer never cross-deliver.
- A session belongs to the app socket its flow was decided for. A UDP conntrack entry outlives its socket,
  so another app's socket reusing the port at once (before the interceptor removed the entry) would be
  sent down this split path. Each round of datagrams a session gets is checked: the socket that owns the
  flow now (one sock_diag lookup) must be the one the interceptor decided the flow for, which it names in
  the redirect table before the verdict (core/redirect.py; a mapped-memory read). Asking only "which socket
  is there now" is not enough: when the decided socket closed before its first datagram reached the proxy
  (a slow round under load) and another app already holds the port, that app's datagrams would follow.
  Another socket's datagrams are dropped, the session closed and the entry deleted, so that socket's next
  datagram is queued and decided for its own app. Nothing that should stay in the VPN leaves here. A flow
  whose entry already carried replies when this proxy first sees it (the proxy restarted, or its session
  timed out) has no known socket: its datagram is dropped and the entry deleted, so the next one is decided
  afresh.
Datagrams are read one by one on the data thread, so a burst of first packets creates one session (it
exists before the second datagram is read). What one readiness event finds queued for a session is sent
on together: with UDP GSO (Linux) one send carries up to 64 equal-sized datagrams through routing and
netfilter once, and the kernel splits them on the way out; order is kept.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

from messages.flows import FiveTuple, IpProtocol

from .base import ProxyBase
from .decider import Address, Refusal, SessionRequest
from .loop import READ
from .session import Session
from .upstream import open_upstream

log = logging.getLogger("splittun.proxy")

#: (client as seen, listen address) → (the app's own address, its original destination, the conntrack mark), or
#: None when the flow was not NAT'd
Resolver = Callable[[Address, Address], "tuple[Address, Address, int] | None"]

_SOL_UDP = getattr(socket, "SOL_UDP", 17)
_UDP_SEGMENT = 103  # linux/udp.h: UDP GSO segment size
_U16 = struct.Struct("=H")
_GSO_MAX_SEGMENTS = 64
_GSO_MAX_BYTES = 60_000  # one GSO send is one IP packet before segmentation: stay below 64 KiB
_NO_GSO = {errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP}
_REFUSAL_MEMORY = 2.0  # seconds a refused flow's further datagrams are dropped without asking again
_LISTEN_RCVBUF = 4 << 20


class DatagramBatch:
    """Datagrams of one session read in one round: equal sizes (the last may be shorter) can go as one
    UDP GSO send; a datagram that breaks the pattern or the size limits starts a new batch."""

    __slots__ = ("count", "data", "last", "size")

    def __init__(self, first: memoryview) -> None:
        self.data = bytearray(first)
        self.size = len(first)
        self.count = 1
        self.last = len(first)

    def add(self, datagram: memoryview) -> bool:
        n = len(datagram)
        if (
            n > self.size
            or self.last < self.size
            or self.count >= _GSO_MAX_SEGMENTS
            or len(self.data) + n > _GSO_MAX_BYTES
        ):
            return False
        self.data += datagram
        self.count += 1
        self.last = n
        return True

    def datagrams(self) -> list[memoryview]:
        view = memoryview(self.data)
        return [view[start : start + self.size] for start in range(0, len(self.data), self.size)]

    def send_each(self, sock: socket.socket, addr: Any = None) -> None:
        for datagram in self.datagrams():
            if addr is None:
                sock.send(datagram)
            else:
                sock.sendto(datagram, addr)


#: (the app's own address, its original destination) → the cookie of the socket that owns that flow now (0: none)
SocketCheck = Callable[[Address, Address], int]
#: (the app's own address, its original destination) → the socket the interceptor decided the flow for: its cookie,
#: 0 for any socket, None when it said nothing (core.proxy.origdst.SplitOwners)
SplitOwners = Callable[[Address, Address], "int | None"]
_REPLACED = "client socket replaced: another socket reused the app's port"
#: The owner of a session whose first datagrams came from a socket already closed: no live socket has this cookie.
_OWNER_CLOSED = -1


class UdpConn:
    __slots__ = (
        "check",
        "client_addr",
        "client_cookie",
        "key",
        "listener",
        "seen",
        "session",
        "upstream",
        "validated_at",
    )

    def __init__(
        self, session: Session, listener: socket.socket, client_addr: Any, upstream: socket.socket, key: Any
    ) -> None:
        self.session = session
        self.listener = listener
        self.client_addr = client_addr  # exactly as recvfrom gave it: replies go back to it
        self.upstream = upstream
        self.key = key
        self.validated_at = time.monotonic()
        self.check = False  # set by the sweep: re-check the conntrack mapping before the next datagram
        self.seen = 0
        self.client_cookie = 0  # the app socket this flow was decided for (0: not known)


def default_resolver() -> Resolver | None:
    """Conntrack lookups on Linux when this process may make them; otherwise none."""
    if not sys.platform.startswith("linux"):
        return None
    from .origdst import ConntrackResolver

    try:
        return ConntrackResolver()
    except OSError as exc:
        log.warning("udp original destinations unavailable (conntrack netlink: %s)", exc.strerror)
        return None


def split_entry_events() -> Any:
    """Destroy events of split conntrack entries (Linux), or None where they cannot be had."""
    if not sys.platform.startswith("linux"):
        return None
    from kernel.conntrack import ConntrackEvents
    from messages.marks import VERDICT_MASK, Mark

    try:
        return ConntrackEvents(mark=int(Mark.REROUTE_TO_SPLIT_TUN), mask=VERDICT_MASK)
    except OSError as exc:
        log.warning("udp conntrack events unavailable (%s)", exc.strerror)
        return None


def default_socket_check() -> SocketCheck | None:
    """sock_diag lookups of the app's socket on Linux; elsewhere none (no check)."""
    if not sys.platform.startswith("linux"):
        return None
    from kernel.sockdiag import SockDiag

    try:
        diag = SockDiag()
    except OSError as exc:
        log.warning("udp client socket checks unavailable (sock_diag netlink: %s)", exc.strerror)
        return None

    def check(client: Address, dst: Address) -> int:
        found = diag.lookup(FiveTuple(IpProtocol.UDP, client[0], client[1], dst[0], dst[1]), strict=True)
        return found.cookie if found is not None else 0

    check.close = diag.close  # type: ignore[attr-defined]
    return check


class UdpProxy(ProxyBase):
    """Transparent UDP proxy on one or more listen addresses (see module docstring)."""

    protocol = "udp"
    kind = socket.SOCK_DGRAM

    def __init__(
        self,
        *args: Any,
        resolver: Resolver | str | None = "auto",
        socket_check: SocketCheck | str | None = "auto",
        owners: SplitOwners | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.resolver: Resolver | None = default_resolver() if resolver == "auto" else resolver  # type: ignore[assignment]
        self.socket_check: SocketCheck | None = (
            default_socket_check() if socket_check == "auto" else socket_check  # type: ignore[assignment]
        )
        self.owners = owners  # NFQUEUE: the socket each split flow was decided for (the interceptor says)
        # Split entries going away (filtered in the kernel): a session lives exactly as long as its entry.
        watch = (
            self.resolver is not None and socket_check == "auto" and getattr(self.resolver, "conntrack_events", True)
        )
        self.ct_events: Any = split_entry_events() if watch else None
        self.by_orig: dict[tuple[Address, Address], UdpConn] = {}
        self.gso = sys.platform.startswith("linux")
        self.buffer = bytearray(self.config.udp_buffer_size)
        self.view = memoryview(self.buffer)
        # per listening socket: client address exactly as recvfrom gives it → session (no per-datagram tuples)
        self.flows: dict[int, dict[Any, UdpConn]] = {sock.fileno(): {} for sock in self.listeners}
        self.conns: dict[str, UdpConn] = {}
        self._refused_recently: dict[tuple[int, Any], float] = {}
        self._replaced: dict[tuple[int, Any], float] = {}  # flows closed for another socket: until when

    def _prepare(self) -> None:
        super()._prepare()
        if self.ct_events is not None:
            self.loop.add(self.ct_events.fileno(), READ, lambda _ev: self._on_entries_gone(), edge=False)

    def _on_entries_gone(self) -> None:
        """Close the sessions whose conntrack entries are gone: a later datagram of the same addresses is a new
        flow (queued, decided) and gets a session of its own."""
        try:
            entries = self.ct_events.read()
        except OSError as exc:
            self._count("recv_errors")
            self.say(logging.WARNING, "conntrack events unreadable: %s", exc.strerror)
            return
        for entry in entries:
            conn = self.by_orig.get((entry.orig.src, entry.orig.dst))
            if conn is not None:
                self._close_conn(conn, "conntrack entry gone")

    def _stop_accepting(self) -> None:
        """UDP replies leave through the listening socket: it stays open while live sessions drain,
        and datagrams of new flows are refused instead."""

    def _tune_listener(self, sock: socket.socket) -> None:
        for opt in (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, _LISTEN_RCVBUF)
                return
            except OSError:
                continue

    # --- client → upstream --------------------------------------------------------------------------

    def _on_listener(self, sock: socket.socket, listen: Any) -> None:
        """Read what is queued (up to `batch` datagrams); forward each session's datagrams together."""
        buf, view = self.buffer, self.view
        lfd = sock.fileno()
        flows = self.flows[lfd]
        out: dict[UdpConn, DatagramBatch] = {}
        checked: set[UdpConn] = set()
        try:
            for _ in range(self.config.batch):
                try:
                    n, addr = sock.recvfrom_into(buf)
                except BlockingIOError:
                    return
                except OSError as exc:
                    self._count("recv_errors")
                    self.say(logging.WARNING, "udp receive failed on %s: %s", listen, exc.strerror)
                    return
                conn = flows.get(addr)
                if conn is None or conn.check:
                    try:
                        conn = self._session_for(sock, listen, addr, (lfd, addr), conn)
                    except Exception as exc:  # odd input or kernel answer: drop the datagram, keep serving
                        self._count("dropped_errors")
                        self.say(logging.ERROR, "udp session setup failed: %s: %s", type(exc).__name__, exc)
                        continue
                    if conn is None:
                        if self._replaced.get((lfd, addr), 0.0) <= time.monotonic():  # else counted already
                            self._count("dropped_refused")
                        continue
                if conn not in checked:
                    checked.add(conn)
                    checked_conn = self._client_socket_checked(sock, listen, addr, conn)
                    if checked_conn is not conn:
                        out.pop(conn, None)
                        if checked_conn is None:
                            continue
                        conn = checked_conn
                        checked.add(conn)
                elif conn.session.closed:
                    self._count("dropped_other_socket")
                    continue
                batch = out.get(conn)
                if batch is None:
                    out[conn] = DatagramBatch(view[:n])
                elif not batch.add(view[:n]):
                    self._forward(conn, batch)
                    out[conn] = DatagramBatch(view[:n])
        finally:
            for conn, batch in out.items():
                if not conn.session.closed:
                    self._forward(conn, batch)

    def _client_socket_checked(self, sock: socket.socket, listen: Address, addr: Any, conn: UdpConn) -> UdpConn | None:
        """The session for this round of a flow's datagrams, once it is known to come from the app socket the
        flow was decided for. That socket is the one the interceptor named in the redirect table before the
        verdict (`owners`; without it, the socket found at the session's first round). Another socket's
        datagrams on the same addresses are either a new flow (a new conntrack entry, which the interceptor
        decided for that socket: a new session), or a socket the interceptor gave the flow to (it took the
        port over with the same verdict: the table names it now), or came down the old entry before the
        interceptor removed it (another app reusing the port at once): those get nothing through — dropped,
        the session closed, the entry deleted, so that socket's next datagram is decided for its own app. No
        socket at all (it sent and closed) means the last datagrams of the decided one while its conntrack
        entry lives (once the interceptor ended it, they are dropped: another app may have sent them down the
        old entry and closed — a narrower window, not none; see ARCHITECTURE.md)."""
        if self.socket_check is None:
            return conn
        s = conn.session
        client, dst = s.orig_client or s.client, s.orig_dst or s.listen
        try:
            cookie = self.socket_check(client, dst)
        except OSError as exc:  # cannot tell whose datagrams these are: never send them out the split path
            self._count("dropped_unverified")
            self.say(logging.WARNING, "udp client socket check failed: %s: these datagrams are dropped", exc)
            return None
        if not conn.client_cookie:  # the session's first round: whose flow is it?
            owner = self.owners(client, dst) if self.owners is not None else 0
            if owner is None:  # the interceptor published no owner: whose it is cannot be known
                return self._drop_flow(conn, client, dst, "dropped_unknown_owner", "the interceptor named no socket")
            if owner and cookie and cookie != owner:  # the decided socket closed and another took its port
                return self._drop_flow(conn, client, dst, "dropped_other_socket", _REPLACED)
            conn.client_cookie = owner or cookie or _OWNER_CLOSED
            return conn
        if cookie == conn.client_cookie:
            return conn
        if cookie and self.owners is not None and self.owners(client, dst) == cookie:
            conn.client_cookie = cookie  # the interceptor gave the flow to this socket (same verdict)
            return conn
        if not cookie:  # the app's last datagrams — unless its entry ended meanwhile: then whose they are is unsure
            if self.ct_events is not None:
                self._on_entries_gone()
            if not s.closed:
                return conn
            self._count("dropped_owner_gone")
            return None
        if self.ct_events is not None:
            self._on_entries_gone()  # the old entry's end may be waiting: then this is a new flow
        if s.closed:
            fresh = self._session_for(sock, listen, addr, conn.key, None)
            if fresh is not None:
                fresh.client_cookie = cookie
            return fresh
        return self._drop_flow(conn, client, dst, "dropped_other_socket", _REPLACED)

    def _drop_flow(self, conn: UdpConn, client: Address, dst: Address, counter: str, reason: str) -> None:
        """Nothing of this round goes out: close the session and delete the flow's entry, so the next datagram
        on these addresses is queued and decided for its own socket; what was queued meanwhile is dropped."""
        self._count(counter)
        if len(self._replaced) > 4 * self.table.max_sessions:
            self._replaced.clear()
        self._replaced[conn.key] = time.monotonic() + _REFUSAL_MEMORY
        self._arm_sweep()  # to forget it
        self._close_conn(conn, reason)
        forget = getattr(self.resolver, "forget", None)
        if forget is not None:
            with contextlib.suppress(OSError):
                forget(client, dst)
        return None

    def _forward(self, conn: UdpConn, batch: DatagramBatch) -> None:
        """One send for a session's queued datagrams: UDP GSO (one pass through routing and netfilter for
        all of them, split into datagrams on the way out) when they allow it, else one send each."""
        up = conn.upstream
        try:
            if batch.count == 1:
                up.send(batch.data)
            elif self.gso:
                try:
                    up.sendmsg([batch.data], [(_SOL_UDP, _UDP_SEGMENT, _U16.pack(batch.size))])
                except OSError as exc:
                    if exc.errno not in _NO_GSO:
                        raise
                    self._no_gso(exc)
                    batch.send_each(up)
            else:
                batch.send_each(up)
        except BlockingIOError:
            self._count("dropped_upstream_full")
            return
        except OSError as exc:  # e.g. ICMP unreachable reported on the connected socket
            self._count("send_errors")
            self.say(logging.INFO, "udp send to %s failed: %s", conn.session.remote, exc.strerror)
            return
        s = conn.session
        s.bytes_up += len(batch.data)
        s.packets_up += batch.count

    def _session_for(
        self, sock: socket.socket, listen: Address, addr: Any, key: tuple[int, Any], known: UdpConn | None
    ) -> UdpConn | None:
        """The flow's session: re-checked `known`, a new one, or None when refused."""
        client = (addr[0], addr[1])
        resolved = self.resolver(client, listen) if self.resolver is not None else None
        if resolved is None and self._replaced.get(key, 0.0) > time.monotonic():
            self._count("dropped_other_socket")  # queued under the entry deleted for another socket: dropped
            return None
        orig_client, orig_dst, ct_mark, replied = resolved if resolved is not None else (None, None, 0, False)
        if known is None and replied and self.socket_check is not None:
            # A flow this proxy never saw, yet its entry already carried replies: it began under an earlier
            # proxy (this one restarted) or outlived a session that timed out. Whose socket it was decided for
            # is unknown here, and another app's socket may have reused the port since: drop, delete the
            # entry, and that socket's next datagram is queued and decided for its own app.
            self._count("dropped_unknown_owner")
            forget = getattr(self.resolver, "forget", None)
            if forget is not None and orig_client is not None and orig_dst is not None:
                with contextlib.suppress(OSError):
                    forget(orig_client, orig_dst)
            return None
        if known is not None:
            s = known.session
            if orig_dst == s.orig_dst and (orig_client or client) == s.orig_client:
                known.check = False
                known.validated_at = time.monotonic()
                return known
            self._close_conn(known, "flow replaced: conntrack mapping changed")
        now = time.monotonic()
        if self.draining:
            return None
        until = self._refused_recently.get(key)
        if until is not None:
            if now < until:
                return None
            del self._refused_recently[key]
        session = Session(self.table.new_id(), "udp", client, listen, orig_dst, orig_client, now=now)
        if self.table.full():
            self._count("refused_session_limit")
            self._refuse(key, session, f"session limit {self.table.max_sessions} reached", now)
            return None
        seen = FiveTuple(IpProtocol.UDP, client[0], client[1], listen[0], listen[1])
        app = orig_client or client
        flow = FiveTuple(IpProtocol.UDP, app[0], app[1], orig_dst[0], orig_dst[1]) if orig_dst is not None else None
        plan = self._decide(SessionRequest(seen, flow, ct_mark))
        if isinstance(plan, Refusal):
            self._refuse(key, session, plan.reason, now)
            return None
        session.remote = plan.remote
        session.interface = plan.binding.interface
        session.extra = plan.extra
        try:
            upstream = open_upstream(socket.SOCK_DGRAM, plan.remote, plan.binding)
            self._announce(upstream, plan.remote)
        except OSError as exc:
            self._refuse(key, session, f"upstream socket: {exc.strerror or exc}", now)
            return None
        try:
            upstream.connect(plan.remote)
            session.local = tuple(upstream.getsockname()[:2])  # type: ignore[assignment]
        except OSError as exc:
            upstream.close()
            self._refuse(key, session, f"dial failed: {exc.strerror or exc}", now)
            return None
        conn = UdpConn(session, sock, addr, upstream, key)
        if orig_client is not None and orig_dst is not None:
            self.by_orig[(orig_client, orig_dst)] = conn
        self._track(session)
        self.flows[key[0]][addr] = conn
        self.conns[session.id] = conn
        session._closer = lambda reason: self.loop.call_soon_threadsafe(lambda: self._close_conn(conn, reason))
        self.loop.add(upstream.fileno(), READ, lambda _ev: self._on_upstream(conn), edge=False)
        self._opened(session)
        return conn

    def _refuse(self, key: tuple[int, Any], session: Session, reason: str, now: float) -> None:
        if len(self._refused_recently) > 4 * self.table.max_sessions:
            self._refused_recently.clear()
        self._refused_recently[key] = now + _REFUSAL_MEMORY
        self._arm_sweep()  # to forget it
        self._refused(session, reason)

    # --- upstream → client --------------------------------------------------------------------------

    def _on_upstream(self, conn: UdpConn) -> None:
        """Replies: read what is queued, send it to the client from the listening socket (batched)."""
        buf, view = self.buffer, self.view
        up, s = conn.upstream, conn.session
        batch: DatagramBatch | None = None
        try:
            for _ in range(self.config.batch):
                try:
                    n = up.recv_into(buf)
                except BlockingIOError:
                    return
                except ConnectionRefusedError:
                    self._count("upstream_unreachable")  # ICMP port unreachable from the remote
                    continue
                except OSError as exc:
                    self._count("recv_errors")
                    self.say(logging.WARNING, "udp receive from %s failed: %s", s.remote, exc.strerror)
                    return
                if batch is None:
                    batch = DatagramBatch(view[:n])
                elif not batch.add(view[:n]):
                    self._reply(conn, batch)
                    batch = DatagramBatch(view[:n])
        finally:
            if batch is not None:
                self._reply(conn, batch)

    def _reply(self, conn: UdpConn, batch: DatagramBatch) -> None:
        listener, client_addr = conn.listener, conn.client_addr
        try:
            if batch.count == 1:
                listener.sendto(batch.data, client_addr)
            elif self.gso:
                try:
                    opt = [(_SOL_UDP, _UDP_SEGMENT, _U16.pack(batch.size))]
                    listener.sendmsg([batch.data], opt, 0, client_addr)
                except OSError as exc:
                    if exc.errno not in _NO_GSO:
                        raise
                    self._no_gso(exc)
                    batch.send_each(listener, client_addr)
            else:
                batch.send_each(listener, client_addr)
        except BlockingIOError:
            self._count("dropped_client_full")
            return
        except OSError as exc:
            self._count("send_errors")
            self.say(logging.INFO, "udp reply to %s failed: %s", client_addr, exc.strerror)
            return
        s = conn.session
        s.bytes_down += len(batch.data)
        s.packets_down += batch.count

    def _no_gso(self, exc: OSError) -> None:
        self.gso = False  # a device on the way cannot segment: datagram by datagram from now on
        self.say(logging.INFO, "udp GSO unavailable (%s): sending datagram by datagram", exc.strerror)

    # --- sessions -----------------------------------------------------------------------------------

    def _close_conn(self, conn: UdpConn, reason: str) -> None:
        s = conn.session
        if s.closed:
            return
        s.ended(reason)
        self.loop.remove(conn.upstream.fileno())
        conn.upstream.close()
        lfd, addr = conn.key
        flows = self.flows.get(lfd, {})
        if flows.get(addr) is conn:
            del flows[addr]
        if (
            s.orig_client is not None
            and s.orig_dst is not None
            and self.by_orig.get((s.orig_client, s.orig_dst)) is conn
        ):
            del self.by_orig[(s.orig_client, s.orig_dst)]
        self.conns.pop(s.id, None)
        self.table.remove(s)
        self._count("closed_" + reason.split(":", 1)[0].replace(" ", "_"))
        self._hook("on_close", s)
        if self.draining:
            self._check_drained()

    def _close_session(self, session: Session, reason: str) -> None:
        conn = self.conns.get(session.id)
        if conn is not None:
            self._close_conn(conn, reason)

    def _sweep(self) -> None:
        now = time.monotonic()
        cfg = self.config
        for conn in list(self.conns.values()):
            s = conn.session
            moved = s.packets_up + s.packets_down
            busy = moved != conn.seen
            if busy:
                conn.seen = moved
                s.last_seen = now
            elif now - s.last_seen >= cfg.udp_idle_timeout:
                self._close_conn(conn, "idle")
                continue
            if self.resolver is not None and now - conn.validated_at >= cfg.udp_revalidate:
                conn.check = True
            if s.report_due(now, moved, busy, cfg.first_stats, cfg.stats_interval):
                self._hook("on_stats", s)
        for memory in (self._refused_recently, self._replaced):
            for key, until in list(memory.items()):
                if until <= now:
                    del memory[key]
        if self.draining:
            self._check_drained()

    def _needs_sweep(self) -> bool:
        return bool(self.table.active or self._refused_recently or self._replaced)

    def _release(self) -> None:
        for thing in (self.resolver, self.socket_check, self.ct_events, self.owners):
            closer = getattr(thing, "close", None)
            if closer is not None:
                with contextlib.suppress(Exception):
                    closer()
