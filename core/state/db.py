"""The state database: connection history, notifications and suppression markers in one SQLite file.

`$SPLITTUN_HOME/state.db` (runtime/paths.py, `Home.state_db`), owned by the controller: it is the only
writer, so WAL mode lets readers (a script with the sqlite3 shell, a backup) look at it while it writes.
The schema grows by numbered migrations (`MIGRATIONS`, the file's `PRAGMA user_version` says how many ran);
a file from a newer splittun is refused rather than guessed at.

Every failure of SQLite (a corrupt file, a full or read-only disk) is a `StateError` whose `str()` is one
line; the caller decides what to do without history (the controller logs it once and runs on).
No actor I/O here: plain records in, plain records out (tests use a temporary file or ":memory:").
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from messages import Notification, NotificationAction
from messages.control import ConnectionInfo, SplitInfo, to_plain

#: Each entry moves the schema one version up; never edit one that shipped, append a new one.
MIGRATIONS: tuple[str, ...] = (
    # 1: closed connections with their split-tunnel context, notifications, "don't show again" markers.
    """
    CREATE TABLE connections (
        conn_id TEXT PRIMARY KEY,
        started REAL NOT NULL,
        ended REAL,                  -- conntrack forgot it
        last_seen REAL NOT NULL,     -- ended, else its proxy session's close, else started
        protocol TEXT NOT NULL,
        ip_version INTEGER NOT NULL,
        inbound INTEGER NOT NULL,
        src_ip TEXT NOT NULL,
        src_port INTEGER NOT NULL,
        dst_ip TEXT NOT NULL,
        dst_port INTEGER NOT NULL,
        domain TEXT NOT NULL,
        pid INTEGER NOT NULL,
        uid INTEGER NOT NULL,
        exe TEXT NOT NULL,
        process_name TEXT NOT NULL,
        cmdline TEXT NOT NULL,       -- JSON list
        app_text TEXT NOT NULL,      -- lower-case exe, name and command line: what --app searches
        verdict INTEGER NOT NULL,
        verb TEXT NOT NULL,
        rule TEXT NOT NULL,
        reason TEXT NOT NULL,
        split_key TEXT NOT NULL,
        interface TEXT NOT NULL,
        end_reason TEXT NOT NULL,
        session_id TEXT,             -- NULL: no proxy session (not split, or refused before one opened)
        worker TEXT,
        session_interface TEXT,
        local_ip TEXT,
        local_port INTEGER,
        session_opened REAL,
        session_closed REAL,
        session_reason TEXT,
        bytes_up INTEGER,
        bytes_down INTEGER,
        packets_up INTEGER,
        packets_down INTEGER,
        data_path TEXT,              -- the split's path: "proxy" (a session) or "kernel" (routed by its mark)
        resolved_via TEXT NOT NULL DEFAULT ''  -- which path and server answered its name (the resolver)
    );
    CREATE INDEX connections_last_seen ON connections (last_seen);
    CREATE INDEX connections_started ON connections (started);
    CREATE TABLE notifications (
        id TEXT PRIMARY KEY,
        topic TEXT NOT NULL,
        ts REAL NOT NULL,
        title TEXT NOT NULL,
        message TEXT NOT NULL,
        level TEXT NOT NULL,
        state TEXT NOT NULL,
        actions TEXT NOT NULL,       -- JSON list of {id, text, type, payload, visibility}
        expires REAL NOT NULL,
        responded TEXT NOT NULL
    );
    CREATE TABLE markers (
        key TEXT PRIMARY KEY,        -- a notification id the user chose "Don't show again" for
        ts REAL NOT NULL
    );
    """,
)

_CONN_COLUMNS = (
    "conn_id",
    "started",
    "ended",
    "last_seen",
    "protocol",
    "ip_version",
    "inbound",
    "src_ip",
    "src_port",
    "dst_ip",
    "dst_port",
    "domain",
    "pid",
    "uid",
    "exe",
    "process_name",
    "cmdline",
    "app_text",
    "verdict",
    "verb",
    "rule",
    "reason",
    "split_key",
    "interface",
    "end_reason",
    "session_id",
    "worker",
    "session_interface",
    "local_ip",
    "local_port",
    "session_opened",
    "session_closed",
    "session_reason",
    "bytes_up",
    "bytes_down",
    "packets_up",
    "packets_down",
    "data_path",
    "resolved_via",
)
_INSERT_CONN = (
    f"INSERT OR REPLACE INTO connections ({', '.join(_CONN_COLUMNS)}) VALUES ({', '.join('?' for _ in _CONN_COLUMNS)})"
)
_NOTE_COLUMNS = ["id", "topic", "ts", "title", "message", "level", "state", "actions", "expires", "responded"]


class StateError(Exception):
    """The database cannot be used; `str()` is one line naming the file and SQLite's reason."""


