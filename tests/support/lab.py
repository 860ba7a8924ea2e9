"""Pytest fixtures for tests that need the lab (host/isp/vpnsrv/inet network namespaces).

Loaded as a plugin by tests/conftest.py (``pytest_plugins``). Fixtures:

- ``lab``: one session-wide ``Lab(name="t", style="replaced")`` (``t-gw0``... under xdist);
  leftovers of a crashed run are removed first and the lab is torn down at session end, also when
  tests fail.
- ``lab_style``: the same lab in each routing style (session-scoped parametrisation, so pytest
  groups tests per style and switches only twice); it restores "replaced" afterwards.
- ``lab_replaced``: the lab, guaranteed in plain "replaced" style (for tests run after lab_style ones).
- ``own_lab(base, **kw)``: a module's private lab, for a fixture to ``yield from``.
- ``make_lab``: factory for extra, test-private labs (``make_lab("tlife", style="wgquick")``), all
  torn down after the test.

Tests that change the lab beyond ``set_style`` must undo it themselves.

Leak check (``splittun.lab.leakmon``): every lab made through these helpers (``lab`` and so ``lab_style`` and
``lab_replaced``, ``own_lab(...)``, ``make_lab(...)``) is registered while it is up, and every test marked
``netns`` ends with a check of each registered lab that exists: its leak monitor is synced and the test fails
when anything left the host's physical uplink(s) outside the VPN since the previous check (so the window
includes the test's own setup), or when the monitor cannot vouch for the link (not running, lost packets).
The VPN carrier, link housekeeping (ARP, NDP, MLD, ff02::/16) and the lab's own ISP-path probes (TTL
``PROBE_TTL``) are never leaks. A test declares what it deliberately splits with the ``leaks`` fixture:

    def test_split(lab: Lab, leaks: Leaks) -> None:
        leaks.allow(T.SERVER_V4[1], "tcp", T.WHOAMI_TCP_PORT)  # address or CIDR; optional proto, port, via=uplink

Allow only what the test splits on purpose. There is no switch to turn the check off.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest

from splittun.lab import Lab
from splittun.lab.leakmon import Allowance, LeakMonitor, LeakMonitorError

#: One lab per pytest-xdist worker (namespaces are global): names get the worker's suffix, after an optional
#: SPLITTUN_TEST_TAG that keeps two test runs on one machine (two checkouts) out of each other's labs.
_WORKER = os.environ.get("SPLITTUN_TEST_TAG", "") + os.environ.get("PYTEST_XDIST_WORKER", "")


def lab_name(base: str) -> str:
    """Name for an extra, test-private lab, unique per xdist worker."""
    return f"{base}-{_WORKER}" if _WORKER else base


#: ids of the lab_style parametrisation: style, optionally "+antispoof".
LAB_STYLES = ("replaced", "wgquick", "wgquick+antispoof")

_netns_reason: list[str | None] = []


def netns_skip_reason() -> str | None:
    """Why the lab cannot be built here (None when it can); probed once per session."""
    if _netns_reason:
        return _netns_reason[0]
    reason = None
    if os.geteuid() != 0:
        reason = "lab needs root (network namespaces, TUN devices, namespaced firewalls)"
    elif missing := [t for t in ("ip", "nft", "iptables-legacy", "ip6tables-legacy", "sysctl") if not shutil.which(t)]:
        reason = f"lab needs {', '.join(missing)} (iproute2, nftables, iptables, procps)"
    elif not os.path.exists("/dev/net/tun"):
        reason = "lab needs /dev/net/tun"
    else:
        probe = f"splittun-labprobe-{os.getpid()}"
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if made.returncode != 0:
            reason = f"cannot create network namespaces here: {made.stderr.strip()}"
        else:
            subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    _netns_reason.append(reason)
    return reason


def require_netns() -> None:
    """pytest.skip() with the reason when the lab cannot be built (not root, no netns, ...)."""
    reason = netns_skip_reason()
    if reason:
        pytest.skip(reason)


def own_lab(base: str, **kw: Any) -> Iterator[Lab]:
    """A private lab (name unique per xdist worker) for a fixture to `yield from`: leftovers of a crashed
    run are removed first, and it is torn down afterwards, also when building it or a test fails."""
    require_netns()
    lab = Lab(name=lab_name(base), **kw)
    lab.down()
    try:
        lab.up()
        watch(lab)
        yield lab
    finally:
        unwatch(lab)
        lab.down()


def parse_style(param: str) -> tuple[str, bool]:
    style, _, extra = param.partition("+")
    return style, extra == "antispoof"


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """The session's lab in "replaced" style; always torn down, also after failures or a crash before."""
    yield from own_lab("t", style="replaced")


