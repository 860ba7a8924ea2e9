"""Reading DNS answers: which addresses did a name resolve to, and for how long.

Domain rules match connections by name, but a connection only carries an address. The resolver reads
every answer it relays here, and the interceptor every plain DNS answer it queues (the fallback for queries
the resolver never sees); both store address → name (names.py) before the app sees the answer, so the
app's very first connection after the lookup already finds its name.

The names learned for an address are the question's name (what the user wrote the rule for) and, when
the answer reaches the address through a CNAME chain, the chain's targets (`chain`); the chain's TTL is
the smallest TTL on the way.
Pure functions over bytes: compressed names, CNAME chains and broken packets are tested with bytes.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from messages.flows import ipv6_text

TYPE_A, TYPE_CNAME, TYPE_AAAA = 1, 5, 28
CLASS_IN = 1
_MAX_POINTER_JUMPS = 32
_MAX_NAME_LENGTH = 255
_MAX_CHAIN = 16


class DnsError(ValueError):
    """Not a DNS message we can read (truncated, bad pointer, …); `reason` is short and stable."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    qname: str  # lower case, no trailing dot
    addresses: tuple[tuple[str, int], ...]  # (address text, TTL seconds) reached from qname
    chain: tuple[str, ...] = ()  # qname and the CNAME targets followed, in order


def read_name(data: bytes, offset: int) -> tuple[str, int]:
    """A possibly compressed name at `offset` → (name, offset after it in the record)."""
    labels: list[str] = []
    length = 0
    jumps = 0
    after = -1  # where the record continues once we followed a pointer
    pos = offset
    while True:
        if pos >= len(data):
            raise DnsError("name runs past the end")
        size = data[pos]
        kind = size & 0xC0
        if kind == 0xC0:
            if pos + 1 >= len(data):
                raise DnsError("name pointer truncated")
            target = ((size & 0x3F) << 8) | data[pos + 1]
            if after < 0:
                after = pos + 2
            jumps += 1
            if jumps > _MAX_POINTER_JUMPS or target >= pos:
                raise DnsError("name pointer loops or points forward")
            pos = target
            continue
        if kind:
            raise DnsError("unsupported label type")
        if size == 0:
            name = ".".join(labels).lower()
            return name, (after if after >= 0 else pos + 1)
        if pos + 1 + size > len(data):
            raise DnsError("label runs past the end")
        length += size + 1
        if length > _MAX_NAME_LENGTH:
            raise DnsError("name longer than 255")
        labels.append(data[pos + 1 : pos + 1 + size].decode("ascii", errors="replace"))
        pos += 1 + size


def parse_response(data: bytes) -> DnsAnswer | None:
    """Addresses the response gives for its question, or None when it teaches nothing.

    None: a query (QR unset), an error rcode, no question, or no A/AAAA reached from the question.
    Raises DnsError when the message is broken (truncated, bad names).
    """
    if len(data) < 12:
        raise DnsError("header truncated")
    _ident, flags, qdcount, ancount, _nscount, _arcount = struct.unpack_from("!HHHHHH", data, 0)
    if not flags & 0x8000 or flags & 0x000F or qdcount == 0:
        return None
    pos = 12
    qname = ""
    for i in range(qdcount):
        name, pos = read_name(data, pos)
        if pos + 4 > len(data):
            raise DnsError("question truncated")
        pos += 4
        if i == 0:
            qname = name
    cnames: dict[str, tuple[str, int]] = {}
    addresses: dict[str, list[tuple[str, int]]] = {}
    for _ in range(ancount):
        owner, pos = read_name(data, pos)
        if pos + 10 > len(data):
            raise DnsError("record header truncated")
        rtype, rclass, ttl, rdlength = struct.unpack_from("!HHIH", data, pos)
        pos += 10
        if pos + rdlength > len(data):
            raise DnsError("record data truncated")
        if rclass == CLASS_IN:
            ttl = min(ttl, 0x7FFFFFFF)  # RFC 2181: a TTL with the top bit set means 0… or is bogus
            if rtype == TYPE_A and rdlength == 4:
                addr = socket.inet_ntop(socket.AF_INET, data[pos : pos + 4])
                addresses.setdefault(owner, []).append((addr, ttl))
            elif rtype == TYPE_AAAA and rdlength == 16:
                addresses.setdefault(owner, []).append((ipv6_text(data[pos : pos + 16]), ttl))
            elif rtype == TYPE_CNAME:
                target, _ = read_name(data, pos)
                cnames[owner] = (target, ttl)
        pos += rdlength
    chain = [qname]
    ttl_cap = 0x7FFFFFFF
    name = qname
    found: list[tuple[str, int]] = []
    for _ in range(_MAX_CHAIN):
        found.extend((addr, min(ttl, ttl_cap)) for addr, ttl in addresses.get(name, ()))
        if name not in cnames:
            break
        name, cname_ttl = cnames[name]
        if name in chain:
            break  # CNAME loop: what we have so far is all there is
        chain.append(name)
        ttl_cap = min(ttl_cap, cname_ttl)
    if not found or not qname:
        return None
    return DnsAnswer(qname=qname, addresses=tuple(found), chain=tuple(chain))