@dataclass(frozen=True)
class ConnectionFilter:
    """Which connections a query wants; the same for the registry's memory and the database.

    A connection is in the window when it started by `until` and was still there at `since` (0 = unbounded)."""

    verdict: int | None = None
    app: str = ""  # case-insensitive text in the process name, executable path or command line
    since: float = 0.0
    until: float = 0.0
    limit: int = 200

    def matches(self, info: ConnectionInfo, now: float) -> bool:
        if self.verdict is not None and info.verdict != self.verdict:
            return False
        if self.until and info.started > self.until:
            return False
        if self.since and last_seen(info, now) < self.since:
            return False
        return not self.app or self.app.lower() in app_text(info)


def last_seen(info: ConnectionInfo, now: float) -> float:
    """When the connection was last there: `now` while open, else when it ended (or its session closed)."""
    if info.state == "open":
        return now
    closed = info.split.closed if info.split is not None else None
    return info.ended or closed or info.started


def app_text(info: ConnectionInfo) -> str:
    return "\n".join((info.exe, info.process_name, " ".join(info.cmdline))).lower()


class StateDB:
    """One open state database. Not thread-safe: the controller uses it from its loop thread."""

    def __init__(self, conn: sqlite3.Connection, where: str) -> None:
        self._db = conn
        self.where = where

    @classmethod
    def open(cls, path: Path | str) -> StateDB:
        """Open (creating it) and migrate to the current schema; StateError when that cannot be done."""
        where = str(path)
        try:
            if where != ":memory:":
                Path(where).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(where, isolation_level=None, check_same_thread=False)
        except (sqlite3.Error, OSError) as exc:
            raise StateError(f"state database {where}: {exc}") from None
        db = cls(conn, where)
        try:
            with db._errors():
                conn.execute("PRAGMA busy_timeout = 2000")
                if where != ":memory:":
                    conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
                db._migrate()
        except StateError:
            conn.close()
            raise
        if where != ":memory:":
            Path(where).chmod(0o600)
        return db

    def close(self) -> None:
        self._db.close()

    @property
    def version(self) -> int:
        with self._errors():
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        current = self.version
        if current > len(MIGRATIONS):
            raise StateError(
                f"state database {self.where}: schema version {current} is newer than this splittun knows "
                f"({len(MIGRATIONS)}); move the file away to start a new history"
            )
        for number, script in enumerate(MIGRATIONS[current:], current + 1):
            self._db.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;")

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            with suppress(sqlite3.Error):
                if self._db.in_transaction:
                    self._db.rollback()
            raise StateError(f"state database {self.where}: {exc}") from None

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._errors():
            self._db.execute("BEGIN")
            yield self._db
            self._db.execute("COMMIT")

    # --- connections ------------------------------------------------------------------------------

    def save_connections(self, rows: Iterable[ConnectionInfo]) -> int:
        """Insert (or update, by conn_id) closed connections in one transaction; how many."""
        values = [_conn_values(info) for info in rows]
        if values:
            with self._transaction() as db:
                db.executemany(_INSERT_CONN, values)
        return len(values)

    def connections(self, query: ConnectionFilter) -> list[ConnectionInfo]:
        """Newest first (by start), at most `query.limit`."""
        where, params = _where(query)
        sql = f"SELECT {', '.join(_CONN_COLUMNS)} FROM connections{where} ORDER BY started DESC LIMIT ?"
        with self._errors():
            return [_conn_info(row) for row in self._db.execute(sql, [*params, max(0, query.limit)])]

    def connection(self, conn_id: str) -> ConnectionInfo | None:
        sql = f"SELECT {', '.join(_CONN_COLUMNS)} FROM connections WHERE conn_id = ?"
        with self._errors():
            row = self._db.execute(sql, (conn_id,)).fetchone()
        return None if row is None else _conn_info(row)

    def verdict_counts(self, query: ConnectionFilter) -> dict[int, int]:
        """Connections per verdict number among those the filter selects (its limit does not apply)."""
        where, params = _where(query)
        with self._errors():
            rows = self._db.execute(f"SELECT verdict, count(*) FROM connections{where} GROUP BY verdict", params)
            return {int(v): int(n) for v, n in rows}

    def connection_ids(self, query: ConnectionFilter) -> set[str]:
        where, params = _where(query)
        with self._errors():
            return {row[0] for row in self._db.execute(f"SELECT conn_id FROM connections{where}", params)}

    def count_connections(self) -> int:
        with self._errors():
            return int(self._db.execute("SELECT count(*) FROM connections").fetchone()[0])

    def prune(self, now: float, max_age: float, max_rows: int) -> int:
        """Retention: delete connections last seen more than `max_age` seconds before `now`, then the oldest
        beyond `max_rows`. How many rows went."""
        with self._transaction() as db:
            gone = db.execute("DELETE FROM connections WHERE last_seen < ?", (now - max_age,)).rowcount
            gone += db.execute(
                "DELETE FROM connections WHERE conn_id IN "
                "(SELECT conn_id FROM connections ORDER BY last_seen DESC LIMIT -1 OFFSET ?)",
                (max(0, max_rows),),
            ).rowcount
        return gone

    # --- notifications and markers ----------------------------------------------------------------

    def save_notification(self, note: Notification) -> None:
        actions = json.dumps([to_plain(a) for a in note.actions])
        values = (note.id, note.topic, note.ts, note.title, note.message, note.level, note.state, actions,
                  note.expires, note.responded)  # fmt: skip
        sql = f"INSERT OR REPLACE INTO notifications ({', '.join(_NOTE_COLUMNS)}) VALUES ({', '.join('?' * 10)})"
        with self._errors():
            self._db.execute(sql, values)

    def notifications(self) -> list[Notification]:
        """Every stored notification, newest first (expired ones too: the caller decides)."""
        sql = f"SELECT {', '.join(_NOTE_COLUMNS)} FROM notifications ORDER BY ts DESC"
        with self._errors():
            return [_note(row) for row in self._db.execute(sql)]

    def notification(self, note_id: str) -> Notification | None:
        sql = f"SELECT {', '.join(_NOTE_COLUMNS)} FROM notifications WHERE id = ?"
        with self._errors():
            row = self._db.execute(sql, (note_id,)).fetchone()
        return None if row is None else _note(row)

    def delete_expired(self, now: float) -> int:
        with self._errors():
            return self._db.execute("DELETE FROM notifications WHERE expires > 0 AND expires < ?", (now,)).rowcount

    def set_marker(self, key: str, now: float | None = None) -> None:
        with self._errors():
            self._db.execute("INSERT OR REPLACE INTO markers (key, ts) VALUES (?, ?)", (key, now or time.time()))

    def has_marker(self, key: str) -> bool:
        with self._errors():
            return self._db.execute("SELECT 1 FROM markers WHERE key = ?", (key,)).fetchone() is not None

    def markers(self) -> list[str]:
        with self._errors():
            return [row[0] for row in self._db.execute("SELECT key FROM markers ORDER BY key")]

    def reset_notifications(self) -> tuple[int, int]:
        """Delete every notification state and every suppression marker: (notifications, markers)."""
        with self._transaction() as db:
            notes = db.execute("DELETE FROM notifications").rowcount
            markers = db.execute("DELETE FROM markers").rowcount
        return notes, markers


