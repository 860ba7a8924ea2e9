"""The divert backend: the interceptor's packet path with a packet diverter instead of NFQUEUE and NAT.

Portmaster's Windows way. A diverter (kernel/divert.py: WinDivert, or eBPFDivert on Linux) hands over every
outbound TCP/UDP packet; nothing in the kernel remembers a verdict or rewrites addresses, so this module does
both, in user space:

- `Redirector` (pure, over pydivert packets): the flows it has verdicts for (by the app's 5-tuple, bounded,
  with idle expiry), the forward rewrite of a split flow's packets to the local proxy (destination = proxy
  address and port, source port = the seen port, re-injected on loopback) and the reverse rewrite of the
  proxy's packets back to the app (source = the original peer). Each redirected flow is published in the
  shared `core.redirect.RedirectTable`, where the proxies read the original destination and split mark.
- `DivertedPacket`: a new flow's first packet as the engine sees any queued packet (`platform.QueuedPacket`):
  the engine decides it with the same code as on NFQUEUE and "marks" it; the mark becomes the Windows
  driver's verdict (`messages.verdict.kext_verdict`: split tunnel = 11) and the redirector acts on it.
- `DivertPath`: the `platform.PacketSource` that reads the diverter on the actor's poll loop.

Verdicts are per flow: permanent ones are remembered (split, accept-always, block/drop-always, ours), the
packet-only ones (accept 1700, block 1701, drop 1702) apply to the packet alone. Anything unexpected
re-injects the packet unchanged: unsplit, through the VPN.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from core.redirect import Redirect, RedirectTable
from kernel.divert import LOOPBACK_INTERFACE, Diverter, divert_filter
from messages.flows import FiveTuple, IpProtocol
from messages.marks import PROXY_IPV4, PROXY_IPV6, SPLIT_PROXY_PORT, Mark
from messages.verdict import KextVerdict, kext_verdict

from .packet import MalformedPacket, parse_packet
from .platform import PacketCallback

TCP_IDLE = 300.0  # a split TCP flow with no packet for this long is forgotten (the proxy's read timeout)
UDP_IDLE = 30.0  # UDP: longer than the proxy's session idle timeout (25 s), so the proxy lets go first
CLOSING_LINGER = 10.0  # after a FIN or RST: the last ACKs and retransmissions still find the flow
SHARED_TCP = 30.0  # seconds a TCP redirect stays in the shared table: the proxy reads it when it accepts
MAX_FLOWS = 65536
#: Seen ports for a further peer of one UDP socket (what the kernel's implicit source NAT does for NFQUEUE).
ALIAS_PORTS = range(20000, 32768)
_FIN, _SYN, _RST, _ACK = 0x01, 0x02, 0x04, 0x10

#: Driver verdicts that re-inject the packet unchanged (no SPN, no own nameserver here: through the VPN).
_PASS = {
    KextVerdict.UNDECIDED,
    KextVerdict.UNDETERMINABLE,
    KextVerdict.ACCEPT,
    KextVerdict.PERMANENT_ACCEPT,
    KextVerdict.REROUTE_TO_NAMESERVER,
    KextVerdict.REROUTE_TO_TUNNEL,
    KextVerdict.FAILED,
}
_DROP = {KextVerdict.BLOCK, KextVerdict.PERMANENT_BLOCK, KextVerdict.DROP, KextVerdict.PERMANENT_DROP}


class Step(Enum):
    """What to do with a diverted packet."""

    SEND = "send"  # re-inject it (rewritten or not)
    DROP = "drop"
    DECIDE = "decide"  # a new flow: the engine decides


@dataclass(slots=True)
class DivertedFlow:
    verdict: KextVerdict
    redirect: Redirect | None  # split flows only
    expires: float
    published_until: float = 0.0  # the shared table's expiry (wall clock), refreshed before it runs out
    closing: bool = False
    answered: bool = False  # the proxy has sent this flow a packet


class Redirector:
    """Flow verdicts and the forward/reverse rewrites of redirected flows (see the module docstring).

    Pure: packets are pydivert `Packet`s (or anything with the same address/port/interface attributes and
    `raw` bytes); clocks are injected."""

    def __init__(
        self,
        table: RedirectTable,
        *,
        proxy4: tuple[str, int] = (PROXY_IPV4, SPLIT_PROXY_PORT),
        proxy6: tuple[str, int] = (PROXY_IPV6, SPLIT_PROXY_PORT),
        loopback_interface: int = LOOPBACK_INTERFACE,
        max_flows: int = MAX_FLOWS,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.table = table
        self.proxy = {4: proxy4, 6: proxy6}
        self.proxy_ports = {proxy4[1], proxy6[1]}
        self.proxy_addrs = {proxy4[0], proxy6[0]}
        self.loopback = loopback_interface
        self.max_flows = max_flows
        self.clock, self.wall = clock, wall
        self.flows: OrderedDict[FiveTuple, DivertedFlow] = OrderedDict()  # least recently used first
        self.by_seen: dict[tuple[int, str, int], FiveTuple] = {}
        self._next_alias = ALIAS_PORTS.start
        self.counters = dict.fromkeys(("forward", "reverse", "passed", "dropped", "evicted", "expired",
                                       "aliases", "unknown_reverse", "table_full", "own_upstreams"), 0)  # fmt: skip

    # --- packets ---------------------------------------------------------------------------------------

    def outbound(self, pkt: Any) -> Step:
        """A diverted outbound packet: rewritten, passed or dropped by its flow's verdict, or DECIDE."""
        info = parse_packet(bytes(pkt.raw))
        flow = info.flow
        if pkt.is_loopback:
            if flow.src_port in self.proxy_ports and flow.src_ip in self.proxy_addrs:
                return self._reverse(pkt, flow, info.tcp_flags)
            return Step.SEND  # loopback traffic of anyone else: never split
        known = self.flows.get(flow)
        if known is None:
            return self._own_upstream(flow)
        now = self.clock()
        if known.expires <= now:
            self._forget(flow, known)
            self.counters["expired"] += 1
            return Step.DECIDE
        if info.tcp_first and (known.redirect is None or known.answered or known.closing):
            # A SYN on a tuple we know, not a retransmission of a split flow's own unanswered SYN: a new
            # connection reusing the addresses and ports, decided for itself.
            self._forget(flow, known)
            return self._own_upstream(flow)  # (our upstream's retransmitted SYN passes again)
        return self._apply(pkt, flow, known, info.tcp_flags, now)

    def _own_upstream(self, flow: FiveTuple) -> Step:
        """A new flow: one of the proxies' upstreams (announced in the table before its first packet) passes
        for good, as a socket carrying 1720 does on NFQUEUE; anything else is for the engine to decide."""
        mine = self.table.lookup(flow.protocol, flow.src_ip, flow.src_port)
        if mine is None or mine.mark != Mark.SPLIT_EGRESS or mine.flow.dst != flow.dst:
            return Step.DECIDE
        self._remember(flow, DivertedFlow(KextVerdict.PERMANENT_ACCEPT, None, self.clock() + self._idle(flow)))
        self.counters["own_upstreams"] += 1
        return Step.SEND

    def decided(self, pkt: Any, mark: int) -> Step:
        """The engine's verdict (its mark) for a new flow's first packet: remember it when the driver would,
        and act on this packet."""
        verdict = kext_verdict(mark)
        info = parse_packet(bytes(pkt.raw))
        flow = info.flow
        if flow.protocol not in (IpProtocol.TCP, IpProtocol.UDP):
            return Step.DROP if verdict in _DROP else Step.SEND
        now = self.clock()
        old = self.flows.get(flow)
        if old is not None:
            self._forget(flow, old)
        remembered = verdict.permanent or verdict == KextVerdict.UNDECIDED
        if verdict == KextVerdict.SPLIT_TUN:
            redirect = self._new_redirect(flow, mark)
            known = DivertedFlow(verdict, redirect, now + self._idle(flow)) if redirect is not None else None
            if known is not None:
                self._remember(flow, known)
                if self._publish(known, force=True):
                    return self._apply(pkt, flow, known, info.tcp_flags, now)
                self._forget(flow, known)
            # No seen port or no room in the table: the proxy could not find the flow. Kept in the VPN.
            self.counters["table_full"] += 1
            verdict, remembered = KextVerdict.PERMANENT_ACCEPT, True
        if remembered:
            self._remember(flow, DivertedFlow(verdict, None, now + self._idle(flow)))
        if verdict in _DROP:
            self.counters["dropped"] += 1
            return Step.DROP
        self.counters["passed"] += 1
        return Step.SEND

    def forget(self, flow: FiveTuple) -> bool:
        """Forget a flow's verdict (re-evaluation, a closed socket): its next packet is decided again."""
        known = self.flows.get(flow)
        if known is None:
            return False
        self._forget(flow, known)
        return True

    # --- rewrites --------------------------------------------------------------------------------------

    def _apply(self, pkt: Any, flow: FiveTuple, known: DivertedFlow, flags: int, now: float) -> Step:
        self.flows.move_to_end(flow)
        if known.verdict in _DROP:
            self.counters["dropped"] += 1
            return Step.DROP
        redirect = known.redirect
        if redirect is None:
            known.expires = now + self._idle(flow)
            self.counters["passed"] += 1
            return Step.SEND
        self._touch(known, flow, flags, now)
        proxy_ip, proxy_port = self.proxy[flow.ip_version]
        pkt.dst_addr = proxy_ip
        pkt.dst_port = proxy_port
        if redirect.seen_port != flow.src_port:
            pkt.src_port = redirect.seen_port
        self._to_loopback(pkt)
        self.counters["forward"] += 1
        return Step.SEND

    def _reverse(self, pkt: Any, seen: FiveTuple, flags: int) -> Step:
        """The proxy's packet to its client (seen address) → from the original peer to the app's own port."""
        app_flow = self.by_seen.get((seen.protocol, seen.dst_ip, seen.dst_port))
        known = self.flows.get(app_flow) if app_flow is not None else None
        if known is None or known.redirect is None or app_flow is None:
            self.counters["unknown_reverse"] += 1
            return Step.SEND  # not a redirected flow (a local client of the proxy port): as it is
        known.answered = True
        self._touch(known, app_flow, flags, self.clock())
        pkt.src_addr = app_flow.dst_ip
        pkt.src_port = app_flow.dst_port
        if app_flow.src_port != seen.dst_port:
            pkt.dst_port = app_flow.src_port
        self._to_loopback(pkt)
        self.counters["reverse"] += 1
        return Step.SEND

    def _to_loopback(self, pkt: Any) -> None:
        """Delivered to the local stack: re-injected on the loopback interface (eBPFDivert: the only way a
        rewritten packet reaches a local socket; see the README)."""
        pkt.interface = (self.loopback, 0)
        pkt.is_loopback = True

    def _touch(self, known: DivertedFlow, flow: FiveTuple, flags: int, now: float) -> None:
        if flags & (_FIN | _RST):
            known.closing = True
            known.expires = now + CLOSING_LINGER
        elif not known.closing:
            known.expires = now + self._idle(flow)
        self._publish(known)

    # --- the tables ------------------------------------------------------------------------------------

    @staticmethod
    def _idle(flow: FiveTuple) -> float:
        return TCP_IDLE if flow.protocol == IpProtocol.TCP else UDP_IDLE

    def _new_redirect(self, flow: FiveTuple, mark: int) -> Redirect | None:
        """The flow's redirect: the app's own port as the seen port unless another flow holds it (one UDP
        socket, a further peer), then an alias port."""
        seen_port = flow.src_port
        if (flow.protocol, flow.src_ip, seen_port) in self.by_seen:
            seen_port = self._alias(flow)
            if seen_port is None:
                return None
            self.counters["aliases"] += 1
        redirect = Redirect(flow, seen_port, mark)
        self.by_seen[redirect.seen()] = flow
        return redirect

    def _alias(self, flow: FiveTuple) -> int | None:
        span = len(ALIAS_PORTS)
        for i in range(span):
            port = ALIAS_PORTS.start + (self._next_alias - ALIAS_PORTS.start + i) % span
            if (flow.protocol, flow.src_ip, port) not in self.by_seen:
                self._next_alias = port + 1
                return port
        return None

    def _publish(self, known: DivertedFlow, force: bool = False) -> bool:
        """Keep the shared entry as long as a proxy may read it: a TCP proxy reads it once, when it accepts the
        connection (SHARED_TCP); a UDP proxy at the flow's start and again while datagrams flow, so a UDP entry
        lives a little longer than the flow's idle time and is rewritten when half of that is used up. Short
        lives keep the table sparse (a full probe window refuses new entries)."""
        if known.redirect is None:
            return False
        wall = self.wall()
        if known.redirect.flow.protocol == IpProtocol.TCP:
            ttl, due = SHARED_TCP, force
        else:
            ttl = UDP_IDLE + CLOSING_LINGER
            due = force or known.published_until - wall < ttl / 2
        if not due:
            return True
        if not self.table.put(known.redirect, wall + ttl):
            return False
        known.published_until = wall + ttl
        return True

    def _remember(self, flow: FiveTuple, known: DivertedFlow) -> None:
        while len(self.flows) >= self.max_flows:
            old_flow, old = next(iter(self.flows.items()))
            self._forget(old_flow, old)
            self.counters["evicted"] += 1
        self.flows[flow] = known

    def _forget(self, flow: FiveTuple, known: DivertedFlow) -> None:
        self.flows.pop(flow, None)
        if known.redirect is not None:
            self.by_seen.pop(known.redirect.seen(), None)
            self.table.remove(known.redirect)

    def sweep(self) -> int:
        """Forget flows idle past their expiry (called now and then; lookups also check expiry)."""
        now = self.clock()
        stale = [(f, k) for f, k in self.flows.items() if k.expires <= now]
        for flow, known in stale:
            self._forget(flow, known)
        self.counters["expired"] += len(stale)
        return len(stale)


