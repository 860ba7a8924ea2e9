"""The state database (core/state): migrations, connection history, retention, notifications and markers,
against temporary files; and the time spellings `--since` and the history options accept."""

from __future__ import annotations

import dataclasses
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from core.state import MIGRATIONS, ConnectionFilter, StateDB, StateError, parse_duration, parse_when
from core.state import db as statedb
from messages import Notification, NotificationAction, Verdict
from messages.control import ConnectionInfo, SplitInfo

NOW = 1_800_000_000.0


def conn(n: int, *, started: float = NOW - 100, ended: float | None = None, verdict: Verdict = Verdict.ACCEPT,
         name: str = "curl", split: bool = False) -> ConnectionInfo:  # fmt: skip
    return ConnectionInfo(
        conn_id=f"c{n}",
        started=started,
        protocol="tcp",
        src_ip="192.0.2.66",
        src_port=40000 + n,
        dst_ip="203.0.113.80",
        dst_port=80,
        pid=9,
        exe=f"/usr/bin/{name}",
        process_name=name,
        cmdline=[name, "http://203.0.113.80/"],
        verdict=int(verdict),
        verb="split tunneled" if verdict == Verdict.REROUTE_TO_SPLIT_TUN else "accepted",
        ended=started + 1 if ended is None else ended,
        end_reason="closed",
        state="closed",
        split=SplitInfo(
            session_id="s1",
            worker="proxy_tcp_00",
            interface="eth0",
            local_ip="192.0.2.10",
            local_port=50000,
            opened=started,
            closed=started + 1,
            reason="closed",
            bytes_up=100,
            bytes_down=5000,
            packets_up=3,
            packets_down=5,
        )
        if split
        else None,
    )


@pytest.fixture
def db(tmp_path: Path) -> StateDB:
    opened = StateDB.open(tmp_path / "state.db")
    yield opened
    opened.close()


def test_a_new_file_is_migrated_to_the_current_schema_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.db"
    db = StateDB.open(path)
    assert db.version == len(MIGRATIONS)
    db.close()
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} >= {
        "connections", "notifications", "markers"}  # fmt: skip
    assert path.stat().st_mode & 0o777 == 0o600
    StateDB.open(path).close()  # opening again migrates nothing


def test_a_file_from_a_newer_splittun_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    raw.close()
    with pytest.raises(StateError, match="newer than this splittun knows"):
        StateDB.open(path)


def test_a_corrupt_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StateError) as caught:
        StateDB.open(path)
    assert str(caught.value).startswith(f"state database {path}: ") and "\n" not in str(caught.value)


def test_an_unwritable_place_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StateError, match="state database"):
        StateDB.open(blocker / "state.db")


def test_connections_round_trip_with_their_split_context(db: StateDB) -> None:
    rows = [conn(1, split=True, verdict=Verdict.REROUTE_TO_SPLIT_TUN), conn(2)]
    assert db.save_connections(rows) == 2
    assert db.connection("c1") == rows[0]
    assert db.connection("c2") == rows[1]
    assert db.connection("nope") is None
    assert db.count_connections() == 2
    # an update of a stored connection (conntrack's end after the session's close) replaces it
    db.save_connections([dataclasses.replace(rows[1], end_reason="timeout")])
    assert db.connection("c2").end_reason == "timeout" and db.count_connections() == 2


def test_every_field_of_a_connection_has_a_column() -> None:
    names = {f.name for f in dataclasses.fields(ConnectionInfo)} - {"split", "state"}
    split = {f.name for f in dataclasses.fields(SplitInfo)}
    renamed = {"interface": "session_interface", "opened": "session_opened", "closed": "session_closed",
               "reason": "session_reason"}  # fmt: skip
    assert names | {renamed.get(n, n) for n in split} <= set(statedb._CONN_COLUMNS)


