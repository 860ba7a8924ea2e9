"""The ivpn process. Foundation stage: heartbeats only; the daemon client comes with its issue."""

from __future__ import annotations

from runtime.actor import Actor


class IvpnActor(Actor):
    """IVPN client interop."""

    name = "ivpn"
