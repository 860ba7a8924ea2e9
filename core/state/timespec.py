"""Times as people type them: `1h`, `30m`, `7d` (durations) and `2026-12-02T10:00`, `1733130000` (moments).

The CLI's `--since/--until`, the API's query parameters and the history options (`splittun/history/maxAge`)
all read times here, so they accept the same spellings and refuse a wrong one with the same words.
"""

from __future__ import annotations

import re
from datetime import datetime

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")


class TimeSpecError(ValueError):
    """Text that is neither a duration nor a moment; `str()` says what is accepted."""


def parse_duration(text: str) -> float:
    """`90`, `90s`, `30m`, `1h`, `7d`, `2w` → seconds."""
    found = _DURATION.match(text.lower())
    if not found:
        raise TimeSpecError(f"{text!r} is not a duration (e.g. 90s, 30m, 1h, 7d)")
    return float(found.group(1)) * _UNITS[found.group(2) or "s"]


def parse_when(text: str, now: float) -> float:
    """A moment as seconds since the epoch: a duration means that long before `now` (`1h` = an hour ago),
    else an ISO date/time (local time unless it carries an offset) or a plain epoch number."""
    text = text.strip()
    if _DURATION.match(text.lower()) and not text.replace(".", "").isdigit():
        return now - parse_duration(text)
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if value > 10**8:  # a plain number this big is an epoch time, not seconds ago
            return value
        return now - value
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise TimeSpecError(
            f"{text!r} is not a time (a duration ago like 1h or 30m, an ISO time like 2026-12-02T10:00, or epoch "
            "seconds)"
        ) from None
