"""What the TCP and UDP proxies share: listeners, the decider call, the session table, hooks, deadlines,
the data thread and graceful shutdown."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any, ClassVar

from runtime.log import LineBudget
from runtime.loop import Timer

from .config import ProxyConfig
from .decider import Address, Decider, Refusal, SessionRequest, UpstreamPlan
from .loop import READ, DataLoop, raise_fd_limit
from .session import Session, SessionTable
from .upstream import family_of

log = logging.getLogger("splittun.proxy")


class SessionHooks:
    """What the proxy tells its owner, called on the data thread (keep them quick; publish and return)."""

    def on_open(self, session: Session) -> None:
        """The upstream is there (TCP: connected) and bytes may flow."""

    def on_stats(self, session: Session) -> None:
        """Periodic counters of a session older than `stats_interval`."""

    def on_close(self, session: Session) -> None:
        """The session ended (also: refused, dial failed). `session.close_reason` says why."""

    #: Seconds an open may be held back, so that a session ending sooner is told in one close; `flush` is
    #: called within this time of an open (and when the proxy stops). 0: nothing is held, no flush.
    hold: float = 0.0

    def flush(self) -> None:
        """Tell what was held back (the opens of sessions still open)."""

    def end_turn(self) -> None:
        """A turn of the data loop ended (its handlers ran; it is about to sleep), and once more after the proxy
        stopped: where events this turn told of leave together (BusHooks: one bus message per run of a topic)."""


def parse_address(text: str) -> Address:
    """`127.0.0.17:719`, `[::1]:719` → (ip, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
    else:
        host, _, port = text.rpartition(":")
        if ":" in host:
            host = ""  # an IPv6 address needs brackets, or its last group would read as the port
    try:
        ipaddress.ip_address(host)
    except ValueError:
        host = ""
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"bad listen address {text!r}: want IP:PORT or [IPv6]:PORT")
    return host, int(port)


