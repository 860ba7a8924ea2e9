"""What splittun remembers across restarts: the state database (connection history, notifications,
suppression markers) and the time spellings its queries and retention options accept.

The controller owns the database (`$SPLITTUN_HOME/state.db`): it writes closed connections from its registry in
batches and answers `connections --since …` from memory for live ones and from here for history. See db.py.
"""

from .db import MIGRATIONS, ConnectionFilter, StateDB, StateError, app_text, last_seen
from .timespec import TimeSpecError, parse_duration, parse_when

__all__ = [
    "MIGRATIONS",
    "ConnectionFilter",
    "StateDB",
    "StateError",
    "TimeSpecError",
    "app_text",
    "last_seen",
    "parse_duration",
    "parse_when",
]
