"""Helpers for the interceptor's lab tests (no tests here): a running splittun in the lab host, policy
publishing, the firewall as `iptables-legacy-save` prints it, the NFQUEUE counters, scripted clients."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from messages import Heartbeat, PolicyRule
from runtime import paths
from runtime.transport import Subscriber
from splittun.lab import Lab
from splittun.lab import topology as T
from splittun.lab.instance import Instance, InstanceError
from tests.support import FIXTURES_DIR

FIXTURES = FIXTURES_DIR / "interceptor"
CLIENT = [sys.executable, str(FIXTURES / "client.py")]
ISP = {4: T.HOST_V4, 6: T.HOST_V6}
VPN = {4: T.VPNSRV_V4, 6: T.VPNSRV_V6}
KEEP = {4: T.SERVER_V4[0], 6: T.SERVER_V6[0]}  # .80: no rule, stays in the VPN
SPLIT = {4: T.SERVER_V4[1], 6: T.SERVER_V6[1]}  # .81: split by address
BY_NAME = {4: T.INET_V4, 6: T.INET_V6}  # what the lab DNS answers for *.example.com (split by name)
DNS = {4: "203.0.113.53", 6: "2001:db8:30::53"}
WAIT = 15.0
RULES = [
    PolicyRule(id="by-address-4", action="split", dest=SPLIT[4]),
    PolicyRule(id="by-address-6", action="split", dest=SPLIT[6]),
    PolicyRule(id="by-name", action="split", dest=".split.example.com"),
]
TOOLS = ("iptables-legacy", "ip6tables-legacy")
OUR_JUMPS = {"mangle": "SPLITTUN-INGEST-OUTPUT", "filter": "SPLITTUN-FILTER", "nat": "SPLITTUN-REDIRECT"}


def wait_until(check: Callable[[], Any], timeout: float = WAIT, step: float = 0.05) -> Any:
    """Poll until `check()` is truthy; returns its last value (falsy after the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def gone(pid: int) -> bool:
    """Exited (maybe a zombie nobody reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def saves(lab: Lab) -> str:
    """iptables-legacy-save + ip6tables-legacy-save of the host, without timestamps, counters, empty tables."""
    return lab.firewall_rules("host")


def chain_rules(lab: Lab, family: int, table: str, chain: str) -> list[str]:
    tool = TOOLS[0] if family == 4 else TOOLS[1]
    lines = lab.exec("host", [tool, "-w", "-t", table, "-S", chain], check=True).stdout.splitlines()
    return [line for line in lines if line.startswith("-A ")]


FOREIGN_RULE = ["-p", "tcp", "--dport", "9", "-j", "RETURN"]


def push_ours_down(lab: Lab) -> None:
    """Another program (a VPN client starting) inserts its rule at position 1 of each chain we jump from."""
    for tool in TOOLS:
        for table in OUR_JUMPS:
            lab.exec("host", [tool, "-w", "-t", table, "-I", "OUTPUT", "1", *FOREIGN_RULE], check=True)


def remove_foreign(lab: Lab) -> None:
    for tool in TOOLS:
        for table in OUR_JUMPS:
            lab.exec("host", [tool, "-w", "-t", table, "-D", "OUTPUT", *FOREIGN_RULE])


def ours_on_top(lab: Lab) -> bool:
    return all(
        chain_rules(lab, family, table, "OUTPUT")[:1] == [f"-A OUTPUT -j {ours}"]
        for family in (4, 6)
        for table, ours in OUR_JUMPS.items()
    )


def queue_counts(lab: Lab) -> dict[int, int]:
    """Packets each NFQUEUE queue ever handed to user space (id_sequence in nfnetlink_queue)."""
    text = lab.exec("host", ["cat", "/proc/net/netfilter/nfnetlink_queue"], check=True).stdout
    return {int(f[0]): int(f[7]) for f in (line.split() for line in text.splitlines()) if len(f) >= 8}


def out_queued(lab: Lab) -> int:
    """Outbound packets queued so far, all workers, both IP versions."""
    return sum(n for q, n in queue_counts(lab).items() if 17040 <= q < 17080)


def client(lab: Lab, *args: str) -> list[str]:
    proc = lab.exec("host", [*CLIENT, *args], timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def curl(lab: Lab, address: str) -> str:
    url = f"http://[{address}]/" if ":" in address else f"http://{address}/"
    proc = lab.exec("host", ["curl", "-s", "-m", "5", url])
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def start(lab: Lab, *args: str, env: dict[str, str] | None = None) -> Instance:
    """`splittun up ARGS` in the lab host (splittun.lab.instance); the test fails when it does not get ready."""
    try:
        return Instance.start(lab, *args, env=env)
    except InstanceError as exc:
        pytest.fail(str(exc))


def stop(inst: Instance) -> subprocess.CompletedProcess[str]:
    return inst.stop()


def hold(lab: Lab, proto: str, address: str, port: int) -> subprocess.Popen[str]:
    """A client holding one TCP connection or UDP socket open; `ask(proc)` sends one request on it."""
    proc = lab.popen("host", [*CLIENT, "hold", proto, address, str(port)], stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def ask(proc: subprocess.Popen[str]) -> str:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def joined_subscriber(ctx: zmq.Context, run_dir: Path, prefixes: list[str], publishers: set[str]) -> Subscriber:
    """A bus subscription known to be in place. Subscriptions reach publishers asynchronously (ZeroMQ's
    slow joiner), so a fixed sleep loses events on a busy machine; instead wait for a heartbeat from
    each publisher whose events the test needs: it comes through the same pipe after our prefixes."""
    sub = Subscriber(ctx, paths.bus_out(run_dir), [*prefixes, "actor.heartbeat"])
    heard: set[str] = set()

    def joined() -> bool:
        while (msg := sub.recv(timeout=0.05)) is not None:
            if isinstance(msg, Heartbeat):
                heard.add(msg.instance)
        return publishers <= heard

    if not wait_until(joined):
        sub.close()
        raise AssertionError(f"no heartbeat through the bus from {sorted(publishers - heard)}")
    return sub


@contextlib.contextmanager
def lab_dns(lab: Lab) -> Iterator[None]:
    """The lab's DNS server for *.example.com (answers BY_NAME) on extra inet addresses; the server and
    the addresses are removed afterwards, also when it fails to start."""
    plen = {4: T.INET_PLEN_V4, 6: T.INET_PLEN_V6}
    proc: subprocess.Popen[str] | None = None
    try:
        for family, addr in DNS.items():
            nodad = ["nodad"] if family == 6 else []
            lab.exec("inet", ["ip", "addr", "replace", f"{addr}/{plen[family]}", "dev", T.INET_IF, *nodad], check=True)
        argv = [sys.executable, str(FIXTURES / "dnsd.py"), "--a", BY_NAME[4], "--aaaa", BY_NAME[6]]
        for addr in DNS.values():
            argv += ["--listen", addr]
        proc = lab.popen("inet", argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "dnsd ready"
        yield
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(5)
        for family, addr in DNS.items():
            lab.exec("inet", ["ip", "addr", "del", f"{addr}/{plen[family]}", "dev", T.INET_IF])
