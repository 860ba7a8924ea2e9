"""The interceptor process. Foundation stage: follows the policy, netenv and ivpn state it will decide from."""

from __future__ import annotations

from actors.runtime import Actor
from messages import IvpnStatus, Message, NetenvChanged, PolicySnapshot


class InterceptorActor(Actor):
    """Packet interceptor: NFQUEUE verdicts and the firewall rule lifecycle."""

    name = "interceptor"
    subscriptions = ("policy.snapshot", "netenv.changed", "ivpn.status")

    def start(self) -> None:
        self.policy: PolicySnapshot | None = None
        self.netenv: NetenvChanged | None = None
        self.ivpn: IvpnStatus | None = None

    def on_message(self, msg: Message) -> None:
        # Each status object is replaced whole (copy-on-write): the verdict path reads one reference.
        if isinstance(msg, PolicySnapshot):
            self.policy = msg
        elif isinstance(msg, NetenvChanged):
            self.netenv = msg
        elif isinstance(msg, IvpnStatus):
            self.ivpn = msg

    def counters(self) -> dict[str, int]:
        return {"policy_version": self.policy.version if self.policy else 0}
