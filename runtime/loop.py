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

from .log import EventLog, describe

Callback = Callable[[], Any]


def until_slot(period: float, now: float | None = None) -> float:
    """Seconds to the next multiple of `period` on the wall clock (never less than a tenth of it): every
    process that times its idle work this way does it at the same instant, so a subscriber woken by one
    message finds the others already there, and the machine wakes once instead of once per process."""
    now = time.time() if now is None else now
    delay = period - now % period
    return delay + period if delay < period / 10 else delay


class Timer:
    __slots__ = ("aligned", "callback", "cancelled", "interval", "when")

    def __init__(self, when: float, interval: float | None, callback: Callback, aligned: bool = False) -> None:
        self.when = when
        self.interval = interval
        self.callback = callback
        self.cancelled = False
        self.aligned = aligned

    def cancel(self) -> None:
        self.cancelled = True


class Timers:
    """One-shot and repeating timers in a heap; the loop that owns them calls `run_due` every round."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()

    def call_later(self, delay: float, callback: Callback) -> Timer:
        return self._schedule(Timer(time.monotonic() + delay, None, callback))

    def call_every(self, interval: float, callback: Callback, first: float | None = None) -> Timer:
        start = time.monotonic() + (interval if first is None else first)
        return self._schedule(Timer(start, interval, callback))

    def call_every_slot(self, interval: float, callback: Callback) -> Timer:
        """Every `interval` seconds on the wall clock's multiples of it (`until_slot`), starting at the next."""
        return self._schedule(Timer(time.monotonic() + until_slot(interval), interval, callback, aligned=True))

    def _schedule(self, timer: Timer) -> Timer:
        heapq.heappush(self._heap, (timer.when, next(self._seq), timer))
        return timer

    def run_due(self, call: Callable[[Callback], Any]) -> float | None:
        """Run what is due through `call` (the loop's error handling); seconds to the next timer, or None."""
        now = time.monotonic()
        while self._heap and self._heap[0][0] <= now:
            _, _, timer = heapq.heappop(self._heap)
            if timer.cancelled:
                continue
            call(timer.callback)
            if timer.interval is not None and not timer.cancelled:
                if timer.aligned:  # the next slot, from the wall clock (it may have been stepped)
                    timer.when = time.monotonic() + until_slot(timer.interval)
                else:
                    # Keep the cadence; when late, the next tick is one interval from now (never a backlog).
                    timer.when += timer.interval
                    if timer.when <= now:
                        timer.when = now + timer.interval
                self._schedule(timer)
        return max(0.0, self._heap[0][0] - time.monotonic()) if self._heap else None


class Wakeup:
    """The thread-safe way into a loop: callbacks queued from any thread, and an fd that turns readable
    (also usable as signal.set_wakeup_fd's target) so the loop's poll returns at once."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)
        self._soon: collections.deque[Callback] = collections.deque()

    def fileno(self) -> int:
        return self.reader.fileno()

    def call_soon(self, callback: Callback) -> None:
        self._soon.append(callback)
        self.poke()

    def poke(self) -> None:
        with contextlib.suppress(OSError):  # a full buffer means a wakeup is already pending
            self.writer.send(b"\0")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self.reader.recv(4096):
                pass

    @property
    def pending(self) -> bool:
        return bool(self._soon)

    def run_soon(self, call: Callable[[Callback], Any]) -> None:
        while self._soon:
            call(self._soon.popleft())

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


class Loop:
    def __init__(self, log: EventLog) -> None:
        self.log = log
        self.poller = zmq.Poller()
        self._handlers: dict[Any, Callback] = {}
        self.timers = Timers()
        self.wakeup = Wakeup()
        self.add_fd(self.wakeup.fileno(), self.wakeup.drain)
        self.running = False
        self.stop_reason = ""
        self.errors = 0
        self._turn_end: list[Callback] = []

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
        return self.timers.call_later(delay, callback)

    def call_every(self, interval: float, callback: Callback, first: float | None = None) -> Timer:
        return self.timers.call_every(interval, callback, first)

    def call_every_slot(self, interval: float, callback: Callback) -> Timer:
        """Idle work every `interval` s on the wall clock's multiples of it: with the heartbeats (which beat on
        those slots too) it wakes a process and its subscribers once, not once each."""
        return self.timers.call_every_slot(interval, callback)

    def at_turn_end(self, callback: Callback) -> None:
        """Call `callback()` at the end of every turn, before the loop sleeps again (and once when it ends):
        where the publisher sends what this turn's handlers published."""
        self._turn_end.append(callback)

    def call_soon_threadsafe(self, callback: Callback) -> None:
        """Run `callback` on the loop thread; safe from any thread."""
        self.wakeup.call_soon(callback)

    # --- running ----------------------------------------------------------------------------------

    def stop(self, reason: str = "requested") -> None:
        """End `run()` after the current round. A stop before `run()` (SIGTERM while an actor is still
        starting, e.g. installing its firewall rules) is kept: `run()` then returns at once."""
        if not self.stop_reason:
            self.stop_reason = reason
        self.running = False
        self.wakeup.poke()

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, _frame: Any) -> None:
            self.stop(signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.set_wakeup_fd(self.wakeup.writer.fileno(), warn_on_full_buffer=False)

    def run(self) -> None:
        self.running = not self.stop_reason
        try:
            while self.running:
                due_in = self.timers.run_due(self._call)
                self._end_turn()
                # No cap: signals, stop() and other threads wake the poll through the wakeup fd, so an idle
                # process sleeps until its next timer instead of waking every second for nothing.
                timeout_ms = None if due_in is None else int(due_in * 1000) + 1
                if not self.running:
                    break
                ready = self.poller.poll(timeout_ms)  # pyzmq retries EINTR after running signal handlers
                for sock_or_fd, _event in ready:
                    handler = self._handlers.get(sock_or_fd)
                    if handler is not None:
                        self._call(handler)
                self.wakeup.run_soon(self._call)
        finally:
            self._end_turn()

    def _end_turn(self) -> None:
        for callback in self._turn_end:
            self._call(callback)

    def _call(self, callback: Callback) -> None:
        try:
            callback()
        except Exception as exc:  # one bad handler must not take the process down
            self.errors += 1
            name = getattr(callback, "__qualname__", repr(callback))
            self.log.error("handler.failed", handler=name, error=describe(exc))

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        self.wakeup.close()


def die_with_parent() -> None:
    """Ask the kernel for SIGTERM when our parent (supervisord) dies: no process outlives its supervisor."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
