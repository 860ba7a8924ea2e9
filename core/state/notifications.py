"""Notifications as Portmaster has them: shown, answered with one of their actions, remembered.

A notification (`messages.Notification`) has an id, a title and message, a level (info, warning, error,
prompt), actions (id, text, type: open-url, open-page, open-setting, open-profile, inject-event,
call-webhook) and a state: active → responded → executed. Answering it with an action the controller can
carry out itself (no type, inject-event: the answer is announced on the bus) executes it at once; the others
(open-url, open-page, open-setting, call-webhook) are the UI's to carry out, so the notification stays
responded. The `suppress` action ("Don't show again") writes a marker: a notification with that id is not
shown again until `reset` deletes every state and every marker.

`NotificationCenter` keeps them in memory and, when it has one, in the state database, so they survive a
restart. A database failure is handed to `on_error` once and the center goes on in memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from messages import Notification, NotificationAction

from .db import StateDB, StateError

SUPPRESS = "suppress"
#: Portmaster's "Don't show again": add it to a notification that may be suppressed.
DONT_SHOW_AGAIN = NotificationAction(id=SUPPRESS, text="Don't show again")
LEVELS = ("info", "warning", "error", "prompt")
ACTION_TYPES = ("", "open-url", "open-page", "open-setting", "open-profile", "inject-event", "call-webhook")
#: Action types the controller carries out itself (the others are the UI's): answered = executed.
EXECUTED_HERE = ("", "inject-event")


class NotificationError(ValueError):
    """A response that cannot be taken: `not_found` (no such notification) or `invalid` (no such action,
    already answered). `str()` is one line."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def check(note: Notification) -> None:
    """ValueError naming what is wrong with a notification someone wants shown."""
    if not note.id:
        raise ValueError("id: must not be empty")
    if note.level not in LEVELS:
        raise ValueError(f"level: {note.level!r} is not one of {', '.join(LEVELS)}")
    for action in note.actions:
        if action.type not in ACTION_TYPES:
            raise ValueError(f"actions: type {action.type!r} of {action.id!r} is not one of {', '.join(ACTION_TYPES)}")


class NotificationCenter:
    def __init__(self, db: StateDB | None, on_error: Callable[[StateError], None]) -> None:
        self.db = db
        self.on_error = on_error
        self._notes: dict[str, Notification] = {}
        self._markers: set[str] = set()
        loaded = self._stored(lambda d: (d.notifications(), d.markers()))
        if loaded is not None:
            self._notes = {n.id: n for n in loaded[0]}
            self._markers = set(loaded[1])

    def _stored(self, action: Callable[[StateDB], Any]) -> Any:
        if self.db is None:
            return None
        try:
            return action(self.db)
        except StateError as exc:
            self.db = None
            self.on_error(exc)
            return None

    def suppressed(self, note_id: str) -> bool:
        return note_id in self._markers

    def show(self, note: Notification) -> Notification | None:
        """Store a notification to be shown; None when its id is suppressed or the same one is already
        showing (nothing to announce). ValueError when it is malformed."""
        check(note)
        if self.suppressed(note.id):
            return None
        old = self._notes.get(note.id)
        if old is not None and old.state == "active" and (old.title, old.message) == (note.title, note.message):
            return None
        self._put(note)
        return note

    def retire(self, note_id: str, now: float) -> Notification | None:
        """The condition it told about is over: it expires now (None when it was not showing)."""
        old = self._notes.get(note_id)
        if old is None or old.state != "active" or (old.expires and old.expires <= now):
            return None
        new = dataclasses.replace(old, expires=now)
        self._put(new)
        return new

    def respond(self, note_id: str, action_id: str, now: float) -> Notification:
        """Answer a notification with one of its actions; the notification in its new state."""
        note = self._notes.get(note_id)
        if note is None or (note.expires and note.expires <= now):
            raise NotificationError("not_found", f"no notification {note_id!r} (expired, or reset)")
        action = next((a for a in note.actions if a.id == action_id), None)
        if action is None:
            known = ", ".join(a.id for a in note.actions) or "none"
            raise NotificationError("invalid", f"{note_id}: no action {action_id!r} (actions: {known})")
        if note.state != "active":
            raise NotificationError("invalid", f"{note_id}: already answered ({note.responded}, {note.state})")
        if action_id == SUPPRESS:
            self._markers.add(note_id)
            self._stored(lambda d: d.set_marker(note_id, now))
        new = dataclasses.replace(
            note, state="executed" if action.type in EXECUTED_HERE else "responded", responded=action_id
        )
        self._put(new)
        return new

    def list(self, now: float, everything: bool = False) -> list[Notification]:
        """Newest first: the ones showing (active, not expired), or with `everything` all that are stored."""
        notes = sorted(self._notes.values(), key=lambda n: n.ts, reverse=True)
        if everything:
            return notes
        return [n for n in notes if n.state == "active" and not (n.expires and n.expires <= now)]

    def get(self, note_id: str) -> Notification | None:
        return self._notes.get(note_id)

    def expire(self, now: float) -> int:
        """Forget notifications whose expiry passed (memory and database)."""
        gone = [n.id for n in self._notes.values() if n.expires and n.expires < now]
        for note_id in gone:
            del self._notes[note_id]
        self._stored(lambda d: d.delete_expired(now))
        return len(gone)

    def reset(self) -> tuple[int, int]:
        """Delete every notification state and every marker: (notifications, markers) deleted."""
        counts = (len(self._notes), len(self._markers))
        self._notes.clear()
        self._markers.clear()
        stored = self._stored(lambda d: d.reset_notifications())
        return stored if stored is not None else counts

    def _put(self, note: Notification) -> None:
        self._notes[note.id] = note
        self._stored(lambda d: d.save_notification(note))
