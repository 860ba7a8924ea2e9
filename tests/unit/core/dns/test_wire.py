"""The resolver's cache path over bytes (core/dns/wire.py): plain questions read like dnspython reads them,
TTL fields found and counted down, anything unusual left to the full parse."""

from __future__ import annotations

import dns.message
import dns.name
import dns.rrset

from core.dns.cache import question_of
from core.dns.wire import patched, read_question, ttl_fields


def test_a_plain_question_reads_as_the_full_parse_reads_it() -> None:
    for q in (dns.message.make_query("Geo.Example.NET.", "AAAA"),
              dns.message.make_query("geo.example.net.", "A", use_edns=0, payload=1232, want_dnssec=True)):  # fmt: skip
        assert read_question(q.to_wire()) == question_of(q)


def test_anything_unusual_takes_the_full_path() -> None:
    q = dns.message.make_query("geo.example.net.", "A")
    response = dns.message.make_response(q).to_wire()
    two = dns.message.make_query("geo.example.net.", "A")
    two.question.append(q.question[0])
    odd = dns.message.make_query(dns.name.Name([b"a.b", b"example", b""]), "A")  # a label holding a dot
    for wire in (response, two.to_wire(), odd.to_wire(), q.to_wire()[:-2], q.to_wire() + b"x", b"\x00" * 5):
        assert read_question(wire) is None


def test_ttls_are_found_outside_the_opt_record_and_counted_down() -> None:
    q = dns.message.make_query("geo.example.net.", "A", use_edns=0)
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text("geo.example.net.", 300, "IN", "CNAME", "edge.cdn.example."))
    r.answer.append(dns.rrset.from_text("edge.cdn.example.", 20, "IN", "A", "203.0.113.80"))
    wire = r.to_wire()
    fields = ttl_fields(wire)
    assert [ttl for _off, ttl in fields] == [300, 20]
    served = dns.message.from_wire(patched(wire, 4242, fields, 30))
    assert served.id == 4242 and [rr.ttl for rr in served.answer] == [270, 0] and served.edns == 0
