"""Parsing an index: a usable one round-trips; anything else is one line naming the field."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from core.updates.index import BadIndex, Index, IndexFile, Version, parse_index

SHA = "ab" * 32


def raw(**fields: object) -> bytes:
    base: dict[str, object] = {
        "name": "splittun-presets",
        "version": "1.2.0",
        "published": "2026-11-30T10:00:00Z",
        "local": False,
        "files": [{"name": "zoom.json", "size": 10, "sha256": SHA}],
    }
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


def test_round_trip() -> None:
    index = parse_index(raw())
    published = datetime(2026, 11, 30, 10, tzinfo=UTC)
    assert index == Index("splittun-presets", Version(1, 2, 0), published, False, (IndexFile("zoom.json", 10, SHA),))
    assert parse_index(index.to_bytes()) == index


def test_offsets_become_utc_and_missing_version_or_date_is_left_to_the_rules() -> None:
    index = parse_index(raw(published="2026-11-30T11:00:00+01:00", version=...))
    assert index.published == datetime(2026, 11, 30, 10, tzinfo=UTC)
    assert index.version is None
    assert parse_index(raw(published=...)).published is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{not json", "index: not valid JSON at line 1 column 2"),
        (b"\xff\xfe", "index: not valid JSON"),
        (b"[]", "index: expected a JSON object"),
        (raw(name=""), "index.name: missing or not a string"),
        (raw(version="1.2"), "index.version: '1.2' is not a semantic version"),
        (raw(published="yesterday"), "index.published: 'yesterday' is not a time"),
        (raw(published="2026-11-30T10:00:00"), "index.published: '2026-11-30T10:00:00' has no time zone"),
        (raw(local="yes"), "index.local: expected true or false"),
        (raw(files=...), "index.files: missing or not a list"),
        (raw(extra=1), "index.extra: unknown field"),
        (raw(files=[{"name": "../etc.json", "size": 1, "sha256": SHA}]), "index.files[0].name: '../etc.json'"),
        (raw(files=[{"name": "a/b.json", "size": 1, "sha256": SHA}]), "index.files[0].name"),
        (raw(files=[{"name": "a.json", "size": -1, "sha256": SHA}]), "index.files[0].size"),
        (raw(files=[{"name": "a.json", "size": 1, "sha256": "AB" * 32}]), "index.files[0].sha256"),
        (raw(files=[{"name": "a.json", "size": 1}]), "index.files[0]: expected exactly name, size and sha256"),
        (raw(files=[{"name": "a.json", "size": 1, "sha256": SHA}] * 2), "index.files: 'a.json' is listed twice"),
    ],
)
def test_unusable_index_is_one_line(data: bytes, message: str) -> None:
    with pytest.raises(BadIndex) as caught:
        parse_index(data)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)