@pytest.fixture(scope="session", params=LAB_STYLES)
def lab_style(request: pytest.FixtureRequest, lab: Lab) -> Iterator[Lab]:
    """The lab switched to each style in turn (ids: replaced, wgquick, wgquick+antispoof)."""
    style, antispoof = parse_style(request.param)
    lab.set_style(style, antispoof=antispoof)
    yield lab
    if lab.exists():
        lab.set_style("replaced", antispoof=False)


@pytest.fixture
def make_lab() -> Iterator[Callable[..., Lab]]:
    """Factory for extra, test-private labs (name made unique per xdist worker, leftovers removed);
    every lab it made is torn down after the test."""
    require_netns()
    made: list[Lab] = []

    def make(base: str, **kw: Any) -> Lab:
        lab = Lab(name=lab_name(base), **kw)
        lab.down()
        made.append(lab)
        return watch(lab)

    yield make
    for lab in made:
        unwatch(lab)
        lab.down()


@pytest.fixture
def lab_replaced(lab: Lab) -> Lab:
    """The lab in plain "replaced" style (a no-op when it already is)."""
    lab.set_style("replaced", antispoof=False)
    return lab


# --- the leak check -----------------------------------------------------------------------------------

#: Labs checked after every netns test, by name: their monitor remembers where the last check ended.
_WATCHED: dict[str, LeakMonitor] = {}


def watch(lab: Lab) -> Lab:
    """Register ``lab`` for the leak check (idempotent); checks start from the beginning of its monitor log."""
    _WATCHED.setdefault(lab.name, LeakMonitor(lab))
    return lab


def unwatch(lab: Lab) -> None:
    _WATCHED.pop(lab.name, None)


class Leaks:
    """The current test's deliberately split destinations (the ``leaks`` fixture)."""

    def __init__(self) -> None:
        self.allowances: list[Allowance] = []

    def allow(self, dest: str, proto: str | None = None, port: int | None = None, via: str | None = None) -> None:
        """Traffic to ``dest`` (address or CIDR; ``proto`` tcp/udp/icmp/icmpv6; ``port`` the destination
        port; ``via`` the host uplink, eth0 or eth1) may leave through the physical uplink during this test:
        the test splits it on purpose."""
        self.allowances.append(Allowance.of(dest, proto, port, via))


_LEAKS = pytest.StashKey[Leaks]()


@pytest.fixture
def leaks(request: pytest.FixtureRequest) -> Leaks:
    """Declare the destinations this test splits, so the leak check does not count them as leaks."""
    return request.node.stash.setdefault(_LEAKS, Leaks())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    """After the body of every netns test: sync each watched lab's leak monitor and fail on any leak."""
    if item.get_closest_marker("netns") is None:
        return (yield)
    started = time.time()
    try:
        result = yield
    except BaseException:
        problems = _leak_problems(item, started)
        if problems:  # the test failed already: add what the monitor saw, do not mask the failure
            item.add_report_section("call", "leak monitor", problems)
        raise
    problems = _leak_problems(item, started)
    if problems:
        pytest.fail(problems, pytrace=False)
    return result


def _leak_problems(item: pytest.Item, started: float) -> str:
    allowances = item.stash[_LEAKS].allowances if _LEAKS in item.stash else []
    problems = []
    for monitor in list(_WATCHED.values()):
        if not monitor.lab.exists():
            continue  # torn down (and its log with it) inside the test
        try:
            report = monitor.report(allowances, advance=True)
            report.assert_no_leaks()
        except LeakMonitorError as exc:
            problems.append(str(exc))
        except AssertionError:
            problems.append(report.describe(since=started))
    if problems:
        problems.append("(times are from the start of the test body; negative: its setup or the previous test's "
                        "teardown. Declare deliberately split destinations with the `leaks` fixture.)")  # fmt: skip
    return "\n".join(problems)
