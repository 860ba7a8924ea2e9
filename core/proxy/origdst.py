"""Where was the app going? The original destination the kernel's NAT rewrote, for TCP and UDP.

TCP: `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` on the accepted socket (the kernel looks up the
connection's conntrack entry by its hash: O(1)).

UDP has no per-flow socket, so the proxy asks conntrack over netlink for the entry whose REPLY tuple is
(proxy address → client address as seen): a single IPCTNL_MSG_CT_GET, which the kernel answers with a
hash lookup (`nf_conntrack_find_get`), so the cost does not grow with the size of the conntrack table.
The answer's ORIGINAL tuple holds the app's real source port and its original destination. (When one
app socket talks to several peers, the kernel's implicit source NAT gives each flow a different port
as the proxy sees it, which is why the REPLY tuple identifies the flow; see README.md.)

The ctnetlink messages and socket are kernel/conntrack.py, shared with the interceptor; the TCP proxy
uses the same lookup for a connection's conntrack mark.
"""

from __future__ import annotations

import errno
import socket
import struct
import time
from pathlib import Path

from core.redirect import Redirect, RedirectTable
from kernel.conntrack import IPS_SEEN_REPLY, Conntrack
from messages.flows import FiveTuple, IpProtocol
from messages.marks import Mark

from .decider import Address

SO_ORIGINAL_DST = 80
#: Seconds an announced upstream stays in the redirect table: its first packet follows at once, and the
#: interceptor remembers the flow from then on.
OWN_UPSTREAM_TTL = 60.0
IP6T_SO_ORIGINAL_DST = 80
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)

# --- SO_ORIGINAL_DST ----------------------------------------------------------------------------------


def parse_sockaddr(data: bytes) -> Address:
    """A kernel sockaddr_in / sockaddr_in6 (host byte order family, network byte order port)."""
    if len(data) < 8:
        raise ValueError(f"sockaddr too short ({len(data)} bytes)")
    family = struct.unpack_from("=H", data)[0]
    port = struct.unpack_from("!H", data, 2)[0]
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, data[4:8]), port
    if family == socket.AF_INET6 and len(data) >= 24:
        return socket.inet_ntop(socket.AF_INET6, data[8:24]), port
    raise ValueError(f"unexpected sockaddr family {family}")


def original_dst(sock: socket.socket) -> Address | None:
    """The pre-NAT destination of an accepted TCP connection; None when it was not NAT'd."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        else:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise
    return parse_sockaddr(raw)


# --- conntrack lookup by reply tuple --------------------------------------------------------------------


class ConntrackResolver:
    """Original addresses by conntrack reply-tuple lookup: (orig_client, orig_dst, mark, replied) or None;
    `replied`: a reply already went back down this entry (a flow older than the session asking).

    None means the kernel has no NAT record for the flow; other failures raise (OSError, ValueError)."""

    def __init__(self, conntrack: Conntrack | None = None, protocol: int = IpProtocol.UDP) -> None:
        self.ct = conntrack or Conntrack(timeout=1.0, rcvbuf=None)
        self.protocol = protocol

    def __call__(self, client: Address, listen: Address) -> tuple[Address, Address, int, bool] | None:
        reply = FiveTuple(self.protocol, listen[0], listen[1], client[0], client[1])
        entry = self.ct.lookup_reply(reply, with_reply=False)  # one new UDP flow each: parse only what is used
        if entry is None:
            return None
        return entry.orig.src, entry.orig.dst, entry.mark, bool(entry.status & IPS_SEEN_REPLY)

    def forget(self, client: Address, dst: Address) -> bool:
        """Delete the flow's entry (original tuple client → dst): its next datagram is NEW again."""
        return self.ct.delete(FiveTuple(self.protocol, client[0], client[1], dst[0], dst[1]))

    def close(self) -> None:
        self.ct.close()


# --- the divert backend's redirect table -----------------------------------------------------------------


class RedirectResolver:
    """Original addresses from the divert interceptor's redirect table (core/redirect.py): with a packet
    diverter there is no NAT in the kernel, so neither SO_ORIGINAL_DST nor conntrack knows them.
    Same answer as `ConntrackResolver`: (the app's address, its original destination, the split mark)."""

    conntrack_events = False  # no conntrack entries to watch: the interceptor's table expires flows

    def __init__(self, table: RedirectTable, protocol: int) -> None:
        self.table = table
        self.protocol = protocol

    def __call__(self, client: Address, listen: Address) -> tuple[Address, Address, int, bool] | None:
        found = self.table.lookup(self.protocol, client[0], client[1])
        if found is None or found.mark == Mark.SPLIT_EGRESS:  # an upstream of ours is never a client: no loop
            return None
        return found.flow.src, found.flow.dst, found.mark, False  # the diverter decided this flow just now

    def announce(self, local: Address, remote: Address) -> bool:
        """An upstream socket of ours, bound and not yet connected: the divert interceptor passes its packets
        untouched (what the 1720 socket mark does on NFQUEUE). False: no room in the table."""
        if not local[1]:
            return False
        flow = FiveTuple(self.protocol, local[0], local[1], remote[0], remote[1])
        return self.table.put(Redirect(flow, local[1], int(Mark.SPLIT_EGRESS)), time.time() + OWN_UPSTREAM_TTL)

    def close(self) -> None:
        self.table.close()


class SplitOwners:
    """Which app socket each split UDP flow was decided for (NFQUEUE): the cookie the interceptor put in the
    redirect table before the flow's verdict (core/redirect.py). Called as (the app's address, its original
    destination) → the socket's cookie, 0 when any socket will do (the verdict did not depend on it), None
    when the interceptor published nothing for the flow. Keyed by the app's address and port: one socket
    talking to several peers is one owner. The interceptor makes the table before it decides anything; with
    no table at all (no interceptor of ours publishes here: a proxy run on its own, as the proxy lab tests
    do) every answer is 0 and the proxy keeps to the socket it finds first. A table made anew (the
    interceptor restarted after `down`) is reopened."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.table: RedirectTable | None = None

    def __call__(self, client: Address, dst: Address) -> int | None:
        table = self.table
        if table is None or table.replaced():  # one stat per new session, beside its conntrack/sock_diag lookups
            if table is not None:
                table.close()
            try:
                table = self.table = RedirectTable(self.path, create=False)
            except OSError:
                table = self.table = None
                return 0
        found = table.lookup(IpProtocol.UDP, client[0], client[1])
        return None if found is None else found.cookie

    def close(self) -> None:
        if self.table is not None:
            self.table.close()
