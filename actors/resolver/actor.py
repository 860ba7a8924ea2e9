"""The resolver process: a stub resolver on 127.0.0.17:53 and [::1]:53 (UDP and TCP), the host's DNS path
while splittun runs.

The interceptor DNATs every local app's DNS query here while this process heartbeats ready, with the
asking app's path in the query's mark (messages/marks.py). The engine (engine.py) decides and answers;
this module owns the sockets and threads:
- the runtime loop reads UDP datagrams and answers cached ones at once;
- a thread pool waits on upstream servers (one query each) and serves TCP connections (one each);
- the policy (split servers, vpnDomains, interfaces) and the network (egresses) arrive on the bus and
  are asked for at start, like the proxies do; they reach the engine as one `Settings` swap.
Ready = listening, with the policy and the network known. Until then the interceptor does not reroute.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import socket
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from core.dns.names import NAMES_FILE, NameTable
from core.ivpn.status import delegated_dns
from core.netenv.dns import link_dns_servers
from core.proxy.base import parse_address
from kernel.conntrack import Conntrack, CtEntry
from messages import IvpnStatus, Message, NetenvChanged, PolicySnapshot
from messages.control import Controller, DnsFlushed, DnsStatus, Ivpn, Netenv, NoArgs, RequestFailed, Resolver
from messages.flows import FiveTuple, IpProtocol
from messages.marks import NAMESERVER_PORT, PROXY_IPV4, PROXY_IPV6
from runtime.actor import Actor, answers
from runtime.log import describe

from .engine import Pending, Query, ResolverEngine, Settings
from .upstream import ask

DEFAULT_LISTEN = (f"{PROXY_IPV4}:{NAMESERVER_PORT}", f"[{PROXY_IPV6}]:{NAMESERVER_PORT}")
SNAPSHOT_RETRY = 0.25
PASSIVE_RETRY = 5.0
LEARN_INTERVAL = 30.0
TCP_IDLE = 10.0  # seconds a TCP client may keep its connection without a query
MAX_UDP = 65535


class ResolverActor(Actor):
    """DNS resolver: every local app's queries, answered on the path the app's connections take."""

    name = "resolver"
    control = Resolver
    subscriptions = ("policy.snapshot", "netenv.changed", "ivpn.status")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add = parser.add_argument
        add("--listen", action="append", metavar="IP:PORT", help=f"default: {' and '.join(DEFAULT_LISTEN)}")
        add("--threads", type=int, default=32, help="upstream queries and TCP clients served at once")
        add("--timeout", type=float, default=2.0, help="seconds to wait for one upstream server")

    def start(self) -> None:
        args = self.rt.args
        self.policy: PolicySnapshot | None = None
        self.netenv: NetenvChanged | None = None
        self.ivpn: IvpnStatus | None = None  # IVPN's custom DNS is delegated to (core/ivpn/status.py)
        self._local = threading.local()  # one conntrack socket per thread (netlink requests are not shared)
        self.engine = ResolverEngine(
            origin=self._origin,
            upstream=ask,
            names=NameTable(self.rt.run_dir / NAMES_FILE),
            publish=self.rt.publish,
            timeout=args.timeout,
        )
        self.pool = ThreadPoolExecutor(max_workers=max(2, args.threads), thread_name_prefix="resolve")
        self.sockets: list[socket.socket] = []
        self.listening: list[str] = []
        self.passive = ""  # why we do not listen: another splittun instance answers DNS in this namespace
        self._listen()
        self.rt.loop.call_later(0.0, self._ask_for_snapshots)
        self.rt.loop.call_every_slot(LEARN_INTERVAL, self._configure)  # servers learned from files change unseen

    def _listen(self) -> None:
        """Bind every address (UDP and TCP) or none. Taken (another instance's resolver) → passive, retry later."""
        texts = self.rt.args.listen or DEFAULT_LISTEN
        sockets: list[socket.socket] = []
        try:
            for text in texts:
                for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                    sockets.append(self._bind(parse_address(text), kind))
        except OSError as exc:
            for sock in sockets:
                sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            if not self.passive:
                hint = "another splittun instance answers DNS in this network namespace; retrying"
                self.log.error("resolver.passive", reason=describe(exc), hint=hint)
            self.passive = f"passive: {' '.join(texts)} taken by another resolver"
            self.rt.loop.call_later(PASSIVE_RETRY, self._listen)
            return
        for sock in sockets:
            handler = self._on_datagram if sock.type == socket.SOCK_DGRAM else self._on_connection
            self.rt.loop.add_fd(sock.fileno(), lambda s=sock, h=handler: h(s))
        self.sockets, self.listening, self.passive = sockets, list(texts), ""
        self.log.info("resolver.listening", addresses=" ".join(self.listening))

    @staticmethod
    def _bind(address: tuple[str, int], kind: socket.SocketKind) -> socket.socket:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sock = socket.socket(family, kind)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            if kind == socket.SOCK_STREAM:
                sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    # --- queries ------------------------------------------------------------------------------------

    def _origin(self, seen: FiveTuple) -> CtEntry | None:
        """The query's conntrack entry: its reply tuple is the query as we see it, reversed."""
        ct = getattr(self._local, "conntrack", None)
        if ct is None:
            ct = self._local.conntrack = Conntrack(rcvbuf=None)
        return ct.lookup_reply(seen)

    def _on_datagram(self, sock: socket.socket) -> None:
        local = sock.getsockname()[:2]
        for _ in range(64):
            try:
                data, client = sock.recvfrom(MAX_UDP)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.log.once("udp.read_failed", describe(exc))
                return
            query = Query(data, IpProtocol.UDP, client[:2], local)
            prepared = self.engine.prepare(query)
            if isinstance(prepared, Pending):
                self.pool.submit(self._finish_datagram, sock, prepared, client)
            elif prepared is not None:
                self._send(sock, prepared, client)

    def _finish_datagram(self, sock: socket.socket, pending: Pending, client: Any) -> None:
        try:
            answer = self.engine.resolve(pending)
        except Exception as exc:  # never lose the thread: the client times out and asks again
            self.log.once("resolve.failed", describe(exc))
            return
        if answer is not None:
            self._send(sock, answer, client)

    def _send(self, sock: socket.socket, answer: bytes, client: Any) -> None:
        try:
            sock.sendto(answer, client)
        except OSError as exc:
            self.log.once("udp.send_failed", describe(exc))

    def _on_connection(self, listener: socket.socket) -> None:
        for _ in range(16):
            try:
                conn, client = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.log.once("tcp.accept_failed", describe(exc))
                return
            self.pool.submit(self._serve_tcp, conn, client[:2])

    def _serve_tcp(self, conn: socket.socket, client: tuple[str, int]) -> None:
        """One TCP client: length-prefixed queries answered in order until it closes or idles."""
        with conn:
            try:
                conn.setblocking(True)
                conn.settimeout(TCP_IDLE)
                local = conn.getsockname()[:2]
                while True:
                    head = _read_exactly(conn, 2)
                    if head is None:
                        return
                    wire = _read_exactly(conn, struct.unpack("!H", head)[0])
                    if wire is None:
                        return
                    answer = self.engine.answer(Query(wire, IpProtocol.TCP, client, local))
                    if answer is None:
                        return
                    conn.sendall(struct.pack("!H", len(answer)) + answer)
            except (OSError, ValueError) as exc:
                self.log.debug("tcp.client_closed", error=describe(exc))
            except Exception as exc:
                self.log.once("resolve.failed", describe(exc))

    # --- the policy and the network -------------------------------------------------------------------

    def on_message(self, msg: Message) -> None:
        if isinstance(msg, PolicySnapshot):
            if self.policy is None or msg.version > self.policy.version:
                self.policy = msg
                self._configure()
        elif isinstance(msg, NetenvChanged):
            self.netenv = msg
            self._configure()
        elif isinstance(msg, IvpnStatus):
            changed = delegated_dns(msg) != delegated_dns(self.ivpn)
            self.ivpn = msg
            if changed:
                self._configure()

    def _configure(self) -> None:
        """New settings from the policy, the network and the servers the split interfaces were given (the
        netenv library reads them from the host's network software: core/netenv/dns.py)."""
        settings = Settings.of(self.policy, self.netenv)
        learned = {e.interface: link_dns_servers(e.ifindex, e.interface) for e in settings.egresses.in_use()}
        settings = Settings.of(self.policy, self.netenv, learned, delegated_dns(self.ivpn))
        if settings != self.engine.settings:
            self.engine.settings = settings
            servers, source = settings.split_servers()
            self.log.info("resolver.configured", split_dns=",".join(servers) or "-", source=source,
                          vpn_domains=",".join(settings.vpn_domains) or "-",
                          vpn_dns=",".join(settings.vpn_servers) or "the server each app asked")  # fmt: skip

    def _ask_for_snapshots(self) -> None:
        """A resolver starting after the last change would wait for the next one: ask the owners instead."""
        for actor, op, have in (
            ("controller", Controller.POLICY, self.policy),
            ("netenv", Netenv.SNAPSHOT, self.netenv),
            ("ivpn", Ivpn.STATUS, self.ivpn),  # not waited for: without IVPN there is nothing to delegate
        ):
            if have is None:
                try:
                    self.on_message(self.rt.ask(actor, op, timeout=0.3))
                except RequestFailed as exc:
                    self.log.debug("resolver.snapshot_unavailable", actor=actor, op=op.name, error=str(exc))
        if self.policy is None or self.netenv is None:
            self.rt.loop.call_later(SNAPSHOT_RETRY, self._ask_for_snapshots)

    # --- control plane and heartbeat --------------------------------------------------------------------

    @answers(Resolver.STATUS)
    def answer_status(self, args: NoArgs) -> DnsStatus:
        settings = self.engine.settings
        servers, source = settings.split_servers()
        split = list(servers) or ["the server each split app asked, out of the split interface"]
        vpn = list(settings.vpn_servers) or ["the server each app asked, through the VPN"]
        return DnsStatus(
            listen=self.listening,
            rerouting=not self.readiness(),
            not_ready=self.readiness(),
            upstreams={"vpn": vpn, "split": split},
            vpn_dns_source="IVPN (delegated)" if settings.vpn_servers else "",
            split_dns_source=source,
            vpn_domains=list(settings.vpn_domains),
            cache_entries=len(self.engine.cache),
            cache_hit_rate=round(self.engine.cache.hit_rate(), 4),
            counters=dict(self.engine.counters),
            recent=list(self.engine.recent),
        )

    @answers(Resolver.FLUSH)
    def answer_flush(self, args: NoArgs) -> DnsFlushed:
        dropped = self.engine.flush()
        self.log.info("cache.flushed", dropped=dropped)
        return DnsFlushed(dropped=dropped)

    def readiness(self) -> str:
        if getattr(self, "passive", ""):
            return self.passive
        if not getattr(self, "sockets", None):
            return "not listening"
        if self.policy is None:
            return "no policy from the controller yet"
        if self.netenv is None:
            return "no network snapshot from netenv yet"
        return ""

    def counters(self) -> dict[str, int]:
        engine = getattr(self, "engine", None)
        if engine is None:
            return {}
        return {**engine.counters, "cache_entries": len(engine.cache)}

    def stop(self) -> None:
        for sock in getattr(self, "sockets", []):
            with contextlib.suppress(OSError):
                sock.close()
        self.sockets = []
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _read_exactly(conn: socket.socket, n: int) -> bytes | None:
    """n bytes, or None when the peer closed first."""
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data
