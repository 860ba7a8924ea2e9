"""The diverter as the interceptor's poll loop sees it: an fd that is readable while packets wait. Linux hands
out the handle's event fd; a handle without one (WinDivert) is read by a thread that wakes the loop."""

from __future__ import annotations

import queue
import select
from typing import Any

from kernel.divert import Diverter, divert_filter


class FakeHandle:
    """pydivert's Divert as far as the diverter uses it: blocking recv with a timeout, send, close."""

    def __init__(self) -> None:
        self.waiting: queue.Queue[Any] = queue.Queue()
        self.sent: list[Any] = []
        self.closed = False

    def recv(self, timeout: float | None = None) -> Any:
        if self.closed:
            raise OSError("handle closed")
        try:
            return self.waiting.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError from None

    def send(self, packet: Any) -> None:
        self.sent.append(packet)

    def close(self) -> None:
        self.closed = True


def test_a_handle_without_an_event_fd_is_read_by_a_thread_that_wakes_the_loop() -> None:
    handle = FakeHandle()
    diverter = Diverter("true", handle=handle)
    try:
        fd = diverter.fileno()
        assert select.select([fd], [], [], 0)[0] == []  # nothing waits: not readable
        for n in range(3):
            handle.waiting.put(f"packet {n}")
        assert select.select([fd], [], [], 5)[0] == [fd]
        got: list[Any] = []
        deadline = 50
        while len(got) < 3 and deadline:
            select.select([fd], [], [], 0.1)
            got += list(diverter.ready())
            deadline -= 1
        assert got == ["packet 0", "packet 1", "packet 2"]
        diverter.send("out")
        assert handle.sent == ["out"]
    finally:
        diverter.close()
    assert handle.closed


def test_a_handle_with_an_event_fd_is_polled_directly() -> None:
    handle = FakeHandle()
    handle._event_fd = 42  # type: ignore[attr-defined]
    handle.waiting.put("p")
    diverter = Diverter("true", handle=handle)
    assert diverter.fileno() == 42
    assert list(diverter.ready()) == ["p"]


def test_the_filter_takes_new_flows_the_proxies_answers_and_dns_answers() -> None:
    import pydivert

    text = divert_filter(719)
    assert pydivert.Divert.check_filter(text) == (True, 0, "")  # WinDivert's own filter compiler accepts it
    assert "outbound and !loopback and (tcp or udp)" in text
    assert "tcp.SrcPort == 719 or udp.SrcPort == 719" in text and "inbound and udp.SrcPort == 53" in text
