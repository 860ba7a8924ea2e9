"""The controller process: config → policy snapshot, the connection registry, the CLI's endpoint.

- Config: loaded from `$SPLITTUN_HOME/config.json` at start and whenever the file changes (checked
  every 0.25 s). A change that does not validate is refused: logged in one line, announced as
  `notify.config.refused`, and the config in force stays in force.
- Policy: every accepted config is compiled into a `policy.snapshot` with a new, larger version,
  published at once and again every few seconds (a subscriber that joined late catches up), and served
  to actors that ask (`policy` op) when they (re)start.
- Edits: while splittun runs the controller is the only writer of the config file. The CLI sends each
  edit as an op (enable, disable, interface.set, rules.add|remove|move, config.set); the controller
  validates it (named interfaces must exist now), writes the file atomically and applies it, answering
  with the policy version that carries it, or refuses it with one line and changes nothing.
- Presets: the version in force ($SPLITTUN_HOME/presets, the built-in set until an update; core/presets) is
  loaded at start; an applied preset (one rule) is expanded from it each time the policy is compiled. The CLI
  downloads and verifies an update into a staging directory; `update.apply` checks the upgrade rules against
  the version in force, switches atomically and republishes the policy; `update.rollback` goes back. A
  version in force older than `splittun/updateStaleAfterDays` is announced as `updates.stale`.
- Registry: `conn.*`, `proxy.session.*` and `dns.query` events joined per connection (registry.py).
- History: every connection that closes is written to the state database (core/state, `$SPLITTUN_HOME/
  state.db`) in batches (every 0.1 s, or at once when many are waiting), so a burst of connections never
  holds up the bus. `connections` answers live ones from memory and the rest from the database, also after a
  restart. Retention (`splittun/history/maxAge`, `maxRows`) runs every minute. A database that cannot be
  opened or written is one log line; the controller runs on without history.
- Notifications: `notify()` shows one (unless the user suppressed its id), stores it and publishes it as
  `notify.*`; other actors raise theirs with the `notify` op. The controller's own: the config refused, the
  split interface gone / back, a rule that can never match (notices.py). Answered with
  `notifications.respond`, all forgotten with `notifications.reset` (core/state/notifications.py).

Its ops are declared in messages/control.py (`Controller`); docs/control-plane.md lists them.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from core import config as cfg
from core.egress import find_interface
from core.presets import Preset, expand, preset_store, presets_of
from core.state import ConnectionFilter, StateDB, StateError
from core.state.notifications import NotificationCenter, NotificationError
from core.updates import staleness
from core.updates.source import UpdateError
from core.updates.store import BUILTIN, Installed, Switched
from kernel.inotify import FileWatch
from messages import Heartbeat, Message, NetenvChanged, Notification, PolicySnapshot, UpdatesStale
from messages.control import (
    INVALID_ARGUMENT,
    NOT_FOUND,
    ActorInfo,
    ConfigSet,
    ConfigState,
    ConnectionArgs,
    ConnectionInfo,
    ConnectionsArgs,
    Controller,
    Edited,
    InterfaceChoice,
    NoArgs,
    NotificationResponse,
    NotificationsArgs,
    NotificationsReset,
    Op,
    PresetApply,
    PresetRef,
    ReloadOutcome,
    RequestFailed,
    RuleAdd,
    RuleMove,
    RuleRef,
    TimeWindow,
    UpdateApply,
    UpdateOutcome,
)
from messages.verdict import parse_verdict, verdict_verb
from runtime.actor import Actor, answers
from runtime.paths import Home

from . import notices
from .registry import ConnectionRegistry

CONFIG_POLL_SECONDS = 0.25  # where inotify is missing
CONFIG_RECHECK_SECONDS = 10.0  # with inotify: a safety net (queue overflow, a watch lost to a remount)
REPUBLISH_SECONDS = 10.0  # late subscribers ask at start; this only covers a dropped publish
#: How often the controller looks whether the preset index in force has become stale, and re-announces it.
STALE_CHECK_SECONDS = 3600.0
HISTORY_FLUSH_SECONDS = 0.1
HISTORY_FLUSH_ROWS = 500  # write at once when this many closed connections wait
RETENTION_SECONDS = 60.0


def interface_checker(snapshot: NetenvChanged | None) -> Any:
    """`exists(name_ip_or_mac)` against the latest netenv snapshot; None when none arrived yet."""
    if snapshot is None:
        return None
    return lambda text: find_interface(snapshot, text) is not None


class ControllerActor(Actor):
    """Controller: config, policy, registry, control endpoint."""

    name = "controller"
    control = Controller
    subscriptions = ("actor.heartbeat", "conn.", "proxy.session.", "netenv.changed", "dns.query")

    def start(self) -> None:
        self._flush_timer: Any = None  # armed while closed connections wait (an idle controller sleeps)
        self.heartbeats: dict[str, tuple[Heartbeat, float]] = {}
        self.registry = ConnectionRegistry()
        self.history_saved = 0
        self.history_pruned = 0
        self.state_errors = 0
        self.db: StateDB | None = None
        self.db = self._open_state(Home.from_env().state_db)
        self.notes = NotificationCenter(self.db, self._state_failed)
        self.conditions: set[str] = set()  # ids of the notices.conditions() shown now
        self.netenv: NetenvChanged | None = None
        home = Home.from_env()
        self.config_path: Path = home.config_file
        self.store = preset_store(home.root)
        self.preset_version, self.presets = self._load_presets()
        self.config = cfg.Config()
        self.config_stamp: tuple[int, int, int] | None = None
        self.last_error = ""
        self.reloads = 0
        self.refused = 0
        # Versions only grow, also across controller restarts: milliseconds since the epoch, then +1.
        self.version = int(time.time() * 1000)
        self.snapshot = self._compile()
        self._check_config_file(initial=True)
        self._watch_config_file()
        self.rt.loop.call_later(0.0, lambda: self.rt.publish(self.snapshot))
        self.rt.loop.call_every_slot(REPUBLISH_SECONDS, lambda: self.rt.publish(self.snapshot))  # with the beats
        self.rt.loop.call_every(STALE_CHECK_SECONDS, self._check_stale, first=0.0)
        self.rt.loop.call_every(RETENTION_SECONDS, self._retain, first=1.0)

    def stop(self) -> None:
        watch = getattr(self, "config_watch", None)
        if watch is not None:
            watch.close()
        if getattr(self, "registry", None) is not None:
            self._flush_history()
        if getattr(self, "db", None) is not None:
            self.db.close()

    # --- state database -----------------------------------------------------------------------------

    def _open_state(self, path: Path) -> StateDB | None:
        try:
            db = StateDB.open(path)
        except StateError as exc:
            self._state_failed(exc)
            return None
        self.log.info("state.opened", path=path, schema=db.version, connections=db.count_connections())
        return db

    def _state_failed(self, exc: StateError) -> None:
        """One line, then on without the database: live connections and everything else keep working."""
        self.state_errors += 1
        self.log.error("state.unavailable", error=str(exc), effect="running without history until restart")
        if self.db is not None:
            self.db.close()
        self.db = None

    def _flush_history(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        rows = self.registry.take_closed()
        if not rows or self.db is None:
            return
        try:
            self.history_saved += self.db.save_connections(rows)
        except StateError as exc:
            self._state_failed(exc)

    def _retain(self) -> None:
        self.notes.expire(time.time())
        if self.db is None:
            return
        try:
            self.history_pruned += self.db.prune(
                time.time(), self.config.history_max_age_seconds, self.config.history_max_rows
            )
        except StateError as exc:
            self._state_failed(exc)

    # --- config -----------------------------------------------------------------------------------

    def _watch_config_file(self) -> None:
        """A hand edit is picked up at once (inotify on the file's directory), without waking this process
        four times a second to stat the file; polling remains where inotify is not available."""
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_watch = FileWatch.open(self.config_path)
        if self.config_watch is None:
            self.rt.loop.call_every(CONFIG_POLL_SECONDS, self._check_config_file)
            return
        watch = self.config_watch
        self.rt.loop.add_fd(watch.fileno(), lambda: watch.changed() and self._check_config_file())
        self.rt.loop.call_every_slot(CONFIG_RECHECK_SECONDS, self._check_config_file)

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.config_path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _check_config_file(self, initial: bool = False) -> None:
        stamp = self._stamp()
        if stamp == self.config_stamp and not initial:
            return
        self.config_stamp = stamp
        self.reload()

    def reload(self) -> ReloadOutcome:
        """Load the file; apply it when valid, else keep the config in force and say why."""
        try:
            new = cfg.load(self.config_path, interface_checker(self.netenv))
        except cfg.ConfigError as exc:
            self.refused += 1
            self.last_error = str(exc)
            self.log.error("config.refused", error=self.last_error, kept_version=self.snapshot.version)
            self.notify(notices.config_refused(self.last_error, time.time()))
            return ReloadOutcome(applied=False, error=self.last_error, version=self.snapshot.version)
        self.last_error = ""
        self.retire(notices.CONFIG_REFUSED)
        self._apply(new, "file")
        return ReloadOutcome(applied=True, version=self.snapshot.version)

    def _apply(self, new: cfg.Config, source: str) -> None:
        """Make `new` the config in force: a new policy snapshot, published at once (when it changed)."""
        if new != self.config or self.reloads == 0:
            stale_days_changed = new.update_stale_days != self.config.update_stale_days
            history_changed = (new.history_max_age, new.history_max_rows) != (
                self.config.history_max_age,
                self.config.history_max_rows,
            )
            self.config = new
            if history_changed:
                self._retain()  # a shorter history takes effect now, not within the minute
            self.snapshot = self._compile()
            self.rt.publish(self.snapshot)
            self.log.info(
                "config.applied",
                version=self.snapshot.version,
                enabled=new.enable,
                interface=new.interface or "auto",
                rules=len(new.rules),
                source=source,
            )
            if stale_days_changed:
                self._check_stale()
            self._check_conditions()
        self.reloads += 1

    def _edit(self, op: Op[Any, Edited], args: Any) -> Edited:
        """One edit op: validated against the config in force, written atomically, applied. A refusal is one
        line (the same the CLI prints when it edits the file itself) and changes nothing."""
        self._check_config_file()  # a hand edit saved a moment ago is what this edit starts from
        if self.last_error:
            raise RequestFailed(
                INVALID_ARGUMENT, f"the config file is invalid, fix or remove it first: {self.last_error}"
            )
        try:
            new, rule = cfg.edit(self.config, op, args, cfg.live_interface_exists, presets=self.presets)
        except cfg.RuleNotFound as exc:
            raise RequestFailed(NOT_FOUND, str(exc)) from None
        except cfg.ConfigError as exc:
            raise RequestFailed(INVALID_ARGUMENT, str(exc)) from None
        cfg.save(self.config_path, new)
        self.config_stamp = self._stamp()  # our own write: nothing to reload
        self._apply(new, op.name)
        return Edited(applied=True, version=self.snapshot.version, rule=rule)

    def _compile(self) -> PolicySnapshot:
        """The config in force as a policy snapshot: applied presets expanded from the presets in force."""
        self.version = max(self.version + 1, int(time.time() * 1000))
        return PolicySnapshot(
            version=self.version,
            ts=time.time(),
            enabled=self.config.enable,
            interface=self.config.interface,
            rules=expand(self.config.rules, self.presets),
            data_path=self.config.data_path,
            split_dns=list(self.config.split_dns),
            vpn_domains=list(self.config.vpn_domains),
            bypass_hosts=list(self.config.bypass_hosts),
        )

    # --- presets and their updates ------------------------------------------------------------------

    def _load_presets(self) -> tuple[Installed, dict[str, Preset]]:
        """The preset version in force; the built-in set when the one on disk cannot be used (said in one line)."""
        try:
            version = self.store.current()
        except UpdateError as exc:
            self.log.error("presets.unusable", error=str(exc), using=BUILTIN)
            version = self.store.load(BUILTIN)
        return version, presets_of(version)

    def _switched(self, switched: Switched) -> UpdateOutcome:
        """A new preset version is in force on disk: load it, recompile, publish, say what changed."""
        self.preset_version, self.presets = self._load_presets()
        self.snapshot = self._compile()
        self.rt.publish(self.snapshot)
        current, previous = switched.current.index, switched.previous.index
        self.log.info("presets.switched", kind=switched.kind, current=current.describe(), version=self.snapshot.version)
        self._check_stale()
        return UpdateOutcome(
            kind=switched.kind, current=current.describe(), previous=previous.describe(), version=self.snapshot.version
        )

    def _check_stale(self) -> None:
        index = self.preset_version.index
        max_age = timedelta(days=self.config.update_stale_days)
        age = staleness(index, datetime.now(UTC), max_age)
        if age is None or index.published is None:
            return
        self.announce_stale_presets(
            UpdatesStale(
                ts=time.time(),
                name=index.name,
                version=str(index.version),
                published=index.published.timestamp(),
                age_days=round(age / timedelta(days=1), 1),
                max_age_days=self.config.update_stale_days,
            )
        )

    def announce_stale_presets(self, stale: UpdatesStale) -> None:
        """The preset index in force is stale: an `updates.stale` event, a line in `splittun status`, and a
        notification with "Don't show again" (suppression id `updates-stale`)."""
        self.log.warning("presets.stale", version=stale.version, age_days=stale.age_days, max_days=stale.max_age_days)
        self.rt.publish(stale)
        self.notify(notices.updates_stale(stale.name, stale.version, stale.age_days, stale.max_age_days, stale.ts))

    # --- notifications ----------------------------------------------------------------------------

    def notify(self, note: Notification) -> Notification | None:
        """Show a notification: stored and published as `note.topic`, unless the user suppressed its id or the
        same one is showing already (then None)."""
        shown = self.notes.show(note)
        if shown is not None:
            self.rt.publish(shown)
            self.log.info("notify.shown", id=shown.id, level=shown.level, title=shown.title)
        return shown

    def retire(self, note_id: str) -> None:
        """What a notification told about is over: it stops showing (announced with its new expiry)."""
        retired = self.notes.retire(note_id, time.time())
        if retired is not None:
            self.rt.publish(retired)

    def _check_conditions(self) -> None:
        now = time.time()
        found = notices.conditions(self.config, self.netenv, now)
        for note_id, note in found.items():
            if note_id not in self.conditions:
                self.notify(note)
        for note_id in self.conditions - set(found):
            self.retire(note_id)
            if note_id == notices.INTERFACE_GONE:
                self.notify(notices.interface_back(self.config, now))
        if notices.INTERFACE_GONE in found:
            self.retire(notices.INTERFACE_BACK)
        self.conditions = set(found)

    # --- bus --------------------------------------------------------------------------------------

    def on_message(self, msg: Message) -> None:
        if isinstance(msg, Heartbeat):
            self.heartbeats[msg.instance] = (msg, time.time())
        elif isinstance(msg, NetenvChanged):
            self.netenv = msg
            self._check_conditions()
        elif self.registry.handle(msg) and self.registry.closed_waiting:
            if self.registry.closed_waiting >= HISTORY_FLUSH_ROWS:
                self._flush_history()
            elif self._flush_timer is None:
                self._flush_timer = self.rt.loop.call_later(HISTORY_FLUSH_SECONDS, self._flush_history)

    # --- requests ---------------------------------------------------------------------------------

    @answers(Controller.ACTORS)
    def answer_actors(self, args: NoArgs) -> list[ActorInfo]:
        """Last heartbeat per instance, with its age as received here."""
        now = time.time()
        return [
            ActorInfo(
                instance=instance,
                name=beat.name,
                pid=beat.pid,
                uptime=beat.uptime,
                age=now - received,
                counters=dict(beat.counters),
                ready=beat.ready,
                not_ready=beat.not_ready,
            )
            for instance, (beat, received) in sorted(self.heartbeats.items())
        ]

    @answers(Controller.POLICY)
    def answer_policy(self, args: NoArgs) -> PolicySnapshot:
        return self.snapshot

    @answers(Controller.RELOAD)
    def answer_reload(self, args: NoArgs) -> ReloadOutcome:
        self.config_stamp = self._stamp()
        return self.reload()

    @answers(Controller.CONFIG)
    def answer_config(self, args: NoArgs) -> ConfigState:
        return ConfigState(config=self.config.to_json(), version=self.snapshot.version, last_error=self.last_error)

    @answers(Controller.NETENV)
    def answer_netenv(self, args: NoArgs) -> NetenvChanged | None:
        return self.netenv

    def _connection_filter(self, args: ConnectionsArgs | TimeWindow, limit: int = 0) -> ConnectionFilter:
        verdict = None
        if isinstance(args, ConnectionsArgs) and args.verdict:
            try:
                verdict = int(parse_verdict(args.verdict))
            except ValueError as exc:
                raise RequestFailed(INVALID_ARGUMENT, str(exc)) from None
        app = args.app if isinstance(args, ConnectionsArgs) else ""
        return ConnectionFilter(verdict=verdict, app=app, since=args.since, until=args.until, limit=limit)

    def _history(self, query: ConnectionFilter) -> list[ConnectionInfo]:
        """What the database holds for `query` (nothing without one); written up to now first."""
        self._flush_history()
        if self.db is None:
            return []
        try:
            return self.db.connections(query)
        except StateError as exc:
            self._state_failed(exc)
            return []

    @answers(Controller.CONNECTIONS)
    def answer_connections(self, args: ConnectionsArgs) -> list[ConnectionInfo]:
        """Live and recent ones from memory (the freshest version), older ones from the database."""
        query = self._connection_filter(args, args.limit)
        rows = {r.conn_id: r for r in self.registry.query(query)}
        for old in self._history(query):
            rows.setdefault(old.conn_id, old)
        return sorted(rows.values(), key=lambda r: r.started, reverse=True)[: max(0, args.limit)]

    @answers(Controller.CONNECTION)
    def answer_connection(self, args: ConnectionArgs) -> ConnectionInfo:
        rec = self.registry.get(args.id)
        if rec is None and self.db is not None:
            self._flush_history()
            try:
                rec = self.db.connection(args.id)
            except StateError as exc:
                self._state_failed(exc)
        if rec is None:
            raise RequestFailed(NOT_FOUND, f"no connection {args.id!r} (not live and not in the history)")
        return rec

    @answers(Controller.COUNTS)
    def answer_counts(self, args: TimeWindow) -> dict[str, int]:
        """Per verdict verb: live connections from memory, closed ones from the database (from memory without
        one); "total" is their sum."""
        query = self._connection_filter(args, limit=1 << 62)
        by_verdict: dict[int, int] = {}
        in_memory = self.registry.query(query)
        stored = None
        if self.db is not None:
            self._flush_history()
            try:
                stored = self.db.verdict_counts(query)
            except StateError as exc:
                self._state_failed(exc)
        if stored is not None:
            by_verdict.update(stored)
            in_memory = [r for r in in_memory if r.state == "open"]  # closed ones are in the database now
        for rec in in_memory:
            by_verdict[rec.verdict] = by_verdict.get(rec.verdict, 0) + 1
        counts = {verdict_verb(v): n for v, n in sorted(by_verdict.items())}
        counts["total"] = sum(by_verdict.values())
        return counts

    @answers(Controller.NOTIFICATIONS)
    def answer_notifications(self, args: NotificationsArgs) -> list[Notification]:
        return self.notes.list(time.time(), everything=args.all)

    @answers(Controller.NOTIFY)
    def answer_notify(self, args: Notification) -> Notification | None:
        try:
            return self.notify(args)
        except ValueError as exc:
            raise RequestFailed(INVALID_ARGUMENT, str(exc)) from None

    @answers(Controller.RESPOND)
    def answer_respond(self, args: NotificationResponse) -> Notification:
        try:
            note = self.notes.respond(args.id, args.action, time.time())
        except NotificationError as exc:
            raise RequestFailed(NOT_FOUND if exc.code == "not_found" else INVALID_ARGUMENT, str(exc)) from None
        self.rt.publish(note)  # the answer is news too (inject-event: it is the event)
        self.log.info("notify.responded", id=note.id, action=note.responded, state=note.state)
        return note

    @answers(Controller.RESET_NOTIFICATIONS)
    def answer_reset_notifications(self, args: NoArgs) -> NotificationsReset:
        notes, markers = self.notes.reset()
        self.conditions = set()  # what still holds is shown again
        self._check_conditions()
        self.log.info("notify.reset", notifications=notes, markers=markers)
        return NotificationsReset(notifications=notes, markers=markers)

    @answers(Controller.ENABLE)
    def answer_enable(self, args: NoArgs) -> Edited:
        return self._edit(Controller.ENABLE, args)

    @answers(Controller.DISABLE)
    def answer_disable(self, args: NoArgs) -> Edited:
        return self._edit(Controller.DISABLE, args)

    @answers(Controller.SET_INTERFACE)
    def answer_set_interface(self, args: InterfaceChoice) -> Edited:
        return self._edit(Controller.SET_INTERFACE, args)

    @answers(Controller.ADD_RULE)
    def answer_add_rule(self, args: RuleAdd) -> Edited:
        return self._edit(Controller.ADD_RULE, args)

    @answers(Controller.REMOVE_RULE)
    def answer_remove_rule(self, args: RuleRef) -> Edited:
        return self._edit(Controller.REMOVE_RULE, args)

    @answers(Controller.MOVE_RULE)
    def answer_move_rule(self, args: RuleMove) -> Edited:
        return self._edit(Controller.MOVE_RULE, args)

    @answers(Controller.SET_CONFIG)
    def answer_set_config(self, args: ConfigSet) -> Edited:
        return self._edit(Controller.SET_CONFIG, args)

    @answers(Controller.APPLY_PRESET)
    def answer_apply_preset(self, args: PresetApply) -> Edited:
        return self._edit(Controller.APPLY_PRESET, args)

    @answers(Controller.REMOVE_PRESET)
    def answer_remove_preset(self, args: PresetRef) -> Edited:
        return self._edit(Controller.REMOVE_PRESET, args)

    @answers(Controller.APPLY_UPDATE)
    def answer_apply_update(self, args: UpdateApply) -> UpdateOutcome:
        """Install the version the CLI staged (verified again here) when the upgrade rules allow it."""
        try:
            switched = self.store.install(self.store.root.parent / args.staging, datetime.now(UTC))
        except UpdateError as exc:
            raise RequestFailed(INVALID_ARGUMENT, str(exc)) from None
        return self._switched(switched)

    @answers(Controller.ROLLBACK_UPDATE)
    def answer_rollback_update(self, args: NoArgs) -> UpdateOutcome:
        try:
            switched = self.store.rollback()
        except UpdateError as exc:
            raise RequestFailed(INVALID_ARGUMENT, str(exc)) from None
        return self._switched(switched)

    def counters(self) -> dict[str, int]:
        return {
            "actors_seen": len(self.heartbeats),
            "policy_version": self.snapshot.version,
            "config_reloads": self.reloads,
            "config_refused": self.refused,
            **self.registry.counts(),
            "history_saved": self.history_saved,
            "history_pruned": self.history_pruned,
            "state_errors": self.state_errors,
            "state_db": int(self.db is not None),
        }
