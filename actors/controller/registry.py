"""The connection registry: interceptor and proxy events joined into one record per connection.

The interceptor names a split connection by its flow key (client address + original destination) in
`conn.verdict`; the proxies publish the same key in `proxy.session.*`. Either may arrive first, so a
session that finds no connection waits (bounded) until the verdict comes. Memory is bounded: closed
connections roll off oldest first, and so do active ones whose end was never reported.
The resolver's `dns.query` events add how a name was resolved ("resolved via"): to the DNS query's own
connection (same flow key), and to later connections to an address its answer gave.
Pure logic: fed with decoded messages, queried with plain arguments.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

from messages import (
    ConnEnd,
    ConnNew,
    ConnVerdict,
    DnsQuery,
    ProxySessionClose,
    ProxySessionOpen,
    ProxySessionStats,
    SessionCounters,
    Verdict,
    verdict_verb,
)
from messages.control import ConnectionInfo, SplitInfo
from messages.flows import flow_key, protocol_name

DEFAULT_MAX_CLOSED = 2048
DEFAULT_MAX_ACTIVE = 16384
PENDING_SESSION_SECONDS = 30.0
MAX_RESOLVED = 4096  # DNS query flows and answer addresses remembered for "resolved via"


@dataclass
class SplitTunnelContext:
    """What the proxy did with a split connection."""

    session_id: str
    worker: str
    interface: str
    local_ip: str
    local_port: int
    opened: float
    closed: float | None = None
    reason: str = ""
    bytes_up: int = 0
    bytes_down: int = 0
    packets_up: int = 0
    packets_down: int = 0

    def count(self, counters: SessionCounters) -> None:
        self.bytes_up, self.bytes_down = counters.bytes_up, counters.bytes_down
        self.packets_up, self.packets_down = counters.packets_up, counters.packets_down


@dataclass
class ConnectionRecord:
    conn_id: str
    started: float
    protocol: str
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    ip_version: int = 4
    inbound: bool = False
    domain: str = ""
    pid: int = -1
    exe: str = ""
    process_name: str = ""
    cmdline: list[str] = field(default_factory=list)
    uid: int = -1
    verdict: int = int(Verdict.UNDECIDED)
    rule: str = ""
    reason: str = ""
    split_key: str = ""
    interface: str = ""
    ended: float | None = None
    end_reason: str = ""
    split: SplitTunnelContext | None = None
    resolved_via: str = ""  # DNS: which path and server answered ("split 192.0.2.1 via eth0", "vpn cache")

    @property
    def verb(self) -> str:
        return verdict_verb(self.verdict)

    @property
    def state(self) -> str:
        """closed once conntrack forgot it, or — sooner — once its proxy session closed (TCP entries
        linger in conntrack for minutes after the close)."""
        return "closed" if self.ended is not None or (self.split and self.split.closed is not None) else "open"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["verb"] = self.verb
        data["state"] = self.state
        return data

    def to_info(self) -> ConnectionInfo:
        """As the `connections` and `connection` ops answer it (messages/control.py)."""
        data = self.to_dict()
        split = data.pop("split")
        return ConnectionInfo(**data, split=None if split is None else SplitInfo(**split))

    def matches_app(self, text: str) -> bool:
        text = text.lower()
        return any(text in part.lower() for part in (self.exe, self.process_name, " ".join(self.cmdline)))


class ConnectionRegistry:
    def __init__(self, max_closed: int = DEFAULT_MAX_CLOSED, max_active: int = DEFAULT_MAX_ACTIVE) -> None:
        self.max_closed = max_closed
        self.max_active = max_active
        self._active: OrderedDict[str, ConnectionRecord] = OrderedDict()
        self._closed: OrderedDict[str, ConnectionRecord] = OrderedDict()
        self._by_split_key: dict[str, str] = {}
        self._pending: OrderedDict[str, tuple[float, SplitTunnelContext]] = OrderedDict()
        self._dns_conns: OrderedDict[str, str] = OrderedDict()  # a DNS query's flow key → its conn_id
        self._resolved: OrderedDict[str, str] = OrderedDict()  # an answer's address → how it was resolved
        self.rolled_off = 0

    # --- events -----------------------------------------------------------------------------------

    def on_conn_new(self, msg: ConnNew) -> None:
        rec = self._find(msg.conn_id)
        if rec is None:
            rec = ConnectionRecord(
                conn_id=msg.conn_id,
                started=msg.ts,
                protocol=protocol_name(msg.protocol),
                src_ip=msg.src_ip,
                src_port=msg.src_port,
                dst_ip=msg.dst_ip,
                dst_port=msg.dst_port,
            )
            self._active[msg.conn_id] = rec
            self._bound(self._active, self.max_active)
        rec.ip_version, rec.inbound, rec.domain = msg.ip_version, msg.inbound, msg.domain or rec.domain
        if msg.dst_port == 53:
            _remember(self._dns_conns, flow_key(msg.protocol, msg.src_ip, msg.src_port, msg.dst_ip, msg.dst_port),
                      msg.conn_id)  # fmt: skip
        else:
            rec.resolved_via = self._resolved.get(msg.dst_ip, rec.resolved_via)
        if msg.process is not None:
            p = msg.process
            rec.pid, rec.exe, rec.process_name, rec.cmdline, rec.uid = p.pid, p.exe, p.name, list(p.cmdline), p.uid

    def on_conn_verdict(self, msg: ConnVerdict) -> None:
        rec = self._find(msg.conn_id)
        if rec is None:
            return  # conn.new was lost (bus restart): nothing to attach the verdict to
        rec.verdict, rec.rule, rec.reason, rec.interface = int(msg.verdict), msg.rule, msg.reason, msg.interface
        if msg.split_key:
            rec.split_key = msg.split_key
            self._by_split_key[msg.split_key] = rec.conn_id
            pending = self._pending.pop(msg.split_key, None)
            if pending is not None:
                rec.split = pending[1]

    def on_conn_end(self, msg: ConnEnd) -> None:
        rec = self._active.pop(msg.conn_id, None)
        if rec is None:
            return
        rec.ended, rec.end_reason = msg.ts, msg.reason
        self._close(rec)

    def on_session_open(self, msg: ProxySessionOpen) -> None:
        ctx = SplitTunnelContext(
            session_id=msg.session_id,
            worker=msg.worker,
            interface=msg.interface,
            local_ip=msg.local_ip,
            local_port=msg.local_port,
            opened=msg.ts,
        )
        rec = self._by_key(msg.split_key)
        if rec is not None:
            rec.split = ctx
        else:
            self._pending[msg.split_key] = (time.monotonic(), ctx)
            self._expire_pending()

    def on_session_stats(self, msg: ProxySessionStats) -> None:
        ctx = self._session(msg.split_key, msg.session_id)
        if ctx is not None:
            ctx.count(msg.counters)

    def on_session_close(self, msg: ProxySessionClose) -> None:
        ctx = self._session(msg.split_key, msg.session_id)
        if ctx is None:
            return
        ctx.count(msg.counters)
        ctx.closed, ctx.reason = msg.ts, msg.reason

    def on_dns_query(self, msg: DnsQuery) -> None:
        if not msg.path:
            return
        via = f"{msg.path} {msg.upstream or 'cache'}" + (f" via {msg.interface}" if msg.interface else "")
        conn_id = self._dns_conns.get(msg.flow)
        rec = self._find(conn_id) if conn_id else None
        if rec is not None:
            rec.resolved_via = via
        for address in msg.addresses:
            _remember(self._resolved, address, via)

    def handle(self, msg: Any) -> bool:
        """Feed any message; True when it was one the registry uses."""
        handler = _HANDLERS.get(type(msg))
        if handler is None:
            return False
        handler(self, msg)
        return True

    # --- queries ----------------------------------------------------------------------------------

    def get(self, conn_id: str) -> ConnectionRecord | None:
        return self._find(conn_id)

    def query(self, verdict: int | None = None, app: str | None = None, limit: int = 200) -> list[ConnectionRecord]:
        """Newest first: active connections, then closed ones."""
        out: list[ConnectionRecord] = []
        for pool in (self._active, self._closed):
            for rec in reversed(pool.values()):
                if verdict is not None and rec.verdict != verdict:
                    continue
                if app and not rec.matches_app(app):
                    continue
                out.append(rec)
                if len(out) >= limit:
                    return out
        return out

    def counts(self) -> dict[str, int]:
        return {
            "connections_active": len(self._active),
            "connections_closed": len(self._closed),
            "sessions_pending": len(self._pending),
            "connections_rolled_off": self.rolled_off,
        }

    # --- internals --------------------------------------------------------------------------------

    def _find(self, conn_id: str) -> ConnectionRecord | None:
        return self._active.get(conn_id) or self._closed.get(conn_id)

    def _by_key(self, split_key: str) -> ConnectionRecord | None:
        conn_id = self._by_split_key.get(split_key)
        return self._find(conn_id) if conn_id else None

    def _session(self, split_key: str, session_id: str) -> SplitTunnelContext | None:
        rec = self._by_key(split_key)
        if rec is not None and rec.split is not None and rec.split.session_id == session_id:
            return rec.split
        pending = self._pending.get(split_key)
        return pending[1] if pending and pending[1].session_id == session_id else None

    def _close(self, rec: ConnectionRecord) -> None:
        self._closed[rec.conn_id] = rec
        self._bound(self._closed, self.max_closed)

    def _bound(self, pool: OrderedDict[str, ConnectionRecord], limit: int) -> None:
        while len(pool) > limit:
            _, old = pool.popitem(last=False)
            self.rolled_off += 1
            if old.split_key and self._by_split_key.get(old.split_key) == old.conn_id:
                del self._by_split_key[old.split_key]

    def _expire_pending(self) -> None:
        cutoff = time.monotonic() - PENDING_SESSION_SECONDS
        while self._pending and (next(iter(self._pending.values()))[0] < cutoff or len(self._pending) > 4096):
            self._pending.popitem(last=False)


def _remember(memory: OrderedDict[str, str], key: str, value: str) -> None:
    memory[key] = value
    memory.move_to_end(key)
    if len(memory) > MAX_RESOLVED:
        memory.popitem(last=False)


_HANDLERS = {
    ConnNew: ConnectionRegistry.on_conn_new,
    ConnVerdict: ConnectionRegistry.on_conn_verdict,
    ConnEnd: ConnectionRegistry.on_conn_end,
    ProxySessionOpen: ConnectionRegistry.on_session_open,
    ProxySessionStats: ConnectionRegistry.on_session_stats,
    ProxySessionClose: ConnectionRegistry.on_session_close,
    DnsQuery: ConnectionRegistry.on_dns_query,
}
