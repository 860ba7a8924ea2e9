"""The redirect table: where a redirected connection was going, shared by the divert interceptor and the proxies.

With a packet diverter (WinDivert on Windows, eBPFDivert on Linux: `--backend divert`) there is no NAT in the
kernel: the interceptor itself rewrites a split connection's packets to the local proxy. The proxy then cannot
ask the kernel for the original destination (no SO_ORIGINAL_DST, no conntrack record); it reads it here
instead, with no request to another process per connection.

One entry per redirected flow, keyed as the proxy sees its client: (protocol, client address, seen port).
The seen port is the app's own port, except when one app socket talks to several peers over UDP: then each
further peer gets a port of its own (what the kernel's implicit source NAT does on the NFQUEUE path), so the
proxy keeps one session per peer. The entry holds the app's real port, the original destination, the split
mark (its interface index: the interface a rule chose) and an expiry.

The proxies publish their own upstream sockets here too (mark 1720, keyed by the upstream's local address and
port) right after binding them, before their first packet: the diverter sees those packets like any other and
must pass them untouched, as the NFQUEUE rules do for a socket carrying 1720.

The table lives in one small memory-mapped file (`path`), like the interceptor's name table: a fixed-size
open-addressing hash table (crc32 of the key, 16-slot probe window), so its size is bounded. Writers (the
interceptor, the proxies) serialise with flock; readers are lock-free with a per-slot sequence counter (odd =
being written). An entry whose expiry passed is free for reuse; the writer refreshes the expiry of live flows.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from kernel.mapped import MappedFile
from messages.flows import FiveTuple, ipv6_text

_MAGIC = b"STREDIR1"
_HEADER = struct.Struct("!8sII")  # magic, slot count, slot size
_HEADER_SIZE = 64
# seq, expiry (monotonic-free wall seconds), proto, client addr len, client addr, seen port, client port,
# original destination addr len, original destination addr, original destination port, split mark
_SLOT = struct.Struct("!IdBB16sHHB16sHI")
_PROBE = 16
DEFAULT_SLOTS = 65536  # 3.5 MiB; a busy app opening 1,000 connections/s keeps ~30,000 live entries (TCP 30 s)
#: The table's file in the run directory (removed by the interceptor's cleanup).
REDIRECTS_FILE = "redirects.table"

#: `splittun up --backend`: how the interceptor sees packets. Every actor reads it from the environment
#: supervisord passes on: the proxies need to know where original destinations come from.
BACKEND_ENV = "SPLITTUN_BACKEND"
NFQUEUE, DIVERT = "nfqueue", "divert"
BACKENDS = (NFQUEUE, DIVERT)


def selected_backend() -> str:
    """NFQUEUE on Linux unless told otherwise; Windows has only the diverter."""
    default = NFQUEUE if sys.platform.startswith("linux") else DIVERT
    chosen = os.environ.get(BACKEND_ENV, "") or default
    return chosen if chosen in BACKENDS else default


@dataclass(frozen=True, slots=True)
class Redirect:
    """One redirected flow: the app's own 5-tuple (`flow`), the port the proxy sees it from, and its split mark."""

    flow: FiveTuple  # the app's address and port → where it was going
    seen_port: int  # the client port as the proxy sees it (the app's own, or an alias for a further peer)
    mark: int  # the split mark the verdict carried (1719 | interface index << 16)

    def seen(self) -> tuple[int, str, int]:
        return self.flow.protocol, self.flow.src_ip, self.seen_port


def _packed(address: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)


def _text(raw: bytes) -> str:
    return ipv6_text(raw) if len(raw) == 16 else socket.inet_ntop(socket.AF_INET, raw)


