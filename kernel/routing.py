"""Policy routing for split egress: `ip rule fwmark 1720 lookup 1720` plus table 1720 with a default route
via each split interface's gateway, IPv4 and IPv6.

Why: the VPN usually owns the default route (or, wg-quick style, diverts every unmarked packet into its
own table). Marked upstream sockets hit our rule first (priority 1720, ahead of wg-quick's 32764/32765),
and SO_BINDTODEVICE then selects the route through the chosen device in our table. Each route gets the
interface index as its metric, so several split interfaces can sit in one table side by side.

One owner: the interceptor's worker 0 keeps it (`RoutingKeeper`, reconciled after every network or policy
change and every 10 s) and never removes it when it stops, since the proxies may still be using it.
`splittun down` removes it once supervisord has stopped, and `python -m actors.interceptor --cleanup` by
hand (actors/interceptor/cleanup.py): `remove` finds ours by priority and table, so no state is needed.
The proxies only mark and bind their upstream sockets; standalone (tests, benchmarks) whoever runs them
applies a `SplitRouting` itself.

The plan comes from core/egress.py (`split_routes`: egresses in, routes out; None while the network or the
policy is unknown, never an empty plan for lack of a snapshot). `SplitRouting.apply` reconciles
the kernel to a plan (adds what is missing, removes what is stale, leaves what is right alone), so calling
it again and again is idempotent. `remove` takes everything out again.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from messages.marks import (
    BYPASS_ROUTE_TABLE,
    BYPASS_RULE_PRIORITY,
    KERNEL_RULE_PRIORITY,
    KERNEL_TABLE_BASE,
    SPLIT_ROUTE_TABLE,
    SPLIT_RULE_PRIORITY,
    Mark,
    split_mark,
)
from runtime.log import describe
from runtime.loop import until_slot

#: Seconds between reconciliations when nothing changed: repairs what another program (a VPN client) removed.
#: A new plan and every network change are applied at once; this pass (two netlink sessions and their dumps,
#: ~15 ms of CPU) was the largest part of an idle instance's CPU at 10 s (bench/RESULTS.md, "idle wakeups").
RECONCILE_INTERVAL = 30.0

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
    mark_index: int | None = None  # kernel data path: the interface index in the split marks it serves

    def __str__(self) -> str:
        via = f"via {self.gateway} " if self.gateway else ""
        marks = "" if self.mark_index is None else f" for split marks with index {self.mark_index}"
        return f"IPv{self.family} default {via}dev {self.interface}{marks}"


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

    def describe_rule(self) -> str:
        return f"fwmark {self.mark} lookup {self.table} priority {self.priority}"

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
            with _tolerate(_ENOENT, _ESRCH):  # another process may have just removed it
                ipr.rule("del", family=af, priority=self.priority, fwmark=r.get("FRA_FWMARK", 0), table=r["FRA_TABLE"])
        with _tolerate(_EEXIST):  # another process (a test, a second instance) may have just added it
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


def kernel_table(mark_index: int) -> int:
    """The routing table of split marks carrying this interface index (0 = the global choice)."""
    return KERNEL_TABLE_BASE + mark_index


class KernelPathRouting:
    """The kernel data path's routing: one rule and table per interface index a split mark can carry,
    `fwmark 1719|index<<16 lookup KERNEL_TABLE_BASE+index` at priority 1719, each table holding the
    default route(s) through that interface (index 0: the global choice). An app's split connection is
    re-routed by its verdict's mark alone: no socket option, no proxy.

    Harmless beside the proxy path: a connection DNAT-ed to a local proxy finds the local table first
    (priority 0), so these rules only ever see packets that leave the host. Like `SplitRouting` it is
    found again by priority and table range, so `remove` needs no state (also after a crash).
    """

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self.table = KERNEL_TABLE_BASE
        self.priority = KERNEL_RULE_PRIORITY

    def describe_rule(self) -> str:
        return (
            f"fwmark {int(Mark.REROUTE_TO_SPLIT_TUN)}|index<<16 lookup {KERNEL_TABLE_BASE}+index "
            f"priority {KERNEL_RULE_PRIORITY}"
        )

    def _one(self, index: int) -> SplitRouting:
        return SplitRouting(self.netns, split_mark(index), kernel_table(index), KERNEL_RULE_PRIORITY)

    def apply(self, routes: Sequence[SplitRoute]) -> list[str]:
        """Make the kernel match `routes` (each with its mark_index); indexes no longer wanted go."""
        by_index: dict[int, list[SplitRoute]] = {}
        for r in routes:
            by_index.setdefault(r.mark_index or 0, []).append(r)
        changes: list[str] = []
        for index, mine in sorted(by_index.items()):
            changes += self._one(index).apply(mine)
        for index in sorted(self.installed_indexes() - set(by_index)):
            changes += self._one(index).remove()
        return changes

    def remove(self) -> list[str]:
        changes: list[str] = []
        for index in sorted(self.installed_indexes()):
            changes += self._one(index).remove()
        return changes

    def installed_indexes(self) -> set[int]:
        """Interface indexes that have a rule of ours (either family)."""
        found: set[int] = set()
        with contextlib.closing(self._one(0)._ipr()) as ipr:
            for af in _FAMILIES.values():
                for msg in ipr.get_rules(family=af):
                    attrs = dict(msg["attrs"])
                    table = attrs.get("FRA_TABLE", 0)
                    if attrs.get("FRA_PRIORITY") == KERNEL_RULE_PRIORITY and 0 <= table - KERNEL_TABLE_BASE <= 0xFFFF:
                        found.add(table - KERNEL_TABLE_BASE)
        return found

    def current(self) -> dict[str, Any]:
        return {str(index): self._one(index).current() for index in sorted(self.installed_indexes())}


_EEXIST, _ENOENT, _ESRCH = errno.EEXIST, errno.ENOENT, errno.ESRCH


@dataclass(frozen=True, slots=True)
class HostRoute:
    """One bypass route: `destination` (an address or CIDR) via `gateway` on `interface`."""

    family: int
    destination: str
    gateway: str
    interface: str

    def __str__(self) -> str:
        return f"{self.destination} via {self.gateway} dev {self.interface}"


class BypassRouting:
    """Table 717 (host routes outside the VPN) and the rule `lookup 717` at priority 717, both IP versions.

    Whoever applies it (the ivpn actor while IVPN connects) passes the whole plan each time; `remove` needs no
    state (finds ours by table and priority), so `splittun down` takes it away after any stop."""

    def __init__(self, netns: str | None = None, table: int = BYPASS_ROUTE_TABLE,
                 priority: int = BYPASS_RULE_PRIORITY) -> None:  # fmt: skip
        self.netns = netns
        self.table = table
        self.priority = priority

    def _ipr(self) -> Any:
        from pyroute2 import IPRoute

        return IPRoute(netns=self.netns) if self.netns else IPRoute()

    def _rules(self, ipr: Any, af: int) -> list[dict[str, Any]]:
        return [
            attrs
            for msg in ipr.get_rules(family=af)
            if (attrs := dict(msg["attrs"])).get("FRA_PRIORITY") == self.priority
            and attrs.get("FRA_TABLE") == self.table
        ]

    def _routes(self, ipr: Any, af: int) -> dict[tuple[str, str, int], Any]:
        out = {}
        for msg in ipr.get_routes(family=af, table=self.table):
            attrs = dict(msg["attrs"])
            if attrs.get("RTA_TABLE", msg.get("table")) != self.table or "RTA_DST" not in attrs:
                continue
            out[(f"{attrs['RTA_DST']}/{msg['dst_len']}", attrs.get("RTA_GATEWAY", ""), attrs.get("RTA_OIF", 0))] = msg
        return out

    def apply(self, routes: Sequence[HostRoute]) -> list[str]:
        """Make table 717 and its rule match `routes` (no routes: nothing of ours stays); what changed."""
        if not routes:
            return self.remove()
        changes: list[str] = []
        with contextlib.closing(self._ipr()) as ipr:
            for fam, af in _FAMILIES.items():
                wanted = {}
                for r in routes:
                    if r.family == fam and (index := _ifindex(ipr, r.interface)):
                        wanted[(_cidr(r.destination), r.gateway, index)] = r
                have = self._routes(ipr, af)
                for key in have:
                    if key not in wanted:
                        with _tolerate(_ENOENT, _ESRCH):
                            ipr.route("del", family=af, dst=key[0], table=self.table, gateway=key[1] or None,
                                      oif=key[2])  # fmt: skip
                        changes.append(f"removed bypass {key[0]} via {key[1]}")
                for key, r in wanted.items():
                    if key not in have:
                        ipr.route("replace", family=af, dst=key[0], gateway=r.gateway, oif=key[2], table=self.table)
                        changes.append(f"added bypass {r} table {self.table}")
                if wanted and not self._rules(ipr, af):
                    with _tolerate(_EEXIST):
                        ipr.rule("add", family=af, table=self.table, priority=self.priority)
                        changes.append(f"added IPv{fam} rule lookup {self.table} priority {self.priority}")
                elif not wanted:
                    changes += self._remove_rules(ipr, fam, af)
        return changes

    def _remove_rules(self, ipr: Any, fam: int, af: int) -> list[str]:
        changes = []
        for _ in self._rules(ipr, af):
            with _tolerate(_ENOENT, _ESRCH):
                ipr.rule("del", family=af, table=self.table, priority=self.priority)
                changes.append(f"removed IPv{fam} rule lookup {self.table} priority {self.priority}")
        return changes

    def remove(self) -> list[str]:
        """Take the rule and every route of table 717 out (idempotent)."""
        changes: list[str] = []
        with contextlib.closing(self._ipr()) as ipr:
            for fam, af in _FAMILIES.items():
                changes += self._remove_rules(ipr, fam, af)
                for (dst, gateway, oif), _msg in self._routes(ipr, af).items():
                    with _tolerate(_ENOENT, _ESRCH):
                        ipr.route("del", family=af, dst=dst, table=self.table, gateway=gateway or None, oif=oif)
                        changes.append(f"removed bypass {dst} via {gateway}")
        return changes

    def current(self) -> dict[str, Any]:
        with contextlib.closing(self._ipr()) as ipr:
            return {
                f"ipv{fam}": {"rules": len(self._rules(ipr, af)), "routes": sorted(k[0] for k in self._routes(ipr, af))}
                for fam, af in _FAMILIES.items()
            }


def _cidr(destination: str) -> str:
    return str(ipaddress.ip_network(destination, strict=False))


@contextlib.contextmanager
def _tolerate(*codes: int) -> Iterator[None]:
    """Swallow these netlink error codes: two processes reconciling at once race harmlessly."""
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


class RoutingKeeper:
    """Keeps the split routing at the latest plan it was given, from a thread of its own: `want` never waits
    for netlink, so the caller's loop (the interceptor's verdicts) never does either.

    It applies each new plan at once and the current one again every `interval` seconds. Until the first
    plan arrives it touches nothing (a restarted owner must not take away routing the proxies are using).
    A failure is counted (`errors`) and logged once per distinct error, not per attempt. Stopping leaves
    the routing in place: removing it is `splittun down`'s job, after every proxy has stopped.
    """

    def __init__(self, routing: SplitRouting, log: Any, interval: float = RECONCILE_INTERVAL) -> None:
        self.routing = routing
        self.log = log
        self.interval = interval
        self.errors = 0
        self.changes = 0
        self.installed: list[SplitRoute] | None = None  # the plan last applied without error
        self.applied_at = 0.0
        self.last_error = ""
        self._wanted: list[SplitRoute] | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._logged_errors: set[str] = set()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="split-routing", daemon=True)
        self._thread.start()

    def want(self, routes: Sequence[SplitRoute] | None, recheck: bool = False) -> None:
        """Apply `routes` soon (None: no plan known, nothing changes). Returns at once. The same plan again
        waits for the next periodic pass unless `recheck` (the network changed: someone may have removed a
        route of ours)."""
        if routes is None:
            return
        with self._lock:
            changed, self._wanted = self._wanted != list(routes), list(routes)
        if changed or recheck:
            self._wake.set()

    def stop(self, timeout: float = 0.5) -> None:
        """Stop reconciling; the routing stays as it is."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(until_slot(self.interval))  # the periodic pass wakes with the heartbeats
            self._wake.clear()
            if not self._stopping.is_set():
                self.reconcile()

    def reconcile(self) -> list[str] | None:
        """Apply the wanted plan now; what changed, or None when there is no plan yet or it failed."""
        with self._lock:
            routes = self._wanted
        if routes is None:
            return None
        try:
            changes = self.routing.apply(routes)
        except Exception as exc:
            self.errors += 1
            self.last_error = describe(exc)
            if self.last_error not in self._logged_errors and len(self._logged_errors) < 64:
                self._logged_errors.add(self.last_error)
                self.log.error("routing.failed", error=self.last_error, failures=self.errors)
            return None
        if self.last_error:
            self.log.info("routing.recovered", after_failures=self.errors)
            self.last_error = ""
        self.installed, self.applied_at = routes, time.time()
        self.changes += len(changes)
        for change in changes:
            self.log.info("routing.changed", change=change)
        return changes

    def not_ready(self) -> str:
        """Why split connections may find no routing ("" once a plan is installed and the last try worked)."""
        if self.last_error:
            return f"split routing failed: {self.last_error}"
        if self.installed is None:
            return "split routing not installed yet: waiting for the network state and the policy"
        return ""

    def status(self) -> dict[str, Any]:
        """What is installed (as far as this keeper applied it) and how reconciling goes."""
        return {
            "owner": True,
            "rule": self.routing.describe_rule(),
            "table": self.routing.table,
            "installed": None if self.installed is None else [str(r) for r in self.installed],
            "applied_at": self.applied_at,
            "wanted": None if self._wanted is None else [str(r) for r in self._wanted],
            "errors": self.errors,
            "last_error": self.last_error,
        }
