"""The ivpn process: keeps a session with the local IVPN daemon (client.py) and publishes `ivpn.status` on
every change, and again every `--republish` seconds for late subscribers. `splittun ivpn` asks it (Ivpn.STATUS).

What IVPN's status means for packets is decided in the interceptor, from `ivpn.status`: the external
verdict handler (core/ivpn/interop.py: IVPN's processes, carrier and daemon port are accept-final) and a
jump check on every state change (IVPN's kill-switch chains, wg-quick's anti-spoofing exemption); the
resolver delegates VPN-path DNS to IVPN's custom DNS from it. The ivpn actor itself
- keeps netenv's location gate: interface-derived location off while IVPN connects or holds its tunnel
  (core/ivpn/status.py);
- asks the controller to show the "IVPN connected" notice on every connect (none once the user chose "Do not
  notify me anymore", until `splittun notifications reset`);
- follows `interceptor.state`: IVPN's DNS counts as delegated only while splittun intercepts (`dns_delegated`);
- runs the pre-connect hooks when IVPN starts connecting (core/ivpn/bypass.py); the first one routes
  `splittun/bypassHosts` outside the VPN (table and rule 717, kernel/routing.py), kept through reconnects and
  removed on disconnect, on stop and by `splittun down`.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from dataclasses import replace

from core.ivpn.bypass import PreConnectCancelled, PreConnectHooks, Refused, plan_bypass
from core.ivpn.portfile import port_file_paths, windows_install_dir
from core.ivpn.protocol import NOT_RUNNING, IvpnSnapshot
from core.ivpn.status import (
    TUNNEL_STATES,
    connected_notice,
    delegated_dns,
    location_gate,
    preconnect_notice,
    to_status,
)
from kernel.routing import BypassRouting, HostRoute
from messages import Message, NetenvChanged, PolicySnapshot
from messages.control import Controller, Interceptor, Ivpn, Location, NoArgs, RequestFailed
from messages.control import Netenv as NetenvOps
from messages.events import InterceptionState, IvpnStatus, Notification
from runtime.actor import Actor, answers
from runtime.log import describe

from .client import DaemonClient

REPUBLISH = 10.0
#: Where to look for the daemon instead of IVPN's own locations (the lab's fake daemon; passed on by supervisord).
PORT_FILE_ENV = "SPLITTUN_IVPN_PORT_FILE"


class IvpnActor(Actor):
    """IVPN client interop."""

    name = "ivpn"
    control = Ivpn
    subscriptions = ("policy.snapshot", "netenv.changed", "interceptor.state")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--port-file",
            action="append",
            default=[p for p in os.environ.get(PORT_FILE_ENV, "").split(os.pathsep) if p],
            help=f"the daemon's port file (repeatable; default: {PORT_FILE_ENV}, a {os.pathsep!r}-separated list, "
            "else this platform's IVPN locations)",
        )
        parser.add_argument(
            "--republish", type=float, default=REPUBLISH, help="repeat the last status every N s (0 = never)"
        )

    def start(self) -> None:
        paths = tuple(getattr(self.rt.args, "port_file", []) or ())
        if not paths:
            install_dir = windows_install_dir() if os.name == "nt" else None
            paths = port_file_paths(env=os.environ, install_dir=install_dir)
        self.status = to_status(NOT_RUNNING, time.time())
        self._snap = NOT_RUNNING
        self.intercepting = False  # interceptor.state: IVPN's DNS is delegated only while splittun intercepts
        self.publishes = 0
        self.location_off = False  # what netenv's location gate should say (location_gate)
        self.location_asks = 0
        self.notices = 0  # notices the controller showed ("IVPN connected", a refused pre-connect hook)
        self.notices_held = 0  # …and the ones it did not (suppressed, or already showing)
        self._was_connected = False
        self._location_lock = threading.Lock()
        # Bypass routes: the hosts (policy snapshot), the network (netenv) and what is installed.
        self.bypass_hosts: tuple[str, ...] = ()
        self.netenv: NetenvChanged | None = None
        self.bypass = ""  # what `splittun ivpn` says about them ("" = none configured or not connecting)
        self._in_tunnel = False
        self._bypass_installed = False
        self._bypass_lock = threading.Lock()
        self._stopping = threading.Event()
        self.routing = BypassRouting()
        self.hooks = PreConnectHooks()
        self.hooks.register("bypassHosts", self._bypass_hook)
        threading.Thread(target=self._fetch_snapshots, name="ivpn-fetch", daemon=True).start()
        self.client = DaemonClient(paths, self._on_snapshot, lambda line: self.log.info("ivpn.daemon", status=line))
        self.client.start()
        republish = float(getattr(self.rt.args, "republish", REPUBLISH))
        if republish > 0:
            self.rt.loop.call_every_slot(republish, self._republish)  # when the heartbeats wake everyone anyway

    def stop(self) -> None:
        if hasattr(self, "_stopping"):
            self._stopping.set()
        client = getattr(self, "client", None)
        if client is not None:
            client.stop()
        if getattr(self, "_bypass_installed", False):
            self._set_bypass(None)

    def _on_snapshot(self, snap: IvpnSnapshot) -> None:
        """Called on the client's thread for every changed snapshot: the status is replaced whole. The
        pre-connect hooks run first, synchronously, when IVPN starts connecting."""
        in_tunnel = snap.state in TUNNEL_STATES  # kept while the daemon restarts: the tunnel outlives it
        if in_tunnel and not self._in_tunnel:
            cancelled = self.hooks.run()
            if cancelled:
                self.log.warning("ivpn.preconnect_cancelled", reason=cancelled)
                notice = preconnect_notice(cancelled, time.time())
                threading.Thread(target=self._notify, args=(notice,), name="ivpn-notice", daemon=True).start()
        elif self._in_tunnel and snap.state in ("DISCONNECTED", "EXITING"):
            self._in_tunnel = False  # first: a bypass follow-up still on its way must find it gone
            self._set_bypass(None)
        self._in_tunnel = in_tunnel if snap.state != "UNKNOWN" else self._in_tunnel
        self._snap = snap
        self.status = self._status_of(snap)
        self._publish()
        gate = location_gate(snap)
        if gate != self.location_off:
            self.location_off = gate
            self._tell_netenv()
        if snap.connected and not self._was_connected:
            notice = connected_notice(snap, time.time())
            threading.Thread(target=self._notify, args=(notice,), name="ivpn-notice", daemon=True).start()
        self._was_connected = snap.connected

    def _notify(self, notice: Notification) -> None:
        """The controller shows it, unless "Do not notify me anymore" marked it (then it answers nil)."""
        try:
            shown = self.rt.ask("controller", Controller.NOTIFY, notice, timeout=2.0)
        except RequestFailed as exc:
            self.log.warning("ivpn.notice_failed", notice=notice.id, error=str(exc))
            return
        if shown is None:
            self.notices_held += 1  # "Do not notify me anymore", or the same one still showing
        else:
            self.notices += 1

    def _status_of(self, snap: IvpnSnapshot) -> IvpnStatus:
        status = to_status(snap, time.time())
        delegated = self.intercepting and bool(delegated_dns(status))
        return replace(status, bypass=self.bypass, dns_delegated=delegated)

    def _publish(self) -> None:
        self.publishes += 1
        self.rt.publish(self.status)  # thread-safe

    # --- bypass routes (the first pre-connect hook) ---------------------------------------------------------

    def _bypass_hook(self) -> None:
        plan = plan_bypass(self.bypass_hosts, self.netenv)
        if isinstance(plan, Refused):
            self.bypass = f"refused: {plan.reason}"
            raise PreConnectCancelled(plan.reason)
        self._set_bypass(plan)

    def _set_bypass(self, plan: list[HostRoute] | None, while_in_tunnel: bool = False) -> None:
        """Install `plan` (None: take ours away). Netlink errors are logged, never raised into the client.
        `while_in_tunnel`: a follow-up of a policy or network change, started on its own thread while IVPN held
        its tunnel; if IVPN disconnected meanwhile (the removal may have run first) it installs nothing."""
        with self._bypass_lock:
            if while_in_tunnel and not self._in_tunnel:
                return
            if not plan and not self._bypass_installed:
                self.bypass = ""
                return
            try:
                changes = self.routing.apply(plan or [])
            except Exception as exc:
                self.log.error("ivpn.bypass_failed", error=describe(exc))
                self.bypass = f"failed: {describe(exc)}"
                return
            self._bypass_installed = bool(plan)
            self.bypass = ", ".join(str(r) for r in plan) if plan else ""
            if changes:
                self.log.info("ivpn.bypass", routes=self.bypass or "none", changes="; ".join(changes))

    def on_message(self, msg: Message) -> None:
        """The bypass hosts (policy) and the network (netenv): while IVPN holds its tunnel, the routes follow."""
        if isinstance(msg, InterceptionState):
            if msg.active != self.intercepting:
                self.intercepting = msg.active
                self.status = self._status_of(self._snap)
                self.log.info("ivpn.interception", active=msg.active, reason=msg.reason,
                              dns_delegated=self.status.dns_delegated)  # fmt: skip
                self._publish()
            return
        if isinstance(msg, PolicySnapshot):
            changed = tuple(msg.bypass_hosts) != self.bypass_hosts
            self.bypass_hosts = tuple(msg.bypass_hosts)
        elif isinstance(msg, NetenvChanged):
            changed = self.netenv is None or msg.seq != self.netenv.seq
            self.netenv = msg
        else:
            return
        if changed and self._in_tunnel:
            plan = plan_bypass(self.bypass_hosts, self.netenv)
            if isinstance(plan, Refused):
                self.log.warning("ivpn.bypass_refused", reason=plan.reason)
                self.bypass = f"refused: {plan.reason}"
                plan = []
            threading.Thread(target=self._set_bypass, args=(plan, True), name="ivpn-bypass", daemon=True).start()

    def _fetch_snapshots(self) -> None:
        """The policy and the network at start (the bus brings every change after that)."""
        wanted = {
            ("controller", Controller.POLICY),
            ("netenv", NetenvOps.SNAPSHOT),
            ("interceptor", Interceptor.STATUS),
        }
        while wanted and not self._stopping.is_set():
            for actor, op in list(wanted):
                try:
                    answer = self.rt.ask(actor, op, timeout=2.0)
                except RequestFailed:
                    continue
                if isinstance(answer, dict) and "active" in answer:  # the interceptor's status
                    answer = InterceptionState(ts=time.time(), active=bool(answer["active"]), reason="asked")
                if isinstance(answer, (PolicySnapshot, NetenvChanged, InterceptionState)):
                    self.rt.loop.call_soon_threadsafe(lambda a=answer: self.on_message(a))
                    wanted.discard((actor, op))
            self._stopping.wait(0.5)

    def _republish(self) -> None:
        """The periodic repeat. While the gate is closed netenv hears it again too (a restarted netenv starts
        with it open); an open gate is netenv's default, so nothing is asked then."""
        self._publish()
        if self.location_off:
            self._tell_netenv()

    def _tell_netenv(self) -> None:
        """Netenv.LOCATION off while IVPN connects or holds its tunnel, on otherwise. From a thread of its own:
        neither the daemon client nor the loop waits for netenv; a failure is retried with the next repeat."""
        if not self._location_lock.acquire(blocking=False):
            return  # one in flight; it applies the latest wish before it lets go

        def tell() -> None:
            try:
                told = None
                while told != self.location_off:
                    told = self.location_off
                    self.location_asks += 1
                    self.rt.ask("netenv", NetenvOps.LOCATION, Location(disabled=told), timeout=2.0)
                    self.log.info("ivpn.location_gate", location="off" if told else "on", state=self.status.state)
            except RequestFailed as exc:
                self.log.debug("ivpn.location_gate_failed", error=str(exc))
            finally:
                self._location_lock.release()

        threading.Thread(target=tell, name="ivpn-location", daemon=True).start()

    @answers(Ivpn.STATUS)
    def answer_status(self, args: NoArgs) -> IvpnStatus:
        return self.status

    @answers(Ivpn.CONNECT)
    def answer_connect(self, args: NoArgs) -> IvpnStatus:
        """Cut the backoff short; the answer is the status now (the client needs a moment to connect)."""
        self.client.wake()
        return self.status

    def counters(self) -> dict[str, int]:
        return {
            "publishes": self.publishes,
            "location_asks": self.location_asks,
            "notices": self.notices,
            "notices_held": self.notices_held,
            **self.client.counters,
        }
