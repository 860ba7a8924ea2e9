"""The netenv process: watch netlink, publish `netenv.changed` with the whole snapshot, answer lookups.

- Any link, address, route or rule change (of this network namespace) schedules a refresh. Refreshes
  are coalesced: the first change after a quiet second is read after `SETTLE` (so the rest of a burst
  lands in the same read), later ones at most once per `MIN_INTERVAL`. So a burst of 100 changes
  costs a couple of reads, the last change is published within ~1 s, and there is never more than
  one publish per second.
- A refresh publishes only when the snapshot differs from the last published one (`seq` + 1). The
  last message is repeated unchanged (same `seq`) every `--republish` seconds for late subscribers.
- Requests (messages/control.py, `Netenv`): `snapshot` (the last published message), `lookup`
  {query | ip | mac | name} (an interface record or nil), `location` {disabled: bool} (the location gate;
  reflected in the next message).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from core.netenv import rtnl
from core.netenv.cache import (
    Netenv,
    NetenvError,
    disable_network_derived_location,
    network_derived_location_disabled,
)
from core.netenv.info import InterfaceInfo, Snapshot
from messages.control import INVALID_ARGUMENT, UNAVAILABLE, Location, Lookup, NoArgs, RequestFailed
from messages.control import Netenv as NetenvOps
from messages.events import InterfaceRecord, NetenvChanged
from runtime.actor import Actor, answers

SETTLE = 0.1  # wait this long after the first change of a burst before reading
MIN_INTERVAL = 1.0  # never read (so never publish) more often than this
REPUBLISH = 30.0  # late subscribers ask at start (snapshot); this covers a dropped publish
RETRY = 5.0  # after a refresh that failed with nothing to fall back on


def refresh_delay(
    now: float, last_refresh: float | None, settle: float = SETTLE, interval: float = MIN_INTERVAL
) -> float:
    """Seconds from `now` until the refresh a change at `now` calls for."""
    if last_refresh is None:
        return settle
    return max(settle, last_refresh + interval - now)


class NetenvActor(Actor):
    """Network environment: interfaces, gateways and the physical uplink, live from netlink."""

    name = "netenv"
    control = NetenvOps

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--republish", type=float, default=REPUBLISH, help="repeat the last snapshot every N s (0 = never)"
        )

    def start(self) -> None:
        self.netenv = Netenv(max_age=MIN_INTERVAL)
        self.monitor = rtnl.Monitor()
        self.rt.loop.add_fd(self.monitor.fileno(), self._on_netlink)
        self.seq = 0
        self.published: Snapshot | None = None
        self.message: NetenvChanged | None = None
        self.published_location: bool | None = None
        self.last_refresh: float | None = None
        self.last_publish = 0.0
        self.pending: Any = None  # the scheduled refresh timer
        self.refreshes = 0
        self.publishes = 0
        self.refresh_failures = 0
        self._refresh()
        republish = float(getattr(self.rt.args, "republish", REPUBLISH))
        if republish > 0:
            self.rt.loop.call_every_slot(republish, lambda: self._republish(republish))  # with the heartbeats

    def stop(self) -> None:
        monitor = getattr(self, "monitor", None)
        if monitor is not None:
            self.rt.loop.remove(monitor.fileno())
            monitor.close()
        if getattr(self, "netenv", None) is not None:
            self.netenv.close()

    # --- changes ----------------------------------------------------------------------------------

    def _on_netlink(self) -> None:
        if self.monitor.drain():
            self._schedule()

    def _schedule(self) -> None:
        if self.pending is not None:
            return  # the refresh already scheduled will see this change too
        delay = refresh_delay(time.monotonic(), self.last_refresh)
        self.pending = self.rt.loop.call_later(delay, self._refresh)

    def _refresh(self) -> None:
        self.pending = None
        self.last_refresh = time.monotonic()
        try:
            snap = self.netenv.refresh()
        except NetenvError as exc:
            self.refresh_failures += 1
            self.log.error("netenv.refresh_failed", error=str(exc), retry_in=f"{RETRY}s")
            self.pending = self.rt.loop.call_later(RETRY, self._refresh)
            return
        self.refreshes += 1
        self._publish_if_changed(snap)

    def _publish_if_changed(self, snap: Snapshot) -> None:
        location = network_derived_location_disabled()
        if snap.same_as(self.published) and location == self.published_location:
            return
        self.seq += 1
        self.message = snap.to_message(self.seq, location_disabled=location)
        self.published, self.published_location = snap, location
        self._send()
        up4, up6 = snap.uplink(4), snap.uplink(6)
        self.log.info(
            "netenv.changed",
            seq=self.seq,
            interfaces=len(snap.interfaces),
            uplink4=f"{up4.interface.name} via {up4.gateway or '?'} ({up4.origin})" if up4 else "none",
            uplink6=f"{up6.interface.name} via {up6.gateway or '?'} ({up6.origin})" if up6 else "none",
            default4=snap.default_route.get(4) or "none",
            default6=snap.default_route.get(6) or "none",
        )

    def _send(self) -> None:
        if self.message is not None:
            self.rt.publish(self.message)
            self.publishes += 1
            self.last_publish = time.monotonic()

    def _republish(self, interval: float) -> None:
        if time.monotonic() - self.last_publish >= interval * 0.9:
            self._send()

    # --- requests ---------------------------------------------------------------------------------

    @answers(NetenvOps.SNAPSHOT)
    def answer_snapshot(self, args: NoArgs) -> NetenvChanged:
        if self.message is None:
            raise RequestFailed(UNAVAILABLE, "no snapshot yet: the network state could not be read")
        return self.message

    @answers(NetenvOps.LOOKUP)
    def answer_lookup(self, args: Lookup) -> InterfaceRecord | None:
        snap = self.netenv.snapshot()
        found: InterfaceInfo | None
        if args.query is not None:
            found = snap.lookup(args.query)
        elif args.ip is not None:
            found = snap.by_ip_text(args.ip)
        elif args.mac is not None:
            found = snap.by_mac.get(args.mac.strip().lower().replace("-", ":"))
        elif args.name is not None:
            found = snap.by_name.get(args.name)
        else:
            raise RequestFailed(INVALID_ARGUMENT, "lookup needs one of query, ip, mac, name")
        return None if found is None else found.to_record()

    @answers(NetenvOps.LOCATION)
    def answer_location(self, args: Location) -> Location:
        disable_network_derived_location(args.disabled)
        self._schedule()  # the next message says so (rate limit as for any change)
        return Location(disabled=network_derived_location_disabled())

    def counters(self) -> dict[str, int]:
        monitor = getattr(self, "monitor", None)
        return {
            "netlink_events": monitor.events if monitor else 0,
            "netlink_overruns": monitor.overruns if monitor else 0,
            "refreshes": getattr(self, "refreshes", 0),
            "refresh_failures": getattr(self, "refresh_failures", 0),
            "snapshots_published": getattr(self, "publishes", 0),
            "seq": getattr(self, "seq", 0),
        }
