"""The packet diverter: WinDivert on Windows, eBPFDivert on Linux, both through pydivert's `Divert`.

A divert handle takes every packet its filter matches out of the network stack; a packet comes back only
when it is re-injected (`send`, as it was or rewritten), otherwise it is dropped. pydivert recomputes the
IP/TCP/UDP checksums on send. On Linux the handle has an event fd (readable while packets wait), so the
interceptor reads it on its poll loop like an NFQUEUE socket; on Windows there is no fd to poll, so a reader
thread feeds the loop through a socket pair (`Diverter`).

What eBPFDivert on this kernel can and cannot do is in actors/interceptor/README.md; the interceptor's
redirect logic (actors/interceptor/divert.py) never touches the handle itself, so tests drive it with
captured packet bytes and a fake handle.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import threading
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
    """An open divert handle read without blocking: `fileno()` is readable while packets wait, `ready()` yields
    what waits now.

    Linux: the handle's own event fd. Windows has no fd to poll (WinDivert reads are overlapped I/O): a reader
    thread blocks in `recv`, queues what it gets and wakes the poll loop through a socket pair, so the
    interceptor's loop is the same on both."""

    BATCH = 256  # packets per wakeup before the loop gives others a turn
    READ_TIMEOUT = 0.5  # seconds a blocked reader waits before checking whether the handle was closed

    def __init__(self, filter_text: str, handle: Any = None) -> None:
        if handle is None:
            import pydivert

            handle = pydivert.Divert(filter_text)
            handle.open()
        self.handle: Any = handle
        self._event_fd = self._handle_fd()
        self._inbox: collections.deque[Any] = collections.deque()
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._closed = threading.Event()
        if self._event_fd is None:
            self._start_reader()

    def _handle_fd(self) -> int | None:
        for holder in (self.handle, getattr(self.handle, "_impl", None)):
            fd = getattr(holder, "_event_fd", None)
            if isinstance(fd, int) and fd >= 0:
                return fd
        return None

    def _start_reader(self) -> None:
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        self._wake = (reader, writer)
        threading.Thread(target=self._read, name="divert-reader", daemon=True).start()

    def _read(self) -> None:
        assert self._wake is not None
        while not self._closed.is_set():
            try:
                packet = self.handle.recv(timeout=self.READ_TIMEOUT)
            except TimeoutError:
                continue
            except OSError:
                return  # the handle was closed
            self._inbox.append(packet)
            try:
                self._wake[1].send(b"\0")
            except OSError:
                return

    def fileno(self) -> int:
        if self._event_fd is not None:
            return self._event_fd
        assert self._wake is not None
        return self._wake[0].fileno()

    def ready(self) -> Iterator[Any]:
        if self._wake is not None:
            with contextlib.suppress(BlockingIOError):
                while self._wake[0].recv(4096):
                    pass
            for _ in range(min(self.BATCH, len(self._inbox))):
                yield self._inbox.popleft()
            if self._inbox:  # more than a batch: come back at once
                with contextlib.suppress(OSError):
                    self._wake[1].send(b"\0")
            return
        for _ in range(self.BATCH):
            try:
                yield self.handle.recv(timeout=0)
            except TimeoutError:
                return

    def send(self, packet: Any) -> None:
        self.handle.send(packet)

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(Exception):
            self.handle.close()
        if self._wake is not None:
            for sock in self._wake:
                sock.close()