class RedirectTable:
    """The shared table; `path=None` gives a private in-memory one (tests, a single process)."""

    def __init__(self, path: Path | None = None, slots: int = DEFAULT_SLOTS, create: bool = True) -> None:
        self.path = path
        self.slots = slots
        size = _HEADER_SIZE + slots * _SLOT.size
        # the interceptor and the proxies may open it at once: MappedFile checks the layout under the lock
        self._file = MappedFile(path, _HEADER.pack(_MAGIC, slots, _SLOT.size), size, create, "redirect table")
        self._map = self._file.map
        self.full = 0  # puts that found no free slot in their window (the flow stays unsplit)

    def close(self) -> None:
        self._file.close()

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        """Writers: the interceptor (redirects) and the proxies (their own upstreams) serialise on the file."""
        return self._file.locked()

    def _window(self, proto: int, addr: bytes, port: int) -> list[int]:
        start = zlib.crc32(bytes((proto,)) + addr + port.to_bytes(2, "big")) % self.slots
        return [_HEADER_SIZE + ((start + i) % self.slots) * _SLOT.size for i in range(_PROBE)]

    def put(self, redirect: Redirect, expiry: float) -> bool:
        """Publish (or refresh) a redirected flow until `expiry` (wall clock); False when its window is full."""
        with self._locked():
            return self._put(redirect, expiry)

    def _put(self, redirect: Redirect, expiry: float) -> bool:
        flow = redirect.flow
        addr, dst = _packed(flow.src_ip), _packed(flow.dst_ip)
        target = -1
        now = time.time()
        for off in self._window(flow.protocol, addr, redirect.seen_port):
            _seq, exp, proto, alen, a, sport, *_ = _SLOT.unpack_from(self._map, off)
            if proto == flow.protocol and a[:alen] == addr and sport == redirect.seen_port:
                target = off
                break
            if target < 0 and (not proto or exp <= now):
                target = off
        if target < 0:
            self.full += 1
            return False
        seq = _SLOT.unpack_from(self._map, target)[0]
        struct.pack_into("!I", self._map, target, (seq + 1) & 0xFFFFFFFF)  # odd: being written
        packed = _SLOT.pack(
            (seq + 1) & 0xFFFFFFFF, expiry, flow.protocol, len(addr), addr, redirect.seen_port,
            flow.src_port, len(dst), dst, flow.dst_port, redirect.mark,
        )  # fmt: skip
        self._map[target + 4 : target + _SLOT.size] = packed[4:]
        struct.pack_into("!I", self._map, target, (seq + 2) & 0xFFFFFFFF)
        return True

    def remove(self, redirect: Redirect) -> None:
        with self._locked():
            self._remove(redirect)

    def _remove(self, redirect: Redirect) -> None:
        flow = redirect.flow
        addr = _packed(flow.src_ip)
        for off in self._window(flow.protocol, addr, redirect.seen_port):
            _seq, _exp, proto, alen, a, sport, *_ = _SLOT.unpack_from(self._map, off)
            if proto == flow.protocol and a[:alen] == addr and sport == redirect.seen_port:
                seq = _SLOT.unpack_from(self._map, off)[0]
                struct.pack_into("!I", self._map, off, (seq + 1) & 0xFFFFFFFF)
                struct.pack_into("!dB", self._map, off + 4, 0.0, 0)
                struct.pack_into("!I", self._map, off, (seq + 2) & 0xFFFFFFFF)
                return

    def lookup(self, protocol: int, client_ip: str, seen_port: int, now: float | None = None) -> Redirect | None:
        """The flow the proxy sees from (client_ip, seen_port); None when unknown or expired."""
        try:
            addr = _packed(client_ip)
        except (OSError, ValueError):
            return None
        now = time.time() if now is None else now
        for off in self._window(protocol, addr, seen_port):
            for _attempt in range(3):
                row = _SLOT.unpack_from(self._map, off)
                if row[0] & 1:
                    continue
                if _SLOT.unpack_from(self._map, off)[0] == row[0]:
                    break
            else:
                return None  # a writer keeps changing it: unknown rather than wait
            _seq, exp, proto, alen, a, sport, cport, dlen, dst, dport, mark = row
            if proto == protocol and a[:alen] == addr and sport == seen_port:
                if exp <= now:
                    return None
                flow = FiveTuple(protocol, _text(a[:alen]), cport, _text(dst[:dlen]), dport)
                return Redirect(flow, seen_port, mark)
        return None
