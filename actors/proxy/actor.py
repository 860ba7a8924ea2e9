"""What proxy_tcp and proxy_udp share as actors: options, the egress from netenv + policy, bus events,
egress lookups, policy routing. Each actor package only names its protocol and proxy class.

Threads: the runtime loop (bus, heartbeats, requests, routing) and the proxy's data thread. The data
thread publishes session events itself (the publisher is thread-safe), so heartbeats keep flowing
however busy the data path is. Snapshots reach the decider as one atomic swap of the egress set.
"""

from __future__ import annotations

import argparse
import ipaddress
import time
from typing import Any, ClassVar

from actors.netenv.egress import EgressSet, find_interface, resolve_egress, static_egress
from actors.runtime import Actor, Runtime
from messages import (
    Message,
    NetenvChanged,
    PolicySnapshot,
    ProxySessionClose,
    ProxySessionOpen,
    ProxySessionStats,
    SessionCounters,
)
from messages.control import INVALID_ARGUMENT, Request, RequestFailed
from messages.marks import PROXY_IPV4, PROXY_IPV6, SPLIT_PROXY_PORT
from messages.schema import MessageError

from .base import ProxyBase, SessionHooks, parse_address
from .config import ProxyConfig
from .decider import SplitDecider
from .routing import SplitRouting, plan
from .session import Session, canon

DEFAULT_LISTEN = (f"{PROXY_IPV4}:{SPLIT_PROXY_PORT}", f"[{PROXY_IPV6}]:{SPLIT_PROXY_PORT}")
ROUTING_RECHECK = 10.0  # seconds: repair the split rule/table if something (a VPN client) removed it
SNAPSHOT_RETRY = 0.25  # seconds between asking for snapshots we have not received yet
STOP_DRAIN = 1.0  # the runtime gives an actor 2 s to stop


