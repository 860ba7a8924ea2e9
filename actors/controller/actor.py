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
- Registry: `conn.*`, `proxy.session.*` and `dns.query` events joined per connection (registry.py).

Its ops are declared in messages/control.py (`Controller`); docs/control-plane.md lists them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from core import config as cfg
from core.egress import find_interface
from messages import Heartbeat, Message, NetenvChanged, Notification, PolicySnapshot
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
    ReloadOutcome,
    RequestFailed,
    RuleAdd,
    RuleMove,
    RuleRef,
)
from messages.verdict import parse_verdict
from runtime.actor import Actor, answers
from runtime.paths import Home

from .registry import ConnectionRegistry

CONFIG_POLL_SECONDS = 0.25
REPUBLISH_SECONDS = 3.0


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
        self.heartbeats: dict[str, tuple[Heartbeat, float]] = {}
        self.registry = ConnectionRegistry()
        self.netenv: NetenvChanged | None = None
        self.config_path: Path = Home.from_env().config_file
        self.config = cfg.Config()
        self.config_stamp: tuple[int, int, int] | None = None
        self.last_error = ""
        self.reloads = 0
        self.refused = 0
        # Versions only grow, also across controller restarts: milliseconds since the epoch, then +1.
        self.version = int(time.time() * 1000)
        self.snapshot = self._compile()
        self._check_config_file(initial=True)
        self.rt.loop.call_every(CONFIG_POLL_SECONDS, self._check_config_file)
        self.rt.loop.call_every(REPUBLISH_SECONDS, lambda: self.rt.publish(self.snapshot), first=0.0)

    # --- config -----------------------------------------------------------------------------------

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
            new, rule = cfg.edit(self.config, op, args, cfg.live_interface_exists)
        except cfg.RuleNotFound as exc:
            raise RequestFailed(NOT_FOUND, str(exc)) from None
        except cfg.ConfigError as exc:
            raise RequestFailed(INVALID_ARGUMENT, str(exc)) from None
        cfg.save(self.config_path, new)
        self.config_stamp = self._stamp()  # our own write: nothing to reload
        self._apply(new, op.name)
        return Edited(applied=True, version=self.snapshot.version, rule=rule)

    def _compile(self) -> PolicySnapshot:
        self.version = max(self.version + 1, int(time.time() * 1000))
        return PolicySnapshot(
            version=self.version,
            ts=time.time(),
            enabled=self.config.enable,
            interface=self.config.interface,
            rules=list(self.config.rules),
            split_dns=list(self.config.split_dns),
            vpn_domains=list(self.config.vpn_domains),
        )

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

    def counters(self) -> dict[str, int]:
        return {
            "actors_seen": len(self.heartbeats),
            "policy_version": self.snapshot.version,
            "config_reloads": self.reloads,
            "config_refused": self.refused,
            **self.registry.counts(),
        }
