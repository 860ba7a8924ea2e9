"""Everything the engine reaches outside itself, behind one object.

The engine (engine.py) decides packets; whatever it needs from the world comes through a `Ports`: the
clocks, its own pid and the uids our processes run as, the bus to publish on, the loop to schedule on, the
conntrack table, attribution (sock_diag, /proc), the name table and the external handler's slot. The actor
builds `ActorPorts` from the real parts; tests hand the engine one fake that implements the same protocol.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, Protocol

from core.dns.names import NameTable
from core.redirect import Redirect, RedirectTable
from core.verdict_handler import SLOT, HandlerSlot
from kernel.conntrack import Conntrack, CtEntry
from messages import Message, ProcessInfo
from messages.flows import FiveTuple

from .attribution import Attributor

#: Seconds a split UDP flow's owner stays in the redirect table: the proxy reads it when the flow's first
#: datagram arrives (milliseconds later), or when a socket takes the flow over; a later decision rewrites it.
SPLIT_OWNER_TTL = 120.0


class Ports(Protocol):
    """What the engine needs from outside. Every call is made on the engine's (the loop's) thread."""

    names: NameTable  # address → name, learned from DNS answers (shared by the workers)
    handler_slot: HandlerSlot  # the external verdict handler (read at every verdict)
    own_pid: int  # this process: always one of ours

    # --- clocks --------------------------------------------------------------------------------------
    def now(self) -> float:
        """Wall clock (s): event timestamps, connection ids, name TTLs, the late-answer memory."""
        ...

    def monotonic(self) -> float:
        """Monotonic clock (s): how long ago an actor's heartbeat was heard."""
        ...

    # --- the bus and the loop ------------------------------------------------------------------------
    def publish(self, msg: Message) -> Any: ...

    def call_later(self, delay: float, callback: Callable[[], Any]) -> Any:
        """Run `callback` on the engine's thread after `delay` s (0: once the current batch of packets is
        handled)."""
        ...

    # --- attribution: sock_diag, then /proc --------------------------------------------------------------
    def attribute(self, flow: FiveTuple) -> ProcessInfo | None:
        """The process holding the connection's socket; None when not found. May raise (then: not found)."""
        ...

    def socket_uid(self, flow: FiveTuple) -> int | None:
        """The uid owning the connection's socket (sock_diag alone), None when not found."""
        ...

    def socket_cookie(self, flow: FiveTuple, fresh: bool = False) -> int:
        """The cookie of the connection's socket (0: none). Without `fresh`, the socket the last attribution
        of this flow found; with it, the socket that owns the tuple now. May raise OSError."""
        ...

    def uid_of(self, pid: int) -> int | None:
        """The effective uid of a process, None when it is gone."""
        ...

    # --- conntrack -----------------------------------------------------------------------------------
    def conntrack_get(self, key: FiveTuple) -> CtEntry | None:
        """The entry whose original tuple is `key`, None when there is none. May raise OSError."""
        ...

    def conntrack_delete(self, key: FiveTuple) -> bool:
        """Delete the entry whose original tuple is `key` (False: it was gone). May raise OSError."""
        ...

    def drain_conntrack_events(self) -> None:
        """Read the destroy events waiting now and hand them to the engine (`on_conntrack_destroyed`)."""
        ...

    # --- the shared redirect table -------------------------------------------------------------------
    def publish_split_owner(self, flow: FiveTuple, mark: int, cookie: int) -> None:
        """Tell the UDP proxy which socket a split UDP flow was decided for (0: any socket), before its
        verdict is given (core/redirect.py)."""
        ...


class ActorPorts:
    """`Ports` from the real parts the actor owns. The engine calls these attributes directly (bound methods
    of the parts, no wrapper in between: they are on the verdict path)."""

    def __init__(
        self,
        *,
        names: NameTable,
        attributor: Attributor,
        conntrack: Conntrack,
        publish: Callable[[Message], Any],
        call_later: Callable[[float, Callable[[], Any]], Any],
        drain_conntrack_events: Callable[[], None],
        handler_slot: HandlerSlot = SLOT,
        redirects: RedirectTable | None = None,
    ) -> None:
        self.names = names
        self.handler_slot = handler_slot
        self.own_pid = os.getpid()
        self.now = time.time
        self.monotonic = time.monotonic
        self.publish = publish
        self.call_later = call_later
        self.attribute = attributor.attribute
        self.socket_uid = attributor.socket_uid
        self.socket_cookie = attributor.socket_cookie
        self.uid_of = attributor.uid_of
        self.conntrack_get = conntrack.get
        self.conntrack_delete = conntrack.delete
        self.drain_conntrack_events = drain_conntrack_events
        self.redirects = redirects

    def publish_split_owner(self, flow: FiveTuple, mark: int, cookie: int) -> None:
        if self.redirects is not None:  # a full probe window is counted by the table; the proxy then drops
            self.redirects.put(Redirect(flow, flow.src_port, mark, cookie), time.time() + SPLIT_OWNER_TTL)
