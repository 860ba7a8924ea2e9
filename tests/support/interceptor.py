"""Helpers for the interceptor's lab tests (no tests here): a running splittun in the lab host, policy
publishing, the firewall as `iptables-legacy-save` prints it, the NFQUEUE counters, scripted clients."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq

from messages import Heartbeat, PolicyRule, PolicySnapshot
from messages.control import RequestFailed
from runtime import paths
from runtime.paths import Home
from runtime.transport import Publisher, Subscriber, request
from splittun.lab import Lab
from splittun.lab import topology as T
from tests.support import FIXTURES_DIR
from tests.support.cli import splittun

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


@dataclass
class Instance:
    """One `splittun up` in the lab host namespace."""

    lab: Lab
    home: Path
    version: int = 0

    @property
    def paths(self) -> Home:
        """Where this instance keeps its sockets and logs: the product's own layout under its home."""
        return Home.from_env({"SPLITTUN_HOME": str(self.home)})

    @property
    def run_dir(self) -> Path:
        return self.paths.run_dir

    @property
    def log_dir(self) -> Path:
        return self.paths.log_dir

    def ask(self, instance: str, op: str, **args: Any) -> Any:
        return request(paths.actor_endpoint(self.run_dir, instance), op, args, timeout=5.0, who=instance)

    def pid(self, instance: str = "interceptor") -> int:
        return int(self.ask(instance, "ping")["pid"])

    def supervisord_pid(self) -> int:
        return int(self.paths.supervisord_pidfile.read_text())

    def active(self, instance: str = "interceptor") -> bool:
        try:
            return bool(self.ask(instance, "status")["active"])
        except RequestFailed:
            return False

    def workers(self) -> list[str]:
        status = splittun("status", "--json", home=self.home, ns=self.lab.ns_host)
        return sorted(r["actor"] for r in json.loads(status.stdout)["actors"] if r["actor"].startswith("interceptor"))

    def set_policy(self, rules: list[PolicyRule], enabled: bool = True) -> None:
        """Publish a snapshot (newer than the controller's) until every interceptor worker adopted it."""
        self.version = max(self.version + 1, int(time.time() * 1000))
        snapshot = PolicySnapshot(version=self.version, ts=time.time(), enabled=enabled, rules=rules)
        workers = self.workers()
        ctx = zmq.Context()
        pub = Publisher(ctx, paths.bus_in(self.run_dir))
        try:

            def adopted() -> bool:
                pub.publish(snapshot)
                try:
                    return all(self.ask(w, "status")["policy_version"] == self.version for w in workers)
                except RequestFailed:
                    return False

            assert wait_until(adopted), f"policy {self.version} not adopted by {workers}"
        finally:
            pub.close()
            ctx.term()


def start(lab: Lab, *args: str, env: dict[str, str] | None = None) -> Instance:
    """`splittun up` in the lab host; returns once the interceptor intercepts and the proxies have egress."""
    home = Path(tempfile.mkdtemp(prefix="st-ic-", dir="/tmp"))
    up = splittun("up", *args, home=home, ns=lab.ns_host, env=env)
    if up.returncode != 0:
        shutil.rmtree(home, ignore_errors=True)
        pytest.fail(up.stdout + up.stderr)
    inst = Instance(lab, home)

    def ready() -> bool:
        try:
            proxies = all(
                inst.ask(p, "status")["egress"]["ipv4"].startswith(T.HOST_IF) for p in ("proxy_tcp_00", "proxy_udp_00")
            )
        except RequestFailed:
            return False
        return proxies and inst.active()

    assert wait_until(ready), "not ready: interceptor inactive or the proxies found no egress"
    return inst


def stop(inst: Instance) -> subprocess.CompletedProcess[str]:
    result = splittun("down", home=inst.home, ns=inst.lab.ns_host)
    shutil.rmtree(inst.home, ignore_errors=True)
    return result


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