# --- rows ↔ records -----------------------------------------------------------------------------------


def _where(query: ConnectionFilter) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if query.verdict is not None:
        clauses.append("verdict = ?")
        params.append(query.verdict)
    if query.since:
        clauses.append("last_seen >= ?")
        params.append(query.since)
    if query.until:
        clauses.append("started <= ?")
        params.append(query.until)
    if query.app:
        clauses.append("instr(app_text, ?) > 0")
        params.append(query.app.lower())
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def _conn_values(info: ConnectionInfo) -> tuple[Any, ...]:
    s = info.split
    session = (
        (s.session_id, s.worker, s.interface, s.local_ip, s.local_port, s.opened, s.closed, s.reason,
         s.bytes_up, s.bytes_down, s.packets_up, s.packets_down, s.data_path)
        if s is not None
        else (None,) * 13
    )  # fmt: skip
    return (
        info.conn_id, info.started, info.ended, last_seen(info, info.started), info.protocol, info.ip_version,
        int(info.inbound), info.src_ip, info.src_port, info.dst_ip, info.dst_port, info.domain, info.pid, info.uid,
        info.exe, info.process_name, json.dumps(info.cmdline), app_text(info), info.verdict, info.verb, info.rule,
        info.reason, info.split_key, info.interface, info.end_reason, *session, info.resolved_via,
    )  # fmt: skip


def _conn_info(row: tuple[Any, ...]) -> ConnectionInfo:
    c = dict(zip(_CONN_COLUMNS, row, strict=True))
    split = None
    if c["session_id"] is not None:
        split = SplitInfo(
            session_id=c["session_id"],
            worker=c["worker"],
            interface=c["session_interface"],
            local_ip=c["local_ip"],
            local_port=c["local_port"],
            opened=c["session_opened"],
            closed=c["session_closed"],
            reason=c["session_reason"],
            bytes_up=c["bytes_up"],
            bytes_down=c["bytes_down"],
            packets_up=c["packets_up"],
            packets_down=c["packets_down"],
            data_path=c["data_path"] or "proxy",
        )
    return ConnectionInfo(
        conn_id=c["conn_id"],
        started=c["started"],
        protocol=c["protocol"],
        src_ip=c["src_ip"],
        src_port=c["src_port"],
        dst_ip=c["dst_ip"],
        dst_port=c["dst_port"],
        ip_version=c["ip_version"],
        inbound=bool(c["inbound"]),
        domain=c["domain"],
        pid=c["pid"],
        exe=c["exe"],
        process_name=c["process_name"],
        cmdline=json.loads(c["cmdline"]),
        uid=c["uid"],
        verdict=c["verdict"],
        rule=c["rule"],
        reason=c["reason"],
        split_key=c["split_key"],
        interface=c["interface"],
        ended=c["ended"],
        end_reason=c["end_reason"],
        split=split,
        resolved_via=c["resolved_via"],
        verb=c["verb"],
        state="closed",
    )


def _note(row: tuple[Any, ...]) -> Notification:
    n = dict(zip(_NOTE_COLUMNS, row, strict=True))
    n["actions"] = [NotificationAction(**a) for a in json.loads(n["actions"])]
    return Notification(**n)