class DivertedPacket:
    """A new flow's first packet (or an inbound DNS answer) as the engine sees a queued packet.

    The engine sets a mark and accepts (or drops); `accept` turns the mark into the driver's verdict."""

    __slots__ = ("inbound", "mark", "packet", "path")

    def __init__(self, path: DivertPath, packet: Any, inbound: bool = False) -> None:
        self.path = path
        self.packet = packet
        self.inbound = inbound
        self.mark = 0

    def get_payload(self) -> bytes:
        return bytes(self.packet.raw)

    def get_mark(self) -> int:
        return self.mark

    def set_mark(self, mark: int) -> None:
        self.mark = mark

    def accept(self) -> None:
        if self.inbound or self.path.redirector.decided(self.packet, self.mark) == Step.SEND:
            self.path.send(self.packet)

    def drop(self) -> None:
        """Not re-injected: gone."""


class DivertPath:
    """`platform.PacketSource` over a diverter: first packets to the engine, the rest rewritten or passed here."""

    def __init__(
        self,
        table: RedirectTable,
        open_diverter: Callable[[str], Any] = Diverter,
        redirector: Redirector | None = None,
    ) -> None:
        self.redirector = redirector or Redirector(table)
        self._open = open_diverter
        self.diverter: Any = None
        self.on_packet: PacketCallback | None = None
        self.counters = {"diverted": 0, "send_errors": 0, "unreadable": 0}  # diverted: every packet read

    def open(self, queues: dict[str, int], on_packet: PacketCallback, add_fd: Callable[[int, Any], None]) -> None:
        """`queues` are NFQUEUE's: the diverter has one handle for everything."""
        self.on_packet = on_packet
        try:
            self.diverter = self._open(divert_filter(SPLIT_PROXY_PORT))
        except (ImportError, NotImplementedError) as exc:  # no pydivert backend here: said, and retried
            raise OSError(f"no packet diverter: {exc}") from exc
        add_fd(self.diverter.fileno(), self.drain)

    def drain(self) -> None:
        for pkt in self.diverter.ready():
            self.handle(pkt)

    def handle(self, pkt: Any) -> None:
        """One diverted packet; never raises (an unreadable one is re-injected as it is)."""
        assert self.on_packet is not None
        self.counters["diverted"] += 1
        try:
            if not pkt.is_outbound:
                self.on_packet(True, DivertedPacket(self, pkt, inbound=True))
                return
            step = self.redirector.outbound(pkt)
        except MalformedPacket:
            self.counters["unreadable"] += 1
            self.send(pkt)
            return
        if step == Step.DECIDE:
            self.on_packet(False, DivertedPacket(self, pkt))
        elif step == Step.SEND:
            self.send(pkt)

    def send(self, pkt: Any) -> None:
        try:
            self.diverter.send(pkt)
        except OSError:
            self.counters["send_errors"] += 1

    def forget(self, flow: FiveTuple) -> bool:
        return self.redirector.forget(flow)

    def close(self) -> None:
        if self.diverter is not None:
            self.diverter.close()
            self.diverter = None
