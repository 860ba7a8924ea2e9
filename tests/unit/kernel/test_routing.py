"""The split policy routing's pure parts and its keeper, with plain objects: the plan from a netenv snapshot
and a policy, "nothing known yet → nothing applied", reconciling off the caller's thread, errors counted and
logged once, and the interceptor handing it plans. (The kernel side: test_proxy_netns.py; in the lab with
proxies stopping and kill -9: test_split_routing.py.)"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Any

from actors.interceptor.actor import InterceptorActor
from core.egress import kernel_routes, plan_routes, split_egresses, split_routes
from core.policy import EMPTY_POLICY, CompiledPolicy
from kernel.routing import RoutingKeeper, SplitRoute, kernel_table
from messages import NetenvChanged, PolicyRule, PolicySnapshot
from tests.unit.core.proxy.test_units import netenv

ETH0_V4 = SplitRoute(4, "eth0", "192.0.2.1", 2)
ETH0_V6 = SplitRoute(6, "eth0", "2001:db8:10::1", 2)
WLAN0_V4 = SplitRoute(4, "wlan0", "198.51.100.1", 3)


def policy(interface: str = "", *rule_interfaces: str, version: int = 1) -> PolicySnapshot:
    rules = [PolicyRule(id=f"r{i}", action="split", dest="203.0.113.80", interface=name)
             for i, name in enumerate(rule_interfaces)]  # fmt: skip
    return PolicySnapshot(version=version, ts=0.0, enabled=True, interface=interface, rules=rules)


# --- the plan ------------------------------------------------------------------------------------------


def test_plan_is_the_global_choice_plus_every_interface_a_rule_names() -> None:
    assert split_routes(netenv(), policy()) == [ETH0_V4, ETH0_V6]  # auto: the uplink, both families
    assert split_routes(netenv(), policy("", "wlan0")) == [ETH0_V4, WLAN0_V4, ETH0_V6]
    assert split_routes(netenv(), policy("wlan0")) == [WLAN0_V4]  # wlan0 has no IPv6
    assert split_routes(netenv(), policy("52:54:00:11:22:33", "eth0")) == [ETH0_V4, WLAN0_V4, ETH0_V6]  # by MAC
    assert split_routes(netenv(), policy("", "eth9", "wgivpn")) == [ETH0_V4, SplitRoute(4, "wgivpn", "", 9), ETH0_V6]


def test_plan_is_what_the_proxies_resolve() -> None:
    """One function for both: the egresses the proxies bind to are the ones the interceptor routes."""
    egresses = split_egresses(netenv(), "", ["wlan0"])
    assert split_routes(netenv(), policy("", "wlan0")) == plan_routes(egresses.in_use())
    assert egresses.chosen.v4 is not None and egresses.by_index[3].v4 is not None
    assert egresses.used == frozenset({3})


def test_an_empty_plan_only_when_the_network_says_so() -> None:
    assert split_routes(netenv(uplink_ipv4="", uplink_ipv6=""), policy()) == []  # no uplink: nothing to route
    assert split_routes(netenv(gateways=[]), policy()) == []  # never the kernel's on-link guess
    assert split_routes(netenv(), policy("eth9")) == []  # the chosen interface is not there


def test_kernel_path_tables_serve_the_global_choice_as_index_0_and_each_rule_interface_as_its_own() -> None:
    """A split mark carries 0 for the global choice, else the rule's interface index: one table each."""
    assert kernel_routes(netenv(), policy()) == [replace(ETH0_V4, mark_index=0), replace(ETH0_V6, mark_index=0)]
    assert kernel_routes(netenv(), policy("", "wlan0")) == [
        replace(ETH0_V4, mark_index=0),
        replace(ETH0_V6, mark_index=0),
        replace(WLAN0_V4, mark_index=3),
    ]
    assert kernel_routes(netenv(), policy("wlan0", "eth0")) == [
        replace(WLAN0_V4, mark_index=0),
        replace(ETH0_V4, mark_index=2),
        replace(ETH0_V6, mark_index=2),
    ]
    assert kernel_routes(None, policy()) is None and kernel_routes(netenv(), None) is None
    assert kernel_table(0) == 1719 << 16 and kernel_table(3) == (1719 << 16) + 3


