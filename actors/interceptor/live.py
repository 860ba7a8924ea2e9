"""The live connections: what this worker decided and still tracks, and their re-evaluation.

A live connection is keyed by its conntrack entry's original tuple (`ParsedPacket.conntrack_tuple()`: the
5-tuple, for ICMP echo with the echo id), the key destroy events and conntrack lookups give back. It
carries its verdict outcome, its process once known, its name, and the identities a verdict belongs to
(the socket's cookie, the conntrack entry's id: see README.md, "A verdict belongs to one connection").
UDP connections are also indexed by their local port, so a closed socket finds its flows at once.

Re-evaluation runs every live connection through the same filtering function as its first packet
(`verdict.decide`, handed in as `evaluate`) and names those whose verdict must change now
(`verdict.reevaluation_resets`); the engine re-queues them (deletes their conntrack entry) and ends them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, ItemsView, Iterator, ValuesView
from dataclasses import dataclass

from messages import ProcessInfo
from messages.flows import FiveTuple, IpProtocol

from .verdict import VerdictOutcome, reevaluation_resets

MAX_LIVE = 65536


@dataclass
class LiveConn:
    conn_id: str
    flow: FiveTuple  # as its first queued packet showed it (ICMP: ports 0)
    first_packet: bool  # that packet could start a connection (TCP: SYN without ACK)
    process: ProcessInfo | None  # None: not found (yet)
    domain: str
    own: bool  # one of splittun's own connections
    outcome: VerdictOutcome
    started: float
    socket_cookie: int = 0  # the socket the verdict was given for (0: not known)
    ct_id: int = 0  # its conntrack entry's id, where it had to be learned (0: not known)


class LiveTable:
    """Live connections by conntrack original tuple, oldest first; at most `max_live` (the oldest goes)."""

    def __init__(self, max_live: int = MAX_LIVE) -> None:
        self.max_live = max_live
        self._conns: OrderedDict[FiveTuple, LiveConn] = OrderedDict()
        self._udp_ports: dict[int, set[FiveTuple]] = {}  # live UDP flows by local port

    def get(self, key: FiveTuple) -> LiveConn | None:
        return self._conns.get(key)

    def __getitem__(self, key: FiveTuple) -> LiveConn:
        return self._conns[key]

    def __contains__(self, key: object) -> bool:
        return key in self._conns

    def __len__(self) -> int:
        return len(self._conns)

    def __iter__(self) -> Iterator[FiveTuple]:
        return iter(self._conns)

    def items(self) -> ItemsView[FiveTuple, LiveConn]:
        return self._conns.items()

    def values(self) -> ValuesView[LiveConn]:
        return self._conns.values()

    def track(self, key: FiveTuple, conn: LiveConn) -> bool:
        """Track `conn` under `key` (replacing what was there); True when the oldest connection was forgotten
        to make room."""
        self._conns[key] = conn
        if key.protocol == IpProtocol.UDP:
            self._udp_ports.setdefault(key.src_port, set()).add(key)
        if len(self._conns) > self.max_live:
            self.untrack(next(iter(self._conns)))
            return True
        return False

    def untrack(self, key: FiveTuple) -> LiveConn | None:
        conn = self._conns.pop(key, None)
        if conn is not None and key.protocol == IpProtocol.UDP:
            keys = self._udp_ports.get(key.src_port)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._udp_ports[key.src_port]
        return conn

    def udp_flows_on(self, port: int) -> list[FiveTuple]:
        """The live UDP connections from local port `port`."""
        keys = self._udp_ports.get(port)
        return list(keys) if keys else []

    def reevaluated(
        self, evaluate: Callable[[LiveConn], VerdictOutcome]
    ) -> Iterator[tuple[FiveTuple, LiveConn, VerdictOutcome]]:
        """Run every live connection through `evaluate` again and yield those that must be re-queued now
        (key, connection, new outcome). The caller may untrack them while iterating."""
        for key, conn in list(self._conns.items()):
            new = evaluate(conn)
            if reevaluation_resets(conn.flow.protocol, conn.outcome, new):
                yield key, conn, new
