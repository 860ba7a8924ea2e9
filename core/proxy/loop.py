"""The data path's own event loop: one thread, epoll, timers, and a thread-safe wakeup.

Why not the actor runtime's loop: that one polls ZeroMQ sockets with poll(2), whose cost grows with every
registered fd, and it must keep heartbeats flowing while bytes move. The proxies run this loop in their
own thread and publish from it: what one turn publishes leaves at the turn's end (`at_turn_end`, where the
owner flushes its `runtime.transport.Batch`), never on a timer. With no timer due the loop sleeps until an
fd or `call_soon_threadsafe` wakes it: an idle proxy does not wake at all.

On Linux fds are registered once, edge-triggered (EPOLLET): the data path reads and writes until
EAGAIN and never has to change its interest set (no epoll_ctl per state change). Elsewhere, or when
asked, the loop is level-triggered through `selectors` and the session code updates its interest.
A handler that raises is logged in one line and counted; the loop keeps running.
"""

from __future__ import annotations

import contextlib
import logging
import select
import selectors
import threading
from collections.abc import Callable
from typing import Any

from runtime.log import LineBudget
from runtime.loop import Timer, Timers, Wakeup

log = logging.getLogger("splittun.proxy")

READ = 0x001  # EPOLLIN
WRITE = 0x004  # EPOLLOUT
ERROR = 0x008  # EPOLLERR
HANGUP = 0x010  # EPOLLHUP
RDHUP = 0x2000  # EPOLLRDHUP
_EPOLLET = 1 << 31

Handler = Callable[[int], Any]  # called with the event mask


