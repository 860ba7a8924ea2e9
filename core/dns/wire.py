"""The few bytes the resolver's cache path reads and writes without a full DNS parse.

A cached answer is served thousands of times a second, and dnspython's full parse and render cost
~150 µs each way. So the cache path reads only the question (and the OPT record's DO bit and size) of a
plain query, and serves a cached answer by patching its id and counting down its TTLs at offsets found
once when it was stored. Anything unusual (several questions, records in a query, odd label bytes, an
answer bigger than the asker takes) returns None and takes the full dnspython path. Pure functions over
bytes; names are compared as `answers.read_name` reads them (lower case, no trailing dot).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from .answers import DnsError, read_name

TYPE_OPT = 41
_HEADER = struct.Struct("!HHHHHH")
_PLAIN_LABEL = re.compile(rb"^[A-Za-z0-9_-]+$")  # labels whose text form cannot collide with another name's


@dataclass(frozen=True, slots=True)
class Question:
    """What a query asks, as far as which answer fits it: the cache keys on all of it but `id`."""

    name: str  # lower case, no trailing dot
    rdtype: int
    rdclass: int
    edns: bool  # the query had an OPT record (the answer then has one too)
    do: bool  # DNSSEC OK
    cd: bool  # checking disabled
    payload: int = 512  # the UDP size the asker takes
    id: int = 0

    @property
    def key(self) -> tuple[str, int, int, bool, bool, bool]:
        return self.name, self.rdtype, self.rdclass, self.edns, self.do, self.cd


def read_question(wire: bytes) -> Question | None:
    """The question of a plain query (QUERY opcode, one question, at most an OPT record), else None."""
    if len(wire) < 12:
        return None
    ident, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(wire, 0)
    if flags & 0x8000 or flags & 0x7800 or qdcount != 1 or ancount or nscount or arcount > 1:
        return None
    labels: list[str] = []
    pos = 12
    while pos < len(wire) and wire[pos]:  # a query's question is never compressed: plain labels only
        size = wire[pos]
        label = wire[pos + 1 : pos + 1 + size]
        if size > 63 or len(label) != size or not _PLAIN_LABEL.match(label):
            return None
        labels.append(label.decode().lower())
        pos += 1 + size
    pos += 1
    if pos + 4 > len(wire):
        return None
    name = ".".join(labels)
    rdtype, rdclass = struct.unpack_from("!HH", wire, pos)
    pos += 4
    edns, do, payload = False, False, 512
    if arcount:
        # OPT: root name (0), type 41, class = UDP size, TTL = ext-rcode, version, DO + flags; rdata
        if pos + 11 > len(wire) or wire[pos] != 0:
            return None
        otype, payload, _ext, version, oflags, rdlen = struct.unpack_from("!HHBBHH", wire, pos + 1)
        if otype != TYPE_OPT or version != 0 or pos + 11 + rdlen != len(wire):
            return None
        edns, do, payload = True, bool(oflags & 0x8000), max(512, payload)
    elif pos != len(wire):
        return None
    return Question(name, rdtype, rdclass, edns, do, bool(flags & 0x0010), payload, ident)


def ttl_fields(wire: bytes) -> tuple[tuple[int, int], ...]:
    """(offset, TTL) of every record's TTL field in a message, the OPT record's left out (its "TTL" holds
    flags). Raises DnsError for a broken message."""
    if len(wire) < 12:
        raise DnsError("header truncated")
    _ident, _flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(wire, 0)
    pos = 12
    for _ in range(qdcount):
        _name, pos = read_name(wire, pos)
        pos += 4
    out: list[tuple[int, int]] = []
    for _ in range(ancount + nscount + arcount):
        _name, pos = read_name(wire, pos)
        if pos + 10 > len(wire):
            raise DnsError("record header truncated")
        rtype, _rclass, ttl, rdlength = struct.unpack_from("!HHIH", wire, pos)
        if rtype != TYPE_OPT:
            out.append((pos + 4, ttl))
        pos += 10 + rdlength
        if pos > len(wire):
            raise DnsError("record data truncated")
    return tuple(out)


def patched(wire: bytes, ident: int, ttls: tuple[tuple[int, int], ...], age: int) -> bytes:
    """`wire` with id `ident` and every TTL counted down by `age` seconds (never below 0)."""
    out = bytearray(wire)
    struct.pack_into("!H", out, 0, ident)
    for offset, ttl in ttls:
        struct.pack_into("!I", out, offset, max(0, ttl - age))
    return bytes(out)
