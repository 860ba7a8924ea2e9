"""The connection registry: interceptor and proxy events joined into one record per connection.

The interceptor names a split connection by its flow key (client address + original destination) with its
verdict (in `conn.new` since version 2, in `conn.verdict` before); the proxies publish the same key in
`proxy.session.*`. Either may arrive first, so a session that finds no connection waits (bounded) until the
verdict comes. Memory is bounded: closed connections roll off oldest first, and so do active ones whose end
was never reported.
The resolver's `dns.query` events add how a name was resolved ("resolved via"): to the DNS query's own
connection (same flow key), and to later connections to an address its answer gave.
Pure logic: fed with decoded messages, queried with plain arguments.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from typing import Any

from core.state import ConnectionFilter
from messages import (
    ConnEnd,
    ConnNew,
    ConnVerdict,
    DnsQuery,
    ProxySessionClose,
    ProxySessionOpen,
    ProxySessionStats,
    SessionCounters,
    verdict_verb,
)
from messages.control import ConnectionInfo, SplitInfo
from messages.flows import flow_key, protocol_name

DEFAULT_MAX_CLOSED = 2048
DEFAULT_MAX_ACTIVE = 16384
PENDING_SESSION_SECONDS = 30.0
MAX_RESOLVED = 4096  # DNS query flows and answer addresses remembered for "resolved via"


def _counted(split: SplitInfo, counters: SessionCounters, **changes: Any) -> SplitInfo:
    return dataclasses.replace(
        split,
        bytes_up=counters.bytes_up,
        bytes_down=counters.bytes_down,
        packets_up=counters.packets_up,
        packets_down=counters.packets_down,
        **changes,
    )


def _updated(rec: ConnectionInfo, **changes: Any) -> ConnectionInfo:
    """`rec` with `changes`, its verb and state derived again (one copy: this runs for every event): closed
    once conntrack forgot it, or — sooner — once its proxy session closed (TCP entries linger in conntrack for
    minutes after the close)."""
    ended = changes.get("ended", rec.ended)
    split = changes.get("split", rec.split)
    closed = ended is not None or (split is not None and split.closed is not None)
    changes["state"] = "closed" if closed else "open"
    changes["verb"] = verdict_verb(changes.get("verdict", rec.verdict))
    # The copy field by field, as the frozen dataclass's __init__ would: dataclasses.replace looks the fields
    # up again on every call and was the largest single cost of an event here (bench/messages_bench.py).
    new = _new_record(ConnectionInfo)
    for name in _RECORD_FIELDS:
        _set(new, name, changes[name] if name in changes else getattr(rec, name))
    return new


_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(ConnectionInfo))  # type: ignore[arg-type]
_new_record = object.__new__
_set = object.__setattr__


class ConnectionRegistry:
    """Connections as `ConnectionInfo` records (replaced whole on every event), live and recently closed.

    Every connection that closes is also queued for the state database: `take_closed()` hands them over."""

    def __init__(self, max_closed: int = DEFAULT_MAX_CLOSED, max_active: int = DEFAULT_MAX_ACTIVE) -> None:
        self.max_closed = max_closed
        self.max_active = max_active
        self._active: OrderedDict[str, ConnectionInfo] = OrderedDict()
        self._closed: OrderedDict[str, ConnectionInfo] = OrderedDict()
        self._by_split_key: dict[str, str] = {}
        self._pending: OrderedDict[str, tuple[float, SplitInfo]] = OrderedDict()
        self._to_store: dict[str, ConnectionInfo] = {}
        self._dns_conns: OrderedDict[str, str] = OrderedDict()  # a DNS query's flow key → its conn_id
        self._resolved: OrderedDict[str, str] = OrderedDict()  # an answer's address → how it was resolved
        self.rolled_off = 0

    # --- events -----------------------------------------------------------------------------------

    def on_conn_new(self, msg: ConnNew) -> None:
        rec = self._find(msg.conn_id)
        if rec is None:
            rec = ConnectionInfo(
                conn_id=msg.conn_id,
                started=msg.ts,
                protocol=protocol_name(msg.protocol),
                src_ip=msg.src_ip,
                src_port=msg.src_port,
                dst_ip=msg.dst_ip,
                dst_port=msg.dst_port,
            )
        changes: dict[str, Any] = {"ip_version": msg.ip_version, "inbound": msg.inbound}
        changes["domain"] = msg.domain or rec.domain
        if msg.dst_port == 53:
            _remember(self._dns_conns, flow_key(msg.protocol, msg.src_ip, msg.src_port, msg.dst_ip, msg.dst_port),
                      msg.conn_id)  # fmt: skip
        else:
            changes["resolved_via"] = self._resolved.get(msg.dst_ip, rec.resolved_via)
        if msg.process is not None:
            p = msg.process
            changes.update(pid=p.pid, exe=p.exe, process_name=p.name, cmdline=list(p.cmdline), uid=p.uid)
        if msg.verdict is not None:  # version 2: the verdict came with it (one record update, not two)
            self._verdict_changes(rec, msg, changes)
        self._put(_updated(rec, **changes))

    def on_conn_verdict(self, msg: ConnVerdict) -> None:
        rec = self._find(msg.conn_id)
        if rec is None:
            return  # conn.new was lost (bus restart): nothing to attach the verdict to
        changes: dict[str, Any] = {}
        self._verdict_changes(rec, msg, changes)
        self._put(_updated(rec, **changes))

    def _verdict_changes(self, rec: ConnectionInfo, msg: ConnNew | ConnVerdict, changes: dict[str, Any]) -> None:
        """What a verdict changes in a record (`msg`: a conn.verdict, or a conn.new carrying one)."""
        changes.update(verdict=int(msg.verdict or 0), rule=msg.rule, reason=msg.reason, interface=msg.interface)
        if msg.data_path == "kernel":  # no proxy session will tell: the interceptor said where it leaves
            changes["split"] = SplitInfo(
                session_id="",
                worker="kernel",
                interface=msg.interface,
                local_ip=msg.local_ip,
                local_port=rec.src_port,
                opened=msg.ts,
                data_path="kernel",
            )
        if msg.split_key:
            changes["split_key"] = msg.split_key
            self._by_split_key[msg.split_key] = rec.conn_id
            pending = self._pending.pop(msg.split_key, None)
            if pending is not None:
                changes["split"] = pending[1]

    def on_conn_end(self, msg: ConnEnd) -> None:
        rec = self._active.get(msg.conn_id) or self._closed.get(msg.conn_id)
        if rec is None or rec.ended is not None:
            return
        changes: dict[str, Any] = dict(ended=msg.ts, end_reason=msg.reason)
        if rec.split is not None and rec.split.data_path == "kernel":  # its end is its split's end
            split = dataclasses.replace(rec.split, closed=msg.ts, reason=msg.reason)
            changes["split"] = split if msg.counters is None else _counted(split, msg.counters)
        self._put(_updated(rec, **changes))

    def on_session_open(self, msg: ProxySessionOpen) -> None:
        split = SplitInfo(
            session_id=msg.session_id,
            worker=msg.worker,
            interface=msg.interface,
            local_ip=msg.local_ip,
            local_port=msg.local_port,
            opened=msg.ts,
        )
        rec = self._by_key(msg.split_key)
        if rec is not None:
            self._put(_updated(rec, split=split))
        else:
            self._pending[msg.split_key] = (time.monotonic(), split)
            self._expire_pending()

    def on_session_stats(self, msg: ProxySessionStats) -> None:
        self._update_session(msg.split_key, msg.session_id, lambda s: _counted(s, msg.counters))

    def on_session_close(self, msg: ProxySessionClose) -> None:
        if msg.opened is not None:  # version 2: a short session's open came inside its close
            self.on_session_open(msg.opened)
        self._update_session(
            msg.split_key, msg.session_id, lambda s: _counted(s, msg.counters, closed=msg.ts, reason=msg.reason)
        )

    def on_dns_query(self, msg: DnsQuery) -> None:
        if not msg.path:
            return
        via = f"{msg.path} {msg.upstream or 'cache'}" + (f" via {msg.interface}" if msg.interface else "")
        conn_id = self._dns_conns.get(msg.flow)
        rec = self._find(conn_id) if conn_id else None
        if rec is not None:
            self._put(_updated(rec, resolved_via=via))
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

    def get(self, conn_id: str) -> ConnectionInfo | None:
        return self._find(conn_id)

    def query(self, query: ConnectionFilter | None = None, now: float | None = None) -> list[ConnectionInfo]:
        """Newest first: active connections, then closed ones."""
        query = query or ConnectionFilter()
        now = time.time() if now is None else now
        out: list[ConnectionInfo] = []
        for pool in (self._active, self._closed):
            for rec in reversed(pool.values()):
                if not query.matches(rec, now):
                    continue
                out.append(rec)
                if len(out) >= query.limit:
                    return out
        return out

    def take_closed(self) -> list[ConnectionInfo]:
        """Connections that closed (or changed after closing) since the last call, for the state database."""
        rows = list(self._to_store.values())
        self._to_store.clear()
        return rows

    @property
    def closed_waiting(self) -> int:
        """How many closed connections `take_closed` would hand over now."""
        return len(self._to_store)

    def counts(self) -> dict[str, int]:
        return {
            "connections_active": len(self._active),
            "connections_closed": len(self._closed),
            "sessions_pending": len(self._pending),
            "connections_rolled_off": self.rolled_off,
        }

    # --- internals --------------------------------------------------------------------------------

    def _put(self, rec: ConnectionInfo) -> None:
        """Store the new version of a record in the pool its state belongs to."""
        if rec.state == "open":
            self._active[rec.conn_id] = rec
            self._bound(self._active, self.max_active)
            return
        if self._active.pop(rec.conn_id, None) is not None or rec.conn_id not in self._closed:
            self._closed[rec.conn_id] = rec
            self._bound(self._closed, self.max_closed)
        else:
            self._closed[rec.conn_id] = rec  # keeps its place: closed order is the order they closed in
        self._to_store[rec.conn_id] = rec

    def _find(self, conn_id: str) -> ConnectionInfo | None:
        return self._active.get(conn_id) or self._closed.get(conn_id)

    def _by_key(self, split_key: str) -> ConnectionInfo | None:
        conn_id = self._by_split_key.get(split_key)
        return self._find(conn_id) if conn_id else None

    def _update_session(self, split_key: str, session_id: str, change: Any) -> None:
        rec = self._by_key(split_key)
        if rec is not None and rec.split is not None and rec.split.session_id == session_id:
            self._put(_updated(rec, split=change(rec.split)))
            return
        pending = self._pending.get(split_key)
        if pending and pending[1].session_id == session_id:
            self._pending[split_key] = (pending[0], change(pending[1]))

    def _bound(self, pool: OrderedDict[str, ConnectionInfo], limit: int) -> None:
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
