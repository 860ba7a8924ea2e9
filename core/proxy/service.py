"""What proxy_tcp and proxy_udp share as actors: options, the egress from netenv + policy, bus events,
egress lookups. Each actor package only names its protocol and proxy class.

The proxies never touch the split policy routing (`ip rule fwmark 1720 lookup 1720`, table 1720): the
interceptor's worker 0 keeps it for both (kernel/routing.py), so one proxy stopping or restarting never
takes it away from the other.

Threads: the runtime loop (bus, heartbeats, requests) and the proxy's data thread. The data
thread publishes session events itself (the publisher is thread-safe), so heartbeats keep flowing
however busy the data path is: through a batch of its own (`Publisher.batch`), flushed at the end of each
of its loop's turns, so one turn's events leave as one bus message per run of one topic (wire version 2).
Snapshots reach the decider as one atomic swap of the egress set.
"""

from __future__ import annotations

import argparse
import ipaddress
import time
from typing import Any, ClassVar

from core.egress import EgressSet, split_egresses, static_egress
from core.redirect import DIVERT, REDIRECTS_FILE, RedirectTable, selected_backend
from messages import (
    Message,
    NetenvChanged,
    PolicySnapshot,
    ProxySessionClose,
    ProxySessionOpen,
    ProxySessionStats,
    SessionCounters,
)
from messages.control import (
    INVALID_ARGUMENT,
    Controller,
    Netenv,
    NoArgs,
    Proxy,
    ProxyStatus,
    RequestFailed,
    SessionsArgs,
    Upstream,
)
from messages.flows import IpProtocol
from messages.marks import PROXY_IPV4, PROXY_IPV6, SPLIT_PROXY_PORT
from runtime.actor import Actor, Runtime, answers

from .base import ProxyBase, SessionHooks, parse_address
from .config import ProxyConfig
from .decider import SplitDecider
from .origdst import RedirectResolver, SplitOwners
from .session import Session, canon

DEFAULT_LISTEN = (f"{PROXY_IPV4}:{SPLIT_PROXY_PORT}", f"[{PROXY_IPV6}]:{SPLIT_PROXY_PORT}")
SNAPSHOT_RETRY = 0.25  # seconds between asking for snapshots we have not received yet
STOP_DRAIN = 1.0  # the runtime gives an actor 2 s to stop
# A session's open waits this long for its close: a short session (most TCP ones: a request and its answer)
# is then one proxy.session.close carrying its open instead of two messages; a longer one's open leaves late
# by at most this (with the other opens held meanwhile: one batch).
OPEN_HOLD = 0.1


class BusHooks(SessionHooks):
    """Session events onto the bus (called on the data thread; publishing never blocks). Opens are held back
    for up to `hold` s: one that closed meanwhile leaves inside its close (schema version 2). What one turn of
    the data loop publishes leaves at its end (`end_turn`)."""

    hold = OPEN_HOLD

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.worker = rt.instance
        self._held: dict[str, ProxySessionOpen] = {}  # session id → its open, not published yet
        self._batch = rt.publisher.batch() if rt.publisher is not None else None
        self.publish = self._batch.publish if self._batch is not None else rt.publish

    def end_turn(self) -> None:
        """The data loop's turn ended: send what it published."""
        if self._batch is not None:
            self._batch.flush()

    def on_open(self, s: Session) -> None:
        dst = s.orig_dst or s.listen
        local = s.local or ("", 0)
        remote = s.remote or ("", 0)
        self._held[s.id] = ProxySessionOpen(
            session_id=s.id,
            worker=self.worker,
            protocol=s.protocol,
            split_key=s.split_key,
            ts=time.time(),
            client_ip=canon(s.orig_client[0]),
            client_port=s.orig_client[1],
            orig_dst_ip=canon(dst[0]),
            orig_dst_port=dst[1],
            local_ip=canon(local[0]) if local[0] else "",
            local_port=local[1],
            interface=s.interface,
            extra=dict(s.extra),
            remote_ip=canon(remote[0]) if remote[0] else "",
            remote_port=remote[1],
        )

    def flush(self) -> None:
        held, self._held = self._held, {}
        for opened in held.values():
            self.publish(opened)

    def on_stats(self, s: Session) -> None:
        opened = self._held.pop(s.id, None)
        if opened is not None:  # never before its open (stats come seconds later: only if a flush was late)
            self.publish(opened)
        self.publish(
            ProxySessionStats(
                session_id=s.id, worker=self.worker, split_key=s.split_key, ts=time.time(), counters=_counters(s)
            )
        )

    def on_close(self, s: Session) -> None:
        self.publish(
            ProxySessionClose(
                session_id=s.id,
                worker=self.worker,
                split_key=s.split_key,
                ts=time.time(),
                counters=_counters(s),
                duration=round(s.age(), 6),
                reason=s.close_reason,
                opened=self._held.pop(s.id, None),
            )
        )


