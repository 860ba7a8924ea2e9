"""The resolver's answer cache (core/dns/cache.py): TTLs, negative answers, per-route keys, DO bit."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.rcode
import dns.rrset

from core.dns.cache import AnswerCache, cache_key, cache_ttl, question_of


def query(name: str = "geo.example.", rdtype: str = "A", do: bool = False) -> dns.message.Message:
    return dns.message.make_query(name, rdtype, want_dnssec=do)


def key(route: str, q: dns.message.Message) -> tuple[object, ...]:
    return cache_key(route, question_of(q))


def answer(q: dns.message.Message, *records: str, rcode: int = dns.rcode.NOERROR, soa: str = "") -> dns.message.Message:
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    for text in records:  # "name ttl type data"
        name, ttl, rdtype, data = text.split(maxsplit=3)
        r.answer.append(dns.rrset.from_text(name, int(ttl), "IN", rdtype, data))
    if soa:
        r.authority.append(dns.rrset.from_text("example.", soa.split()[0], "IN", "SOA",
                                               "ns. host. 1 7200 900 1209600 " + soa.split()[1]))  # fmt: skip
    return r


def test_an_answer_lives_for_its_smallest_ttl_counted_down_when_served() -> None:
    cache = AnswerCache()
    q = query()
    r = answer(q, "geo.example. 300 CNAME edge.cdn.example.", "edge.cdn.example. 60 A 203.0.113.80")
    k = key("vpn", q)
    assert cache_ttl(r) == 60 and cache.put(k, r, now=1000.0)
    hit = cache.get(k, 7, now=1030.0)
    assert hit is not None and hit[1].addresses == ("203.0.113.80",) and hit[1].answers == 2
    served = dns.message.from_wire(hit[0])
    assert served.id == 7 and [rr.ttl for rr in served.answer] == [270, 30]
    assert cache.get(k, 8, now=1060.0) is None and len(cache) == 0
    assert (cache.hits, cache.misses) == (1, 1)


def test_negative_answers_live_for_the_soa_minimum_and_without_soa_not_at_all() -> None:
    q = query("nope.example.")
    assert cache_ttl(answer(q, rcode=dns.rcode.NXDOMAIN, soa="3600 120")) == 120
    assert cache_ttl(answer(q, soa="30 120")) == 30  # NODATA: the SOA record's own TTL is smaller
    assert cache_ttl(answer(q, rcode=dns.rcode.NXDOMAIN)) is None


def test_failures_and_truncated_answers_are_not_cached() -> None:
    q = query()
    assert cache_ttl(answer(q, rcode=dns.rcode.SERVFAIL)) is None
    truncated = answer(q, "geo.example. 60 A 203.0.113.80")
    truncated.flags |= dns.flags.TC
    assert cache_ttl(truncated) is None


def test_routes_and_the_do_bit_keep_answers_apart() -> None:
    keys = {key("vpn", query()), key("split", query()), key("vpn", query(do=True)), key("vpn", query(rdtype="AAAA")),
            key("vpn", dns.message.make_query("geo.example.", "A", use_edns=0))}  # fmt: skip
    assert len(keys) == 5
    assert key("vpn", query()) == key("vpn", query("GEO.example."))


def test_least_recently_used_answers_go_first_and_flush_empties() -> None:
    cache = AnswerCache(max_entries=2)
    for i in range(3):
        q = query(f"n{i}.example.")
        cache.put(key("vpn", q), answer(q, f"n{i}.example. 60 A 203.0.113.{i}"), now=0.0)
    assert cache.get(key("vpn", query("n0.example.")), 1, now=1.0) is None
    assert cache.get(key("vpn", query("n2.example.")), 1, now=1.0) is not None
    assert cache.flush() == 2 and len(cache) == 0
