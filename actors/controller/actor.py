"""The controller process. Foundation stage: the actor registry behind `splittun status`."""

from __future__ import annotations

import time
from typing import Any

from actors.runtime import Actor
from messages import Heartbeat, Message
from messages.control import Request


class ControllerActor(Actor):
    """Controller: config, policy, registry, control endpoint."""

    name = "controller"
    subscriptions = ("actor.heartbeat",)

    def start(self) -> None:
        self.heartbeats: dict[str, tuple[Heartbeat, float]] = {}

    def on_message(self, msg: Message) -> None:
        if isinstance(msg, Heartbeat):
            self.heartbeats[msg.instance] = (msg, time.time())

    def handle_request(self, req: Request) -> Any:
        if req.op == "actors":
            return self.actor_table()
        return super().handle_request(req)

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
            }
            for instance, (beat, received) in sorted(self.heartbeats.items())
        ]

    def counters(self) -> dict[str, int]:
        return {"actors_seen": len(self.heartbeats)}
