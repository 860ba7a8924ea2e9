"""A fake kernel for the netlink tests: the socket under test talks to prepared datagrams."""

from __future__ import annotations

import struct

from kernel.netlink import NLMSG_ERROR, NLMSG_HDR, NetlinkSocket, nlmsg


class FakeKernel:
    """Stands in for the socket: records what is sent, answers with prepared datagrams, then times out
    (blocking) or has nothing more (non-blocking). An OSError in the answers is raised by that recv."""

    def __init__(self, *answers: bytes | OSError) -> None:
        self.answers = list(answers)
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)

    def recv(self, size: int) -> bytes:
        if not self.answers:
            raise TimeoutError("timed out")
        answer = self.answers.pop(0)
        if isinstance(answer, OSError):
            raise answer
        return answer[:size]

    def close(self) -> None:
        pass


def install(nl: NetlinkSocket, *answers: bytes | OSError, last_seq: int = 0) -> FakeKernel:
    """Put a fake kernel behind `nl` (its real socket is closed); its next request has seq last_seq + 1."""
    nl.close()
    kernel = FakeKernel(*answers)
    nl.sock = kernel  # type: ignore[assignment]
    nl._seq = last_seq
    return kernel


def error(seq: int, code: int) -> bytes:
    return nlmsg(NLMSG_ERROR, 0, seq, struct.pack("=i", -code) + NLMSG_HDR.pack(16, 0, 0, seq, 0))
