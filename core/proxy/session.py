"""Session context and the session cache (pure bookkeeping: no sockets here).

A `Session` is what the rest of splittun sees of one proxied flow: who, where to, through which
interface and local address, counters each way, and `close()`. The `SessionTable` holds the live
sessions with aggregate metrics and a second index by upstream destination, so "which proxied egress
connections go to IP:port?" is one dict lookup (Portmaster's FindProxiedEgressConnection).
Sessions are created and mutated on the proxy's data thread; other threads (the actor's loop answering
egress lookups) read through the table under its lock.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from messages.flows import canonical_ip, endpoint_text

from .decider import Address

_CANON: dict[str, str] = {}
_CANON_MAX = 4096


def canon(ip: str) -> str:
    """`canonical_ip` with a cache: a proxy sees the same few addresses over and over, and parsing one
    with `ipaddress` costs more than the rest of a session's bookkeeping."""
    found = _CANON.get(ip)
    if found is None:
        if len(_CANON) >= _CANON_MAX:
            _CANON.clear()
        found = _CANON[ip] = canonical_ip(ip)
    return found


def split_key(protocol: str, src: Address, dst: Address) -> str:
    """`messages.flows.flow_key` (the interceptor's key), through the address cache."""
    return f"{protocol} {endpoint_text(canon(src[0]), src[1])} {endpoint_text(canon(dst[0]), dst[1])}"


def _canon(addr: Address) -> Address:
    return (canon(addr[0]), int(addr[1]))


