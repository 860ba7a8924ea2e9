"""The resolver's answer cache: TTLs honoured, negative answers too (RFC 2308), kept apart per route.

An answer is cached for the smallest TTL of its records (capped), a negative one (NXDOMAIN, or NOERROR
without an answer) for its SOA's TTL and minimum, whichever is smaller. A cached answer is served with
its TTLs counted down by its age and the asker's query id. Answers that say nothing lasting (SERVFAIL,
REFUSED, truncated, no SOA on a negative answer) are not cached. The key holds the route (split and VPN
answers for one name differ on purpose: geo-DNS), the question, and the DO and CD bits (DNSSEC records
are only in answers to DO queries). Pure: the clock is an argument.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

MAX_TTL = 86400
MAX_NEGATIVE_TTL = 3600
MAX_ENTRIES = 10000

CacheKey = tuple[Any, ...]


def cache_key(route_key: Any, query: dns.message.Message) -> CacheKey | None:
    """The key of a query's answer on a route; None for what is never cached (no single question)."""
    if len(query.question) != 1:
        return None
    q = query.question[0]
    do = bool(query.ednsflags & dns.flags.DO)
    return route_key, q.name.to_text().lower(), q.rdtype, q.rdclass, do, bool(query.flags & dns.flags.CD)


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


@dataclass
class _Entry:
    wire: bytes
    stored: float
    expires: float


class AnswerCache:
    """Least recently used answers, at most `max_entries`."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def flush(self) -> int:
        """Forget everything; returns how many answers were dropped."""
        count = len(self._entries)
        self._entries.clear()
        return count

    def put(self, key: CacheKey | None, response: dns.message.Message, now: float) -> bool:
        """Keep `response` for its TTL; False when it is not cacheable."""
        ttl = cache_ttl(response)
        if key is None or ttl is None or ttl <= 0:
            return False
        self._entries[key] = _Entry(response.to_wire(), now, now + ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return True

    def get(self, key: CacheKey | None, query_id: int, now: float) -> dns.message.Message | None:
        """The cached answer for `key`, TTLs counted down and with `query_id`; None when absent or expired."""
        entry = self._entries.get(key) if key is not None else None
        if entry is None or entry.expires <= now:
            if entry is not None:
                del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        answer = dns.message.from_wire(entry.wire)
        age = int(now - entry.stored)
        for section in (answer.answer, answer.authority, answer.additional):
            for rrset in section:
                rrset.ttl = max(0, rrset.ttl - age)
        answer.id = query_id
        return answer

    def hit_rate(self) -> float:
        asked = self.hits + self.misses
        return self.hits / asked if asked else 0.0
