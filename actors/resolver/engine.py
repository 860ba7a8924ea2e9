"""The resolver's query path: parse → which app's path (conntrack) → route → cache → upstream → names → answer.

Free of sockets: the actor hands it one `Query` at a time (a datagram, or one message of a TCP stream) and
gets the answer's bytes back. What it reaches outside is passed in: the conntrack lookup of the query's
entry (its mark says the asking app's path, its original tuple which server the app asked), the upstream
transport, the name table and the publisher. Tests drive it with plain bytes and fakes.

`prepare` is cheap (no network) and runs on the actor's loop for UDP: a cached answer leaves at once;
otherwise it returns a `Pending` that `resolve` finishes on a worker thread (it waits on the upstream).
The names of every relayed answer are stored before the answer is returned, so the app's first
connection already finds its name. Any failure answers SERVFAIL (or FORMERR for a broken query) and is
counted; nothing here raises.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype

from core.dns.answers import DnsError, parse_response
from core.dns.cache import AnswerCache, CacheKey, cache_key, question_of
from core.dns.names import NameTable
from core.dns.route import SPLIT, DnsRoute, NoRoute, family, route
from core.dns.wire import Question, read_question
from core.egress import EgressSet, SplitEgresses, split_egresses
from core.proxy.decider import Binding
from kernel.conntrack import CtEntry
from messages import DnsQuery, Mark, NetenvChanged, PolicySnapshot
from messages.flows import FiveTuple, IpProtocol, endpoint_text, protocol_name
from messages.marks import nameserver_path
from runtime.log import describe

UDP_MIN_SIZE = 512
TCP_MAX_SIZE = 65535
MAX_EVENT_ADDRESSES = 8
RECENT = 50  # queries kept for `splittun dns`

#: (query, server, binding, timeout) → (answer, transport used: "udp", "tcp"…). Raises on failure.
Upstream = Callable[[dns.message.Message, str, Binding, float], tuple[dns.message.Message, str]]
#: The conntrack entry whose reply tuple is the given 5-tuple (the resolver's view), or None.
Origin = Callable[[FiveTuple], CtEntry | None]


@dataclass(frozen=True, slots=True)
class Query:
    """One DNS message as it arrived: the client as the resolver sees it and the address it arrived on."""

    wire: bytes
    protocol: int  # IpProtocol.UDP | IpProtocol.TCP
    client: tuple[str, int]
    local: tuple[str, int]
    arrived: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Settings:
    """What the resolver resolves with, replaced whole when the policy or the network changes."""

    configured: tuple[str, ...] = ()  # splittun/splitDNS: wins over what was learned
    learned: Mapping[str, tuple[tuple[str, ...], str]] = field(default_factory=dict)  # interface → (servers, source)
    vpn_domains: tuple[str, ...] = ()
    vpn_servers: tuple[str, ...] = ()  # the VPN's own DNS (IVPN's, delegated): VPN-path queries go there
    egresses: SplitEgresses = field(default_factory=lambda: split_egresses(None, ""))

    @classmethod
    def of(
        cls,
        policy: PolicySnapshot | None,
        netenv: NetenvChanged | None,
        learned: Mapping[str, tuple[tuple[str, ...], str]] | None = None,
        vpn_servers: tuple[str, ...] = (),
    ) -> Settings:
        interfaces = [r.interface for r in policy.rules if r.interface] if policy is not None else []
        return cls(
            configured=tuple(policy.split_dns) if policy is not None else (),
            learned=dict(learned or {}),
            vpn_domains=tuple(policy.vpn_domains) if policy is not None else (),
            vpn_servers=vpn_servers,
            egresses=split_egresses(netenv, policy.interface if policy is not None else "", interfaces),
        )

    def egress_set(self, index: int) -> EgressSet:
        if index:
            return self.egresses.by_index.get(index) or EgressSet(reason=f"no interface with index {index} here")
        return self.egresses.chosen

    def split_servers(self, index: int = 0) -> tuple[tuple[str, ...], str]:
        """The split path's servers for the interface `index` names (0 = the global choice), and their source."""
        if self.configured:
            return self.configured, "splittun/splitDNS"
        for egress in self.egress_set(index).all():
            servers, source = self.learned.get(egress.interface, ((), ""))
            if servers:
                return servers, f"netenv: {source} ({egress.interface})"
        return (), "none"


@dataclass
class Pending:
    """A query that needs an upstream: everything `resolve` needs, decided on the way in."""

    query: Query
    message: dns.message.Message
    route: DnsRoute
    key: CacheKey
    flow: str
    question: Question


