"""NFQUEUE (Linux): the queues the interceptor's rules send packets to, read on a poll loop.

`NfqueueSource` binds one netfilterqueue queue per queue number, configures each fail-open (a full queue
accepts instead of dropping: a hung interceptor never blocks traffic, it just lets it pass unsplit through the
VPN) and hands every packet to a callback together with its direction. The packets are netfilterqueue's
own objects (`get_payload`, `get_mark`, `set_mark`, `accept`, `drop`); the interceptor's platform seam
(`actors/interceptor/platform.py`) names what it expects of them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

from .netlink import nla, nlmsg

NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_CONFIG = 2
NFQA_CFG_MASK, NFQA_CFG_FLAGS = 4, 5
NFQA_CFG_F_FAIL_OPEN = 0x1
#: How much of a packet user space gets: outbound we read headers only; inbound DNS answers in full.
COPY_OUT = 256
COPY_IN = 4016  # netfilterqueue's maximum
QUEUE_MAXLEN = 4096

#: (inbound, packet): called on the poll loop's thread for every queued packet.
PacketCallback = Callable[[bool, Any], None]


def fail_open_config(queue_num: int) -> bytes:
    """NFQNL_MSG_CONFIG setting NFQA_CFG_F_FAIL_OPEN: a full queue accepts instead of dropping."""
    payload = struct.pack("!BBH", socket.AF_UNSPEC, 0, queue_num)
    payload += nla(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN))
    payload += nla(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN))
    return nlmsg((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG, 0x1, 0, payload)


class NfqueueSource:
    """A worker's NFQUEUE queues, read on the actor's poll loop (non-blocking, one fd per queue).

    Queue names ending in "in" carry inbound packets (DNS answers, UDP flows starting from outside)."""

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
