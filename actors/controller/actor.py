"""The controller process: config → policy snapshot, the connection registry, the CLI's endpoint.

- Config: loaded from `$SPLITTUN_HOME/config.json` at start and whenever the file changes (checked
  every 0.25 s). A change that does not validate is refused: logged in one line, announced as
  `notify.config.refused`, and the config in force stays in force.
- Policy: every accepted config is compiled into a `policy.snapshot` with a new, larger version,
  published at once and again every few seconds (a subscriber that joined late catches up), and served
  to actors that ask (`policy` op) when they (re)start.
- Registry: `conn.*` and `proxy.session.*` events joined per connection (registry.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from core import config as cfg
from core.egress import find_interface
from messages import Heartbeat, Message, NetenvChanged, Notification, PolicySnapshot
from messages.control import INVALID_ARGUMENT, NOT_FOUND, Request, RequestFailed
from messages.verdict import parse_verdict
from runtime.actor import Actor
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
    subscriptions = ("actor.heartbeat", "conn.", "proxy.session.", "netenv.changed")

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

    def reload(self) -> dict[str, Any]:
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
            return {"applied": False, "error": self.last_error, "version": self.snapshot.version}
        self.last_error = ""
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
            )
        self.reloads += 1
        return {"applied": True, "error": "", "version": self.snapshot.version}

    def _compile(self) -> PolicySnapshot:
        self.version = max(self.version + 1, int(time.time() * 1000))
        return PolicySnapshot(
            version=self.version,
            ts=time.time(),
            enabled=self.config.enable,
            interface=self.config.interface,
            rules=list(self.config.rules),
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

    def handle_request(self, req: Request) -> Any:
        op, args = req.op, req.args
        if op == "actors":
            return self.actor_table()
        if op == "policy":
            return self.snapshot.to_wire() | {"v": self.snapshot.VERSION}
        if op == "reload":
            self.config_stamp = self._stamp()
            return self.reload()
        if op == "config":
            return {"config": self.config.to_json(), "version": self.snapshot.version, "last_error": self.last_error}
        if op == "netenv":
            return None if self.netenv is None else self.netenv.to_wire()
        if op == "connections":
            return self._connections(args)
        if op == "connection":
            rec = self.registry.get(str(args.get("id", "")))
            if rec is None:
                raise RequestFailed(NOT_FOUND, f"no connection {args.get('id')!r} (old ones roll off)")
            return rec.to_dict()
        return super().handle_request(req)

    def _connections(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        verdict = None
        if args.get("verdict"):
            try:
                verdict = int(parse_verdict(str(args["verdict"])))
            except ValueError as exc:
                raise RequestFailed(INVALID_ARGUMENT, str(exc)) from None
        limit = int(args.get("limit", 200))
        return [r.to_dict() for r in self.registry.query(verdict, args.get("app") or None, limit)]

    def actor_table(self) -> list[dict[str, Any]]:
        """Last heartbeat per instance, with its age as received here."""
        now = time.time()
        return [
            {
                "instance": instance,
                "name": beat.name,
                "pid": beat.pid,
                "uptime": beat.uptime,
                "age": now - received,
                "counters": beat.counters,
                "ready": beat.ready,
                "not_ready": beat.not_ready,
            }
            for instance, (beat, received) in sorted(self.heartbeats.items())
        ]

    def counters(self) -> dict[str, int]:
        return {
            "actors_seen": len(self.heartbeats),
            "policy_version": self.snapshot.version,
            "config_reloads": self.reloads,
            "config_refused": self.refused,
            **self.registry.counts(),
        }
