"""The verdict for one connection: scope, precedence, policy, external handler → a `VerdictOutcome`
(the verdict, the mark that carries it, the rule and the reason).

Pure: everything it needs arrives as arguments (the 5-tuple, its process and name, the compiled policy,
the handler), so every precedence rule is tested with plain objects. The same function decides a
new connection and re-evaluates a live one, so the external handler applies to both.

Order (a verdict only goes up within one evaluation):
1. Our own connections (our marks, our actors' pids) → Accept, accept-final (1709). Nobody overrides.
2. Everyone else starts at Accept. The external handler may raise it (Block, Drop, RerouteToTunnel…);
   anything above Accept except a split request is final: a tunnelled connection is never split. It may also
   answer AcceptFinal (the VPN's own connections): accepted for good with 1709, like ours, never split.
3. Only accepted outbound TCP/UDP to a routable destination qualifies for splitting: never localhost,
   multicast, broadcast or link-local; never ICMP or other protocols.
4. The policy's first matching rule decides split or keep.
5. Only a connection's first packet can be split (the proxy cannot take over a stream half-way): a TCP
   packet without SYN — seen after a conntrack flush or a re-evaluation — gets a permanent non-split
   verdict instead, so it keeps going where it went: through the VPN.
6. A split needs somewhere to go: when its interface (the rule's, or the global choice) has no egress
   for the flow's IP version, it stays in the VPN. The split mark carries the rule's interface index.
7. DNS (TCP/UDP to port 53): while the resolver is ready, the query is rerouted to it (RerouteToNameserver,
   1799) instead, the mark carrying the path steps 4-6 chose for it (messages/marks.py: nameserver_mark), so
   the resolver asks on that path. While it is not, a query is never split: it stays in the VPN.
Every verdict except the malformed-packet one is permanent (saved to the connmark).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache

from core.egress import Egress, resolve_egress
from core.policy import CompiledPolicy
from core.verdict_handler import AcceptFinal, ConnectionView, VerdictHandler
from messages import IvpnStatus, Mark, NetenvChanged, ProcessInfo, Verdict
from messages.flows import FiveTuple, IpProtocol
from messages.marks import (
    MAX_INTERFACE_INDEX,
    MAX_NAMESERVER_INTERFACE_INDEX,
    NAMESERVER_PORT,
    nameserver_mark,
    split_mark,
)
from runtime.log import describe

#: Marks the rules give our own traffic; a packet carrying one is ours (accept-final, never split).
OWN_MARKS = frozenset({Mark.ACCEPT_FINAL, Mark.SPLIT_EGRESS})

_MARK_FOR = {
    Verdict.ACCEPT: Mark.ACCEPT_ALWAYS,
    Verdict.BLOCK: Mark.BLOCK_ALWAYS,
    Verdict.DROP: Mark.DROP_ALWAYS,
    Verdict.REROUTE_TO_TUNNEL: Mark.REROUTE_TO_TUNNEL,  # no DNAT: "tunnelled" = through the VPN
    Verdict.REROUTE_TO_SPLIT_TUN: Mark.REROUTE_TO_SPLIT_TUN,
}
#: Handler verdicts honoured as final (besides the split request).
_HANDLER_FINAL = frozenset({Verdict.BLOCK, Verdict.DROP, Verdict.REROUTE_TO_TUNNEL})

RULE_EXTERNAL = "external"
#: Verdicts that take the same path (through the VPN): moving between them needs no re-queueing.
_SAME_PATH = frozenset({Verdict.ACCEPT, Verdict.REROUTE_TO_TUNNEL})

#: (interface choice, IP version) → (interface index for the split mark, 0 = the global choice; why the
#: split has nowhere to go, "" = it has). A split without an egress stays in the VPN instead of reaching a
#: proxy that could only refuse it.
EgressCheck = Callable[[str, int], tuple[int, str]]


class SplitEgress:
    """Where split connections can go, precomputed whenever the network or the policy changes, so the
    verdict path only does a dict lookup. Without a netenv snapshot yet, the global choice is left to the
    proxies (they refuse what they cannot send) and a rule's own interface cannot be checked: kept."""

    def __init__(self, netenv: NetenvChanged | None, global_choice: str, rule_interfaces: Iterable[str]) -> None:
        self.known = netenv is not None
        self._answers: dict[tuple[str, int], tuple[int, str]] = {}
        self._found: dict[tuple[str, int], Egress] = {}
        if netenv is None:
            return
        for spec in {"", *rule_interfaces}:
            egress = resolve_egress(netenv, spec or global_choice)
            for version in (4, 6):
                found = egress.for_family(version)
                if found is not None:
                    self._found[(spec, version)] = found
                if found is None:
                    self._answers[(spec, version)] = (0, egress.why(version))
                elif spec and not 0 < found.ifindex <= MAX_INTERFACE_INDEX:
                    self._answers[(spec, version)] = (0, f"interface index {found.ifindex} of {spec!r} unusable")
                else:
                    self._answers[(spec, version)] = (found.ifindex if spec else 0, "")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SplitEgress) and (self.known, self._answers) == (other.known, other._answers)

    __hash__ = None  # type: ignore[assignment]

    def found(self, interface: str, version: int) -> Egress | None:
        """The egress a split connection of this rule interface ("" = the global choice) leaves through."""
        return self._found.get((interface, version))

    def check(self, interface: str, version: int) -> tuple[int, str]:
        answer = self._answers.get((interface, version))
        if answer is not None:
            return answer
        if not self.known:
            return (0, "") if not interface else (0, "the network state is not known yet")
        return 0, f"interface {interface!r} is not known"


