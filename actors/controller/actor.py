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
- Registry: `conn.*` and `proxy.session.*` events joined per connection (registry.py).

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
    Op,
    PresetApply,
    PresetRef,
    ReloadOutcome,
    RequestFailed,
    RuleAdd,
    RuleMove,
    RuleRef,
    UpdateApply,
    UpdateOutcome,
)
from messages.verdict import parse_verdict
from runtime.actor import Actor, answers
from runtime.paths import Home

from .registry import ConnectionRegistry

CONFIG_POLL_SECONDS = 0.25  # where inotify is missing
CONFIG_RECHECK_SECONDS = 10.0  # with inotify: a safety net (queue overflow, a watch lost to a remount)
REPUBLISH_SECONDS = 10.0  # late subscribers ask at start; this only covers a dropped publish
#: How often the controller looks whether the preset index in force has become stale, and re-announces it.
STALE_CHECK_SECONDS = 3600.0


def interface_checker(snapshot: NetenvChanged | None) -> Any:
    """`exists(name_ip_or_mac)` against the latest netenv snapshot; None when none arrived yet."""
    if snapshot is None:
        return None
    return lambda text: find_interface(snapshot, text) is not None


class ControllerActor(Actor):
    """Controller: config, policy, registry, control endpoint."""

    name = "controller"
    control = Controller
    subscriptions = ("actor.heartbeat", "conn.", "proxy.session.", "netenv.changed")

    def start(self) -> None:
        self.heartbeats: dict[str, tuple[Heartbeat, float]] = {}
        self.registry = ConnectionRegistry()
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
        self.rt.loop.call_every(REPUBLISH_SECONDS, lambda: self.rt.publish(self.snapshot), first=0.0)
        self.rt.loop.call_every(STALE_CHECK_SECONDS, self._check_stale, first=0.0)

    def stop(self) -> None:
        watch = getattr(self, "config_watch", None)
        if watch is not None:
            watch.close()

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
        self.rt.loop.call_every(CONFIG_RECHECK_SECONDS, self._check_config_file)

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
            self.rt.publish(
                Notification(
                    topic="notify.config.refused",
                    id="config-refused",
                    ts=time.time(),
                    title="Config change refused",
                    message=f"{self.last_error}. The previous config stays in force.",
                    level="error",
                )
            )
            return ReloadOutcome(applied=False, error=self.last_error, version=self.snapshot.version)
        self.last_error = ""
        self._apply(new, "file")
        return ReloadOutcome(applied=True, version=self.snapshot.version)

    def _apply(self, new: cfg.Config, source: str) -> None:
        """Make `new` the config in force: a new policy snapshot, published at once (when it changed)."""
        if new != self.config or self.reloads == 0:
            stale_days_changed = new.update_stale_days != self.config.update_stale_days
            self.config = new
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
        """THE HOOK for notifications (issue 12): the preset index in force is stale. Today an `updates.stale`
        event and a line in `splittun status`; the notification system turns it into a notice with a
        "Don't show again" action (suppression id `updates-stale`)."""
        self.log.warning("presets.stale", version=stale.version, age_days=stale.age_days, max_days=stale.max_age_days)
        self.rt.publish(stale)

    # --- bus --------------------------------------------------------------------------------------

    def on_message(self, msg: Message) -> None:
        if isinstance(msg, Heartbeat):
            self.heartbeats[msg.instance] = (msg, time.time())
        elif isinstance(msg, NetenvChanged):
            self.netenv = msg
        else:
            self.registry.handle(msg)

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

    @answers(Controller.CONNECTIONS)
    def answer_connections(self, args: ConnectionsArgs) -> list[ConnectionInfo]:
        verdict = None
        if args.verdict:
            try:
                verdict = int(parse_verdict(args.verdict))
            except ValueError as exc:
                raise RequestFailed(INVALID_ARGUMENT, str(exc)) from None
        return [r.to_info() for r in self.registry.query(verdict, args.app or None, args.limit)]

    @answers(Controller.CONNECTION)
    def answer_connection(self, args: ConnectionArgs) -> ConnectionInfo:
        rec = self.registry.get(args.id)
        if rec is None:
            raise RequestFailed(NOT_FOUND, f"no connection {args.id!r} (old ones roll off)")
        return rec.to_info()

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
        }
