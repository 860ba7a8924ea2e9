"""The config file's watch: changes to the watched name are seen (also by rename, as saves do), others not."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from kernel.inotify import IN_MOVED_TO, FileWatch, parse_names


def _event(name: bytes, padded: int = 16) -> bytes:
    body = name.ljust(padded, b"\0") if name else b""
    return struct.pack("iIII", 1, IN_MOVED_TO, 0, len(body)) + body


def test_parse_names_reads_every_event_of_a_read() -> None:
    buf = _event(b"config.json") + _event(b"") + _event(b"other", 32)
    assert parse_names(buf) == ["config.json", "other"]


def test_parse_names_stops_at_a_truncated_event() -> None:
    assert parse_names(_event(b"config.json")[:10]) == []


def test_a_rename_onto_the_file_is_seen_and_other_files_are_not(tmp_path: Path) -> None:
    target = tmp_path / "config.json"
    watch = FileWatch.open(target)
    assert watch is not None
    try:
        assert watch.changed() is False  # nothing yet
        (tmp_path / "unrelated").write_text("x")
        assert watch.changed() is False
        tmp = tmp_path / "config.json.tmp"
        tmp.write_text("{}")
        os.replace(tmp, target)  # how config.save writes
        assert watch.changed() is True
        assert watch.changed() is False  # drained
        target.write_text('{"a": 1}')  # a hand edit in place
        assert watch.changed() is True
    finally:
        watch.close()
