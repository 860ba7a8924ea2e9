"""The decider: the one hook that says where a new session goes and how it leaves.

The proxy calls it once per new session, before dialling, with what the kernel told it (client address,
listen address, original destination). It answers with a `Decision` (remote address, local binding,
extra info carried on the session) or a `Refusal`, which closes the session without touching the network.
Swapping the decider is how per-rule interfaces plug in later: nothing else in the proxy changes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from core.egress import EgressSet
from messages.marks import Mark, split_interface_index

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class SessionRequest:
    protocol: str  # "tcp" | "udp"
    client: Address  # the client as the proxy sees it (after the kernel's NAT)
    listen: Address  # the proxy address the session arrived on
    orig_dst: Address | None  # where the app was going; None when the kernel has no NAT record
    orig_client: Address | None = None  # the app's own address before NAT, when it differs from `client`
    ct_mark: int = 0  # the connection's conntrack mark, when the decider asked for it (wants_ct_mark)

    @property
    def family(self) -> int:
        target = self.orig_dst or self.client
        return 6 if ":" in target[0] else 4


@dataclass(frozen=True, slots=True)
class Binding:
    """How the upstream socket leaves: device (SO_BINDTODEVICE), source address, fwmark (SO_MARK)."""

    interface: str = ""
    source_ip: str = ""
    mark: int = 0


@dataclass(frozen=True, slots=True)
class Decision:
    remote: Address
    binding: Binding = Binding()
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str


Decider = Callable[[SessionRequest], Decision | Refusal]


def to_original_destination(req: SessionRequest) -> Decision | Refusal:
    """Dial the original destination with the kernel's default routing (a plain transparent proxy)."""
    if req.orig_dst is None:
        return Refusal("no original destination")
    return Decision(remote=req.orig_dst)


class SplitDecider:
    """Dial the original destination through the split interface of its address family.

    The egress is replaced as a whole (`update`) when the network or the configured interface changes;
    a session always sees one consistent egress. A family without a usable egress (no interface, no
    gateway) is refused: sending it anyway would fall back on the kernel's on-link guess or the VPN.
    """

    def __init__(self, egress: EgressSet | None = None, mark: int = Mark.SPLIT_EGRESS) -> None:
        self._egress = egress or EgressSet(reason="no network environment yet")
        self._by_index: Mapping[int, EgressSet] = {}
        self.mark = mark
        self.wants_ct_mark = False  # True while some rule names its own interface (the mark carries it)
        self._lock = threading.Lock()

    @property
    def egress(self) -> EgressSet:
        return self._egress

    def update(
        self, egress: EgressSet, by_index: Mapping[int, EgressSet] | None = None, wants_ct_mark: bool = False
    ) -> None:
        """The global egress, and one per interface index for connections whose rule chose an interface
        (the interceptor puts the index in the split mark)."""
        with self._lock:
            self._egress = egress
            self._by_index = dict(by_index or {})
            self.wants_ct_mark = wants_ct_mark

    def __call__(self, req: SessionRequest) -> Decision | Refusal:
        if req.orig_dst is None:
            return Refusal("no original destination")
        family = 6 if ":" in req.orig_dst[0] else 4
        chosen = self._egress
        index = split_interface_index(req.ct_mark) if req.ct_mark else None
        if index:
            chosen = self._by_index.get(index) or EgressSet(reason=f"no interface with index {index} here")
        egress = chosen.for_family(family)
        if egress is None:
            return Refusal(chosen.why(family))
        return Decision(
            remote=req.orig_dst,
            binding=Binding(interface=egress.interface, source_ip=egress.source, mark=self.mark),
            extra={"interface": egress.interface},
        )
