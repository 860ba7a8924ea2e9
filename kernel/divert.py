"""The packet diverter: WinDivert on Windows, eBPFDivert on Linux, both through pydivert's `Divert`.

A divert handle takes every packet its filter matches out of the network stack; a packet comes back only
when it is re-injected (`send`, as it was or rewritten), otherwise it is dropped. pydivert recomputes the
IP/TCP/UDP checksums on send. On Linux the handle has an event fd (readable while packets wait), so the
interceptor reads it on its poll loop like an NFQUEUE socket; on Windows there is no fd to poll (a reader
thread would be needed: not written yet, see actors/interceptor/README.md, "The divert backend").

What eBPFDivert on this kernel can and cannot do is in actors/interceptor/README.md; the interceptor's
redirect logic (actors/interceptor/divert.py) never touches the handle itself, so tests drive it with
captured packet bytes and a fake handle.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

#: What the interceptor diverts (WinDivert filter language, the same on both systems):
#: - outbound TCP and UDP leaving through any interface but loopback: a new flow's first packet is decided,
#:   a redirected flow's packets are rewritten to the proxy; everything else is re-injected unchanged;
#: - what the proxies send back to their clients over loopback (source port 719): rewritten to come from the
#:   original peer;
#: - inbound DNS answers: names for domain rules, re-injected unchanged.
LOOPBACK_INTERFACE = 1  # Linux's lo; Windows: the loopback pseudo-interface's index (also 1)


def divert_filter(proxy_port: int) -> str:
    return (
        "(outbound and !loopback and (tcp or udp))"
        f" or (outbound and loopback and (tcp.SrcPort == {proxy_port} or udp.SrcPort == {proxy_port}))"
        " or (inbound and udp.SrcPort == 53)"
    )


class DivertHandle(Protocol):
    """What the interceptor needs of a divert handle (pydivert's `Divert`; tests use a fake)."""

    def recv(self, bufsize: int = ..., timeout: float | None = ...) -> Any: ...
    def send(self, packet: Any, recalculate_checksum: bool = ...) -> int: ...
    def close(self) -> None: ...


class Diverter:
    """An open divert handle read without blocking: `ready()` yields what waits now."""

    BATCH = 256  # packets per wakeup before the loop gives others a turn

    def __init__(self, filter_text: str) -> None:
        import pydivert

        self.handle: Any = pydivert.Divert(filter_text)
        self.handle.open()

    def fileno(self) -> int:
        """The event fd (Linux): readable while packets wait."""
        fd = getattr(self.handle, "_event_fd", None)
        if fd is None:
            fd = getattr(getattr(self.handle, "_impl", None), "_event_fd", None)
        if fd is None or fd < 0:
            raise OSError("this divert handle has no event fd to poll")
        return int(fd)

    def ready(self) -> Iterator[Any]:
        for _ in range(self.BATCH):
            try:
                yield self.handle.recv(timeout=0)
            except TimeoutError:
                return

    def send(self, packet: Any) -> None:
        self.handle.send(packet)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.handle.close()