class ResolverEngine:
    """The query path of one resolver process (thread-safe: the loop and the worker threads share it)."""

    def __init__(
        self,
        *,
        origin: Origin,
        upstream: Upstream,
        names: NameTable,
        publish: Callable[[Any], Any],
        timeout: float = 2.0,
        cache: AnswerCache | None = None,
    ) -> None:
        self.origin = origin
        self.upstream = upstream
        self.names = names
        self.publish = publish
        self.timeout = timeout
        self.cache = cache or AnswerCache()
        self.settings = Settings()
        self.recent: deque[DnsQuery] = deque(maxlen=RECENT)
        self._cache_lock = threading.Lock()
        self._names_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self.counters: dict[str, int] = dict.fromkeys(
            ("queries", "tcp_queries", "cache_hits", "upstream_queries", "upstream_errors", "truncated_retries",
             "malformed", "refused", "servfail", "split", "vpn", "names_learned", "truncated_answers"),
            0,
        )  # fmt: skip

    def count(self, key: str, n: int = 1) -> None:
        with self._count_lock:
            self.counters[key] += n

    def flush(self) -> int:
        with self._cache_lock:
            return self.cache.flush()

    # --- the way in (no network) ----------------------------------------------------------------------

    def prepare(self, q: Query) -> bytes | Pending | None:
        """The answer's bytes when no upstream is needed (cache, errors); a `Pending` otherwise; None = drop.

        A plain query is read without a full parse (core/dns/wire.py), so a cached answer costs no
        dnspython work at all; anything else is parsed and checked first."""
        self.count("queries")
        if q.protocol == IpProtocol.TCP:
            self.count("tcp_queries")
        question = read_question(q.wire)
        message = None
        if question is None:
            try:
                message = dns.message.from_wire(q.wire)
            except dns.exception.DNSException:
                self.count("malformed")
                return formerr(q.wire)
            if message.flags & dns.flags.QR or message.opcode() != dns.opcode.QUERY or len(message.question) != 1:
                self.count("malformed")
                return self._reply(message, dns.rcode.FORMERR if message.question else dns.rcode.NOTIMP)
            question = question_of(message)
        try:
            entry = self.origin(FiveTuple(q.protocol, q.local[0], q.local[1], q.client[0], q.client[1]))
        except (OSError, ValueError):
            entry = None
        flow = _flow_text(entry.orig if entry is not None else FiveTuple(q.protocol, *q.client, *q.local))
        where = self._route(question.name, entry)
        if isinstance(where, NoRoute):
            self.count("refused")
            self._event(q, question, flow, "", "", "", dns.rcode.REFUSED)
            return self._reply(message or dns.message.from_wire(q.wire), dns.rcode.REFUSED)
        self.count("split" if where.path == SPLIT else "vpn")
        key = cache_key(where.key, question)
        with self._cache_lock:
            hit = self.cache.get(key, question.id, time.time())
        limit = TCP_MAX_SIZE if q.protocol == IpProtocol.TCP else question.payload
        if hit is not None:
            wire, cached = hit
            self.count("cache_hits")
            self._event(q, question, flow, where.path, "", "", cached.rcode, cached.answers, cached.addresses,
                        transport="cache")  # fmt: skip
            if len(wire) <= limit:
                return wire
            return self._fit(q, message or dns.message.from_wire(q.wire), dns.message.from_wire(wire))
        return Pending(q, message or dns.message.from_wire(q.wire), where, key, flow, question)

    def _route(self, qname: str, entry: CtEntry | None) -> DnsRoute | NoRoute:
        if entry is None:
            return NoRoute("no conntrack entry: not a query splittun rerouted")
        settings = self.settings
        path = nameserver_path(entry.mark)
        index = path[1] if path else 0
        return route(
            qname,
            entry.mark,
            entry.orig.dst_ip,
            split_servers=settings.split_servers(index)[0],
            split_families=[f for f in (4, 6) if settings.egress_set(index).for_family(f) is not None],
            vpn_servers=settings.vpn_servers,
            vpn_domains=settings.vpn_domains,
        )

    # --- the upstream (blocking: a worker thread) ----------------------------------------------------

    def resolve(self, p: Pending) -> bytes | None:
        """Ask the route's servers in order; learn the names, cache and answer. SERVFAIL when none answers."""
        last_error = "no usable server"
        for server in p.route.servers:
            binding = self._binding(p.route, server)
            if binding is None:
                continue
            self.count("upstream_queries")
            try:
                answer, transport = self.upstream(p.message, server, binding, self.timeout)
            except (dns.exception.DNSException, OSError, ValueError) as exc:
                self.count("upstream_errors")
                last_error = describe(exc)
                continue
            if transport == "tcp":
                self.count("truncated_retries")
            answer.id = p.message.id
            wire = answer.to_wire()  # rendered once: for the names, the cache and the app
            self._learn(wire)
            with self._cache_lock:
                self.cache.put(p.key, answer, time.time(), wire)
            found = [rd.address for r in answer.answer if r.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA) for rd in r]
            self._event(p.query, p.question, p.flow, p.route.path, server, binding.interface, answer.rcode(),
                        sum(len(r) for r in answer.answer), found, transport=transport)  # fmt: skip
            return self._fit(p.query, p.message, answer, wire)
        self.count("servfail")
        self._event(p.query, p.question, p.flow, p.route.path, "", "", dns.rcode.SERVFAIL, error=last_error)
        return self._reply(p.message, dns.rcode.SERVFAIL)

    def answer(self, q: Query) -> bytes | None:
        """Both steps in one (TCP streams, tests)."""
        prepared = self.prepare(q)
        return self.resolve(prepared) if isinstance(prepared, Pending) else prepared

    def _binding(self, r: DnsRoute, server: str) -> Binding | None:
        """How the upstream socket leaves: VPN = accept-final mark (never queued, the VPN's route);
        split = like the proxies' upstream (egress mark, the interface, its address); None = cannot."""
        if r.path != SPLIT:
            return Binding(mark=int(Mark.ACCEPT_FINAL))
        egress = self.settings.egress_set(r.interface_index).for_family(family(server))
        if egress is None:
            return None
        return Binding(interface=egress.interface, source_ip=egress.source, mark=int(Mark.SPLIT_EGRESS))

    def _learn(self, wire: bytes) -> None:
        """Address → names of the answer, before the app sees it (the interceptor reads them)."""
        try:
            found = parse_response(wire)
        except DnsError:
            return
        if found is None:
            return
        with self._names_lock:
            if self.names.replaced():  # the interceptor's cleanup removed it; a new one made another
                self.names = self.names.reopen()
            self.count("names_learned", self.names.learn_answer(found))

    # --- answers -------------------------------------------------------------------------------------

    def _reply(self, message: dns.message.Message, rcode: int) -> bytes:
        response = dns.message.make_response(message)
        response.set_rcode(rcode)
        return response.to_wire()

    def _fit(self, q: Query, query: dns.message.Message, answer: dns.message.Message, wire: bytes = b"") -> bytes:
        """The answer as the client can take it: over UDP at most its EDNS size (512 without EDNS); an answer
        too big goes out truncated (TC), so the client asks again over TCP."""
        limit = (
            TCP_MAX_SIZE if q.protocol == IpProtocol.TCP else max(UDP_MIN_SIZE, query.payload if query.edns >= 0 else 0)
        )
        if wire and len(wire) <= limit:
            return wire
        try:
            return answer.to_wire(max_size=limit)
        except dns.exception.TooBig:
            self.count("truncated_answers")
            short = dns.message.make_response(query)
            short.flags |= dns.flags.TC
            short.set_rcode(answer.rcode())
            return short.to_wire()

    def _event(
        self,
        q: Query,
        question: Question,
        flow: str,
        path: str,
        upstream: str,
        interface: str,
        rcode: int,
        answers: int = 0,
        addresses: Sequence[str] = (),
        *,
        transport: str = "",
        error: str = "",
    ) -> None:
        event = DnsQuery(
            ts=time.time(),
            flow=flow,
            name=question.name,
            qtype=_rdtype_text(question.rdtype),
            path=path,
            upstream=upstream,
            interface=interface,
            rcode=_rcode_text(rcode) + (f" ({error})" if error else ""),
            answers=answers,
            addresses=list(addresses[:MAX_EVENT_ADDRESSES]),
            latency_ms=round((time.monotonic() - q.arrived) * 1000, 3),
            cached=transport == "cache",
            transport=transport,
        )
        self.recent.append(event)
        self.publish(event)


def _flow_text(t: FiveTuple) -> str:
    """The flow key of a tuple read from conntrack (its addresses are canonical already: no re-parse)."""
    return f"{protocol_name(t.protocol)} {endpoint_text(t.src_ip, t.src_port)} {endpoint_text(t.dst_ip, t.dst_port)}"


@functools.lru_cache(maxsize=256)
def _rdtype_text(rdtype: int) -> str:
    return dns.rdatatype.to_text(rdtype)


@functools.lru_cache(maxsize=64)
def _rcode_text(rcode: int) -> str:
    return dns.rcode.to_text(rcode)


def formerr(wire: bytes) -> bytes | None:
    """FORMERR for a query whose header is readable (same id and opcode); None = drop it."""
    if len(wire) < 12 or wire[2] & 0x80:  # too short for a header, or a response: never answer
        return None
    opcode_bits = wire[2] & 0x78
    return wire[:2] + bytes([0x80 | opcode_bits, int(dns.rcode.FORMERR)]) + bytes(8)
