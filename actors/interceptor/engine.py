"""The interceptor's packet path: parse → decide (attributing first only when it matters) → verdict
and mark → attribute → events.

Platform-neutral and free of sockets: the actor hands it queued packets (`platform.QueuedPacket`) and
one `ports.Ports` object for everything outside it (clocks, own pid and uids, publishing, scheduling,
conntrack, attribution, names, the handler slot). Tests drive it with fake packets and one fake ports
object. The connections it decided live in a `live.LiveTable`; the verdict itself is `verdict.decide`.

Every queued packet gets a verdict, whatever happens: an exception anywhere on the path accepts the
packet unmarked (mark 0 = unsplit, through the VPN), logs once and keeps going.

Finding a connection's process costs far more than deciding (a sock_diag request, then /proc reads:
tens of µs, more for a process holding hundreds of fds). So the verdict waits for it only when the
process can change the verdict: the policy has app rules, an external handler looks at processes, or
the policy would split a socket owned by a uid one of our processes runs as (our own connections are
never split). Otherwise the packet is released first and its process is looked for right after —
while the connection is at most one round trip old, so its socket and the process holding it are
normally still there. Events are published at the end of the batch of packets the kernel handed over
in one wakeup: one conn.new per decided connection, carrying its process and its verdict (one message
instead of conn.new + conn.verdict: the bus and every subscriber pay per message).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field, replace
from typing import Any

from core.dns.answers import DnsError, parse_response
from core.policy import EMPTY_POLICY, CompiledPolicy
from kernel.conntrack import TCP_CONNTRACK_CLOSE, TCP_CONNTRACK_TIME_WAIT, CtCounters, CtEntry
from kernel.sockdiag import DiagSocket
from messages import (
    ConnEnd,
    ConnNew,
    IvpnStatus,
    Mark,
    NetenvChanged,
    PolicySnapshot,
    ProcessInfo,
    SessionCounters,
    Verdict,
)
from messages.events import HEARTBEAT_TTL
from messages.flows import FiveTuple, IpProtocol
from messages.marks import NAMESERVER_PORT, PROXY_IPV4, PROXY_IPV6, VERDICT_MASK
from runtime.log import EventLog, describe

from .live import LiveConn, LiveTable
from .packet import MalformedPacket, ParsedPacket, parse_packet
from .platform import QueuedPacket
from .ports import Ports
from .verdict import MALFORMED, SplitEgress, VerdictOutcome, decide

#: Delays (s) between attribution attempts for a socket or process not visible yet; only used when the
#: policy has app rules (otherwise the verdict does not depend on the process and nobody should wait).
RETRY_DELAYS = (0.002, 0.008, 0.03)
MAX_DECISIONS = 4096
OWN_PID_TTL = HEARTBEAT_TTL  # seconds a heartbeat's pid counts as ours
#: Seconds a UDP flow whose entry we deleted is remembered, so a late answer cannot turn it around.
LATE_ANSWER_MEMORY = 5.0
MAX_DELETED_MEMORY = 16384
RESOLVER = "resolver"  # the actor DNS queries are rerouted to while it heartbeats ready
RESOLVER_SILENCE = HEARTBEAT_TTL  # seconds without its heartbeat after which it counts as gone (a kill is
# seen at once: its listening socket's destroy event)
_RESOLVER_LISTEN = {(socket.AF_INET, socket.inet_pton(socket.AF_INET, PROXY_IPV4)),
                    (socket.AF_INET6, socket.inet_pton(socket.AF_INET6, PROXY_IPV6))}  # fmt: skip
_SPLITTABLE = (IpProtocol.TCP, IpProtocol.UDP)
_ICMP = (IpProtocol.ICMP, IpProtocol.ICMPV6)


def _ivpn_facts(s: IvpnStatus) -> tuple[object, ...]:
    """What of IVPN's status a verdict may depend on (the handler's carrier, daemon port, state)."""
    return (s.state, s.connected, s.interface, s.paused, s.server_ip, s.server_port, s.daemon_port, s.kill_switch)


def _resolver_listener(sock: DiagSocket) -> bool:
    """Is this destroyed socket one the resolver listens on (so the resolver is gone)?"""
    return (sock.family, sock.src[: 4 if sock.family == socket.AF_INET else 16]) in _RESOLVER_LISTEN


@dataclass
class _Pending:
    info: ParsedPacket
    packets: list[QueuedPacket] = field(default_factory=list)


class Engine:
    """The packet path of one interceptor worker. Its cost counters (busy_us, verdict_us, attribution_us) are
    measured with its own stopwatch (`time.perf_counter_ns`); every other clock comes from the ports."""

    def __init__(self, *, instance: str, log: EventLog, ports: Ports) -> None:
        self.instance = instance
        self.log = log
        self.ports = ports
        self.policy: CompiledPolicy = EMPTY_POLICY
        self.ivpn: IvpnStatus | None = None
        self.live = LiveTable()
        self._deleted_udp: dict[FiveTuple, float] = {}  # answer tuple of a UDP flow we deleted → until when
        self._pending: dict[FiveTuple, _Pending] = {}
        self._unpublished: list[LiveConn] = []  # decided in this batch of packets; their events to come
        self._decisions: dict[tuple[int, int, str, int, str, bool], VerdictOutcome] = {}  # _destination_outcome
        self.netenv: NetenvChanged | None = None
        self.tcp_data_path = "proxy"  # until the firewall's rules say otherwise (set_data_path)
        self.egress = SplitEgress(None, "", [])
        self.nameserver = False  # the resolver is ready: DNS queries are rerouted to it
        self._resolver_heard = 0.0  # monotonic time of its last heartbeat
        self._own: dict[str, tuple[int, float]] = {}
        self._own_cache: tuple[float, frozenset[int]] = (-1.0, frozenset())
        self._own_uids: tuple[frozenset[int], frozenset[int]] = (frozenset(), frozenset())  # (for pids, uids)
        self._arrived = 0  # perf_counter_ns when the packet being handled arrived (0: none)
        self._id_prefix = f"{instance}-{int(ports.now()):x}"
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
                "dns_rerouted",
                "reevaluation_resets",
                "errors",
                "handler_errors",
                "untracked",
                "tuple_repeats",  # queued packets of a tuple already decided: checked against the kernel
                "tuple_reused",  # …that turned out to be a new connection (a reused port): decided afresh
                "reused_entries_dropped",  # SYNs of a new connection reopening an old entry: entry deleted
                "syn_retransmits",  # SYNs of a decided connection queued again: same socket, same verdict
                "sockets_closed",  # UDP sockets gone whose connections ended (their entries deleted or handed on)
                "late_answers_dropped",  # answers to a UDP flow deleted a moment ago: would have turned it
                "udp_port_races",  # …whose tuple another socket already used: decided for it at once
                "stale_destroys",  # destroy events of an entry that a new connection had already replaced
                "attribution_errors",  # finding a process failed with an error (decided without it)
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
        changed = old is None or _ivpn_facts(old) != _ivpn_facts(status)
        if changed and self.ports.handler_slot.get() is not None:
            self.reevaluate(f"ivpn {status.state}")

    def heard_actor(self, instance: str, pid: int, now: float | None = None) -> None:
        old = self._own.get(instance)
        self._own[instance] = (pid, self.ports.monotonic() if now is None else now)
        if old is None or old[0] != pid:
            self._own_cache = (-1.0, frozenset())

    def heard_resolver(self, ready: bool, now: float | None = None) -> None:
        """The resolver's heartbeat: DNS is rerouted to it exactly while it says it is ready."""
        self._resolver_heard = self.ports.monotonic() if now is None else now
        self._set_nameserver(ready, "ready" if ready else "not ready")

    def check_resolver(self, now: float | None = None) -> None:
        """Called every second: a resolver whose heartbeats stopped is gone (its queries go where apps sent them)."""
        now = self.ports.monotonic() if now is None else now
        if self.nameserver and now - self._resolver_heard > RESOLVER_SILENCE:
            self._set_nameserver(False, "silent")

    def _set_nameserver(self, ready: bool, why: str) -> None:
        if ready == self.nameserver:
            return
        self.nameserver = ready
        self._decisions.clear()
        self.log.info("resolver.followed", rerouting=ready, why=why)
        self.reevaluate(f"resolver {why}")

    def own_pids(self, now: float | None = None) -> frozenset[int]:
        """Our actors' pids (heard within OWN_PID_TTL) and ours; recomputed at most once a second."""
        now = self.ports.monotonic() if now is None else now
        computed, pids = self._own_cache
        if computed < 0 or not 0 <= now - computed < 1.0:
            own = {pid for pid, seen in self._own.values() if now - seen < OWN_PID_TTL}
            pids = frozenset(own | {self.ports.own_pid})
            self._own_cache = (now, pids)
        return pids

    def own_uids(self) -> frozenset[int]:
        """The uids our processes run as: a socket of another uid cannot be ours."""
        pids = self.own_pids()
        known_for, uids = self._own_uids
        if known_for != pids:  # asked again only when our processes change (a gone one has no uid)
            uid_of = self.ports.uid_of
            uids = frozenset(uid for pid in pids if (uid := uid_of(pid)) is not None)
            self._own_uids = (pids, uids)
        return uids

    def _surely_not_ours(self, info: ParsedPacket) -> bool:
        """The socket's owner (sock_diag alone) is a uid none of our processes runs as: apps run as
        users, splittun as root. Then a split needs no look at /proc before the verdict."""
        uids = self.own_uids()
        uid = self.ports.socket_uid(info.flow)
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
            self.log.once("packet.failed", describe(exc))
            self._accept_unmarked(pkt)
        self._arrived = 0
        self.counters["busy_us"] += (time.perf_counter_ns() - started) // 1000

    def _accept_unmarked(self, pkt: QueuedPacket) -> None:
        try:
            pkt.set_mark(0)
            pkt.accept()
        except Exception as exc:  # the verdict was already given, or the queue is gone
            self.log.once("packet.verdict_failed", describe(exc))

    def _on_inbound(self, pkt: QueuedPacket) -> None:
        """Two kinds of inbound packets are queued:
        - DNS answers (from port 53, replies of outbound flows): learn their names, let them through unchanged;
        - the first datagram of a UDP flow that starts from outside. A late answer to a flow whose entry we
          just deleted would start one, turning the app's flow around (see `_delete_entry`): dropped. Any
          other is a real inbound flow: accepted for good (accept-always, saved), never split."""
        data = pkt.get_payload()
        try:
            info = parse_packet(data)
        except MalformedPacket as exc:
            self.log.once("inbound.unreadable", exc.reason)
            pkt.accept()
            return
        if info.flow.protocol == IpProtocol.UDP and info.flow.src_port != 53:
            # The external handler first: the VPN carrier's datagrams (IVPN's server answering after its entry
            # was re-queued or expired) are accepted for good, never taken for a late answer.
            if self._evaluate(info.flow, True, None, "", False, True, False).mark == Mark.ACCEPT_FINAL:
                pkt.set_mark(int(Mark.ACCEPT_FINAL))
                pkt.accept()
                return
            until = self._deleted_udp.get(info.flow)
            if until is not None and until > self.ports.now():
                self.counters["late_answers_dropped"] += 1
                pkt.drop()
                return
            if pkt.get_mark() == 0:
                pkt.set_mark(int(Mark.ACCEPT_ALWAYS))
            pkt.accept()
            return
        answer = None
        if info.flow.protocol == IpProtocol.UDP:
            try:
                answer = parse_response(data[info.payload_offset :])
            except DnsError as exc:
                self.log.once("dns.unreadable", exc.reason)
        if answer is not None:
            self.counters["dns_answers"] += 1
            now = self.ports.now()
            self.counters["names_learned"] += self.ports.names.learn_answer(answer, now)
        pkt.accept()

    def _on_outbound(self, pkt: QueuedPacket) -> None:
        self.counters["queued"] += 1
        data = pkt.get_payload()
        try:
            info = parse_packet(data)
        except MalformedPacket as exc:
            self.counters["malformed"] += 1
            self.log.once("packet.malformed", exc.reason)
            self._apply(pkt, MALFORMED)
            return
        if info.fragment:  # conntrack reassembles before OUTPUT, so this is odd: pass it, never split it
            self.counters["malformed"] += 1
            self.log.once("packet.malformed", "non-first fragment")
            self._apply(pkt, MALFORMED)
            return
        key = info.conntrack_tuple()
        if info.tcp_first and pkt.get_mark() & VERDICT_MASK:
            self._on_syn_of_decided_entry(key, info, pkt)
            return
        live = self.live.get(key)
        if live is not None:
            if self._same_connection(key, live, info):  # queued before its first packet's verdict was saved
                self._apply(pkt, live.outcome)
                return
            if self.live.get(key) is live:  # not ended by its destroy event just read: end it here
                self._end(key, live, "closed: a new connection reuses its addresses and ports")
            self.counters["tuple_reused"] += 1
            self._learn_ct_id_after(key)
        pending = self._pending.get(key)
        if pending is not None:
            pending.packets.append(pkt)
            return
        self._attempt(key, info, [pkt], 0)

    def _same_connection(self, key: FiveTuple, conn: LiveConn, info: ParsedPacket) -> bool:
        """Is a packet queued for a tuple we already decided part of that connection, or of a new one that
        happens to reuse its addresses and ports? A verdict belongs to one connection (the kernel's conntrack
        entry), never to a tuple: a reused port must not inherit another app's verdict.

        Only unmarked packets of a new entry are queued, so:
        - a TCP SYN has a fresh entry: the old connection's one is gone (conntrack kills an entry in
          TIME_WAIT when a SYN reuses its tuple). A new connection.
        - anything else (UDP, a first packet of another protocol) may be a packet sent before the first
          one's verdict was saved in the connmark; then the decided entry is still in the table, carrying
          the verdict's mark. Its destroy event, when it is gone, is read first.
        """
        self.counters["tuple_repeats"] += 1
        if info.tcp_first:
            return False
        self.ports.drain_conntrack_events()
        if self.live.get(key) is not conn:
            return False
        try:
            entry = self.ports.conntrack_get(key)
        except OSError as exc:
            self.log.once("conntrack.get_failed", describe(exc))
            return False  # cannot tell: deciding afresh is right for this packet's own app either way
        if entry is None or entry.mark != conn.outcome.mark:
            return False
        conn.ct_id = entry.id
        return True

    def _on_syn_of_decided_entry(self, key: FiveTuple, info: ParsedPacket, pkt: QueuedPacket) -> None:
        """A SYN whose conntrack entry already carries one of our verdicts (the rules restore it, then queue
        it): either the retransmitted SYN of a connection we decided, or a new connection that reopened an
        old entry — conntrack lets a SYN reuse an entry in CLOSE state (after a reset), keeping its mark
        and its NAT binding, so the new connection would silently inherit the old one's path. The socket
        tells them apart."""
        conn = self.live.get(key)
        mark = pkt.get_mark()
        if (
            conn is not None
            and conn.outcome.mark == mark
            and conn.socket_cookie
            and self._cookie(info.flow, fresh=True) == conn.socket_cookie
        ):
            self.counters["syn_retransmits"] += 1
            self._apply(pkt, conn.outcome)
            return
        # Not the socket that verdict was given for: remove the old entry and drop this SYN. The app
        # retransmits it (1 s later) on a fresh entry, which is queued and decided for its own app.
        if conn is not None:
            self._end(key, conn, "closed: a new connection reopened its conntrack entry")
        self._delete_entry(key)
        self.counters["reused_entries_dropped"] += 1
        pkt.drop()

    def _learn_ct_id_after(self, key: FiveTuple) -> None:
        """After a reused tuple, learn the new connection's entry id once its verdict is in: the old
        entry's destroy event, if it comes late, must not end the new connection."""

        def learn() -> None:
            conn = self.live.get(key)
            if conn is None or conn.ct_id:
                return
            try:
                entry = self.ports.conntrack_get(key)
            except OSError:
                return
            if entry is not None and entry.mark == conn.outcome.mark:
                conn.ct_id = entry.id

        self.ports.call_later(0.0, learn)

    def _verdict_needs_process(self) -> bool:
        """Can the process change this verdict beyond "is it ours"? App rules, or a handler that looks at
        processes (one that does not sets `needs_process = False` on itself)."""
        if self.policy.uses_apps:
            return True
        handler = self.ports.handler_slot.get()
        return handler is not None and getattr(handler, "needs_process", True)

    def _attempt(self, key: FiveTuple, info: ParsedPacket, packets: list[QueuedPacket], attempt: int) -> None:
        process = None
        flow = info.flow
        if flow.protocol in _SPLITTABLE:
            if attempt == 0 and not self._verdict_needs_process():
                domain = self.ports.names.lookup(flow.dst_ip, self.ports.now())
                outcome = self._destination_outcome(info, domain)
                # The process cannot change it, except that our own connections (and the VPN's own, for the
                # handler: IVPN's processes run as root, as we do) are never split.
                if not outcome.split or self._surely_not_ours(info):  # verdict first, process right after
                    conn = self._decided(key, flow, info.first_packet, None, domain, False, outcome, packets)
                    self._attribute_after_verdict(conn)
                    return
            try:
                process = self._attribute(flow)
            except Exception as exc:  # a race we did not foresee: never split, and say so in the verdict
                self.counters["attribution_errors"] += 1
                self.log.once("attribution.failed", describe(exc))
                self._decide_new(key, info, None, packets, failed=describe(exc))
                return
            if process is None and self.policy.uses_apps and attempt < len(RETRY_DELAYS):
                self.counters["attribution_retries"] += 1
                self._pending[key] = _Pending(info, packets)
                self.ports.call_later(RETRY_DELAYS[attempt], lambda: self._retry(key, attempt + 1))
                return
            if process is None:
                self.counters["unattributed"] += 1
        self._decide_new(key, info, process, packets)

    def _destination_outcome(self, info: ParsedPacket, domain: str) -> VerdictOutcome:
        """The verdict of a connection whose process does not matter. Without an external handler (or with
        one that answers by destination, `by_destination`) it depends only on the destination (IP version,
        protocol, address, port, name) and on whether this is the first packet, so it is remembered per
        destination until anything else `decide()` looks at changes (the policy, the VPN state: `_decisions`
        is cleared there): an app's next connection to the same server skips the policy walk."""
        flow, first = info.flow, info.first_packet
        handler = self.ports.handler_slot.get()
        cacheable = handler is None or bool(getattr(handler, "by_destination", False))
        key = (info.ip_version, flow.protocol, flow.dst_ip, flow.dst_port, domain, first)
        if cacheable and (outcome := self._decisions.get(key)) is not None:
            return outcome
        outcome = self._evaluate(flow, first, None, domain, False, attributed=False)
        if cacheable:
            if len(self._decisions) >= MAX_DECISIONS:
                self._decisions.clear()
            self._decisions[key] = outcome
        return outcome

    def _retry(self, key: FiveTuple, attempt: int) -> None:
        pending = self._pending.pop(key, None)
        if pending is None:
            return
        try:
            self._attempt(key, pending.info, pending.packets, attempt)
        except Exception as exc:
            self.counters["errors"] += 1
            self.log.once("packet.failed", describe(exc))
            for pkt in pending.packets:
                self._accept_unmarked(pkt)

    def flush_pending(self) -> None:
        """Decide every packet still waiting for attribution (on stop: unbinding would drop them)."""
        for key in list(self._pending):
            pending = self._pending.pop(key)
            self._decide_new(key, pending.info, None, pending.packets)
        self.flush_events()

    def _apply(self, pkt: QueuedPacket, outcome: VerdictOutcome) -> None:
        pkt.set_mark(int(outcome.mark))
        pkt.accept()

    def _evaluate(
        self,
        flow: FiveTuple,
        first_packet: bool,
        process: ProcessInfo | None,
        domain: str,
        own: bool,
        inbound: bool = False,
        attributed: bool = True,
    ) -> VerdictOutcome:
        errors: list[str] = []
        outcome = decide(
            flow,
            self.policy,
            first_packet=first_packet,
            inbound=inbound,
            attributed=attributed,
            process=process,
            domain=domain,
            own=own,
            handler=self.ports.handler_slot.get(),
            ivpn=self.ivpn,
            errors=errors,
            egress=self.egress.check,
            nameserver=self.nameserver,
        )
        for error in errors:
            self.counters["handler_errors"] += 1
            self.log.once("handler.failed", error)
        return outcome

    def _decide_new(
        self,
        key: FiveTuple,
        info: ParsedPacket,
        process: ProcessInfo | None,
        packets: list[QueuedPacket],
        failed: str = "",
    ) -> None:
        """Decide with what is known of the process. `failed`: finding it raised (then a split, which would
        need it, is refused and the verdict says why)."""
        flow, first = info.flow, info.first_packet
        domain = self.ports.names.lookup(flow.dst_ip, self.ports.now())
        own = process is not None and process.pid in self.own_pids()
        outcome = self._evaluate(flow, first, process, domain, own)
        if failed and outcome.split:
            outcome = VerdictOutcome(Verdict.ACCEPT, Mark.ACCEPT_ALWAYS, outcome.rule,
                                     f"finding the process failed ({failed}): kept in the VPN")  # fmt: skip
        elif process is None and self.policy.uses_apps and flow.protocol in _SPLITTABLE and not outcome.rule:
            # App rules could not be checked: said in the verdict's reason and counted, never silent.
            outcome = replace(outcome, reason=outcome.reason or "process not found: app rules could not match")
        cookie = self._cookie(flow) if process is not None else 0
        self._decided(key, flow, first, process, domain, own, outcome, packets, cookie)

    def _decided(
        self,
        key: FiveTuple,
        flow: FiveTuple,
        first_packet: bool,
        process: ProcessInfo | None,
        domain: str,
        own: bool,
        outcome: VerdictOutcome,
        packets: list[QueuedPacket],
        cookie: int = 0,
    ) -> LiveConn:
        """Give the verdict, then track the connection and queue its events for the end of this batch.
        `cookie`: the socket it was decided for (0: any). A split UDP flow's owner is published first: the UDP
        proxy lets only that socket's datagrams through (another app may reuse the port before the entry
        goes; core/redirect.py)."""
        if outcome.split and flow.protocol == IpProtocol.UDP:
            self.ports.publish_split_owner(flow, int(outcome.mark), cookie)
        for pkt in packets:
            self._apply(pkt, outcome)
        if self._arrived:  # not for a connection decided late (retries, stop)
            self.counters["verdict_us"] += (time.perf_counter_ns() - self._arrived) // 1000
        now = self.ports.now()
        self.counters["decided"] += 1
        if outcome.split:
            self.counters["split"] += 1
        elif outcome.rerouted_to_nameserver:
            self.counters["dns_rerouted"] += 1
        self._next_id += 1
        conn = LiveConn(f"{self._id_prefix}-{self._next_id}", flow, first_packet, process, domain, own, outcome, now)
        conn.socket_cookie = cookie
        if self.live.track(key, conn):
            self.counters["untracked"] += 1
        if not self._unpublished:
            self.ports.call_later(0.0, self.flush_events)
        self._unpublished.append(conn)
        return conn

    def _attribute(self, flow: FiveTuple) -> ProcessInfo | None:
        started = time.perf_counter_ns()
        try:
            return self.ports.attribute(flow)
        finally:
            self.counters["attribution_us"] += (time.perf_counter_ns() - started) // 1000

    def _attribute_after_verdict(self, conn: LiveConn) -> None:
        """The process of a connection already decided without it, for its events (and re-evaluations)."""
        self.counters["attributed_after_verdict"] += 1
        try:
            process = self._attribute(conn.flow)
        except Exception as exc:  # the verdict is given; the connection just has no process in its events
            self.counters["errors"] += 1
            self.log.once("attribution.failed", describe(exc))
            process = None
        if process is None:
            self.counters["unattributed"] += 1
            return
        conn.process = process
        conn.own = process.pid in self.own_pids()  # kept in the VPN already; re-evaluations treat it as ours
        conn.socket_cookie = self._cookie(conn.flow)

    def _cookie(self, flow: FiveTuple, fresh: bool = False) -> int:
        """The cookie of the socket the last attribution of `flow` found (no syscall), or with `fresh` of the
        socket that owns the flow's tuple now; 0 when unknown."""
        try:
            return self.ports.socket_cookie(flow, fresh=fresh)
        except OSError:
            return 0

    def flush_events(self) -> None:
        """End of a batch of packets: conn.new (with its verdict) for every connection decided in it."""
        if not self._unpublished:
            return
        started = time.perf_counter_ns()
        batch, self._unpublished = self._unpublished, []
        for conn in batch:
            try:
                self._publish_new(conn, conn.started)
            except Exception as exc:
                self.counters["errors"] += 1
                self.log.once("event.failed", describe(exc))
        self.counters["busy_us"] += (time.perf_counter_ns() - started) // 1000

    # --- events ----------------------------------------------------------------------------------------

    def _publish_new(self, conn: LiveConn, now: float) -> None:
        """The connection and its verdict in one conn.new (version 2)."""
        f = conn.flow
        icmp = f.protocol in _ICMP
        o = conn.outcome
        interface, data_path, local_ip = o.interface if o.split else "", "", ""
        if o.split:
            data_path = self.data_path(f)
            if data_path == "kernel":  # no proxy reports where it left: say it here
                egress = self.egress.found(o.interface, f.ip_version)
                if egress is not None:
                    interface, local_ip = egress.interface, egress.source
        self.ports.publish(
            ConnNew(
                conn_id=conn.conn_id,
                ts=now,
                ip_version=f.ip_version,
                protocol=f.protocol,
                src_ip=f.src_ip,
                src_port=0 if icmp else f.src_port,
                dst_ip=f.dst_ip,
                dst_port=0 if icmp else f.dst_port,
                inbound=False,  # only outbound connections are decided (and tracked)
                process=conn.process,
                domain=conn.domain,
                verdict=o.verdict,
                rule=o.rule,
                reason=o.reason,
                split_key=f.key() if o.split else "",
                interface=interface,
                data_path=data_path,
                local_ip=local_ip,
            )
        )

    def set_data_path(self, data_path: str) -> None:
        """The firewall's rules now send split TCP this way (the actor calls this once they are in place)."""
        self.tcp_data_path = data_path

    def data_path(self, flow: FiveTuple) -> str:
        """How a split connection of this flow leaves: split TCP as the firewall's rules send it (the kernel
        path lets it out by its mark), everything else through a proxy."""
        return self.tcp_data_path if flow.protocol == IpProtocol.TCP else "proxy"

    def on_conntrack_destroyed(self, entries: list[CtEntry]) -> None:
        """conn.end for our connections whose conntrack entry is gone (closed or timed out)."""
        for entry in entries:
            conn = self.live.get(entry.orig)
            if conn is None:
                continue
            if conn.ct_id and entry.id and conn.ct_id != entry.id:  # an older entry of a reused tuple
                self.counters["stale_destroys"] += 1
                continue
            self._end(entry.orig, conn, "closed", _counters(entry.counters))

    def on_conntrack_updated(self, entries: list[CtEntry]) -> None:
        """conn.end for split TCP connections that closed (TIME_WAIT or CLOSE), not minutes later when their
        entry times out: on the kernel path no proxy session tells when the connection ended. Counts come
        from the entry itself (update events carry none)."""
        for entry in entries:
            if entry.tcp_state not in (TCP_CONNTRACK_TIME_WAIT, TCP_CONNTRACK_CLOSE):
                continue
            conn = self.live.get(entry.orig)
            if conn is None or (conn.ct_id and entry.id and conn.ct_id != entry.id):
                continue
            try:
                counted = self.ports.conntrack_get(entry.orig)
            except OSError:
                counted = None
            if counted is not None and entry.id and counted.id and counted.id != entry.id:
                continue  # the tuple has a newer entry already: this one's close is not the live connection's
            counters = counted.counters if counted is not None else None
            self._end(entry.orig, conn, "closed", _counters(counters))

    def on_sockets_destroyed(self, sockets: list[DiagSocket]) -> None:
        """UDP sockets that are gone. A UDP conntrack entry outlives its socket, and another socket on the same
        port (another app, maybe) talking to the same peer would follow the old entry's path unseen. So:
        - nobody uses the tuple now: delete the entry; the next socket's first datagram is queued and decided;
        - another socket already does (the port was reused at once): decide for that socket now. The same
          verdict keeps the entry (and the connection continues under the new socket); another deletes it,
          so its next datagram starts afresh (what it sent meanwhile went the old way: counted)."""
        for sock in sockets:
            if sock.sport == NAMESERVER_PORT and _resolver_listener(sock):
                self._set_nameserver(False, "listener closed")  # killed: no waiting for its heartbeats to stop
            for key in self.live.udp_flows_on(sock.sport):
                conn = self.live.get(key)
                if conn is None or (conn.socket_cookie and sock.cookie and conn.socket_cookie != sock.cookie):
                    continue  # another socket on the same port (SO_REUSEPORT, another local address)
                self.counters["sockets_closed"] += 1
                self._end(key, conn, "closed: its socket was closed")
                successor = self._cookie(conn.flow, fresh=True)
                if successor and successor != sock.cookie and self._keeps_path(key, conn, successor):
                    continue
                self._delete_entry(key)

    def _delete_entry(self, key: FiveTuple) -> bool:
        """Delete a connection's conntrack entry (its next packet is queued again); False when that failed.

        A UDP flow's answers may still be on their way: one arriving after the entry is gone would make a
        new entry in the other direction, and the app's next datagrams would then pass as replies to it,
        never queued (stuck on the path they happen to take). So the flow is remembered for a moment, and
        such a late answer is dropped instead (`_on_inbound`)."""
        try:
            self.ports.conntrack_delete(key)
        except OSError as exc:
            self.log.once("conntrack.delete_failed", describe(exc))
            return False
        if key.protocol == IpProtocol.UDP:
            if len(self._deleted_udp) >= MAX_DELETED_MEMORY:
                self._deleted_udp.clear()
            self._deleted_udp[key.reversed()] = self.ports.now() + LATE_ANSWER_MEMORY
        return True

    def _keeps_path(self, key: FiveTuple, old: LiveConn, cookie: int) -> bool:
        """Another socket took over a closed socket's tuple before its entry was deleted: decide for it. True
        when its verdict is the old one (the entry stays, tracked as its connection), else False."""
        self.counters["udp_port_races"] += 1
        f = old.flow
        try:
            process = self._attribute(f)
        except Exception as exc:
            self.log.once("attribution.failed", describe(exc))
            return False
        if process is None and self._verdict_needs_process():
            return False  # its verdict cannot be known without its process: a fresh entry will be decided
        domain = old.domain or self.ports.names.lookup(f.dst_ip, self.ports.now())
        own = process is not None and process.pid in self.own_pids()
        outcome = self._evaluate(f, old.first_packet, process, domain, own)
        if outcome.mark != old.outcome.mark:
            return False
        self._decided(key, f, old.first_packet, process, domain, own, outcome, [], cookie)
        return True

    def _end(self, key: FiveTuple, conn: LiveConn, reason: str, counters: SessionCounters | None = None) -> None:
        """Forget a live connection and publish its conn.end (after any conn.new still queued), with
        conntrack's byte and packet counts when the entry's destroy event carried them."""
        self.flush_events()  # conn.new before conn.end, always
        if self.live.get(key) is conn:
            self.live.untrack(key)
        self.ports.publish(ConnEnd(conn_id=conn.conn_id, ts=self.ports.now(), reason=reason, counters=counters))

    # --- re-evaluation ---------------------------------------------------------------------------------

    def reevaluate(self, why: str) -> int:
        """Run every live connection through the filter again; re-queue those whose verdict must change.

        Re-queueing = deleting the conntrack entry: the next packet is NEW, our rules queue it and it is
        decided afresh (a new conn_id: conn.end closes the old one, so a conn_id's verdict only goes up).
        """
        self.flush_events()  # conn.new before any conn.end it causes
        resets = 0
        now = self.ports.now()
        names = self.ports.names

        def evaluate(conn: LiveConn) -> VerdictOutcome:
            domain = conn.domain or names.lookup(conn.flow.dst_ip, now)
            self.counters["reevaluated"] += 1
            return self._evaluate(conn.flow, conn.first_packet, conn.process, domain, conn.own,
                                  attributed=conn.process is not None)  # fmt: skip

        for key, conn, new in self.live.reevaluated(evaluate):
            if not self._delete_entry(key):
                continue
            self.live.untrack(key)
            resets += 1
            reason = f"re-evaluated ({why}): {conn.outcome.verdict.verb()} -> {new.verdict.verb()}"
            self.ports.publish(ConnEnd(conn_id=conn.conn_id, ts=now, reason=reason))
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


def _counters(counted: CtCounters | None) -> SessionCounters | None:
    """Conntrack's counts in the proxies' terms: the original direction is the app's upload."""
    if counted is None:
        return None
    return SessionCounters(
        bytes_up=counted.bytes_orig,
        bytes_down=counted.bytes_reply,
        packets_up=counted.packets_orig,
        packets_down=counted.packets_reply,
    )
