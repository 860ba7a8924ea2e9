"""One consistent log line per event, on stderr (supervisord writes it to the program's log file).

`2026-11-25T10:00:00.123Z INFO proxy_tcp_00[4242] session.open id=3 client=192.0.2.10:43210`

Built on stdlib logging so library messages (pyroute2, supervisor…) come out in the same shape.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any


class _Formatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        t = time.gmtime(record.created)
        return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"


_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"


def setup(instance: str, level: str | None = None) -> EventLog:
    """Route all logging to stderr in our line format and return the actor's event log."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(_FORMAT))
    root.addHandler(handler)
    root.setLevel((level or os.environ.get("SPLITTUN_LOG_LEVEL") or "INFO").upper())
    for noisy in ("pyroute2",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return EventLog(instance)


def format_value(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return json.dumps(text)
    return text


class EventLog:
    """`log.info("session.open", id=3, client="…")` → one line: event name, then key=value pairs."""

    def __init__(self, name: str) -> None:
        self.logger = logging.getLogger(name)
        self._seen: set[tuple[str, str]] = set()

    def _emit(self, level: int, event: str, fields: dict[str, Any]) -> None:
        if self.logger.isEnabledFor(level):
            parts = [event, *(f"{k}={format_value(v)}" for k, v in fields.items())]
            self.logger.log(level, " ".join(parts))

    def debug(self, event: str, **fields: Any) -> None:
        self._emit(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit(logging.ERROR, event, fields)

    def once(self, event: str, reason: str, limit: int = 1024) -> None:
        """A warning the first time this event happens for this reason, never again (per packet problems:
        visible, yet never a line per packet). At most `limit` distinct ones are remembered."""
        key = (event, reason)
        if key not in self._seen and len(self._seen) < limit:
            self._seen.add(key)
            self.warning(event, reason=reason, note="logged once")


def describe(exc: BaseException) -> str:
    """`TypeName: message`: how an exception is written in a log line or an error answer, everywhere."""
    return f"{type(exc).__name__}: {exc}"


class LineBudget:
    """At most `per_second` log lines a second for one kind of trouble: bad input must be visible, yet
    never flood the log nor slow the loop that meets it."""

    def __init__(self, per_second: int = 5) -> None:
        self.per_second = per_second
        self._window = (0, 0)  # (second, lines written in it)

    def allow(self) -> bool:
        second = int(time.monotonic())
        window, lines = self._window
        if window != second:
            window, lines = second, 0
        self._window = (window, lines + 1)
        return lines < self.per_second
