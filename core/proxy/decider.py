"""The decider: the one hook that says where a new session goes and how it leaves.

The proxy calls it once per new session, before dialling, with a `SessionRequest`: the session as the proxy
sees it (client address after the kernel's NAT → the proxy address it arrived on) and the connection as the
app made it (the app's address → its original destination), both `FiveTuple`s. It answers with an
`UpstreamPlan` (remote address, how the upstream socket leaves, extra info carried on the session) or a
`Refusal`, which closes the session without touching the network. Swapping the decider is how per-rule
interfaces plug in: nothing else in the proxy changes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from core.egress import EgressSet
from messages.flows import FiveTuple
from messages.marks import Mark, split_interface_index

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class SessionRequest:
    """A new session, before anything is dialled."""

    seen: FiveTuple  # as the proxy sees it: the client (after the kernel's NAT) → the proxy address it arrived on
    flow: FiveTuple | None  # as the app made it: its own address → where it was going; None without a NAT record
    ct_mark: int = 0  # the connection's conntrack mark, when the decider asked for it (wants_ct_mark)

    @property
    def protocol(self) -> int:
        return self.seen.protocol

    @property
    def client(self) -> Address:
        """The client as the proxy sees it."""
        return self.seen.src

    @property
    def listen(self) -> Address:
        return self.seen.dst

    @property
    def orig_dst(self) -> Address | None:
        """Where the app was going; None when the kernel has no NAT record."""
        return self.flow.dst if self.flow is not None else None

    @property
    def ip_version(self) -> int:
        """Of the original destination (else of the client)."""
        return 6 if ":" in (self.flow.dst_ip if self.flow is not None else self.seen.src_ip) else 4


@dataclass(frozen=True, slots=True)
class Binding:
    """How the upstream socket leaves: device (SO_BINDTODEVICE), source address, fwmark (SO_MARK); the device's
    index for binders that bind by index (IP_UNICAST_IF, upstream.UnicastIfBinder)."""

    interface: str = ""
    source_ip: str = ""
    mark: int = 0
    ifindex: int = 0


@dataclass(frozen=True, slots=True)
class UpstreamPlan:
    """Where a session's upstream goes and how its socket leaves."""

    remote: Address
    binding: Binding = Binding()
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Refusal:
    """No upstream for this session, and why."""

    reason: str


Decider = Callable[[SessionRequest], UpstreamPlan | Refusal]


def to_original_destination(req: SessionRequest) -> UpstreamPlan | Refusal:
    """Dial the original destination with the kernel's default routing (a plain transparent proxy)."""
    if req.flow is None:
        return Refusal("no original destination")
    return UpstreamPlan(remote=req.flow.dst)


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

    def __call__(self, req: SessionRequest) -> UpstreamPlan | Refusal:
        if req.flow is None:
            return Refusal("no original destination")
        family = req.ip_version
        chosen = self._egress
        index = split_interface_index(req.ct_mark) if req.ct_mark else None
        if index:
            chosen = self._by_index.get(index) or EgressSet(reason=f"no interface with index {index} here")
        egress = chosen.for_family(family)
        if egress is None:
            return Refusal(chosen.why(family))
        return UpstreamPlan(
            remote=req.flow.dst,
            binding=Binding(egress.interface, egress.source, self.mark, egress.ifindex),
            extra={"interface": egress.interface},
        )
