"""The poll loop every splittun process runs: ZeroMQ sockets, raw fds, timers and signals in one thread.

Why one thread: the interceptor's verdict callback, heartbeats and bus messages then never race, and
nothing needs a lock except publishing from worker threads (see transport.Publisher). A callback that
raises is logged in one line and counted; the loop keeps running. SIGTERM/SIGINT wake the loop through
`signal.set_wakeup_fd`, so a stop request is seen within one poll even while blocked in libzmq.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import heapq
import itertools
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import zmq

from .log import EventLog

Callback = Callable[[], Any]


class Timer:
    __slots__ = ("callback", "cancelled", "interval", "when")

    def __init__(self, when: float, interval: float | None, callback: Callback) -> None:
        self.when = when
        self.interval = interval
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    def __init__(self, log: EventLog) -> None:
        self.log = log
        self.poller = zmq.Poller()
        self._handlers: dict[Any, Callback] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._soon: collections.deque[Callback] = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.add_fd(self._wake_r.fileno(), self._drain_wakeups)
        self.running = False
        self.stop_reason = ""
        self.errors = 0

    # --- registration -----------------------------------------------------------------------------

    def add_socket(self, sock: zmq.Socket, callback: Callback) -> None:
        """Call `callback()` whenever `sock` is readable; it should drain what is ready."""
        self.poller.register(sock, zmq.POLLIN)
        self._handlers[sock] = callback

    def add_fd(self, fd: int, callback: Callback) -> None:
        self.poller.register(fd, zmq.POLLIN)
        self._handlers[fd] = callback

    def remove(self, sock_or_fd: Any) -> None:
        if self._handlers.pop(sock_or_fd, None) is not None:
            self.poller.unregister(sock_or_fd)

    def call_later(self, delay: float, callback: Callback) -> Timer:
        return self._schedule(Timer(time.monotonic() + delay, None, callback))

    def call_every(self, interval: float, callback: Callback, first: float | None = None) -> Timer:
        start = time.monotonic() + (interval if first is None else first)
        return self._schedule(Timer(start, interval, callback))

    def call_soon_threadsafe(self, callback: Callback) -> None:
        """Run `callback` on the loop thread; safe from any thread."""
        self._soon.append(callback)
        self._wake()

    def _schedule(self, timer: Timer) -> Timer:
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        return timer

    # --- running ----------------------------------------------------------------------------------

    def stop(self, reason: str = "requested") -> None:
        if self.running and not self.stop_reason:
            self.stop_reason = reason
        self.running = False
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # a full buffer means a wakeup is already pending
            self._wake_w.send(b"\0")

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, _frame: Any) -> None:
            self.stop(signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)

    def run(self) -> None:
        self.running = True
        while self.running:
            timeout_ms = self._run_due_timers()
            if not self.running:
                break
            ready = self.poller.poll(timeout_ms)  # pyzmq retries EINTR after running signal handlers
            for sock_or_fd, _event in ready:
                handler = self._handlers.get(sock_or_fd)
                if handler is not None:
                    self._call(handler)
            while self._soon:
                self._call(self._soon.popleft())

    def _run_due_timers(self) -> int:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            self._call(timer.callback)
            if timer.interval is not None and not timer.cancelled:
                # Keep the cadence but never fire a backlog of missed ticks.
                timer.when = max(timer.when + timer.interval, now)
                self._schedule(timer)
        if not self._timers:
            return 1000
        return max(0, min(1000, int((self._timers[0][0] - time.monotonic()) * 1000) + 1))

    def _call(self, callback: Callback) -> None:
        try:
            callback()
        except Exception as exc:  # one bad handler must not take the process down
            self.errors += 1
            name = getattr(callback, "__qualname__", repr(callback))
            self.log.error("handler.failed", handler=name, error=f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        for sock in (self._wake_r, self._wake_w):
            sock.close()


def die_with_parent() -> None:
    """Ask the kernel for SIGTERM when our parent (supervisord) dies: no process outlives its supervisor."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
