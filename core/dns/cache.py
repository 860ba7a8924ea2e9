"""The resolver's answer cache: TTLs honoured, negative answers too (RFC 2308), kept apart per route.

Answers are kept as bytes and served by patching id and TTLs (core/dns/wire.py): no parse per hit.
An answer is cached for the smallest TTL of its records (capped), a negative one (NXDOMAIN, or NOERROR
without an answer) for its SOA's TTL and minimum, whichever is smaller. A cached answer is served with
its TTLs counted down by its age and the asker's query id. Answers that say nothing lasting (SERVFAIL,
REFUSED, truncated, no SOA on a negative answer) are not cached. The key holds the route (split and VPN
answers for one name differ on purpose: geo-DNS), the question, whether the query had EDNS, and the DO
and CD bits (DNSSEC records are only in answers to DO queries). Pure: the clock is an argument.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

from .answers import DnsError
from .wire import Question, patched, ttl_fields

MAX_TTL = 86400
MAX_NEGATIVE_TTL = 3600
MAX_ENTRIES = 10000

CacheKey = tuple[Any, ...]


def question_of(message: dns.message.Message) -> Question:
    """The `Question` of a parsed query (the full path), keyed like `wire.read_question` keys a plain one."""
    q = message.question[0]
    edns = message.edns >= 0
    return Question(
        name=q.name.to_text(omit_final_dot=True).lower(),
        rdtype=q.rdtype,
        rdclass=q.rdclass,
        edns=edns,
        do=bool(message.ednsflags & dns.flags.DO),
        cd=bool(message.flags & dns.flags.CD),
        payload=max(512, message.payload) if edns else 512,
        id=message.id,
    )


def cache_key(route_key: Any, question: Question) -> CacheKey:
    """The key of a question's answer on a route (split and VPN answers for one name differ on purpose)."""
    return (route_key, *question.key)


def cache_ttl(response: dns.message.Message) -> int | None:
    """Seconds `response` may be served from the cache; None when it must not be cached."""
    if response.flags & dns.flags.TC:
        return None
    rcode = response.rcode()
    negative = rcode == dns.rcode.NXDOMAIN or (rcode == dns.rcode.NOERROR and not response.answer)
    if negative:
        soas = [r for r in response.authority if r.rdtype == dns.rdatatype.SOA]
        if not soas:
            return None
        return min(MAX_NEGATIVE_TTL, *(min(r.ttl, r[0].minimum) for r in soas))
    if rcode != dns.rcode.NOERROR:
        return None
    ttls = [r.ttl for section in (response.answer, response.authority) for r in section]
    return min(MAX_TTL, *ttls)


@dataclass(frozen=True)
class Cached:
    """One cached answer: its bytes, where its TTLs are, and what a `dns.query` event says about it."""

    wire: bytes
    ttls: tuple[tuple[int, int], ...]
    stored: float
    expires: float
    rcode: int
    answers: int
    addresses: tuple[str, ...]


class AnswerCache:
    """Least recently used answers, at most `max_entries`."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[CacheKey, Cached] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def flush(self) -> int:
        """Forget everything; returns how many answers were dropped."""
        count = len(self._entries)
        self._entries.clear()
        return count

    def put(self, key: CacheKey, response: dns.message.Message, now: float, wire: bytes = b"") -> bool:
        """Keep `response` (rendered as `wire`, when the caller has it) for its TTL; False when not cacheable."""
        ttl = cache_ttl(response)
        if ttl is None or ttl <= 0:
            return False
        wire = wire or response.to_wire()
        try:
            ttls = ttl_fields(wire)
        except DnsError:
            return False
        addresses = tuple(
            rd.address for r in response.answer if r.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA) for rd in r
        )
        answers = sum(len(r) for r in response.answer)
        self._entries[key] = Cached(wire, ttls, now, now + ttl, response.rcode(), answers, addresses)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return True

    def get(self, key: CacheKey, ident: int, now: float) -> tuple[bytes, Cached] | None:
        """The cached answer for `key` with id `ident` and its TTLs counted down; None when absent or expired."""
        entry = self._entries.get(key)
        if entry is None or entry.expires <= now:
            if entry is not None:
                del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return patched(entry.wire, ident, entry.ttls, int(now - entry.stored)), entry

    def hit_rate(self) -> float:
        asked = self.hits + self.misses
        return self.hits / asked if asked else 0.0
