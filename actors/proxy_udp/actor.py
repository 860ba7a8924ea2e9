"""A proxy_udp worker process. Foundation stage: follows the policy and netenv snapshots."""

from __future__ import annotations

from actors.runtime import Actor
from messages import Message, NetenvChanged, PolicySnapshot


class ProxyUdpActor(Actor):
    """Transparent UDP split proxy worker."""

    name = "proxy_udp"
    subscriptions = ("policy.snapshot", "netenv.changed")

    def start(self) -> None:
        self.policy: PolicySnapshot | None = None
        self.netenv: NetenvChanged | None = None

    def on_message(self, msg: Message) -> None:
        if isinstance(msg, PolicySnapshot):
            self.policy = msg
        elif isinstance(msg, NetenvChanged):
            self.netenv = msg