class DataLoop:
    """epoll (or selectors) + timers + call_soon_threadsafe, for one thread."""

    def __init__(self, edge_triggered: bool | None = None, name: str = "proxy") -> None:
        has_epoll = hasattr(select, "epoll")
        self.edge_triggered = has_epoll if edge_triggered is None else (edge_triggered and has_epoll)
        self.name = name
        self._epoll = select.epoll() if self.edge_triggered else None
        self._selector = None if self._epoll else selectors.DefaultSelector()
        self._handlers: dict[int, Handler] = {}
        self.timers = Timers()
        self.wakeup = Wakeup()
        self.add(self.wakeup.fileno(), READ, lambda _events: self.wakeup.drain(), edge=False)
        self.running = False
        self.thread: threading.Thread | None = None
        self.errors = 0
        self._failure_lines = LineBudget(5)
        self._turn_end: list[Callable[[], Any]] = []

    # --- registration -------------------------------------------------------------------------------

    def add(self, fd: int, events: int, handler: Handler, edge: bool = True) -> None:
        """Watch `fd`. With edge=True on an edge-triggered loop, `events` should be everything wanted
        over the fd's life (READ|WRITE|RDHUP): the handler sorts out what to do."""
        self._handlers[fd] = handler
        if self._epoll is not None:
            self._epoll.register(fd, events | (_EPOLLET if edge else 0))
        else:
            assert self._selector is not None
            mask = _to_selector(events)
            self._selector.register(fd, mask or selectors.EVENT_READ, handler if mask else _ignore)

    def interest(self, fd: int, events: int) -> None:
        """Level-triggered loops only: change what `fd` is watched for (a no-op when edge-triggered)."""
        if self._selector is None or fd not in self._handlers:
            return
        mask = _to_selector(events)
        key = self._selector.get_key(fd)
        if mask == 0:
            # selectors cannot watch nothing; park it on read with a no-op until interest returns
            self._selector.modify(fd, selectors.EVENT_READ, _ignore)
        elif key.events != mask or key.data is _ignore:
            self._selector.modify(fd, mask, self._handlers[fd])

    def remove(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is None:
            return
        with contextlib.suppress(OSError, KeyError, ValueError):
            if self._epoll is not None:
                self._epoll.unregister(fd)
            else:
                assert self._selector is not None
                self._selector.unregister(fd)

    def forget(self, fd: int) -> None:
        """Drop `fd`'s handler before the caller closes it: closing an fd takes it out of epoll anyway,
        so the data path saves an epoll_ctl per socket (selectors still needs the unregister)."""
        if self._epoll is not None:
            self._handlers.pop(fd, None)
        else:
            self.remove(fd)

    def call_later(self, delay: float, callback: Callable[[], Any]) -> Timer:
        return self.timers.call_later(delay, callback)

    def call_every(self, interval: float, callback: Callable[[], Any]) -> Timer:
        return self.timers.call_every(interval, callback)

    def call_every_slot(self, interval: float, callback: Callable[[], Any]) -> Timer:
        """Every `interval` s on the wall clock's multiples of it (runtime/loop.py `until_slot`)."""
        return self.timers.call_every_slot(interval, callback)

    def call_soon_threadsafe(self, callback: Callable[[], Any]) -> None:
        self.wakeup.call_soon(callback)

    def at_turn_end(self, callback: Callable[[], Any]) -> None:
        """Call `callback()` at the end of every turn, before the loop sleeps again (and once when it ends):
        where the owner sends the events this turn's handlers published, together."""
        self._turn_end.append(callback)

    def end_turn(self) -> None:
        """Run the turn-end callbacks (the loop does it; also whoever runs handlers after it stopped)."""
        for callback in self._turn_end:
            self._call(callback)

    # --- running ------------------------------------------------------------------------------------

    def start_thread(self) -> threading.Thread:
        self.thread = threading.Thread(target=self.run, name=self.name, daemon=True)
        self.thread.start()
        return self.thread

    def stop(self) -> None:
        """Thread-safe: the loop ends after the current round."""

        def _stop() -> None:
            self.running = False

        self.call_soon_threadsafe(_stop)

    def run(self) -> None:
        self.running = True
        try:
            self._run()
        finally:
            self.end_turn()

    def _run(self) -> None:
        handlers = self._handlers
        while self.running:
            due_in = self.timers.run_due(self._call)
            self.end_turn()
            # No cap: stop() and other threads wake the poll through the wakeup fd, so with no timer due the
            # loop sleeps until something happens (an idle proxy has no timer: its sweep runs with sessions).
            timeout = due_in
            if not self.running:
                break
            if self.wakeup.pending:
                timeout = 0
            if self._epoll is not None:
                try:
                    ready = self._epoll.poll(-1 if timeout is None else timeout, 1024)
                except InterruptedError:
                    continue
                for fd, events in ready:
                    handler = handlers.get(fd)
                    if handler is not None:
                        try:
                            handler(events)
                        except Exception as exc:
                            self._failed(handler, exc)
            else:
                assert self._selector is not None
                for key, mask in self._selector.select(timeout):
                    try:
                        key.data(_from_selector(mask))
                    except Exception as exc:
                        self._failed(key.data, exc)
            self.wakeup.run_soon(self._call)

    def _call(self, callback: Callable[[], Any]) -> None:
        try:
            callback()
        except Exception as exc:
            self._failed(callback, exc)

    def _failed(self, callback: Any, exc: Exception) -> None:
        """One line per failure, at most 5 lines a second: bad input must never flood nor stop the loop."""
        self.errors += 1
        if self._failure_lines.allow():
            name = getattr(callback, "__qualname__", repr(callback))
            log.error("proxy handler %s failed: %s: %s", name, type(exc).__name__, exc)

    def close(self) -> None:
        for fd in list(self._handlers):
            self.remove(fd)
        if self._epoll is not None:
            self._epoll.close()
        if self._selector is not None:
            self._selector.close()
        self.wakeup.close()


def _ignore(_events: int) -> None:
    pass


def _to_selector(events: int) -> int:
    mask = 0
    if events & (READ | RDHUP):
        mask |= selectors.EVENT_READ
    if events & WRITE:
        mask |= selectors.EVENT_WRITE
    return mask


def _from_selector(mask: int) -> int:
    return (READ if mask & selectors.EVENT_READ else 0) | (WRITE if mask & selectors.EVENT_WRITE else 0)


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one (each session holds two sockets)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Linux
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft
