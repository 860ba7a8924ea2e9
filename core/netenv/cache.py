"""The lazy, shared snapshot behind every lookup, and the location gate.

- Nothing is read until the first lookup.
- A snapshot younger than `max_age` (1 s) is returned as is: one tuple read and a clock call, no lock.
- When it is older, the first caller refreshes under a lock; callers arriving meanwhile wait for that
  refresh and get its result, so a burst of callers costs one refresh, and there is at most one
  refresh per second however many threads ask.
- A failed refresh keeps the previous snapshot (logged in one line) and is retried after `max_age`;
  only when there never was one does the caller get a `NetenvError`.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Protocol

from runtime.log import EventLog, describe

from .info import Snapshot
from .raw import RawState
from .uplink import Memory, decide

log = EventLog("netenv")


class NetenvError(RuntimeError):
    """The network state could not be read at all."""


class NotSupportedError(NetenvError):
    """This operating system has no netenv reader (Linux and Windows have)."""


class Source(Protocol):
    def read(self) -> RawState: ...
    def close(self) -> None: ...


def platform_source() -> Source:
    """The reader for the running OS."""
    if sys.platform.startswith("linux"):
        from .linux import LinuxSource

        return LinuxSource()
    if sys.platform == "win32":
        from .windows import WindowsSource

        return WindowsSource()
    raise NotSupportedError(
        f"netenv does not support {sys.platform!r}: interface and gateway detection exists for Linux and Windows"
    )


class Netenv:
    """A snapshot cache over one source (the platform's by default)."""

    def __init__(
        self,
        source: Source | Callable[[], Source] | None = None,
        max_age: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source_arg = source
        self._source: Source | None = None
        self.max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        self._current: tuple[Snapshot, float] | None = None
        self._memory = Memory()
        self.refreshes = 0
        self.failures = 0
        self._last_problems: tuple[str, ...] = ()

    def _get_source(self) -> Source:
        if self._source is None:
            arg = self._source_arg
            if arg is None:
                self._source = platform_source()
            elif callable(arg) and not hasattr(arg, "read"):
                self._source = arg()
            else:
                self._source = arg  # type: ignore[assignment]
        return self._source

    def snapshot(self) -> Snapshot:
        """The current snapshot, refreshed when older than `max_age`."""
        current = self._current
        if current is not None and self._clock() - current[1] < self.max_age:
            return current[0]
        with self._lock:
            now_current = self._current
            if now_current is not current and now_current is not None:
                return now_current[0]  # another caller refreshed while we waited for the lock
            return self._refresh_locked()

    def refresh(self) -> Snapshot:
        """Read now, whatever the age (the actor calls this after a netlink change)."""
        with self._lock:
            return self._refresh_locked()

    def _refresh_locked(self) -> Snapshot:
        previous = self._current
        try:
            raw = self._get_source().read()
            snap, self._memory = decide(raw, self._memory)
        except NotSupportedError:
            raise
        except Exception as exc:  # a broken reader must not take the caller down: keep the last view
            self.failures += 1
            reason = describe(exc)
            if previous is None:
                raise NetenvError(f"cannot read the network state: {reason}") from exc
            log.warning("netenv.refresh_failed", error=reason, keeping="previous snapshot")
            self._current = (previous[0], self._clock())
            return previous[0]
        self.refreshes += 1
        if snap.problems and snap.problems != self._last_problems:
            log.warning("netenv.read_problems", count=len(snap.problems), first=snap.problems[0])
        self._last_problems = snap.problems
        self._current = (snap, self._clock())
        return snap

    @property
    def memory(self) -> Memory:
        return self._memory

    def close(self) -> None:
        with self._lock:
            if self._source is not None:
                self._source.close()
                self._source = None
            self._current = None


# --- the location gate ------------------------------------------------------------------------------

_location_disabled = threading.Event()


def disable_network_derived_location(disabled: bool) -> None:
    """While set, interface-derived location lookups return nothing.

    The ivpn actor sets it while a VPN connects, so the VPN's addresses are never taken for where the
    device is. One flag for the process, flipped atomically.
    """
    if disabled:
        _location_disabled.set()
    else:
        _location_disabled.clear()


def network_derived_location_disabled() -> bool:
    return _location_disabled.is_set()
