"""The interceptor's packet path: parse → decide (attributing first only when it matters) → verdict
and mark → attribute → events.

Platform-neutral and free of sockets: the actor hands it queued packets (anything with
`get_payload/set_mark/accept`) and gives it functions to attribute flows, delete a conntrack entry,
publish an event and schedule a callback. Tests drive it with fake packets and fakes for those.

Every queued packet gets a verdict, whatever happens: an exception anywhere on the path accepts the
packet unmarked (mark 0 = unsplit, through the VPN), logs once and keeps going.

Finding a connection's process costs far more than deciding (a sock_diag request, then /proc reads:
tens of µs, more for a process holding hundreds of fds). So the verdict waits for it only when the
process can change the verdict: the policy has app rules, an external handler looks at processes, or
the policy would split a socket owned by a uid one of our processes runs as (our own connections are
never split). Otherwise the packet is released first and its process is looked for right after —
while the connection is at most one round trip old, so its socket and the process holding it are
normally still there. Events are published at the end of the batch of packets the kernel handed over
in one wakeup (conn.new with the process, then conn.verdict).
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from actors.conntrack import CtEntry, CtTuple
from messages import ConnEnd, ConnNew, ConnVerdict, IvpnStatus, Message, NetenvChanged, PolicySnapshot, flow_key
from messages.log import EventLog
from splittun.policy import EMPTY_POLICY, CompiledPolicy

from .decide import MALFORMED, Flow, Outcome, SplitEgress, decide, reevaluation_resets
from .dns import DnsError, parse_response
from .hook import SLOT, HandlerSlot
from .names import NameTable
from .packet import ICMP, ICMPV6, TCP, UDP, MalformedPacket, PacketInfo, parse_packet
from .procinfo import Owner

#: Delays (s) between attribution attempts for a socket or process not visible yet; only used when the
#: policy has app rules (otherwise the verdict does not depend on the process and nobody should wait).
RETRY_DELAYS = (0.002, 0.008, 0.03)
MAX_LIVE = 65536
MAX_DECISIONS = 4096
OWN_PID_TTL = 5.0  # seconds a heartbeat's pid counts as ours


class QueuedPacket(Protocol):
    def get_payload(self) -> bytes: ...
    def set_mark(self, mark: int) -> None: ...
    def accept(self) -> None: ...


@dataclass
class LiveConn:
    conn_id: str
    flow: Flow
    owner: Owner | None
    domain: str
    own: bool
    outcome: Outcome
    started: float


@dataclass
class _Pending:
    info: PacketInfo
    packets: list[QueuedPacket] = field(default_factory=list)


def ct_tuple(info: PacketInfo) -> CtTuple:
    """The conntrack original tuple of the packet's connection (ICMP echo: id in src_port)."""
    if info.protocol in (ICMP, ICMPV6):
        return CtTuple(info.protocol, info.src_ip, info.icmp_id, info.dst_ip, 0)
    return CtTuple(info.protocol, info.src_ip, info.src_port, info.dst_ip, info.dst_port)


def _flow(info: PacketInfo) -> Flow:
    return Flow(
        ip_version=info.ip_version,
        protocol=info.protocol,
        src_ip=info.src_ip,
        src_port=info.src_port,
        dst_ip=info.dst_ip,
        dst_port=info.dst_port,
        first_packet=info.protocol != TCP or info.tcp_first,
    )


