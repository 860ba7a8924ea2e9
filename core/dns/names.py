"""Address → domain name, learned from DNS answers, shared by the resolver and every interceptor worker.

The resolver (actors/resolver) writes every answer it relays before the app sees it; the interceptor's
snooping of plain DNS answers it queues (answers.py) is the fallback for queries the resolver never sees.
A name learned through a CNAME chain is stored as the chain, space-separated ("www.example.com
cdn.example.net"), so a domain rule matches the asked name or any CNAME target (core/policy/match.py).

With `--queue-balance` the DNS answer and the connection that follows it usually land on different
queues (the kernel hashes each flow's addresses), so a per-process dict would miss the very first
connection. The table therefore lives in one small memory-mapped file that all workers open: a
fixed-size open-addressing hash table (crc32 of the address, 8-slot probe window).

Writers (one DNS answer at a time) serialise with flock; readers are lock-free with a per-slot
sequence counter (odd = being written; a changed counter = read again), so the verdict path never
waits for another process. A name is kept for max(TTL, GRACE) seconds: apps keep using addresses after
the record expired, and an address is re-learned at the next lookup anyway. When two names share an
address (CDNs), the latest answer wins — the app connecting right after its lookup is the one asking.
"""

from __future__ import annotations

import socket
import struct
import time
import zlib
from pathlib import Path

from kernel.mapped import MappedFile

from .answers import DnsAnswer

#: The table's file in the run directory (removed by the interceptor's cleanup).
NAMES_FILE = "interceptor-names.table"
GRACE = 600  # seconds a learned name is kept at least
_MAGIC = b"STNAMES1"
_HEADER = struct.Struct("!8sII")  # magic, slot count, slot size
_HEADER_SIZE = 64
_SLOT = struct.Struct("!IIBB2x16s")  # seq, expiry, addr length, name length, address
_SLOT_SIZE = 288  # _SLOT (28) + 255 name bytes, rounded up
_NAME_MAX = 255
_PROBE = 8
DEFAULT_SLOTS = 16384  # 4.5 MiB


_MAPPED = b"\0" * 10 + b"\xff\xff"


def chain_text(chain: tuple[str, ...] | list[str]) -> str:
    """The names of a CNAME chain as one stored name: whole names only, at most 255 bytes."""
    text = ""
    for name in chain:
        longer = f"{text} {name}" if text else name
        if len(longer.encode("ascii", errors="replace")) > _NAME_MAX:
            break
        text = longer
    return text


def _address_bytes(address: str) -> bytes:
    """Packed address (IPv4-mapped IPv6 as IPv4); OSError when it is not one. inet_pton: on the verdict path."""
    if ":" in address:
        raw = socket.inet_pton(socket.AF_INET6, address)
        return raw[12:] if raw[:12] == _MAPPED else raw
    return socket.inet_pton(socket.AF_INET, address)


class NameTable:
    """The shared table; `path=None` gives a private in-memory one (tests, a single process)."""

    def __init__(self, path: Path | None = None, slots: int = DEFAULT_SLOTS) -> None:
        self.path = path
        size = _HEADER_SIZE + slots * _SLOT_SIZE
        self._file = MappedFile(path, _HEADER.pack(_MAGIC, slots, _SLOT_SIZE), size)
        self._map = self._file.map
        self.slots = slots
        self.learned = 0

    def replaced(self) -> bool:
        """Was the file removed or replaced since we opened it (the interceptor's cleanup removes it on
        stop, a restarted one makes a new one)? A long-lived writer then opens the new one (`reopen`)."""
        return self._file.replaced()

    def reopen(self) -> NameTable:
        """A fresh table on the same path (creating the file if needed); this one is closed."""
        self.close()
        table = NameTable(self.path, self.slots)
        table.learned = self.learned
        return table

    def learn_answer(self, answer: DnsAnswer, now: float | None = None) -> int:
        """Every address of an answer → its CNAME chain's names; returns how many addresses were learned."""
        name = chain_text(answer.chain or (answer.qname,))
        for address, ttl in answer.addresses:
            self.learn(address, name, ttl, now)
        return len(answer.addresses)

    def close(self) -> None:
        self._file.close()

    def _window(self, key: bytes) -> range:
        start = zlib.crc32(key) % self.slots
        return range(start, start + _PROBE)

    def _offset(self, index: int) -> int:
        return _HEADER_SIZE + (index % self.slots) * _SLOT_SIZE

    def learn(self, address: str, name: str, ttl: int, now: float | None = None) -> None:
        """Remember that `address` belongs to `name` (called for every A/AAAA of a DNS answer)."""
        key = _address_bytes(address)
        raw_name = name.encode("ascii", errors="replace")[:_NAME_MAX]
        now = time.time() if now is None else now
        expiry = int(now) + max(int(ttl), GRACE)
        with self._file.locked():
            best, best_expiry = -1, None
            for index in self._window(key):
                off = self._offset(index)
                seq, exp, alen, _nlen, addr = _SLOT.unpack_from(self._map, off)
                if alen and addr[:alen] == key:
                    best = off
                    break
                stale = 0 if not alen or exp <= now else exp
                if best_expiry is None or stale < best_expiry:
                    best, best_expiry = off, stale
            seq = _SLOT.unpack_from(self._map, best)[0]
            struct.pack_into("!I", self._map, best, (seq + 1) & 0xFFFFFFFF)  # odd: being written
            struct.pack_into("!IBB2x16s", self._map, best + 4, expiry, len(key), len(raw_name), key)
            self._map[best + _SLOT.size : best + _SLOT.size + len(raw_name)] = raw_name
            struct.pack_into("!I", self._map, best, (seq + 2) & 0xFFFFFFFF)
        self.learned += 1

    def lookup(self, address: str, now: float | None = None) -> str:
        """The name last learned for `address`, or "" (unknown or expired)."""
        try:
            key = _address_bytes(address)
        except (OSError, ValueError):
            return ""
        now = time.time() if now is None else now
        for index in self._window(key):
            off = self._offset(index)
            for _attempt in range(3):
                seq, exp, alen, nlen, addr = _SLOT.unpack_from(self._map, off)
                if seq & 1:
                    continue
                name = bytes(self._map[off + _SLOT.size : off + _SLOT.size + nlen])
                if _SLOT.unpack_from(self._map, off)[0] != seq:
                    continue
                break
            else:
                return ""  # a writer keeps changing it: treat as unknown rather than wait
            if alen and addr[:alen] == key:
                return name.decode("ascii", errors="replace") if exp > now else ""
        return ""
