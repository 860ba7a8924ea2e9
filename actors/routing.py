"""Policy routing for split egress: `ip rule fwmark 1720 lookup 1720` plus table 1720 with a default route
via each split interface's gateway, IPv4 and IPv6.

Why: the VPN usually owns the default route (or, wg-quick style, diverts every unmarked packet into its
own table). Marked upstream sockets hit our rule first (priority 1720, ahead of wg-quick's 32764/32765),
and SO_BINDTODEVICE then selects the route through the chosen device in our table. Each route gets the
interface index as its metric, so several split interfaces can sit in one table side by side.

`plan` is pure (egresses in, routes out); `SplitRouting.apply` reconciles the kernel to the plan (adds
what is missing, removes what is stale, leaves what is right alone), so calling it again and again is
idempotent, and two processes applying the same plan converge. `remove` takes everything out again.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from actors.netenv.egress import Egress
from messages.marks import SPLIT_ROUTE_TABLE, SPLIT_RULE_PRIORITY, Mark

_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}
_DEFAULT = {4: "0.0.0.0/0", 6: "::/0"}
_FULL_MASK = 0xFFFFFFFF
_SCOPE_LINK = 253


@dataclass(frozen=True, slots=True)
class SplitRoute:
    family: int
    interface: str
    gateway: str = ""  # "" = device route (point-to-point links only)
    ifindex: int = 0

    def __str__(self) -> str:
        via = f"via {self.gateway} " if self.gateway else ""
        return f"IPv{self.family} default {via}dev {self.interface}"


def plan(egresses: Iterable[Egress]) -> list[SplitRoute]:
    """The split table's routes for these egresses (one per family and interface)."""
    routes: dict[tuple[int, str], SplitRoute] = {}
    for e in egresses:
        if e.gateway or e.point_to_point:
            routes[(e.family, e.interface)] = SplitRoute(e.family, e.interface, e.gateway, e.ifindex)
    return sorted(routes.values(), key=lambda r: (r.family, r.interface))


