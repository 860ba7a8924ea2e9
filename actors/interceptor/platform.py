"""The platform seam: one small interface per concern, Linux implementations behind them.

- `Firewall`: put our interception rules in place, take them away, keep them first.
- `PacketSource`: deliver queued packets to a callback and take their verdicts.
The engine (engine.py), the verdict logic (decide.py) and the parsers never see the platform. A
Windows port implements these two with WinDivert (`pydivert`): the firewall becomes the divert
filter, the packet source the divert handle, and a split verdict rewrites the packet to the proxy
instead of setting a mark (DESIGN.md, "Windows data path"). No Windows code exists yet.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any, Protocol

from kernel.netlink import nla, nlmsg

from .engine import QueuedPacket

PacketCallback = Callable[[bool, QueuedPacket], None]  # (inbound, packet)


class Firewall(Protocol):
    def install(self) -> None: ...
    def remove(self) -> list[str]: ...
    def check_jump_order(self) -> list[str]: ...


class PacketSource(Protocol):
    def open(self, queues: dict[str, int], on_packet: PacketCallback, add_fd: Callable[[int, Any], None]) -> None: ...
    def close(self) -> None: ...


# --- Linux: NFQUEUE ---------------------------------------------------------------------------------------

NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_CONFIG = 2
NFQA_CFG_MASK, NFQA_CFG_FLAGS = 4, 5
NFQA_CFG_F_FAIL_OPEN = 0x1
#: How much of a packet user space gets: outbound we read headers only; inbound DNS answers in full.
COPY_OUT = 256
COPY_IN = 4016  # netfilterqueue's maximum
QUEUE_MAXLEN = 4096


def fail_open_config(queue_num: int) -> bytes:
    """NFQNL_MSG_CONFIG setting NFQA_CFG_F_FAIL_OPEN: a full queue accepts instead of dropping."""
    payload = struct.pack("!BBH", socket.AF_UNSPEC, 0, queue_num)
    payload += nla(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN))
    payload += nla(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN))
    return nlmsg((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG, 0x1, 0, payload)


class NfqueueSource:
    """The worker's NFQUEUE queues, read on the actor's poll loop (non-blocking, one fd per queue)."""

    def __init__(self) -> None:
        self.queues: list[Any] = []

    def open(self, queues: dict[str, int], on_packet: PacketCallback, add_fd: Callable[[int, Any], None]) -> None:
        """Bind every queue or none (OSError: a queue is taken, e.g. by another instance here)."""
        from netfilterqueue import NetfilterQueue

        try:
            for name, number in queues.items():
                inbound = name.endswith("in")
                q = NetfilterQueue()
                self.queues.append(q)
                q.bind(
                    number,
                    lambda pkt, inbound=inbound: on_packet(inbound, pkt),
                    max_len=QUEUE_MAXLEN,
                    range=COPY_IN if inbound else COPY_OUT,
                )
                self._set_fail_open(q.get_fd(), number)
        except OSError:
            self.close()
            raise
        for q in self.queues:
            add_fd(q.get_fd(), lambda q=q: q.run(block=False))

    @staticmethod
    def _set_fail_open(fd: int, number: int) -> None:
        """The queue must be configured from the socket that bound it (the kernel checks the port id)."""
        sock = socket.socket(fileno=os.dup(fd))
        try:
            sock.sendto(fail_open_config(number), (0, 0))
        finally:
            sock.close()

    def close(self) -> None:
        for q in self.queues:
            with contextlib.suppress(Exception):
                q.unbind()
        self.queues.clear()


def packet_source() -> PacketSource:
    if sys.platform.startswith("linux"):
        return NfqueueSource()
    raise NotImplementedError(f"packet interception is not implemented on {sys.platform} (WinDivert: planned)")


def firewall(workers: int) -> Firewall:
    if sys.platform.startswith("linux"):
        from .firewall import LinuxFirewall

        return LinuxFirewall(workers)
    raise NotImplementedError(f"firewall rules are not implemented on {sys.platform}")
