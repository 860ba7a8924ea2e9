"""The platform seam: one small interface per concern, and the per-platform choice behind them.

- `Firewall`: put our interception rules in place, take them away, keep them first.
- `PacketSource`: deliver queued packets (`QueuedPacket`) to a callback and take their verdicts.
The engine (engine.py), the verdict logic (verdict.py) and the parsers never see the platform. Two packet
sources, chosen by `splittun up --backend` (core.redirect.selected_backend):
- NFQUEUE (Linux's default): `kernel.nfqueue.NfqueueSource` behind `firewall.LinuxFirewall` (iptables-legacy);
  a verdict is a mark, the kernel's NAT takes split connections to the proxies.
- divert (Windows' only one; on Linux through pydivert's eBPF backend): `divert.DivertPath`. The divert filter is
  the interception; a split verdict rewrites the flow's packets to the proxy instead of setting a mark. On Linux
  the firewall stays `LinuxFirewall` for its egress half (the proxies' 1720 replies under strict rp_filter, the
  wg-quick exemption); its queue rules find no listener and let packets pass unmarked (--queue-bypass) to the
  diverter. No Windows firewall exists yet (README, "The divert backend").
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
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


def packet_source(backend: str = "nfqueue", run_dir: Path | None = None) -> PacketSource:
    if backend == "divert":
        from core.redirect import REDIRECTS_FILE, RedirectTable

        from .divert import DivertPath

        return DivertPath(RedirectTable(run_dir / REDIRECTS_FILE if run_dir is not None else None))
    if sys.platform.startswith("linux"):
        from kernel.nfqueue import NfqueueSource

        return NfqueueSource()
    raise NotImplementedError(f"NFQUEUE exists only on Linux; on {sys.platform} use the divert backend")


def firewall(workers: int) -> Firewall:
    if sys.platform.startswith("linux"):
        from .firewall import LinuxFirewall

        return LinuxFirewall(workers)
    raise NotImplementedError(f"firewall rules are not implemented on {sys.platform}")
