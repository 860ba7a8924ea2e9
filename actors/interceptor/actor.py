"""The interceptor process: binds its NFQUEUE queues, runs the engine, owns the rules and the split
routing (worker 0).

Workers: supervisord runs `interceptor` (worker 0) plus `interceptor_01…` (SPLITTUN_INTERCEPTOR_WORKERS
in total). Worker i binds queue slot i of each of the four queue groups (17040+i v4 out, 17140+i v4 in,
17060+i v6 out, 17160+i v6 in); the rules spread flows over the slots with --queue-balance. Only
worker 0 installs, checks and removes the rules: it is the only one that knows when interception
starts and stops, and a restart of any other worker must not touch them. While a worker is down its
slot's packets bypass the queue (--queue-bypass): unsplit, through the VPN.

Worker 0 also keeps the split policy routing the proxies' upstream sockets use (kernel/routing.py): from
a thread of its own, once it knows the network and the policy, after each change of either and every
10 s. It never removes it on stop (a proxy may still be using it); `splittun down` does, afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import threading
import time
from typing import Any

from core import verdict_handler
from core.dns.names import NAMES_FILE, NameTable
from core.egress import kernel_routes, split_routes
from core.redirect import REDIRECTS_FILE, RedirectTable, selected_backend
from kernel.conntrack import Conntrack, ConntrackEvents
from kernel.procfs import ProcReader
from kernel.routing import KernelPathRouting, RoutingKeeper, SplitRouting
from kernel.sockdiag import SockDiag, SocketEvents
from messages import Heartbeat, IvpnStatus, Mark, Message, NetenvChanged, PolicySnapshot
from messages.control import INVALID_ARGUMENT, Controller, Interceptor, NoArgs, Op, RequestFailed, RulesChecked
from messages.control import Ivpn as IvpnOps
from messages.control import Netenv as NetenvOps
from messages.events import HEARTBEAT_INTERVAL, InterceptionState
from messages.marks import VERDICT_MASK
from runtime import paths
from runtime.actor import Actor, answers
from runtime.log import describe

from .attribution import Attributor
from .cleanup import cleanup, write_marker
from .divert import DivertPath
from .engine import RESOLVER, Engine
from .firewall import MAX_WORKERS, worker_queues
from .platform import Firewall, PacketSource, firewall, packet_source
from .ports import ActorPorts

#: The IVPN interop (core/ivpn/interop.py): IVPN's processes, carrier and daemon port are never split.
DEFAULT_HANDLER = "core.ivpn.interop:interceptor_verdict_handler"
DEFAULT_JUMP_CHECKS = "5,15,45"
SNAPSHOT_RETRY = 0.5  # seconds between asking for the policy or the network we have not got yet
PASSIVE_RETRY = 5.0
# After the scheduled checks: other software's firewall edits (a kill switch, a firewall reload) do not
# always come with a network change; each check runs iptables-save six times, so not every few seconds.
JUMP_CHECK_EVERY = 60.0
SWEEP_INTERVAL = 10.0  # seconds between sweeps of the divert backend's idle flows


def _ivpn_firewall_facts(status: IvpnStatus) -> tuple[object, ...]:
    """What of IVPN's status comes with firewall changes of its own (chains, wg-quick's tables)."""
    return (status.state, status.connected, status.kill_switch, status.daemon)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


class InterceptorActor(Actor):
    """Packet interceptor: NFQUEUE verdicts and the firewall rule lifecycle."""

    name = "interceptor"
    control = Interceptor
    subscriptions = ("policy.snapshot", "netenv.changed", "ivpn.status", "actor.heartbeat")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--workers",
            type=int,
            default=_env_int("SPLITTUN_INTERCEPTOR_WORKERS", 1),
            help=f"interceptor workers in total, 1-{MAX_WORKERS} (default: SPLITTUN_INTERCEPTOR_WORKERS or 1)",
        )
        parser.add_argument(
            "--jump-checks",
            default=os.environ.get("SPLITTUN_JUMP_CHECKS", DEFAULT_JUMP_CHECKS),
            help="seconds after start at which displaced jump rules are put back on top (default 5,15,45)",
        )
        parser.add_argument(
            "--verdict-handler",
            default=os.environ.get("SPLITTUN_VERDICT_HANDLER", DEFAULT_HANDLER),
            help="module:function registered as the external verdict handler ('' = none)",
        )
        parser.add_argument(
            "--cleanup",
            action="store_true",
            help="remove every rule, conntrack mark and the split routing the interceptor may have left here, "
            "then exit (--skip-rules, --skip-routing, --routing-unless-intercepting: see __main__.py)",
        )

    def start(self) -> None:
        args = self.rt.args
        self.netenv: NetenvChanged | None = None
        self.index = self.rt.worker_index
        self.workers = args.workers
        if not 1 <= self.workers <= MAX_WORKERS or self.index >= self.workers:
            raise ValueError(f"worker {self.index} of {self.workers}: workers must be 1-{MAX_WORKERS}")
        self.owns_rules = self.index == 0
        self._stopping = threading.Event()
        self.names = NameTable(self.rt.run_dir / NAMES_FILE)
        self.diag = SockDiag()
        self.attributor = Attributor(self.diag, ProcReader())
        self.conntrack = Conntrack()
        self.ct_events = ConntrackEvents()
        self.ct_updates: ConntrackEvents | None = None  # while split TCP takes the kernel path (_follow_data_path)
        self.socket_events = SocketEvents()
        if args.verdict_handler and verdict_handler.SLOT.get() is None:
            try:
                if verdict_handler.load(args.verdict_handler):
                    self.log.info("handler.registered", handler=args.verdict_handler)
            except Exception as exc:  # a broken handler module must not stop interception
                self.log.error("handler.load_failed", handler=args.verdict_handler, error=describe(exc))
        self.backend = selected_backend()
        self.source: PacketSource = packet_source(self.backend, self.rt.run_dir)
        divert = isinstance(self.source, DivertPath)
        # NFQUEUE: split UDP flows' owners for the UDP proxy (the diverter keeps its own redirects there)
        self.redirects = None if divert else RedirectTable(self.rt.run_dir / REDIRECTS_FILE)
        ports = ActorPorts(
            names=self.names,
            attributor=self.attributor,
            conntrack=self.conntrack,
            publish=self.rt.publish,
            call_later=self.rt.loop.call_later,
            drain_conntrack_events=self._read_conntrack,
            handler_slot=verdict_handler.SLOT,
            redirects=self.redirects,
        )
        if divert:
            if self.workers != 1:
                raise ValueError("the divert backend runs one interceptor worker (one divert handle)")
            # No kernel NAT or connmark: a re-queued connection is one the diverter forgets, and no conntrack
            # entry ever carries our verdict.
            ports.conntrack_get = lambda key: None  # type: ignore[method-assign]
            ports.conntrack_delete = self.source.forget  # type: ignore[method-assign]
            self.rt.loop.call_later(SWEEP_INTERVAL, self._sweep_divert)
        self.engine = Engine(instance=self.rt.instance, log=self.log, ports=ports)
        self.rt.loop.add_fd(self.ct_events.fileno(), self._read_conntrack)
        self.rt.loop.add_fd(self.socket_events.fileno(), self._read_sockets)
        self.fw: Firewall | None = None
        self.routing: RoutingKeeper | None = None  # worker 0, once active: the proxies' table 1720
        self.kernel_routing: RoutingKeeper | None = None  # and the kernel data path's per-interface tables
        self._fw_lock = threading.Lock()  # rule checks run on the loop or, after network changes, a thread
        self._data_path_wanted = ""
        self.active = False
        self._passive_logged = False
        self.rt.loop.call_every_slot(HEARTBEAT_INTERVAL, self.engine.check_resolver)  # wakes with the beats
        self._activate()
        for fetch in (self._fetch_policy, self._fetch_netenv, self._fetch_ivpn):
            threading.Thread(target=fetch, name=fetch.__name__, daemon=True).start()

    def _activate(self) -> None:
        """Bind our queues; worker 0 then installs the rules. Queues taken → passive, retry later.

        The kernel gives a queue number to one listener per network namespace: if another splittun
        instance intercepts here, this one stays passive (heartbeating, touching no rule) and takes over
        once the other one is gone.
        """
        try:
            self.source.open(worker_queues(self.index), self.engine.on_packet, self.rt.loop.add_fd)
        except OSError as exc:
            if not self._passive_logged:
                self.log.error(
                    "interceptor.passive",
                    reason=f"cannot bind queues {sorted(worker_queues(self.index).values())}: {exc}",
                    hint="another splittun instance intercepts in this network namespace; retrying",
                )
                self._passive_logged = True
            self.rt.loop.call_later(PASSIVE_RETRY, self._activate)
            return
        self.active = True
        if self._passive_logged:
            self.log.info("interceptor.active", queues=sorted(worker_queues(self.index).values()))
        if self.owns_rules:
            self.fw = firewall(self.workers)
            write_marker(
                paths.rules_marker(self.rt.run_dir)
            )  # before installing: a crash right after still gets cleaned up
            self.fw.install()
            self._follow_data_path(self.fw.data_path)
            self.log.info("rules.installed", workers=self.workers, data_path=self.fw.data_path)
            self._announce(True, "rules installed")
            self.rt.loop.call_every_slot(HEARTBEAT_INTERVAL * 5, lambda: self._announce(self.active, "repeat"))
            for delay in self._check_schedule(self.rt.args.jump_checks):
                self.rt.loop.call_later(delay, lambda d=delay: self._check_jumps(f"scheduled {d:g}s"))
            self.rt.loop.call_every_slot(JUMP_CHECK_EVERY, lambda: self._check_jumps_in_background("periodic"))
            write_marker(paths.routing_marker(self.rt.run_dir))  # before the first change: `down` removes what we add
            self.routing = RoutingKeeper(SplitRouting(), self.log)
            self.kernel_routing = RoutingKeeper(KernelPathRouting(), self.log)
            for keeper in self._keepers():
                keeper.start()
            self._want_routing()

    @staticmethod
    def _check_schedule(text: str) -> list[float]:
        try:
            return [float(part) for part in text.split(",") if part.strip()]
        except ValueError:
            return [float(x) for x in DEFAULT_JUMP_CHECKS.split(",")]

    # --- control plane ---------------------------------------------------------------------------------

    def _fetch_policy(self) -> None:
        """The current policy from the controller (packets are decided meanwhile with it disabled)."""
        self._fetch("controller", Controller.POLICY, lambda: self.engine.policy.version > 0,
                    lambda snap: self._adopt(snap, "controller"))  # fmt: skip

    def _fetch_netenv(self) -> None:
        """The network from netenv: until it arrives, a rule's own interface cannot be checked (kept)."""
        self._fetch("netenv", NetenvOps.SNAPSHOT, lambda: self.engine.netenv is not None,
                    lambda snap: self.on_message(snap))  # fmt: skip

    def _fetch_ivpn(self) -> None:
        """IVPN's status from the ivpn actor, so the handler knows the VPN carrier without waiting for the
        next `ivpn.status` (until then it keeps process-less connections in the VPN: core/ivpn/interop.py)."""
        self._fetch("ivpn", IvpnOps.STATUS, lambda: self.engine.ivpn is not None,
                    lambda status: self.on_message(status))  # fmt: skip

    def _fetch(self, actor: str, op: Op[Any, Any], have: Any, adopt: Any) -> None:
        """Ask `actor` until it answers or the bus brought the same thing. Runs in a thread: packets keep
        flowing meanwhile; the answer is adopted on the loop thread."""
        while not self._stopping.is_set() and not have():
            try:
                snapshot = self.rt.ask(actor, op, timeout=2.0)
            except RequestFailed as exc:
                self._stopping.wait(SNAPSHOT_RETRY)
                if self._stopping.is_set():
                    return
                self.log.debug("snapshot.fetch_retry", actor=actor, op=op.name, error=str(exc))
                continue
            self.rt.loop.call_soon_threadsafe(lambda s=snapshot: adopt(s) if not have() else None)
            return

    def _adopt(self, snapshot: PolicySnapshot, source: str) -> None:
        if self.engine.set_policy(snapshot):
            self.log.info(
                "policy.adopted",
                version=snapshot.version,
                enabled=snapshot.enabled,
                rules=len(snapshot.rules),
                source=source,
            )
            if not self.owns_rules:  # worker 0's rules follow the policy; the others' verdicts follow it
                self.engine.set_data_path(self._data_path_for(snapshot))
            self._want_routing()

    def _want_routing(self, recheck: bool = False) -> None:
        """Hand the split routing for the current network and policy to the keeper's thread (never waits).
        Until both are known there is no plan, and the routing stays as it is."""
        if self.routing is not None and self.kernel_routing is not None:
            policy = self.engine.policy.snapshot if self.engine.policy.version > 0 else None
            self.routing.want(split_routes(self.netenv, policy), recheck)
            self.kernel_routing.want(kernel_routes(self.netenv, policy), recheck)
            if policy is not None and self.fw is not None:
                self._set_data_path(self._data_path_for(policy))

    def _keepers(self) -> list[RoutingKeeper]:
        return [k for k in (getattr(self, "routing", None), getattr(self, "kernel_routing", None)) if k is not None]

    def _data_path_for(self, policy: PolicySnapshot) -> str:
        """The data path split TCP takes under `policy` here: the divert backend rewrites split packets to the
        proxy itself (no kernel path there, as on Windows)."""
        return "proxy" if isinstance(getattr(self, "source", None), DivertPath) else policy.data_path

    def _set_data_path(self, data_path: str) -> None:
        """The policy's data path decides the nat and filter rules (DNAT split TCP to the proxy, or let the
        kernel route it). Rewriting them takes six iptables-restore runs, so a thread does it, never the
        verdict loop; the engine says "kernel" in its verdicts only once the rules are in place."""
        fw = self.fw
        if fw is None or data_path in (fw.data_path, self._data_path_wanted):
            return
        self._data_path_wanted = data_path

        def switch() -> None:
            with self._fw_lock:
                try:
                    fw.set_data_path(data_path)
                except Exception as exc:
                    self.log.error("rules.data_path_failed", data_path=data_path, error=describe(exc))
                    self._data_path_wanted = ""
                    return
            self.log.info("rules.data_path", data_path=data_path)
            self.rt.loop.call_soon_threadsafe(lambda: self._follow_data_path(data_path))

        threading.Thread(target=switch, name="data-path", daemon=True).start()

    def on_message(self, msg: Message) -> None:
        if isinstance(msg, PolicySnapshot):
            self._adopt(msg, "bus")
        elif isinstance(msg, Heartbeat):
            self.engine.heard_actor(msg.instance, msg.pid)
            if msg.name == RESOLVER:
                self.engine.heard_resolver(msg.ready)
        elif isinstance(msg, IvpnStatus):
            old = self.engine.ivpn
            self.engine.set_ivpn(msg)
            if old is not None and _ivpn_firewall_facts(old) != _ivpn_firewall_facts(msg):
                # IVPN (re)connecting or turning its kill switch on inserts its chains above ours: at once,
                # not only when a scheduled check happens to catch it.
                self._check_jumps_in_background(f"ivpn {msg.state.lower()}, kill switch {msg.kill_switch}", wait=True)
        elif isinstance(msg, NetenvChanged):
            changed = self.netenv is None or msg.seq != self.netenv.seq  # not just netenv repeating itself
            self.netenv = msg
            self.engine.set_netenv(msg)
            if changed:
                self._check_jumps_in_background("network changed")
            self._want_routing(recheck=changed)

    def _sweep_divert(self) -> None:
        if isinstance(self.source, DivertPath):
            self.source.redirector.sweep()
            self.rt.loop.call_later(SWEEP_INTERVAL, self._sweep_divert)

    def _read_conntrack(self) -> None:
        self.engine.on_conntrack_destroyed(self.ct_events.read())

    def _read_conntrack_updates(self) -> None:
        if self.ct_updates is not None:
            self.engine.on_conntrack_updated(self.ct_updates.read())

    def _follow_data_path(self, data_path: str) -> None:
        """Verdicts say the data path the rules now have. On the kernel path no proxy session tells when a
        split TCP connection closed, so split entries' state changes are read (filtered in the kernel);
        on the proxy path nobody needs them."""
        self.engine.set_data_path(data_path)
        if data_path == "kernel" and self.ct_updates is None:
            self.ct_updates = ConntrackEvents(mark=int(Mark.REROUTE_TO_SPLIT_TUN), mask=VERDICT_MASK, updates=True)
            self.rt.loop.add_fd(self.ct_updates.fileno(), self._read_conntrack_updates)
        elif data_path != "kernel" and self.ct_updates is not None:
            self.rt.loop.remove(self.ct_updates.fileno())
            self.ct_updates.close()
            self.ct_updates = None

    def _read_sockets(self) -> None:
        self.engine.on_sockets_destroyed(self.socket_events.read())

    def _announce(self, active: bool, reason: str) -> None:
        """`interceptor.state` (worker 0 only: it alone knows when interception starts and stops)."""
        self.rt.publish(InterceptionState(ts=time.time(), active=active, reason=reason))

    def _check_jumps(self, why: str) -> list[str]:
        if self.fw is None:
            return []
        try:
            with self._fw_lock:
                moved = self.fw.check_jump_order()
        except Exception as exc:
            self.log.error("rules.check_failed", why=why, error=describe(exc))
            raise
        if moved:
            self.log.warning("rules.jumps_moved_back", why=why, moved=",".join(moved))
        return moved

    def _check_jumps_in_background(self, why: str, wait: bool = False) -> None:
        """A VPN that connects later (wg-quick recreating its anti-spoofing table, a kill switch inserting
        its chains) shows up as a network change: check then too, off the verdict loop. `wait`: run after a
        check in progress instead of skipping (it may have read the rules before the change)."""
        if self.fw is None or (self._fw_lock.locked() and not wait):
            return

        def check() -> None:
            with contextlib.suppress(Exception):  # _check_jumps logged it; the next check retries
                self._check_jumps(why)

        threading.Thread(target=check, name="rules-check", daemon=True).start()

    @answers(Interceptor.CHECK_RULES)
    def answer_check_rules(self, args: NoArgs) -> RulesChecked:
        if not self.owns_rules:
            raise RequestFailed(INVALID_ARGUMENT, "only worker 0 (interceptor) owns the rules")
        return RulesChecked(moved=self._check_jumps("requested"))

    @answers(Interceptor.STATUS)
    def answer_status(self, args: NoArgs) -> dict[str, Any]:
        policy = self.engine.policy
        return {
            "active": self.active,
            "worker": self.index,
            "workers": self.workers,
            "owns_rules": self.owns_rules,
            "queues": worker_queues(self.index),
            "handler": verdict_handler.SLOT.name,
            "backend": getattr(self, "backend", ""),
            "routing": self.routing.status() if self.routing is not None else {"owner": False},
            "kernel_routing": self.kernel_routing.status() if self.kernel_routing is not None else {"owner": False},
            "data_path": self.engine.tcp_data_path,  # what verdicts say now (worker 0: once the rules are in place)
            "policy_data_path": self._data_path_for(policy.snapshot) if policy.version > 0 else "",
            **self.engine.status(),
        }

    def readiness(self) -> str:
        if not getattr(self, "active", False):
            return "passive: another interceptor holds the queues"
        return next((why for keeper in self._keepers() if (why := keeper.not_ready())), "")

    def counters(self) -> dict[str, int]:
        engine = getattr(self, "engine", None)
        if engine is None:
            return {}
        out = {k: v for k, v in engine.status().items() if isinstance(v, int)}
        out["active"] = int(self.active)
        source = getattr(self, "source", None)
        if isinstance(source, DivertPath):
            out |= {f"divert_{k}": v for k, v in (source.redirector.counters | source.counters).items()}
            out["divert_flows"] = len(source.redirector.flows)
        out["conntrack_overruns"] = self.ct_events.overruns + (self.ct_updates.overruns if self.ct_updates else 0)
        out["socket_event_overruns"] = self.socket_events.overruns
        out["attribution_scans"] = self.attributor.scans
        out["attribution_listings"] = self.attributor.listings
        out["attribution_no_socket"] = self.attributor.no_socket
        out["attribution_no_process"] = self.attributor.no_process
        keepers = self._keepers()
        if keepers:
            out["routing_errors"] = sum(k.errors for k in keepers)
            out["routing_changes"] = sum(k.changes for k in keepers)
        return out

    def stop(self) -> None:
        """Worker 0 removes the rules first (nothing queued any more), then every worker lets go. The split
        routing stays: a proxy may still be using it (`splittun down` removes it once all have stopped)."""
        if hasattr(self, "_stopping"):
            self._stopping.set()
        for keeper in self._keepers():
            keeper.stop()
        if getattr(self, "owns_rules", False) and getattr(self, "active", False):
            self._announce(False, "stopping")
            try:
                removed = cleanup(self.rt.run_dir)
                self.log.info("rules.removed", **{k: str(v) for k, v in removed.items()})
            except Exception as exc:
                self.log.error("rules.remove_failed", error=describe(exc))
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.flush_pending()
        for name in (
            "source",
            "ct_events",
            "ct_updates",
            "socket_events",
            "conntrack",
            "diag",
            "attributor",
            "names",
            "redirects",
        ):
            thing = getattr(self, name, None)
            if thing is not None:
                try:
                    thing.close()
                except Exception as exc:
                    self.log.warning("close.failed", what=name, error=describe(exc))
