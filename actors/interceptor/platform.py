"""The platform seam: one small interface per concern, and the per-platform choice behind them.

- `Firewall`: put our interception rules in place, take them away, keep them first.
- `PacketSource`: deliver queued packets (`QueuedPacket`) to a callback and take their verdicts.
The engine (engine.py), the verdict logic (verdict.py) and the parsers never see the platform. Linux:
`firewall.LinuxFirewall` (iptables-legacy) and `kernel.nfqueue.NfqueueSource`. A Windows port implements
these two with WinDivert (`pydivert`): the firewall becomes the divert filter, the packet source the divert
handle, and a split verdict rewrites the packet to the proxy instead of setting a mark. No Windows code exists
yet.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Protocol


class QueuedPacket(Protocol):
    """A packet waiting for its verdict (netfilterqueue's packet on Linux)."""

    def get_payload(self) -> bytes: ...
    def get_mark(self) -> int: ...
    def set_mark(self, mark: int) -> None: ...
    def accept(self) -> None: ...
    def drop(self) -> None: ...


PacketCallback = Callable[[bool, QueuedPacket], None]  # (inbound, packet)


class Firewall(Protocol):
    data_path: str  # how split TCP leaves: "proxy", or "kernel" where the platform can route by mark

    def install(self) -> None: ...
    def remove(self) -> list[str]: ...
    def check_jump_order(self) -> list[str]: ...
    def set_data_path(self, data_path: str) -> None: ...


class PacketSource(Protocol):
    def open(self, queues: dict[str, int], on_packet: PacketCallback, add_fd: Callable[[int, Any], None]) -> None: ...
    def close(self) -> None: ...


def packet_source() -> PacketSource:
    if sys.platform.startswith("linux"):
        from kernel.nfqueue import NfqueueSource

        return NfqueueSource()
    raise NotImplementedError(f"packet interception is not implemented on {sys.platform} (WinDivert: planned)")


def firewall(workers: int) -> Firewall:
    if sys.platform.startswith("linux"):
        from .firewall import LinuxFirewall

        return LinuxFirewall(workers)
    raise NotImplementedError(f"firewall rules are not implemented on {sys.platform}")