class SplitRouting:
    """Installs and removes the split rule and table (in `netns`, default: this process's namespace)."""

    def __init__(
        self,
        netns: str | None = None,
        mark: int = Mark.SPLIT_EGRESS,
        table: int = SPLIT_ROUTE_TABLE,
        priority: int = SPLIT_RULE_PRIORITY,
    ) -> None:
        self.netns = netns
        self.mark = mark
        self.table = table
        self.priority = priority

    def _ipr(self) -> Any:
        from pyroute2 import IPRoute  # imported late: library users without routing never need it

        return IPRoute(netns=self.netns) if self.netns else IPRoute()

    def apply(self, routes: Sequence[SplitRoute]) -> list[str]:
        """Make the kernel match `routes`; returns what changed (empty when it already did)."""
        changes: list[str] = []
        with contextlib.closing(self._ipr()) as ipr:
            for fam, af in _FAMILIES.items():
                changes += self._ensure_rule(ipr, fam, af)
                wanted: dict[tuple[int, str], SplitRoute] = {}
                for r in routes:
                    if r.family != fam:
                        continue
                    index = r.ifindex or _ifindex(ipr, r.interface)
                    if index:
                        wanted[(index, r.gateway)] = r
                    else:
                        changes.append(f"skipped {r}: no such interface")
                have = self._routes(ipr, af)
                for (index, gateway, metric), msg in have.items():
                    if (index, gateway) not in wanted or metric != index:
                        with _tolerate(_ENOENT, _ESRCH):
                            ipr.route("del", **_route_args(msg, af, self.table))
                        changes.append(f"removed IPv{fam} default via {gateway or '-'} ifindex {index}")
                present = {(i, g) for (i, g, m) in have if m == i}
                for (index, gateway), r in wanted.items():
                    if (index, gateway) in present:
                        continue
                    args: dict[str, Any] = {"family": af, "dst": _DEFAULT[fam], "oif": index}
                    args.update(table=self.table, priority=index)
                    if gateway:
                        args["gateway"] = gateway
                    else:
                        args["scope"] = _SCOPE_LINK
                    ipr.route("replace", **args)
                    changes.append(f"added {r} table {self.table}")
        return changes

    def remove(self) -> list[str]:
        """Take the rule and every route of the split table out (idempotent)."""
        changes: list[str] = []
        with contextlib.closing(self._ipr()) as ipr:
            for fam, af in _FAMILIES.items():
                for rule in self._our_rules(ipr, af):
                    with _tolerate(_ENOENT, _ESRCH):
                        ipr.rule("del", family=af, priority=self.priority, fwmark=rule.get("FRA_FWMARK", 0),
                                 table=rule.get("FRA_TABLE", self.table))  # fmt: skip
                        changes.append(f"removed IPv{fam} rule fwmark {self.mark} lookup {self.table}")
                for (index, gateway, _metric), msg in self._routes(ipr, af).items():
                    with _tolerate(_ENOENT, _ESRCH):
                        ipr.route("del", **_route_args(msg, af, self.table))
                        changes.append(f"removed IPv{fam} default via {gateway or '-'} ifindex {index}")
        return changes

    def _our_rules(self, ipr: Any, af: int) -> list[dict[str, Any]]:
        found = []
        for msg in ipr.get_rules(family=af):
            attrs = dict(msg["attrs"])
            if attrs.get("FRA_PRIORITY") == self.priority and (
                attrs.get("FRA_TABLE") == self.table or attrs.get("FRA_FWMARK") == self.mark
            ):
                found.append(attrs)
        return found

    def _ensure_rule(self, ipr: Any, fam: int, af: int) -> list[str]:
        rules = self._our_rules(ipr, af)
        good = [
            r
            for r in rules
            if r.get("FRA_FWMARK") == self.mark
            and r.get("FRA_FWMASK", _FULL_MASK) == _FULL_MASK
            and r.get("FRA_TABLE") == self.table
        ]
        changes = []
        if len(good) == 1 and len(rules) == 1:
            return changes
        for r in rules:  # stale or duplicate: rebuild from scratch
            with _tolerate(_ENOENT, _ESRCH):  # another worker may have just removed it
                ipr.rule("del", family=af, priority=self.priority, fwmark=r.get("FRA_FWMARK", 0), table=r["FRA_TABLE"])
        with _tolerate(_EEXIST):  # another worker (proxy_tcp vs proxy_udp) may have just added it
            ipr.rule("add", family=af, fwmark=self.mark, fwmask=_FULL_MASK, table=self.table, priority=self.priority)
            changes.append(f"added IPv{fam} rule fwmark {self.mark} lookup {self.table} priority {self.priority}")
        return changes

    def _routes(self, ipr: Any, af: int) -> dict[tuple[int, str, int], Any]:
        out = {}
        for msg in ipr.get_routes(family=af, table=self.table):
            attrs = dict(msg["attrs"])
            if attrs.get("RTA_TABLE", msg.get("table")) != self.table or msg.get("dst_len") != 0:
                continue
            key = (attrs.get("RTA_OIF", 0), attrs.get("RTA_GATEWAY", ""), attrs.get("RTA_PRIORITY", 0))
            out[key] = msg
        return out

    def current(self) -> dict[str, Any]:
        """What is installed now (for status and tests)."""
        with contextlib.closing(self._ipr()) as ipr:
            return {
                f"ipv{fam}": {
                    "rules": len(self._our_rules(ipr, af)),
                    "routes": sorted((g, i, m) for (i, g, m) in self._routes(ipr, af)),
                }
                for fam, af in _FAMILIES.items()
            }


_EEXIST, _ENOENT, _ESRCH = errno.EEXIST, errno.ENOENT, errno.ESRCH


@contextlib.contextmanager
def _tolerate(*codes: int) -> Iterator[None]:
    """Swallow these netlink error codes: two workers reconciling at once race harmlessly."""
    try:
        yield
    except Exception as exc:  # pyroute2's NetlinkError carries the errno as .code
        if getattr(exc, "code", getattr(exc, "errno", None)) not in codes:
            raise


def _ifindex(ipr: Any, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else 0


def _route_args(msg: Any, af: int, table: int) -> dict[str, Any]:
    """What deletes exactly this route. The scope matters: without it the kernel looks for a universe
    route and answers ESRCH for the link-scope default a point-to-point egress gets."""
    attrs = dict(msg["attrs"])
    args: dict[str, Any] = {
        "family": af,
        "dst": _DEFAULT[4 if af == socket.AF_INET else 6],
        "table": table,
        "scope": msg["scope"],
    }
    for key, name in (("RTA_OIF", "oif"), ("RTA_GATEWAY", "gateway"), ("RTA_PRIORITY", "priority")):
        if key in attrs:
            args[name] = attrs[key]
    return args