class ProxyBase:
    protocol: ClassVar[str] = ""
    kind: ClassVar[socket.SocketKind]

    def __init__(
        self,
        listen: Sequence[Address],
        decider: Decider,
        config: ProxyConfig | None = None,
        hooks: SessionHooks | None = None,
        id_prefix: str | None = None,
    ) -> None:
        self.config = config or ProxyConfig()
        self.decider = decider
        self.hooks = hooks or SessionHooks()
        self.table = SessionTable(self.config.max_sessions, id_prefix)
        self.loop = DataLoop(self.config.edge_triggered, name=f"proxy-{self.protocol}")
        self.edge = self.loop.edge_triggered
        self._lines = LineBudget(5)  # bad input must be visible, never flood the log
        self.suppressed_lines = 0
        self.draining = False
        self.stopped = threading.Event()
        self._drain_deadline = 0.0
        self._started = False
        self._flush_due = False
        self._sweeper: Timer | None = None  # runs while there is something to sweep (`_arm_sweep`)
        self.stats: dict[str, int] = {}
        raise_fd_limit()
        self.listeners: list[socket.socket] = []
        try:
            for addr in listen:
                self.listeners.append(self._bind(addr))
        except BaseException:
            for sock in self.listeners:
                sock.close()
            raise
        self.addresses: list[Address] = [tuple(s.getsockname()[:2]) for s in self.listeners]  # type: ignore[misc]

    # --- lifecycle ----------------------------------------------------------------------------------

    def _bind(self, addr: Address) -> socket.socket:
        family = family_of(addr[0])
        sock = socket.socket(family, self.kind)
        try:
            if self.kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.config.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            self._tune_listener(sock)
            sock.bind(addr)
            if self.kind == socket.SOCK_STREAM:
                sock.listen(self.config.backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _tune_listener(self, sock: socket.socket) -> None:
        """Socket options before bind (UDP: a larger receive buffer)."""

    def start(self) -> None:
        """Start serving on a thread of its own; returns at once."""
        self._prepare()
        self.loop.start_thread()

    def run(self) -> None:
        """Serve on the calling thread until `shutdown`."""
        self._prepare()
        try:
            self.loop.run()
        finally:
            self._cleanup()

    def _prepare(self) -> None:
        if self._started:
            raise RuntimeError("proxy already started")
        self._started = True
        for sock in self.listeners:
            self._register_listener(sock)
        self.loop.at_turn_end(self.hooks.end_turn)

    def _register_listener(self, sock: socket.socket) -> None:
        listen = tuple(sock.getsockname()[:2])
        self.loop.add(sock.fileno(), READ, lambda ev: self._on_listener(sock, listen), edge=False)

    def _on_listener(self, sock: socket.socket, listen: Any) -> None:
        raise NotImplementedError

    def shutdown(self, drain_timeout: float | None = None) -> None:
        """Stop accepting, let live sessions finish for up to `drain_timeout` s, close the rest, stop.

        Thread-safe; blocks until the data thread has ended (when it runs on one)."""
        timeout = self.config.drain_timeout if drain_timeout is None else drain_timeout
        if not self._started:
            self._close_listeners()
            self.stopped.set()
            return
        self.loop.call_soon_threadsafe(lambda: self._begin_drain(timeout))
        thread = self.loop.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout + 5.0)
            self._cleanup()

    def _begin_drain(self, timeout: float) -> None:
        if self.draining:
            return
        self.draining = True
        self._drain_deadline = time.monotonic() + timeout
        self._stop_accepting()
        self.loop.call_later(timeout, self._check_drained)
        self._check_drained()

    def _stop_accepting(self) -> None:
        """Drain begins: no new sessions from here on (TCP: close the listeners)."""
        self._close_listeners()

    def _close_listeners(self) -> None:
        for sock in self.listeners:
            self.loop.remove(sock.fileno())
            sock.close()
        self.listeners = []

    def _check_drained(self) -> None:
        if not self.draining:
            return
        if self.table.active and time.monotonic() < self._drain_deadline:
            return
        for session in self.table.sessions():
            self._close_session(session, "shutdown")
        self.loop.running = False

    def _cleanup(self) -> None:
        if self.stopped.is_set():
            return
        for session in self.table.sessions():  # the loop stopped some other way: still close everything
            self._close_session(session, "shutdown")
        self._flush_hooks()
        self.loop.end_turn()  # what closing them published leaves too
        self._close_listeners()
        self._release()
        self.loop.close()
        self.stopped.set()

    def _release(self) -> None:
        """Free protocol resources (pipes, resolvers)."""

    # --- sessions -----------------------------------------------------------------------------------

    def _track(self, session: Session) -> None:
        """A new live session: into the table, and deadlines are watched from now on."""
        self.table.add(session)
        self._arm_sweep()

    def _arm_sweep(self) -> None:
        """Check deadlines every `config.tick()` s, on the wall clock's multiples of it (`until_slot`), while
        there is something to check: an idle proxy has no timer and never wakes."""
        if self._sweeper is None:
            self._sweeper = self.loop.call_every_slot(self.config.tick(), self._sweep_tick)

    def _sweep_tick(self) -> None:
        self._sweep()
        if self._sweeper is not None and not self._needs_sweep():
            self._sweeper.cancel()
            self._sweeper = None

    def _needs_sweep(self) -> bool:
        """Whether deadlines are left to check (live sessions; UDP: refusals to forget)."""
        return bool(self.table.active)

    def _announce(self, upstream: socket.socket, remote: Address) -> None:
        """Divert backend: say the upstream is ours before its first packet (its resolver's `announce`)."""
        announce = getattr(getattr(self, "resolver", None), "announce", None)
        if announce is not None:
            try:
                local = upstream.getsockname()
                announced = announce((local[0], local[1]), remote)
            except OSError as exc:
                announced, reason = False, str(exc)
            else:
                reason = "the redirect table has no room"
            if not announced:
                self._count("upstream_unannounced")
                self.say(logging.WARNING, "upstream %s not announced: %s", remote, reason)

    def _decide(self, req: SessionRequest) -> UpstreamPlan | Refusal:
        try:
            answer = self.decider(req)
        except Exception as exc:
            self.say(logging.ERROR, "decider failed for %s: %s: %s", req, type(exc).__name__, exc)
            return Refusal(f"decider failed: {type(exc).__name__}")
        if not isinstance(answer, (UpstreamPlan, Refusal)):
            return Refusal(f"decider returned {type(answer).__name__}")
        if isinstance(answer, UpstreamPlan) and answer.remote in self.addresses:
            return Refusal("loop: the remote is this proxy")
        return answer

    def _opened(self, session: Session) -> None:
        """A session's upstream is there: tell the hooks, and have them flush within `hooks.hold` s."""
        self._hook("on_open", session)
        if self.hooks.hold > 0 and not self._flush_due:
            self._flush_due = True
            self.loop.call_later(self.hooks.hold, self._flush_hooks)

    def _flush_hooks(self) -> None:
        self._flush_due = False
        try:
            self.hooks.flush()
        except Exception as exc:
            self.say(logging.ERROR, "session hook flush failed: %s: %s", type(exc).__name__, exc)

    def _refused(self, session: Session, reason: str) -> None:
        self.table.refuse()
        session.ended(f"refused: {reason}")
        self._count("refused")
        self._hook("on_close", session)

    def say(self, level: int, msg: str, *args: Any) -> None:
        """A log line within the line budget (a burst of bad input is counted, not written line by line)."""
        if self._lines.allow():
            log.log(level, msg, *args)
        else:
            self.suppressed_lines += 1

    def _hook(self, name: str, session: Session) -> None:
        try:
            getattr(self.hooks, name)(session)
        except Exception as exc:
            self.say(logging.ERROR, "session hook %s failed: %s: %s", name, type(exc).__name__, exc)

    def _count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def _close_session(self, session: Session, reason: str) -> None:
        raise NotImplementedError

    def _sweep(self) -> None:
        raise NotImplementedError

    def counters(self) -> dict[str, int]:
        """Aggregate metrics plus the proxy's own counters (for heartbeats)."""
        out = {f"sessions_{k}": v for k, v in self.table.metrics().items()}
        out.update(self.stats)
        if self.loop.errors:
            out["loop_errors"] = self.loop.errors
        return out

    def close_all(self, reason: str = "closed") -> None:
        """Thread-safe: end every live session."""

        def _do() -> None:
            for session in self.table.sessions():
                self._close_session(session, reason)

        self.loop.call_soon_threadsafe(_do)

    def __enter__(self) -> ProxyBase:
        return self

    def __exit__(self, *_exc: object) -> None:
        with contextlib.suppress(Exception):
            self.shutdown(0.0)