def test_filters_newest_first_and_limit(db: StateDB) -> None:
    db.save_connections(
        [
            conn(1, started=NOW - 7200, name="firefox"),
            conn(2, started=NOW - 600, verdict=Verdict.REROUTE_TO_SPLIT_TUN),
            conn(3, started=NOW - 60),
            conn(4, started=NOW - 5000, ended=NOW - 30),  # long-lived: seen within the last hour
        ]
    )
    ids = lambda **kw: [r.conn_id for r in db.connections(ConnectionFilter(**kw))]  # noqa: E731
    assert ids() == ["c3", "c2", "c4", "c1"]
    assert ids(limit=2) == ["c3", "c2"]
    assert ids(since=NOW - 3600) == ["c3", "c2", "c4"]
    assert ids(until=NOW - 1000) == ["c4", "c1"]
    assert ids(verdict=int(Verdict.REROUTE_TO_SPLIT_TUN)) == ["c2"]
    assert ids(app="FireFox") == ["c1"] and ids(app="http://203.0.113") == ["c3", "c2", "c4", "c1"]
    counts = db.verdict_counts(ConnectionFilter(since=NOW - 3600))
    assert counts == {int(Verdict.ACCEPT): 2, int(Verdict.REROUTE_TO_SPLIT_TUN): 1}


def test_the_filter_means_the_same_in_memory() -> None:
    live = dataclasses.replace(conn(9, started=NOW - 9000), ended=None, state="open", split=None)
    assert ConnectionFilter(since=NOW - 10).matches(live, NOW)  # open: still there now
    assert not ConnectionFilter(since=NOW - 10).matches(conn(8, started=NOW - 9000), NOW)
    assert ConnectionFilter(app="CURL", verdict=int(Verdict.ACCEPT)).matches(live, NOW)


def test_retention_by_age_then_by_rows(db: StateDB) -> None:
    db.save_connections([conn(i, started=NOW - 1000 * i, ended=NOW - 1000 * i + 1) for i in range(1, 11)])
    assert db.prune(NOW, max_age=5500, max_rows=1000) == 5  # c6…c10 last seen more than 5500 s ago
    assert [r.conn_id for r in db.connections(ConnectionFilter())] == ["c1", "c2", "c3", "c4", "c5"]
    assert db.prune(NOW, max_age=10**9, max_rows=2) == 3  # the oldest go first
    assert [r.conn_id for r in db.connections(ConnectionFilter())] == ["c1", "c2"]
    assert db.prune(NOW, max_age=10**9, max_rows=2) == 0


def test_notifications_markers_and_reset(db: StateDB) -> None:
    note = Notification(
        topic="notify.netenv.interface",
        id="split-interface-gone",
        ts=NOW,
        title="Split interface gone",
        message="eth0 disappeared",
        level="warning",
        actions=[NotificationAction(id="suppress", text="Don't show again"),
                 NotificationAction(id="settings", text="Settings", type="open-setting", payload={"key": "x"})],
        expires=NOW + 60,
    )  # fmt: skip
    db.save_notification(note)
    assert db.notifications() == [note] and db.notification(note.id) == note
    db.save_notification(dataclasses.replace(note, state="executed", responded="suppress"))
    assert db.notification(note.id).state == "executed"
    db.set_marker(note.id, NOW)
    assert db.has_marker(note.id) and db.markers() == [note.id]
    assert db.delete_expired(NOW + 61) == 1 and db.notifications() == []
    db.save_notification(note)
    assert db.reset_notifications() == (1, 1)
    assert db.notifications() == [] and not db.has_marker(note.id)


def test_time_spellings() -> None:
    assert parse_duration("90") == 90 and parse_duration("30m") == 1800 and parse_duration("7d") == 7 * 86400
    assert parse_when("1h", NOW) == NOW - 3600
    assert parse_when("90", NOW) == NOW - 90
    assert parse_when(str(NOW - 5), NOW) == NOW - 5  # epoch seconds
    assert parse_when("2027-01-15T08:00:00+00:00", NOW) == datetime(2027, 1, 15, 8, tzinfo=UTC).timestamp()
    for bad in ("soon", "1x", "-1h", ""):
        with pytest.raises(ValueError, match="is not a"):
            parse_when(bad, NOW)