class BusHooks(SessionHooks):
    """Session events onto the bus (called on the data thread; publishing never blocks)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.worker = rt.instance

    def on_open(self, s: Session) -> None:
        dst = s.orig_dst or s.listen
        local = s.local or ("", 0)
        remote = s.remote or ("", 0)
        self.rt.publish(
            ProxySessionOpen(
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
        )

    def on_stats(self, s: Session) -> None:
        self.rt.publish(
            ProxySessionStats(
                session_id=s.id, worker=self.worker, split_key=s.split_key, ts=time.time(), counters=_counters(s)
            )
        )

    def on_close(self, s: Session) -> None:
        self.rt.publish(
            ProxySessionClose(
                session_id=s.id,
                worker=self.worker,
                split_key=s.split_key,
                ts=time.time(),
                counters=_counters(s),
                duration=round(s.age(), 6),
                reason=s.close_reason,
            )
        )


def _counters(s: Session) -> SessionCounters:
    return SessionCounters(
        bytes_up=s.bytes_up, bytes_down=s.bytes_down, packets_up=s.packets_up, packets_down=s.packets_down
    )


class ProxyActor(Actor):
    """Base of the proxy_tcp and proxy_udp actors."""

    subscriptions = ("policy.snapshot", "netenv.changed")
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
        add("--no-routing", action="store_true",
            help="do not install the split rule and table (worker 0 does by default)")  # fmt: skip

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
        self.routing = SplitRouting() if (not args.no_routing and self.rt.worker_index == 0) else None
        self.routing_errors = 0
        self._routes_wanted: list[Any] | None = None
        self.proxy = self.proxy_class(
            listen, self.decider, self.config, BusHooks(self.rt), id_prefix=f"{self.rt.instance}-"
        )
        self.proxy.start()
        if self.static:
            egress = static_egress(args.interface, source4=args.source4, gateway4=args.gateway4,
                                   source6=args.source6, gateway6=args.gateway6)  # fmt: skip
            self._set_egress(egress)
        else:
            self.rt.loop.call_later(0.0, self._ask_for_snapshots)
        self.rt.loop.call_every(ROUTING_RECHECK, self._reconcile_routing)
        self.log.info("proxy.listening", protocol=self.proxy.protocol,
                      addresses=" ".join(f"{ip}:{port}" for ip, port in self.proxy.addresses),
                      routing=self.routing is not None, splice=getattr(self.proxy, "use_splice", False))  # fmt: skip

    def stop(self) -> None:
        proxy = getattr(self, "proxy", None)
        if proxy is not None:
            proxy.shutdown(STOP_DRAIN)
        if getattr(self, "routing", None) is not None and self._routes_wanted is not None:
            try:
                self.routing.remove()  # type: ignore[union-attr]
            except Exception as exc:
                self.log.error("proxy.routing_failed", action="remove", error=f"{type(exc).__name__}: {exc}")

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
        for actor, op, cls in (("controller", "policy", PolicySnapshot), ("netenv", "snapshot", NetenvChanged)):
            try:
                data = self.rt.request(actor, op, timeout=0.3)
                if data:
                    self.on_message(cls.from_wire(data, cls.TOPIC))
            except (RequestFailed, MessageError) as exc:
                self.log.debug("proxy.snapshot_unavailable", actor=actor, op=op, error=str(exc))
        if self.netenv is None:
            self.rt.loop.call_later(SNAPSHOT_RETRY, self._ask_for_snapshots)

    def _recompute(self) -> None:
        if self.static:
            return
        choice = self.rt.args.interface if self.rt.args.interface is not None else self.choice
        egress = resolve_egress(self.netenv, choice)
        # Any interface index the interceptor may put in a split mark resolves; routes only where used.
        by_index = {i.index: resolve_egress(self.netenv, i.name) for i in self.netenv.interfaces} if self.netenv else {}
        used = {
            iface.index for spec in self.rule_interfaces if self.netenv and (iface := find_interface(self.netenv, spec))
        }
        self._set_egress(egress, by_index, used)

    def _set_egress(
        self, egress: EgressSet, by_index: dict[int, EgressSet] | None = None, used: set[int] | None = None
    ) -> None:
        old = self.decider.egress
        self.decider.update(egress, by_index, wants_ct_mark=bool(self.rule_interfaces))
        if egress != old:
            self.log.info("proxy.egress", **{f"ipv{f}": _describe(egress, f) for f in (4, 6)})
        rule_egresses = [e for index in sorted(used or ()) for e in (by_index or {})[index].all()]
        self._routes_wanted = plan([*egress.all(), *rule_egresses])
        self._reconcile_routing()

    def _reconcile_routing(self) -> None:
        if self.routing is None or self._routes_wanted is None:
            return
        try:
            changes = self.routing.apply(self._routes_wanted)
        except Exception as exc:
            self.routing_errors += 1
            self.log.error("proxy.routing_failed", action="apply", error=f"{type(exc).__name__}: {exc}")
            return
        for change in changes:
            self.log.info("proxy.routing", change=change)

    # --- requests -----------------------------------------------------------------------------------

    def handle_request(self, req: Request) -> Any:
        if req.op == "egress":
            ip, port = req.args.get("ip"), req.args.get("port")
            try:
                ipaddress.ip_address(str(ip))
                port = int(port)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise RequestFailed(INVALID_ARGUMENT, "egress needs ip (an IP address) and port (a number)") from None
            return [s.to_dict() for s in self.proxy.table.by_upstream(str(ip), port)]
        if req.op == "sessions":
            limit = int(req.args.get("limit", 200))
            return [s.to_dict() for s in self.proxy.table.sessions()[:limit]]
        if req.op == "status":
            egress = self.decider.egress
            return {
                "protocol": self.proxy.protocol,
                "listen": [list(a) for a in self.proxy.addresses],
                "egress": {f"ipv{f}": _describe(egress, f) for f in (4, 6)},
                "routing": self.routing is not None,
                "counters": self.proxy.counters(),
            }
        return super().handle_request(req)

    def readiness(self) -> str:
        egress = self.decider.egress
        if egress.for_family(4) is None and egress.for_family(6) is None:
            return f"no egress: {egress.why(4)}"
        return ""

    def counters(self) -> dict[str, int]:
        out = self.proxy.counters()
        if self.routing_errors:
            out["routing_errors"] = self.routing_errors
        return out


def _describe(egress: EgressSet, family: int) -> str:
    e = egress.for_family(family)
    if e is None:
        return f"none ({egress.why(family)})"
    via = f" via {e.gateway}" if e.gateway else ""
    return f"{e.interface} src {e.source or '-'}{via}"
