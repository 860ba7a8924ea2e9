"""The netenv process. Foundation stage: heartbeats only; the netlink watcher comes with its issue."""

from __future__ import annotations

from actors.runtime import Actor


class NetenvActor(Actor):
    """Network environment watcher (netlink)."""

    name = "netenv"