def test_nothing_known_yet_means_no_plan() -> None:
    assert split_routes(None, policy()) is None
    assert split_routes(netenv(), None) is None
    assert split_routes(None, None) is None


# --- the keeper ----------------------------------------------------------------------------------------


class FakeRouting:
    """SplitRouting's interface, recording; `fail` makes apply raise it."""

    table = 1720

    def __init__(self) -> None:
        self.applied: list[list[SplitRoute]] = []
        self.removed = 0
        self.fail: Exception | None = None
        self.threads: set[str] = set()

    def describe_rule(self) -> str:
        return "fwmark 1720 lookup 1720 priority 1720"

    def apply(self, routes: list[SplitRoute]) -> list[str]:
        self.threads.add(threading.current_thread().name)
        if self.fail is not None:
            raise self.fail
        changed = [] if self.applied and self.applied[-1] == routes else [f"set {len(routes)}"]
        self.applied.append(list(routes))
        return changed

    def remove(self) -> list[str]:
        self.removed += 1
        return []


class FakeLog:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: self.lines.append((level, event, kw))

    def events(self, name: str) -> list[dict[str, Any]]:
        return [kw for _level, event, kw in self.lines if event == name]


def eventually(check: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_keeper_applies_nothing_until_it_has_a_plan() -> None:
    fake, log = FakeRouting(), FakeLog()
    keeper = RoutingKeeper(fake, log, interval=0.01)  # type: ignore[arg-type]
    keeper.start()
    try:
        keeper.want(None)  # a restarted interceptor without netenv or policy: the proxies' routing stays
        time.sleep(0.1)  # ten reconcile periods
        assert fake.applied == [] and keeper.installed is None
        assert "waiting for the network state" in keeper.not_ready()
        assert keeper.status()["installed"] is None
        keeper.want([ETH0_V4])
        assert eventually(lambda: fake.applied)
        keeper.want(None)  # no plan (again) never means "empty plan"
        time.sleep(0.05)
        assert all(routes == [ETH0_V4] for routes in fake.applied)
        assert keeper.status()["installed"] == ["IPv4 default via 192.0.2.1 dev eth0"] and keeper.not_ready() == ""
    finally:
        keeper.stop()
    assert fake.removed == 0  # stopping leaves the routing in place
    assert fake.threads == {"split-routing"}  # never on the caller's thread


def test_keeper_reconciles_periodically_and_on_every_new_plan() -> None:
    fake = FakeRouting()
    keeper = RoutingKeeper(fake, FakeLog(), interval=0.02)  # type: ignore[arg-type]
    keeper.start()
    try:
        keeper.want([ETH0_V4])
        assert eventually(lambda: len(fake.applied) >= 3)  # again and again: repairs what others removed
        keeper.want([ETH0_V4, ETH0_V6])
        assert eventually(lambda: fake.applied[-1] == [ETH0_V4, ETH0_V6])
        assert keeper.changes == 2
    finally:
        keeper.stop()


def test_the_same_plan_again_waits_for_the_periodic_pass_unless_the_network_changed() -> None:
    fake = FakeRouting()
    keeper = RoutingKeeper(fake, FakeLog(), interval=10)  # type: ignore[arg-type]
    keeper.start()
    try:
        keeper.want([ETH0_V4])
        assert eventually(lambda: len(fake.applied) == 1)
        for _ in range(5):  # netenv repeating its last snapshot, a policy change that moves no route
            keeper.want([ETH0_V4])
        time.sleep(0.05)
        assert len(fake.applied) == 1
        keeper.want([ETH0_V4], recheck=True)  # a real network change: maybe someone removed our route
        assert eventually(lambda: len(fake.applied) == 2)
    finally:
        keeper.stop()


def test_want_never_waits_for_a_slow_apply() -> None:
    fake, gate = FakeRouting(), threading.Event()
    slow_apply = fake.apply
    fake.apply = lambda routes: (gate.wait(5), slow_apply(routes))[1]  # type: ignore[method-assign]
    keeper = RoutingKeeper(fake, FakeLog(), interval=10)  # type: ignore[arg-type]
    keeper.start()
    try:
        keeper.want([ETH0_V4])
        time.sleep(0.02)  # the keeper's thread is stuck in netlink now
        started = time.perf_counter()
        for _ in range(100):
            keeper.want([ETH0_V6])
        assert time.perf_counter() - started < 0.05
        gate.set()
        assert eventually(lambda: fake.applied and fake.applied[-1] == [ETH0_V6])
    finally:
        gate.set()
        keeper.stop()


def test_errors_are_counted_and_each_distinct_one_logged_once() -> None:
    fake, log = FakeRouting(), FakeLog()
    keeper = RoutingKeeper(fake, log)  # type: ignore[arg-type]
    keeper.want([ETH0_V4])  # reconciled by hand below: no thread needed
    fake.fail = OSError(1, "Operation not permitted")
    for _ in range(5):
        assert keeper.reconcile() is None
    fake.fail = OSError(19, "No such device")
    keeper.reconcile()
    keeper.reconcile()
    assert keeper.errors == 7
    assert [e["error"] for e in log.events("routing.failed")] == [
        "PermissionError: [Errno 1] Operation not permitted",
        "OSError: [Errno 19] No such device",
    ]
    assert keeper.not_ready() == "split routing failed: OSError: [Errno 19] No such device"
    fake.fail = None
    assert keeper.reconcile() == ["set 1"]
    assert keeper.not_ready() == "" and keeper.status()["errors"] == 7 and log.events("routing.recovered")
    fake.fail = OSError(1, "Operation not permitted")
    keeper.reconcile()
    assert len(log.events("routing.failed")) == 2  # seen before: counted, not logged again


# --- the interceptor hands the keeper its plans --------------------------------------------------------


class FakeEngine:
    def __init__(self) -> None:
        self.policy = EMPTY_POLICY

    def set_policy(self, snapshot: PolicySnapshot) -> bool:
        if snapshot.version <= self.policy.version:
            return False
        self.policy = CompiledPolicy(snapshot)
        return True

    def set_netenv(self, snapshot: NetenvChanged) -> bool:
        return True


def interceptor() -> tuple[InterceptorActor, FakeRouting]:
    """Worker 0's routing path only: no queues, no firewall, no bus."""
    actor = InterceptorActor.__new__(InterceptorActor)
    fake = FakeRouting()
    actor.log, actor.engine, actor.netenv, actor.fw = FakeLog(), FakeEngine(), None, None  # type: ignore[assignment]
    actor.routing = RoutingKeeper(fake, actor.log)  # type: ignore[arg-type]
    actor.kernel_routing = RoutingKeeper(FakeRouting(), actor.log)  # type: ignore[arg-type]
    actor._fw_lock = threading.Lock()
    actor.owns_rules = True
    return actor, fake


def test_interceptor_plans_only_once_it_knows_the_network_and_the_policy() -> None:
    actor, fake = interceptor()
    assert actor.routing is not None
    actor.on_message(policy("", "wlan0", version=5))  # the policy, but no network yet
    assert actor.routing.reconcile() is None and fake.applied == []
    actor.on_message(netenv())
    actor.routing.reconcile()
    assert fake.applied == [[ETH0_V4, WLAN0_V4, ETH0_V6]]
    actor.on_message(policy("wlan0", version=6))  # every policy change…
    actor.routing.reconcile()
    assert fake.applied[-1] == [WLAN0_V4]
    actor.on_message(netenv(gateways=[], seq=2))  # …and every network change brings a new plan
    actor.routing.reconcile()
    assert fake.applied[-1] == []  # wlan0 lost its gateway: nothing to route through
    actor.routing._wake.clear()
    actor.on_message(netenv(gateways=[], seq=2))  # netenv repeating itself: nothing new to do
    assert not actor.routing._wake.is_set()
    actor.on_message(netenv(gateways=[], seq=3))  # the same plan, but the network changed: check it again
    assert actor.routing._wake.is_set()


def test_interceptor_without_a_policy_yet_leaves_the_routing_alone() -> None:
    actor, fake = interceptor()
    assert actor.routing is not None
    actor.on_message(netenv())  # a restarted interceptor hears the network first
    assert actor.routing.reconcile() is None and fake.applied == []