def _counters(s: Session) -> SessionCounters:
    return SessionCounters(
        bytes_up=s.bytes_up, bytes_down=s.bytes_down, packets_up=s.packets_up, packets_down=s.packets_down
    )


class ProxyActor(Actor):
    """Base of the proxy_tcp and proxy_udp actors."""

    subscriptions = ("policy.snapshot", "netenv.changed")
    control = Proxy
    proxy_class: ClassVar[type[ProxyBase]]

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        d = ProxyConfig()
        add = parser.add_argument
        add(
            "--listen",
            action="append",
            metavar="IP:PORT",
            help=f"listen address, repeatable (default: {' and '.join(DEFAULT_LISTEN)})",
        )
        add("--max-sessions", type=int, default=d.max_sessions)
        add("--read-timeout", type=float, default=d.read_timeout, help="rolling idle timeout of a TCP session (s)")
        add("--write-timeout", type=float, default=d.write_timeout)
        add("--dial-timeout", type=float, default=d.dial_timeout)
        add("--buffer-size", type=int, default=d.buffer_size)
        add("--pipe-size", type=int, default=d.pipe_size, help="splice pipe capacity per direction in flight")
        add("--udp-idle-timeout", type=float, default=d.udp_idle_timeout)
        add("--stats-interval", type=float, default=d.stats_interval)
        add("--no-splice", action="store_true", help="copy bytes instead of os.splice")
        add(
            "--interface",
            default=None,
            help="split interface (name, IP or MAC) instead of the policy's; with --gateway4/6 no netenv is needed",
        )
        add("--source4", default="")
        add("--gateway4", default="")
        add("--source6", default="")
        add("--gateway6", default="")

    # --- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        args = self.rt.args
        listen = [parse_address(a) for a in (args.listen or DEFAULT_LISTEN)]
        self.config = ProxyConfig(
            max_sessions=args.max_sessions,
            read_timeout=args.read_timeout,
            write_timeout=args.write_timeout,
            dial_timeout=args.dial_timeout,
            buffer_size=args.buffer_size,
            pipe_size=args.pipe_size,
            udp_idle_timeout=args.udp_idle_timeout,
            stats_interval=args.stats_interval,
            splice=False if args.no_splice else None,
        )
        self.netenv: NetenvChanged | None = None
        self.choice = ""  # the policy's splittun/interface
        self.rule_interfaces: list[str] = []  # interfaces rules chose for themselves
        self.static = bool(args.interface and (args.gateway4 or args.gateway6))
        self.decider = SplitDecider()
        extra: dict[str, Any] = {}
        if selected_backend() == DIVERT:  # no kernel NAT: original destinations come from the interceptor's table
            protocol = IpProtocol.TCP if self.proxy_class.protocol == "tcp" else IpProtocol.UDP
            extra["resolver"] = RedirectResolver(RedirectTable(self.rt.run_dir / REDIRECTS_FILE), protocol)
        elif self.proxy_class.protocol == "udp":  # NFQUEUE: the interceptor names each split flow's socket
            extra["owners"] = SplitOwners(self.rt.run_dir / REDIRECTS_FILE)
        hooks = BusHooks(self.rt)
        self.proxy = self.proxy_class(
            listen, self.decider, self.config, hooks, id_prefix=f"{self.rt.instance}-", **extra
        )
        self.proxy.start()
        if self.static:
            egress = static_egress(args.interface, source4=args.source4, gateway4=args.gateway4,
                                   source6=args.source6, gateway6=args.gateway6)  # fmt: skip
            self._set_egress(egress)
        else:
            self.rt.loop.call_later(0.0, self._ask_for_snapshots)
        self.log.info("proxy.listening", protocol=self.proxy.protocol,
                      addresses=" ".join(f"{ip}:{port}" for ip, port in self.proxy.addresses),
                      splice=getattr(self.proxy, "use_splice", False))  # fmt: skip

    def stop(self) -> None:
        proxy = getattr(self, "proxy", None)
        if proxy is not None:
            proxy.shutdown(STOP_DRAIN)

    # --- snapshots → egress -------------------------------------------------------------------------

    def on_message(self, msg: Message) -> None:
        if isinstance(msg, PolicySnapshot):
            rule_interfaces = sorted({r.interface for r in msg.rules if r.interface})
            if (msg.interface, rule_interfaces) != (self.choice, self.rule_interfaces):
                self.choice, self.rule_interfaces = msg.interface, rule_interfaces
                self._recompute()
        elif isinstance(msg, NetenvChanged):
            self.netenv = msg
            self._recompute()

    def _ask_for_snapshots(self) -> None:
        """A worker that starts after the last change would wait for the next one: ask each owner instead
        (the policy from the controller, the network from netenv itself)."""
        if self.static or self.netenv is not None:
            return
        for actor, op in (("controller", Controller.POLICY), ("netenv", Netenv.SNAPSHOT)):
            try:
                self.on_message(self.rt.ask(actor, op, timeout=0.3))
            except RequestFailed as exc:
                self.log.debug("proxy.snapshot_unavailable", actor=actor, op=op.name, error=str(exc))
        if self.netenv is None:
            self.rt.loop.call_later(SNAPSHOT_RETRY, self._ask_for_snapshots)

    def _recompute(self) -> None:
        if self.static:
            return
        choice = self.rt.args.interface if self.rt.args.interface is not None else self.choice
        # Any interface index the interceptor may put in a split mark resolves.
        egresses = split_egresses(self.netenv, choice, self.rule_interfaces)
        self._set_egress(egresses.chosen, egresses.by_index)

    def _set_egress(self, egress: EgressSet, by_index: dict[int, EgressSet] | None = None) -> None:
        old = self.decider.egress
        self.decider.update(egress, by_index, wants_ct_mark=bool(self.rule_interfaces))
        if egress != old:
            self.log.info("proxy.egress", **{f"ipv{f}": _describe(egress, f) for f in (4, 6)})

    # --- requests -----------------------------------------------------------------------------------

    @answers(Proxy.EGRESS)
    def answer_egress(self, args: Upstream) -> list[dict[str, Any]]:
        try:
            ipaddress.ip_address(args.ip)
        except ValueError:
            raise RequestFailed(INVALID_ARGUMENT, "egress needs ip (an IP address) and port (a number)") from None
        return [s.to_dict() for s in self.proxy.table.by_upstream(args.ip, args.port)]

    @answers(Proxy.SESSIONS)
    def answer_sessions(self, args: SessionsArgs) -> list[dict[str, Any]]:
        return [s.to_dict() for s in self.proxy.table.sessions()[: args.limit]]

    @answers(Proxy.STATUS)
    def answer_status(self, args: NoArgs) -> ProxyStatus:
        egress = self.decider.egress
        return ProxyStatus(
            protocol=self.proxy.protocol,
            listen=[list(a) for a in self.proxy.addresses],
            egress={f"ipv{f}": _describe(egress, f) for f in (4, 6)},
            counters=self.proxy.counters(),
        )

    def readiness(self) -> str:
        egress = self.decider.egress
        if egress.for_family(4) is None and egress.for_family(6) is None:
            return f"no egress: {egress.why(4)}"
        return ""

    def counters(self) -> dict[str, int]:
        return self.proxy.counters()


def _describe(egress: EgressSet, family: int) -> str:
    e = egress.for_family(family)
    if e is None:
        return f"none ({egress.why(family)})"
    via = f" via {e.gateway}" if e.gateway else ""
    return f"{e.interface} src {e.source or '-'}{via}"