@dataclass(frozen=True, slots=True)
class VerdictOutcome:
    """What `decide` answers: the verdict, the packet mark that carries it, which rule and why."""

    verdict: Verdict
    mark: int
    rule: str = ""  # id of the rule that decided ("" = default, "external" = the handler)
    reason: str = ""
    interface: str = ""  # split only: the rule's interface, "" = the global choice

    @property
    def split(self) -> bool:
        return self.verdict == Verdict.REROUTE_TO_SPLIT_TUN

    @property
    def rerouted_to_nameserver(self) -> bool:
        return self.verdict == Verdict.REROUTE_TO_NAMESERVER

    @property
    def permanent(self) -> bool:
        return self.mark != Mark.ACCEPT


MALFORMED = VerdictOutcome(Verdict.ACCEPT, Mark.ACCEPT, reason="malformed packet: accepted unsplit, this packet only")
OWN = VerdictOutcome(Verdict.ACCEPT, Mark.ACCEPT_FINAL, reason="splittun's own connection")


@lru_cache(maxsize=4096)
def never_split_destination(address: str) -> str:
    """Why a destination can never be split ("" = it can): these never go through the VPN anyway."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return "unreadable destination"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "localhost"
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified or (ip.version == 4 and int(ip) == 0xFFFFFFFF):
        return "broadcast/unspecified"
    if ip.is_link_local:
        return "link-local"
    return ""


def _handler_verdict(
    handler: VerdictHandler | None, view: ConnectionView
) -> tuple[Verdict | AcceptFinal | None, str, str | None]:
    """(verdict, AcceptFinal or None; reason; error): an exception is reported, never raised into the verdict path."""
    if handler is None:
        return None, "", None
    try:
        result = handler(view)
    except Exception as exc:
        return None, "", describe(exc)
    if isinstance(result, AcceptFinal):
        return result, result.reason, None
    reason = ""
    if isinstance(result, tuple):
        result, reason = result[0], str(result[1]) if len(result) > 1 else ""
    if result is None:
        return None, reason, None
    try:
        return Verdict(int(result)), reason, None
    except (TypeError, ValueError):
        return None, "", f"handler returned {result!r}, not a Verdict"


def decide(
    flow: FiveTuple,
    policy: CompiledPolicy,
    *,
    first_packet: bool = True,
    inbound: bool = False,
    packet_mark: int = 0,
    process: ProcessInfo | None = None,
    domain: str = "",
    own: bool = False,
    handler: VerdictHandler | None = None,
    ivpn: IvpnStatus | None = None,
    errors: list[str] | None = None,
    egress: EgressCheck | None = None,
    nameserver: bool = False,
    attributed: bool = True,
) -> VerdictOutcome:
    """The filtering function every connection goes through (first packet and re-evaluation).

    `flow` is the connection as its queued packet shows it; `first_packet`: that packet can start a
    connection (TCP: SYN without ACK; other protocols: always); `packet_mark`: the mark it carried.
    Handler errors are appended to `errors` (when given) so the caller can log them once.
    `nameserver`: the resolver is ready, so DNS queries are rerouted to it. `attributed`: the process was
    looked for (False: the verdict comes first; the handler's view says so).
    """
    if own or packet_mark in OWN_MARKS:
        return OWN
    wanted, reason, error = _handler_verdict(handler, ConnectionView(flow, inbound, process, domain, ivpn, attributed))
    if error is not None:
        if errors is not None:
            errors.append(error)
        return VerdictOutcome(
            Verdict.ACCEPT, Mark.ACCEPT_ALWAYS, RULE_EXTERNAL, "external handler failed: kept in the VPN"
        )
    if isinstance(wanted, AcceptFinal):
        return VerdictOutcome(Verdict.ACCEPT, Mark.ACCEPT_FINAL, RULE_EXTERNAL, reason or "external handler: final")
    if wanted is not None and wanted > Verdict.ACCEPT and wanted != Verdict.REROUTE_TO_SPLIT_TUN:
        if wanted in _HANDLER_FINAL:
            return VerdictOutcome(wanted, _MARK_FOR[wanted], RULE_EXTERNAL, reason or "external handler")
        why = f"external handler asked {wanted.string()}, which splittun does not implement: kept in the VPN"
        return VerdictOutcome(Verdict.ACCEPT, Mark.ACCEPT_ALWAYS, RULE_EXTERNAL, why)
    # Accepted. Does it qualify for a split at all?
    if inbound:
        return VerdictOutcome(Verdict.ACCEPT, Mark.ACCEPT_ALWAYS, reason="inbound: never split")
    if flow.protocol not in (IpProtocol.TCP, IpProtocol.UDP):
        return VerdictOutcome(Verdict.ACCEPT, Mark.ACCEPT_ALWAYS, reason="only TCP and UDP can be split")
    scope = never_split_destination(flow.dst_ip)
    if scope:
        return VerdictOutcome(Verdict.ACCEPT, Mark.ACCEPT_ALWAYS, reason=f"{scope}: never split")
    if wanted == Verdict.REROUTE_TO_SPLIT_TUN:
        rule, split, interface = RULE_EXTERNAL, True, ""
        reason = reason or "external handler"
    else:
        match = policy.match(flow, domain, process)
        rule, split, interface = match.rule_id, match.split, match.interface
        reason = ""
    if flow.dst_port == NAMESERVER_PORT:
        return _dns_outcome(flow, first_packet, rule, split, interface, reason, egress, nameserver)
    if not split:
        return VerdictOutcome(Verdict.ACCEPT, Mark.ACCEPT_ALWAYS, rule, reason)
    if not first_packet:
        return VerdictOutcome(
            Verdict.ACCEPT, Mark.ACCEPT_ALWAYS, rule, "mid-stream TCP (no SYN) cannot be split: kept in the VPN"
        )
    index, problem = egress(interface, flow.ip_version) if egress is not None else (0, "")
    if problem:
        return VerdictOutcome(Verdict.ACCEPT, Mark.ACCEPT_ALWAYS, rule, f"{problem}: kept in the VPN", interface)
    return VerdictOutcome(Verdict.REROUTE_TO_SPLIT_TUN, split_mark(index), rule, reason, interface)


def _dns_outcome(
    flow: FiveTuple,
    first_packet: bool,
    rule: str,
    split: bool,
    interface: str,
    reason: str,
    egress: EgressCheck | None,
    nameserver: bool,
) -> VerdictOutcome:
    """A DNS query: rerouted to the resolver with the path the policy chose for it, or kept in the VPN."""
    if not nameserver or not first_packet:
        why = "resolver not ready" if not nameserver else "mid-stream TCP cannot be rerouted"
        return VerdictOutcome(Verdict.ACCEPT, Mark.ACCEPT_ALWAYS, rule, f"DNS: {why}: kept in the VPN")
    index, problem = egress(interface, flow.ip_version) if split and egress is not None else (0, "")
    if split and not problem and index > MAX_NAMESERVER_INTERFACE_INDEX:
        problem = f"interface index {index} does not fit in a nameserver mark"
    if not split or problem:
        why = f"DNS: {problem}: resolved through the VPN" if problem else reason
        return VerdictOutcome(Verdict.REROUTE_TO_NAMESERVER, nameserver_mark(), rule, why)
    why = reason or "DNS: resolved on the split path"
    return VerdictOutcome(Verdict.REROUTE_TO_NAMESERVER, nameserver_mark(True, index), rule, why, interface)


def reevaluation_resets(protocol: int, old: VerdictOutcome, new: VerdictOutcome) -> bool:
    """Should a live connection be re-queued (its conntrack entry deleted) after a policy change?

    UDP: whenever the verdict changes (a datagram flow can move between proxy and VPN at any packet).
    TCP: only between non-split verdicts (e.g. Accept ↔ Block); a split stream keeps its proxy until it
    closes and an unsplit one cannot be moved to the proxy mid-way. Others: when the verdict changes.
    Accept and RerouteToTunnel take the same path here (through the VPN, no DNAT): no reset between them,
    so a handler that learns more (IVPN's carrier, once its status is known) never cuts a flow short.
    """
    if old.verdict == new.verdict or {old.verdict, new.verdict} == _SAME_PATH:
        return False
    if protocol == IpProtocol.TCP:
        return not old.split and not new.split
    return True