class Session:
    """One proxied flow. Counters are updated by the data path; `close()` is safe from any thread."""

    __slots__ = (
        "__weakref__",
        "_closer",
        "bytes_down",
        "bytes_up",
        "client",
        "close_reason",
        "closed",
        "created",
        "extra",
        "id",
        "interface",
        "last_seen",
        "listen",
        "local",
        "orig_client",
        "orig_dst",
        "packets_down",
        "packets_up",
        "protocol",
        "remote",
        "reported",
        "split_key",
        "stats_at",
    )

    def __init__(
        self,
        session_id: str,
        protocol: str,
        client: Address,
        listen: Address,
        orig_dst: Address | None,
        orig_client: Address | None = None,
        now: float | None = None,
    ) -> None:
        now = time.monotonic() if now is None else now
        self.id = session_id
        self.protocol = protocol
        self.client = client
        self.listen = listen
        self.orig_dst = orig_dst
        self.orig_client = orig_client or client
        self.remote: Address | None = None  # upstream destination the decider chose
        self.local: Address | None = None  # upstream socket's local address once it exists
        self.interface = ""
        self.extra: Mapping[str, Any] = {}
        self.created = now
        self.last_seen = now
        self.stats_at = now  # when counters were last reported
        self.reported = 0  # the progress count (`report_due`) at the last report; the open's is 0
        self.bytes_up = 0  # client → remote
        self.bytes_down = 0
        self.packets_up = 0
        self.packets_down = 0
        self.closed = False
        self.close_reason = ""
        self._closer: Callable[[str], None] | None = None
        dst = orig_dst or listen
        self.split_key = split_key(protocol, self.orig_client, dst)

    def report_due(self, now: float, moved: int, busy: bool, first: float, every: float) -> bool:
        """Whether to report counters now; True records the report. `moved` is the session's progress count
        (TCP: bytes, UDP: datagrams), `busy` whether it moved since the last sweep. Reports carry news only:
        none while nothing moved since the last (the open counts as one, of nothing). The first comes `first`
        s after the open if the session is busy then, so live tables show a busy session early; one quiet by
        then (a DNS query and its answer) reports after `every` s like the rest, or in its close if sooner."""
        if moved == self.reported:
            return False
        if now - self.stats_at < (first if busy and self.stats_at == self.created else every):
            return False
        self.stats_at = now
        self.reported = moved
        return True

    def close(self, reason: str = "closed") -> None:
        """Ask the proxy to end the session (resets a TCP session); returns at once."""
        closer = self._closer
        if closer is not None and not self.closed:
            closer(reason)

    def ended(self, reason: str) -> None:
        """The proxy ended the session (called on its data thread): closed for good, with why. The closer is
        dropped because it holds the proxy's connection object: without that cycle, refcounting frees the
        session at once instead of leaving it to the cycle collector."""
        self.closed = True
        self.close_reason = reason
        self._closer = None

    def age(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.created

    def counters(self) -> dict[str, int]:
        return {
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "packets_up": self.packets_up,
            "packets_down": self.packets_down,
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain, msgpack-able view (egress lookups, `sessions` requests)."""
        now = time.monotonic()
        return {
            "session_id": self.id,
            "protocol": self.protocol,
            "split_key": self.split_key,
            "client": list(self.orig_client),
            "orig_dst": list(self.orig_dst) if self.orig_dst else None,
            "remote": list(self.remote) if self.remote else None,
            "local": list(self.local) if self.local else None,
            "interface": self.interface,
            "age": round(now - self.created, 3),
            "idle": round(now - self.last_seen, 3),
            "extra": dict(self.extra),
            **self.counters(),
        }

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.split_key}{' closed' if self.closed else ''}>"


class SessionTable:
    """Live sessions by id and by upstream destination, with aggregate metrics."""

    def __init__(self, max_sessions: int = 2048, id_prefix: str | None = None) -> None:
        self.max_sessions = max_sessions
        self.id_prefix = f"{os.getpid():x}-" if id_prefix is None else id_prefix
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._by_id: dict[str, Session] = {}
        self._by_upstream: dict[Address, dict[str, Session]] = {}
        self.created = 0
        self.closed = 0
        self.refused = 0

    def new_id(self) -> str:
        return f"{self.id_prefix}{next(self._ids):x}"

    @property
    def active(self) -> int:
        return len(self._by_id)

    def full(self) -> bool:
        return len(self._by_id) >= self.max_sessions

    def add(self, session: Session) -> None:
        with self._lock:
            self._by_id[session.id] = session
            self.created += 1
            if session.remote is not None:
                self._by_upstream.setdefault(_canon(session.remote), {})[session.id] = session

    def set_remote(self, session: Session, remote: Address) -> None:
        """Record (or change) where the session's upstream goes, keeping the upstream index right."""
        with self._lock:
            self._unindex(session)
            session.remote = remote
            if session.id in self._by_id:
                self._by_upstream.setdefault(_canon(remote), {})[session.id] = session

    def remove(self, session: Session) -> bool:
        """Forget a session; False when it was not in the table."""
        with self._lock:
            if self._by_id.pop(session.id, None) is None:
                return False
            self._unindex(session)
            self.closed += 1
            return True

    def _unindex(self, session: Session) -> None:
        if session.remote is None:
            return
        key = _canon(session.remote)
        bucket = self._by_upstream.get(key)
        if bucket is not None:
            bucket.pop(session.id, None)
            if not bucket:
                del self._by_upstream[key]

    def refuse(self) -> None:
        self.refused += 1

    def get(self, session_id: str) -> Session | None:
        return self._by_id.get(session_id)

    def by_upstream(self, ip: str, port: int) -> list[Session]:
        """Sessions whose upstream goes to ip:port (O(1) plus the matches)."""
        with self._lock:
            bucket = self._by_upstream.get((canon(ip), int(port)))
            return list(bucket.values()) if bucket else []

    def sessions(self) -> list[Session]:
        with self._lock:
            return list(self._by_id.values())

    def __iter__(self) -> Iterator[Session]:
        return iter(self.sessions())

    def __len__(self) -> int:
        return len(self._by_id)

    def metrics(self) -> dict[str, int]:
        return {"active": self.active, "created": self.created, "closed": self.closed, "refused": self.refused}
