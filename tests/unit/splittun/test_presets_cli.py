"""`splittun presets …` and `splittun update …` while splittun is not running: the command edits the config and
switches preset versions itself, with the controller's code; every refusal is one line (root: config edits and
switches need it, like every edit)."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.support.cli import assert_one_line_error, splittun
from tests.support.updates import publish, snapshot

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="config edits need root, like every splittun edit")


def ok(home: Path, *args: str) -> str:
    result = splittun(*args, home=home)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_presets_apply_list_remove_and_an_update_offline(home: Path, tmp_path: Path) -> None:
    assert "KB0060548: UDP 8801-8810, meeting media" in ok(home, "presets", "show", "zoom")
    assert "preset zoom applied as r1 (split): saved" in ok(home, "presets", "apply", "zoom")
    assert "preset steam applied as r2 (keep)" in ok(home, "presets", "apply", "steam", "--keep", "--position", "1")
    assert [r["preset"] for r in json.loads(ok(home, "rules", "list", "--json"))] == ["steam", "zoom"]
    assert_one_line_error(splittun("presets", "apply", "zoom", home=home), 2, "zoom: preset already applied as rule r1")
    assert_one_line_error(
        splittun("presets", "apply", "zoomz", home=home), 2, "zoomz: no such preset (presets in force:"
    )
    assert_one_line_error(splittun("update", "check", home=home), 2, "no update source configured")
    source = publish(tmp_path / "v2", "2.0.0", {"zoom": [{"dest": ".zoom.us"}]}, datetime.now(UTC) - timedelta(hours=1))
    ok(home, "config", "set", "splittun/updateSource", str(source))
    assert "upgrade: 1.0.0 → 2.0.0" in ok(home, "update", "check")
    assert "installed; splittun is not running" in ok(home, "update", "apply")
    listed = json.loads(ok(home, "presets", "list", "--json"))
    assert listed["version"]["version"] == "2.0.0" and [p["name"] for p in listed["presets"]] == ["zoom"]
    assert "applied but not in force (match nothing until an update brings them back): steam" in ok(
        home, "presets", "list"
    )
    before = snapshot(home)
    assert_one_line_error(splittun("update", "apply", home=home), 2, "refused by rule same-date: ")
    assert snapshot(home) == before
    assert json.loads(ok(home, "update", "rollback", "--json"))["kind"] == "rollback"
    assert "steam" in ok(home, "presets", "list")
    assert "preset steam removed" in ok(home, "presets", "remove", "steam")
    assert_one_line_error(splittun("presets", "remove", "steam", home=home), 2, "steam: preset not applied")
