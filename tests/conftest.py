"""Shared test fixtures. The layout: tests/unit/ mirrors the source tree (no root needed), tests/netns/ holds the
tests that need root and network namespaces (marked `netns` by directory; elsewhere skipped with the reason),
tests/support/ the helpers both use, tests/fixtures/ data and helper programs.
Everything a test creates (namespaces, processes, homes) is removed in fixture teardown, also on failure.
splittun itself only ever runs inside namespaces the tests create: never in the root namespace.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import splittun

#: The shared fixtures: the lab (with the leak check after every namespace test) and the proxy test helpers.
pytest_plugins = ["tests.support.lab", "tests.support.proxy"]

#: Everything under tests/netns/ needs root and network namespaces: marked here, by directory.
NETNS_DIR = Path(__file__).parent / "netns"


def netns_unavailable_reason() -> str | None:
    """Why namespace tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, firewall rules); CI runs as root"
    if shutil.which("ip") is None:
        return "needs iproute2 ('ip'); `make deps` installs it"
    probe = f"splittun-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create network namespaces here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


_NETNS_REASON: list[str | None] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if NETNS_DIR in Path(item.path).parents:
            item.add_marker(pytest.mark.netns)
    needs = [item for item in items if item.get_closest_marker("netns")]
    if not needs:
        return
    if not _NETNS_REASON:
        _NETNS_REASON.append(netns_unavailable_reason())
    reason = _NETNS_REASON[0]
    if reason:
        for item in needs:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def home() -> Iterator[Path]:
    """A fresh SPLITTUN_HOME with a short path (ipc socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="st-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def netns() -> Iterator[str]:
    """An empty network namespace (loopback up); removed with every process in it."""
    name = f"splittun-t-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        kill_netns_processes(name)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def host_ns(netns: str) -> Iterator[str]:
    """`netns` plus an uplink `eth0` (192.0.2.10/24, 2001:db8::10/64) to a gateway namespace, so the proxies
    have an egress as on any connected machine: a place to run splittun without the whole lab."""
    gateway = f"{netns}-gw"
    subprocess.run(["ip", "netns", "add", gateway], check=True)
    setup = [
        ["ip", "-n", netns, "link", "add", "eth0", "type", "veth", "peer", "name", "lan0", "netns", gateway],
        ["ip", "-n", netns, "addr", "add", "192.0.2.10/24", "dev", "eth0"],
        ["ip", "-n", netns, "addr", "add", "2001:db8::10/64", "dev", "eth0", "nodad"],
        ["ip", "-n", gateway, "addr", "add", "192.0.2.1/24", "dev", "lan0"],
        ["ip", "-n", gateway, "addr", "add", "2001:db8::1/64", "dev", "lan0", "nodad"],
        ["ip", "-n", netns, "link", "set", "eth0", "up"],
        ["ip", "-n", gateway, "link", "set", "lan0", "up"],
        ["ip", "-n", netns, "route", "add", "default", "via", "192.0.2.1"],
        ["ip", "-n", netns, "-6", "route", "add", "default", "via", "2001:db8::1"],
    ]
    try:
        for argv in setup:
            subprocess.run(argv, check=True, capture_output=True)
        yield netns
    finally:
        kill_netns_processes(gateway)
        subprocess.run(["ip", "netns", "del", gateway], capture_output=True)


def kill_netns_processes(name: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)


@pytest.fixture
def running(home: Path, host_ns: str) -> Iterator[tuple[Path, str]]:
    """splittun up inside a fresh namespace with an uplink; always brought down again."""
    up = splittun("up", home=home, ns=host_ns)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        yield home, host_ns
    finally:
        splittun("down", home=home, ns=host_ns)