class Engine:
    def __init__(
        self,
        *,
        instance: str,
        log: EventLog,
        publish: Callable[[Message], Any],
        attribute: Callable[[int, str, int, str, int], Owner | None],
        names: NameTable,
        schedule: Callable[[float, Callable[[], Any]], Any],
        delete_conntrack: Callable[[CtTuple], bool] | None = None,
        handler_slot: HandlerSlot = SLOT,
        clock: Callable[[], float] = time.time,
        socket_uid: Callable[[int, str, int, str, int], int | None] | None = None,
        uid_of: Callable[[int], int | None] | None = None,
    ) -> None:
        self.instance = instance
        self.log = log
        self.publish = publish
        self.attribute = attribute
        self.socket_uid = socket_uid
        self.uid_of = uid_of
        self.names = names
        self.schedule = schedule
        self.delete_conntrack = delete_conntrack
        self.slot = handler_slot
        self.clock = clock
        self.policy: CompiledPolicy = EMPTY_POLICY
        self.ivpn: IvpnStatus | None = None
        self.live: OrderedDict[CtTuple, LiveConn] = OrderedDict()
        self._pending: dict[CtTuple, _Pending] = {}
        self._unpublished: list[LiveConn] = []  # decided in this batch of packets; their events to come
        self._decisions: dict[tuple[int, int, str, int, str, bool], Outcome] = {}  # see _destination_outcome
        self.netenv: NetenvChanged | None = None
        self.egress = SplitEgress(None, "", [])
        self._own: dict[str, tuple[int, float]] = {}
        self._own_cache: tuple[float, frozenset[int]] = (-1.0, frozenset())
        self._own_uids: tuple[frozenset[int], frozenset[int]] = (frozenset(), frozenset())  # (for pids, uids)
        self._logged: set[str] = set()
        self._arrived = 0  # perf_counter_ns when the packet being handled arrived (0: none)
        self._id_prefix = f"{instance}-{int(clock()):x}"
        self._next_id = 0
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "queued",
                "decided",
                "split",
                "malformed",
                "dns_answers",
                "names_learned",
                "attribution_retries",
                "attributed_after_verdict",
                "unattributed",
                "reevaluated",
                "reevaluation_resets",
                "errors",
                "handler_errors",
                "untracked",
                "busy_us",  # time spent on packets and their events, in µs (busy_us / queued = cost per packet)
                "verdict_us",  # of that, from a new connection's packet arriving to its verdict (/ decided)
                "attribution_us",  # of that, finding processes (before or after the verdict)
            ),
            0,
        )

    # --- state fed by the bus --------------------------------------------------------------------------

    def set_policy(self, snapshot: PolicySnapshot) -> bool:
        """Adopt a newer snapshot and re-evaluate live connections; False when it is not newer."""
        if snapshot.version <= self.policy.version:
            return False
        self.policy = CompiledPolicy(snapshot)
        self.egress = self._split_egress()
        self._decisions.clear()
        self.reevaluate(f"policy {snapshot.version}")
        return True

    def set_netenv(self, snapshot: NetenvChanged) -> bool:
        """Where split connections can go follows the network: when that changed, verdicts are decided
        anew and live connections re-evaluated (a UDP flow whose interface went away moves to the VPN)."""
        self.netenv = snapshot
        egress = self._split_egress()
        if egress == self.egress:
            return False
        self.egress = egress
        self._decisions.clear()
        self.reevaluate(f"network {snapshot.seq}")
        return True

    def _split_egress(self) -> SplitEgress:
        snap = self.policy.snapshot
        return SplitEgress(self.netenv, snap.interface, [r.interface for r in snap.rules if r.interface])

    def set_ivpn(self, status: IvpnStatus) -> None:
        """The handler may decide by VPN state: a changed state re-evaluates live connections."""
        old = self.ivpn
        self.ivpn = status
        self._decisions.clear()
        changed = old is None or (old.state, old.connected, old.interface, old.paused) != (
            status.state,
            status.connected,
            status.interface,
            status.paused,
        )
        if changed and self.slot.get() is not None:
            self.reevaluate(f"ivpn {status.state}")

    def heard_actor(self, instance: str, pid: int, now: float | None = None) -> None:
        old = self._own.get(instance)
        self._own[instance] = (pid, time.monotonic() if now is None else now)
        if old is None or old[0] != pid:
            self._own_cache = (-1.0, frozenset())

    def own_pids(self, now: float | None = None) -> frozenset[int]:
        """Our actors' pids (heard within OWN_PID_TTL) and ours; recomputed at most once a second."""
        now = time.monotonic() if now is None else now
        computed, pids = self._own_cache
        if computed < 0 or not 0 <= now - computed < 1.0:
            pids = frozenset({pid for pid, seen in self._own.values() if now - seen < OWN_PID_TTL} | {os.getpid()})
            self._own_cache = (now, pids)
        return pids

    def own_uids(self) -> frozenset[int] | None:
        """The uids our processes run as (None when unknown): a socket of another uid cannot be ours."""
        if self.uid_of is None:
            return None
        pids = self.own_pids()
        known_for, uids = self._own_uids
        if known_for != pids:  # asked again only when our processes change (a gone one has no uid)
            uids = frozenset(uid for pid in pids if (uid := self.uid_of(pid)) is not None)
            self._own_uids = (pids, uids)
        return uids

    def _surely_not_ours(self, info: PacketInfo) -> bool:
        """The socket's owner (sock_diag alone) is a uid none of our processes runs as: apps run as
        users, splittun as root. Then a split needs no look at /proc before the verdict."""
        uids = self.own_uids()
        if uids is None or self.socket_uid is None:
            return False
        uid = self.socket_uid(info.protocol, info.src_ip, info.src_port, info.dst_ip, info.dst_port)
        return uid is not None and uid not in uids

    # --- packets ---------------------------------------------------------------------------------------

    def on_packet(self, inbound: bool, pkt: QueuedPacket) -> None:
        """NFQUEUE callback. Never raises; every packet gets a verdict."""
        started = self._arrived = time.perf_counter_ns()
        try:
            if inbound:
                self._on_inbound(pkt)
            else:
                self._on_outbound(pkt)
        except Exception as exc:
            self.counters["errors"] += 1
            self._once("packet.failed", f"{type(exc).__name__}: {exc}")
            self._accept_unmarked(pkt)
        self._arrived = 0
        self.counters["busy_us"] += (time.perf_counter_ns() - started) // 1000

    def _accept_unmarked(self, pkt: QueuedPacket) -> None:
        try:
            pkt.set_mark(0)
            pkt.accept()
        except Exception as exc:  # the verdict was already given, or the queue is gone
            self._once("packet.verdict_failed", f"{type(exc).__name__}: {exc}")

    def _once(self, event: str, reason: str) -> None:
        """Log a problem the first time it happens (per event and reason), never per packet."""
        key = f"{event}:{reason}"
        if key not in self._logged and len(self._logged) < 1024:
            self._logged.add(key)
            self.log.warning(event, reason=reason, note="logged once")

    def _on_inbound(self, pkt: QueuedPacket) -> None:
        """A DNS answer: learn its names, then let it through unchanged."""
        data = pkt.get_payload()
        try:
            info = parse_packet(data)
            answer = parse_response(data[info.payload_offset :]) if info.protocol == UDP else None
        except (MalformedPacket, DnsError) as exc:
            self._once("dns.unreadable", exc.reason)
            answer = None
        if answer is not None:
            self.counters["dns_answers"] += 1
            now = self.clock()
            for address, ttl in answer.addresses:
                self.names.learn(address, answer.qname, ttl, now)
                self.counters["names_learned"] += 1
        pkt.accept()

    def _on_outbound(self, pkt: QueuedPacket) -> None:
        self.counters["queued"] += 1
        data = pkt.get_payload()
        try:
            info = parse_packet(data)
        except MalformedPacket as exc:
            self.counters["malformed"] += 1
            self._once("packet.malformed", exc.reason)
            self._apply(pkt, MALFORMED)
            return
        if info.fragment:  # conntrack reassembles before OUTPUT, so this is odd: pass it, never split it
            self.counters["malformed"] += 1
            self._once("packet.malformed", "non-first fragment")
            self._apply(pkt, MALFORMED)
            return
        key = ct_tuple(info)
        live = self.live.get(key)
        if live is not None:  # a second packet that was queued before the first one's connmark was saved
            self._apply(pkt, live.outcome)
            return
        pending = self._pending.get(key)
        if pending is not None:
            pending.packets.append(pkt)
            return
        self._attempt(key, info, [pkt], 0)

    def _verdict_needs_process(self) -> bool:
        """Can the process change this verdict beyond "is it ours"? App rules, or a handler that looks at
        processes (one that does not sets `needs_process = False` on itself)."""
        if self.policy.uses_apps:
            return True
        handler = self.slot.get()
        return handler is not None and getattr(handler, "needs_process", True)

    def _attempt(self, key: CtTuple, info: PacketInfo, packets: list[QueuedPacket], attempt: int) -> None:
        owner = None
        if info.protocol in (TCP, UDP):
            if attempt == 0 and not self._verdict_needs_process():
                domain = self.names.lookup(info.dst_ip, self.clock())
                outcome = self._destination_outcome(info, domain)
                # The process cannot change it, except that our own connections are never split.
                if not outcome.split or self._surely_not_ours(info):  # verdict first, process right after
                    conn = self._decided(key, info, None, domain, False, outcome, packets)
                    self._attribute_after_verdict(conn)
                    return
            owner = self._attribute(info.protocol, info.src_ip, info.src_port, info.dst_ip, info.dst_port)
            if owner is None and self.policy.uses_apps and attempt < len(RETRY_DELAYS):
                self.counters["attribution_retries"] += 1
                self._pending[key] = _Pending(info, packets)
                self.schedule(RETRY_DELAYS[attempt], lambda: self._retry(key, attempt + 1))
                return
            if owner is None:
                self.counters["unattributed"] += 1
        self._decide_new(key, info, owner, packets)

    def _destination_outcome(self, info: PacketInfo, domain: str) -> Outcome:
        """The verdict of a connection whose process does not matter. Without an external handler it
        depends only on the destination (IP version, protocol, address, port, name) and on whether this
        is the first packet, so it is remembered per destination until anything else `decide()` looks at
        changes (the policy, the VPN state: `_decisions` is cleared there): an app's next connection to
        the same server skips the policy walk."""
        first = info.protocol != TCP or info.tcp_first
        cacheable = self.slot.get() is None
        key = (info.ip_version, info.protocol, info.dst_ip, info.dst_port, domain, first)
        if cacheable and (outcome := self._decisions.get(key)) is not None:
            return outcome
        outcome = self._evaluate(_flow(info), None, domain, False)
        if cacheable:
            if len(self._decisions) >= MAX_DECISIONS:
                self._decisions.clear()
            self._decisions[key] = outcome
        return outcome

    def _retry(self, key: CtTuple, attempt: int) -> None:
        pending = self._pending.pop(key, None)
        if pending is None:
            return
        try:
            self._attempt(key, pending.info, pending.packets, attempt)
        except Exception as exc:
            self.counters["errors"] += 1
            self._once("packet.failed", f"{type(exc).__name__}: {exc}")
            for pkt in pending.packets:
                self._accept_unmarked(pkt)

    def flush_pending(self) -> None:
        """Decide every packet still waiting for attribution (on stop: unbinding would drop them)."""
        for key in list(self._pending):
            pending = self._pending.pop(key)
            self._decide_new(key, pending.info, None, pending.packets)
        self.flush_events()

    def _apply(self, pkt: QueuedPacket, outcome: Outcome) -> None:
        pkt.set_mark(int(outcome.mark))
        pkt.accept()

    def _evaluate(self, flow: Flow, owner: Owner | None, domain: str, own: bool) -> Outcome:
        errors: list[str] = []
        outcome = decide(
            flow,
            self.policy,
            app=owner.app if owner else None,
            process=owner.info if owner else None,
            domain=domain,
            own=own,
            handler=self.slot.get(),
            ivpn=self.ivpn,
            errors=errors,
            egress=self.egress.check,
        )
        for error in errors:
            self.counters["handler_errors"] += 1
            self._once("handler.failed", error)
        return outcome

    def _decide_new(self, key: CtTuple, info: PacketInfo, owner: Owner | None, packets: list[QueuedPacket]) -> None:
        domain = self.names.lookup(info.dst_ip, self.clock())
        own = owner is not None and owner.info.pid in self.own_pids()
        flow = _flow(info)
        self._decided(key, flow, owner, domain, own, self._evaluate(flow, owner, domain, own), packets)

    def _decided(
        self,
        key: CtTuple,
        flow: Flow | PacketInfo,
        owner: Owner | None,
        domain: str,
        own: bool,
        outcome: Outcome,
        packets: list[QueuedPacket],
    ) -> LiveConn:
        """Give the verdict, then track the connection and queue its events for the end of this batch."""
        for pkt in packets:
            self._apply(pkt, outcome)
        if self._arrived:  # not for a connection decided late (retries, stop)
            self.counters["verdict_us"] += (time.perf_counter_ns() - self._arrived) // 1000
        if isinstance(flow, PacketInfo):
            flow = _flow(flow)
        now = self.clock()
        self.counters["decided"] += 1
        if outcome.split:
            self.counters["split"] += 1
        self._next_id += 1
        conn = LiveConn(f"{self._id_prefix}-{self._next_id}", flow, owner, domain, own, outcome, now)
        self.live[key] = conn
        if len(self.live) > MAX_LIVE:
            self.live.popitem(last=False)
            self.counters["untracked"] += 1
        if not self._unpublished:
            self.schedule(0.0, self.flush_events)
        self._unpublished.append(conn)
        return conn

    def _attribute(self, protocol: int, src_ip: str, sport: int, dst_ip: str, dport: int) -> Owner | None:
        started = time.perf_counter_ns()
        try:
            return self.attribute(protocol, src_ip, sport, dst_ip, dport)
        finally:
            self.counters["attribution_us"] += (time.perf_counter_ns() - started) // 1000

    def _attribute_after_verdict(self, conn: LiveConn) -> None:
        """The process of a connection already decided without it, for its events (and re-evaluations)."""
        f = conn.flow
        self.counters["attributed_after_verdict"] += 1
        try:
            owner = self._attribute(f.protocol, f.src_ip, f.src_port, f.dst_ip, f.dst_port)
        except Exception as exc:  # the verdict is given; the connection just has no process in its events
            self.counters["errors"] += 1
            self._once("attribution.failed", f"{type(exc).__name__}: {exc}")
            owner = None
        if owner is None:
            self.counters["unattributed"] += 1
            return
        conn.owner = owner
        conn.own = owner.info.pid in self.own_pids()  # kept in the VPN already; re-evaluations treat it as ours

    def flush_events(self) -> None:
        """End of a batch of packets: conn.new and conn.verdict for every connection decided in it."""
        if not self._unpublished:
            return
        started = time.perf_counter_ns()
        batch, self._unpublished = self._unpublished, []
        for conn in batch:
            try:
                self._publish_new(conn, conn.started)
                self._publish_verdict(conn, conn.started)
            except Exception as exc:
                self.counters["errors"] += 1
                self._once("event.failed", f"{type(exc).__name__}: {exc}")
        self.counters["busy_us"] += (time.perf_counter_ns() - started) // 1000

    # --- events ----------------------------------------------------------------------------------------

    def _publish_new(self, conn: LiveConn, now: float) -> None:
        f = conn.flow
        icmp = f.protocol in (ICMP, ICMPV6)
        self.publish(
            ConnNew(
                conn_id=conn.conn_id,
                ts=now,
                ip_version=f.ip_version,
                protocol=f.protocol,
                src_ip=f.src_ip,
                src_port=0 if icmp else f.src_port,
                dst_ip=f.dst_ip,
                dst_port=0 if icmp else f.dst_port,
                inbound=f.inbound,
                process=conn.owner.info if conn.owner else None,
                domain=conn.domain,
            )
        )

    def _publish_verdict(self, conn: LiveConn, now: float) -> None:
        o, f = conn.outcome, conn.flow
        self.publish(
            ConnVerdict(
                conn_id=conn.conn_id,
                ts=now,
                verdict=o.verdict,
                rule=o.rule,
                reason=o.reason,
                split_key=flow_key(f.protocol, f.src_ip, f.src_port, f.dst_ip, f.dst_port) if o.split else "",
                interface=o.interface if o.split else "",
            )
        )

    def on_conntrack_destroyed(self, entries: list[CtEntry]) -> None:
        """conn.end for our connections whose conntrack entry is gone (closed or timed out)."""
        self.flush_events()  # conn.new before conn.end, always
        now = self.clock()
        for entry in entries:
            conn = self.live.pop(entry.orig, None)
            if conn is not None:
                self.publish(ConnEnd(conn_id=conn.conn_id, ts=now, reason="closed"))

    # --- re-evaluation ---------------------------------------------------------------------------------

    def reevaluate(self, why: str) -> int:
        """Run every live connection through the filter again; re-queue those whose verdict must change.

        Re-queueing = deleting the conntrack entry: the next packet is NEW, our rules queue it and it is
        decided afresh (a new conn_id: conn.end closes the old one, so a conn_id's verdict only goes up).
        """
        self.flush_events()  # conn.new before any conn.end it causes
        resets = 0
        now = self.clock()
        for key, conn in list(self.live.items()):
            domain = conn.domain or self.names.lookup(conn.flow.dst_ip, now)
            new = self._evaluate(conn.flow, conn.owner, domain, conn.own)
            self.counters["reevaluated"] += 1
            if not reevaluation_resets(conn.flow.protocol, conn.outcome, new):
                continue
            if self.delete_conntrack is not None:
                try:
                    self.delete_conntrack(key)
                except OSError as exc:
                    self._once("conntrack.delete_failed", f"{type(exc).__name__}: {exc}")
                    continue
            self.live.pop(key, None)
            resets += 1
            reason = f"re-evaluated ({why}): {conn.outcome.verdict.verb()} -> {new.verdict.verb()}"
            self.publish(ConnEnd(conn_id=conn.conn_id, ts=now, reason=reason))
        self.counters["reevaluation_resets"] += resets
        if resets:
            self.log.info("connections.reevaluated", why=why, reset=resets, live=len(self.live))
        return resets

    def status(self) -> dict[str, Any]:
        return {
            **self.counters,
            "policy_version": self.policy.version,
            "policy_enabled": int(self.policy.enabled),
            "live": len(self.live),
            "pending": len(self._pending),
        }
