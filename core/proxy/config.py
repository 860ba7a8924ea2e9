"""Proxy settings, with Portmaster's proxy defaults so its users find the numbers they know."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    max_sessions: int = 2048  # over the limit a new session is refused (and counted), never queued
    read_timeout: float = 300.0  # rolling: a TCP session with no byte either way for this long is closed
    write_timeout: float = 30.0  # a peer that takes no byte for this long while some wait: reset
    dial_timeout: float = 10.0
    buffer_size: int = 32 * 1024  # copy path (no splice): bytes per read
    pipe_size: int = 256 * 1024  # splice path: kernel pipe capacity per direction in flight
    udp_buffer_size: int = 64 * 1024  # largest datagram accepted (bigger ones are truncated by the kernel)
    # UDP: the kernel forgets an unanswered/quiet UDP NAT mapping after nf_conntrack_udp_timeout (30 s by
    # default); replies un-NAT through that mapping, so a session must never outlive it. Keep it below.
    udp_idle_timeout: float = 25.0
    udp_revalidate: float = 5.0  # re-check a UDP session's conntrack mapping at most this often
    first_stats: float = 1.0  # a busy session's first counters report comes this soon, so tables are live early
    stats_interval: float = 10.0  # then every interval
    drain_timeout: float = 5.0  # graceful shutdown: wait this long for live sessions, then close them
    backlog: int = 1024
    reuse_port: bool = True  # N worker processes share the listening port
    splice: bool | None = None  # None = zero-copy os.splice where the platform has it
    edge_triggered: bool | None = None  # None = epoll edge-triggered where available (fewer syscalls)
    batch: int = 64  # accepts / datagrams handled per readiness event before others get a turn

    def with_(self, **changes: Any) -> ProxyConfig:
        return replace(self, **changes)

    def tick(self) -> float:
        """How often deadlines are checked: a quarter of the shortest timeout, between 10 ms and 1 s."""
        shortest = min(self.read_timeout, self.write_timeout, self.dial_timeout, self.udp_idle_timeout)
        return max(0.01, min(1.0, shortest / 4, self.stats_interval / 2))
