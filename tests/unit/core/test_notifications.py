"""Notifications (core/state/notifications.py): shown, answered, suppressed, reset; kept across a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.state import StateDB, StateError
from core.state.notifications import DONT_SHOW_AGAIN, NotificationCenter, NotificationError
from messages import Notification, NotificationAction

NOW = 1_800_000_000.0


def note(note_id: str = "ivpn-connected", message: str = "Connected to IVPN", **kw: object) -> Notification:
    docs = NotificationAction(id="docs", text="Read more", type="open-url", payload="https://example.org/")
    actions = [NotificationAction(id="ok", text="OK"), DONT_SHOW_AGAIN, docs]
    return Notification(topic="notify.ivpn.connected", id=note_id, ts=NOW, title="IVPN", message=message,
                        actions=actions, **kw)  # fmt: skip


def center(tmp_path: Path) -> NotificationCenter:
    errors: list[StateError] = []
    return NotificationCenter(StateDB.open(tmp_path / "state.db"), errors.append)


def test_lifecycle_active_responded_executed(tmp_path: Path) -> None:
    c = center(tmp_path)
    assert c.show(note()) == note()
    assert c.show(note()) is None  # the same one showing already: nothing new to announce
    assert [n.id for n in c.list(NOW)] == ["ivpn-connected"]
    done = c.respond("ivpn-connected", "ok", NOW)
    assert (done.state, done.responded) == ("executed", "ok")
    assert c.list(NOW) == [] and c.list(NOW, everything=True) == [done]
    with pytest.raises(NotificationError, match="already answered") as caught:
        c.respond("ivpn-connected", "ok", NOW)
    assert caught.value.code == "invalid"
    c.show(note("other"))
    assert c.respond("other", "docs", NOW).state == "responded"  # open-url: the UI's to carry out


def test_wrong_answers_say_why(tmp_path: Path) -> None:
    c = center(tmp_path)
    c.show(note())
    with pytest.raises(NotificationError, match=r"no action 'nope' \(actions: ok, suppress, docs\)"):
        c.respond("ivpn-connected", "nope", NOW)
    with pytest.raises(NotificationError, match="no notification 'ghost'") as caught:
        c.respond("ghost", "ok", NOW)
    assert caught.value.code == "not_found"
    with pytest.raises(ValueError, match="level: 'loud'"):
        c.show(note(level="loud"))


def test_suppress_keeps_it_away_until_reset_also_after_a_restart(tmp_path: Path) -> None:
    c = center(tmp_path)
    c.show(note())
    c.respond("ivpn-connected", "suppress", NOW)
    assert c.suppressed("ivpn-connected") and c.show(note(message="Connected again")) is None
    c.db.close()
    again = center(tmp_path)  # a restarted controller
    assert again.suppressed("ivpn-connected") and again.show(note(message="Connected again")) is None
    assert again.get("ivpn-connected").state == "executed"
    assert again.reset() == (1, 1)
    assert again.show(note(message="Connected again")) is not None and again.list(NOW)[0].state == "active"


def test_expiry_and_retire(tmp_path: Path) -> None:
    c = center(tmp_path)
    c.show(note(expires=NOW + 10))
    assert c.list(NOW + 5) and c.list(NOW + 11) == []
    with pytest.raises(NotificationError, match="expired"):
        c.respond("ivpn-connected", "ok", NOW + 11)
    assert c.expire(NOW + 11) == 1 and c.list(NOW, everything=True) == []
    c.show(note("gone"))
    assert c.retire("gone", NOW).expires == NOW and c.list(NOW + 1) == []
    assert c.retire("gone", NOW + 1) is None


def test_without_a_database_it_works_in_memory(tmp_path: Path) -> None:
    errors: list[StateError] = []
    db = StateDB.open(tmp_path / "state.db")
    c = NotificationCenter(db, errors.append)
    db.close()  # the database fails under it
    assert c.show(note()) is not None
    assert len(errors) == 1 and c.db is None
    assert c.respond("ivpn-connected", "suppress", NOW).state == "executed" and c.suppressed("ivpn-connected")
    assert c.reset() == (1, 1) and len(errors) == 1
