"""Helpers for the end-to-end tests (tests/netns/test_e2e.py): one splittun instance in a private lab, driven only
through the `splittun` CLI, the real clients (curl, socat, scripted Python, tests/fixtures/two_peers.py), and
what "exactly as before `up`" means (firewall, ip rules, routes, conntrack entries with our marks).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from actors.interceptor.firewall import CONNTRACK_MARKS
from messages.marks import SPLIT_ROUTE_TABLE, VERDICT_MASK, Mark
from runtime.paths import Home
from splittun.lab import Lab
from splittun.lab import topology as T
from splittun.lab.instance import Instance, InstanceError, poll
from tests.support import FIXTURES_DIR
from tests.support.interceptor import DNS, FIXTURES, wait_until
from tests.support.lab import own_lab

#: Conntrack marks that are splittun's (under VERDICT_MASK: a split mark also carries an interface index).
OUR_CT_MARKS = frozenset(CONNTRACK_MARKS | {int(Mark.SPLIT_EGRESS)})
UDP = T.WHOAMI_UDP_PORT
TCP = T.WHOAMI_TCP_PORT
SYSCTLS = ("net.ipv4.conf.all.src_valid_mark", "net.ipv4.conf.all.rp_filter", "net.ipv4.conf.default.rp_filter",
           f"net.ipv4.conf.{T.HOST_IF}.rp_filter", "net.netfilter.nf_conntrack_acct")  # fmt: skip


# --- what `splittun down` must leave exactly as it found it ---------------------------------------------


@dataclass(frozen=True)
class HostState:
    """What a user would list in the host namespace to see whether splittun left anything behind."""

    firewall: str  # iptables-legacy-save + ip6tables-legacy-save (no counters, no empty tables)
    rules: str  # ip -4 rule; ip -6 rule
    routes: str  # ip -4/-6 route show table all (main, local, 1720, wg-quick's 51820, ...)
    split_table: str  # ip -4/-6 route show table 1720, spelled out for the message when it differs
    conntrack: tuple[str, ...]  # conntrack entries carrying our marks, without their countdown
    sysctls: str  # what splittun may adjust: src_valid_mark (strict rp_filter), conntrack accounting


def host_state(lab: Lab) -> HostState:
    def ip(*args: str) -> str:
        out = ""
        for family in ("-4", "-6"):
            proc = lab.exec("host", ["ip", family, *args])
            # A routing table nobody ever filled does not exist: `ip` says so and exits 2. That is empty.
            assert proc.returncode == 0 or "table does not exist" in proc.stderr, proc.stderr
            out += proc.stdout
        return out

    return HostState(
        firewall=lab.firewall_rules("host"),
        rules=ip("rule"),
        routes=ip("route", "show", "table", "all"),
        split_table=ip("route", "show", "table", str(SPLIT_ROUTE_TABLE)),
        conntrack=tuple(our_conntrack(lab)),
        sysctls=lab.exec("host", ["sysctl", *SYSCTLS], check=True).stdout,
    )


def our_conntrack(lab: Lab) -> list[str]:
    """Conntrack entries with one of our marks (IPv4 and IPv6), the timeout field dropped."""
    found = []
    for family in ("ipv4", "ipv6"):
        out = lab.exec("host", ["conntrack", "-L", "-f", family], check=True).stdout
        for line in out.splitlines():
            mark = re.search(r"\bmark=(\d+)", line)
            if mark and int(mark.group(1)) & VERDICT_MASK in OUR_CT_MARKS:
                fields = line.split()
                found.append(" ".join(fields[:2] + fields[3:]))
    return sorted(found)


# --- one splittun instance, driven through its CLI ------------------------------------------------------


class E2E:
    """The lab plus the splittun instance the tests share; restarted when a test wants another routing style
    (the VPN's routing is set up before splittun starts, as on a real machine)."""

    @property
    def split_tcp_path(self) -> str:
        """How split TCP leaves in this harness: the divert backend always proxies, NFQUEUE follows dataPath."""
        return "proxy" if self.backend == "divert" else (self.data_path or "kernel")

    def __init__(self, lab: Lab, data_path: str = "", backend: str = "nfqueue") -> None:
        self.lab = lab
        self.data_path = data_path  # splittun/dataPath every test starts with ("" = the default)
        self.backend = backend  # splittun up --backend
        self.inst: Instance | None = None
        self.style: tuple[str, bool] | None = None
        #: The host before splittun first ran in each style: what every `down` must return to.
        self.pristine: dict[tuple[str, bool], HostState] = {}
        #: Extra environment for `splittun up` (e.g. SSL_CERT_FILE: the CAs the resolver trusts for DNS over TLS).
        self.env: dict[str, str] = {}

    # -- lifecycle --

    def ensure(self, style: str = "replaced", antispoof: bool = False) -> Instance:
        """splittun running in the lab host with the VPN in `style`."""
        if self.inst is not None and self.style == (style, antispoof) and self.running():
            return self.inst
        self.stop()
        self.lab.set_style(style, antispoof=antispoof)
        self.style = (style, antispoof)
        self.pristine.setdefault(self.style, host_state(self.lab))
        self.inst = self._up()
        return self.inst

    def _up(self) -> Instance:
        """`splittun up` with a fresh home, ready to split (splittun.lab.instance)."""
        try:
            self.inst = Instance.start(self.lab, "--backend", self.backend, env=self.env or None)
        except InstanceError as exc:
            pytest.fail(str(exc))
        return self.inst

    def running(self) -> bool:
        assert self.inst is not None
        return self.inst.running()

    def stop(self) -> subprocess.CompletedProcess[str] | None:
        """`splittun down`; the home goes too, whatever happens."""
        inst, self.inst = self.inst, None
        return None if inst is None else inst.stop()

    def reset(self) -> None:
        """Back to the tests' baseline through the CLI: enabled, no rules, interface auto, the data path."""
        config = self.config_file()
        if config.get("splittun/rules"):
            self.apply("config", "set", "splittun/rules", "[]")
        if config.get("splittun/interface"):
            self.interface("auto", expect=T.HOST_IF)
        if self.data_path and config.get("splittun/dataPath", "kernel") != self.data_path:
            self.apply("config", "set", "splittun/dataPath", self.data_path)
        if self.data_path:  # the interceptor rewrites its rules in the background: until they are in place
            assert self.inst is not None
            inst = self.inst
            assert poll(lambda: inst.ask("interceptor", "status")["data_path"] == self.data_path, 15.0)
        if not config.get("splittun/enable"):
            self.apply("enable")

    # -- the CLI --

    @property
    def home(self) -> Path:
        assert self.inst is not None, "splittun is not running"
        return self.inst.home

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`splittun ARGS…` in the lab host, as the user would type it."""
        assert self.inst is not None, "splittun is not running"
        return self.inst.cli(*args)

    def ok(self, *args: str) -> str:
        result = self.cli(*args)
        assert result.returncode == 0, f"splittun {' '.join(args)}: {result.stdout}{result.stderr}"
        return result.stdout

    def refused(self, *args: str) -> str:
        """A command splittun must refuse: exit 2 and exactly one line saying why."""
        result = self.cli(*args)
        text = (result.stdout + result.stderr).strip()
        assert result.returncode == 2, f"splittun {' '.join(args)} was not refused: {text}"
        assert len(text.splitlines()) == 1, f"not one line: {text!r}"
        return text

    def apply(self, *args: str) -> str:
        """A config edit that must be applied; returns once the interceptor decides with the new policy."""
        out = self.ok(*args)
        version = re.search(r"applied \(policy version (\d+)\)", out)
        assert version, f"splittun {' '.join(args)} did not report an applied policy: {out}"
        self.wait_policy(int(version.group(1)))
        return out

    def interface(self, choice: str, expect: str) -> str:
        """`splittun interface CHOICE`; returns once the proxies leave through `expect` (IPv4 and IPv6)."""
        out = self.apply("interface", choice)
        assert wait_until(lambda: self.egress() == {4: expect, 6: expect}), f"egress {self.egress()}, not {expect}"
        return out

    def config_file(self) -> dict[str, Any]:
        path = Home.from_env({"SPLITTUN_HOME": str(self.home)}).config_file
        return json.loads(path.read_text()) if path.exists() else {}

    def rules(self) -> list[dict[str, Any]]:
        return list(json.loads(self.ok("rules", "list", "--json")))

    def connections(self, *args: str) -> list[dict[str, Any]]:
        return list(json.loads(self.ok("connections", "--json", "--limit", "500", *args)))

    # -- waiting on the actors (observation only: every change goes through the CLI) --

    def policy_version(self) -> int:
        assert self.inst is not None
        return self.inst.policy_version()

    def wait_policy(self, version: int) -> None:
        assert self.inst is not None and self.inst.wait_policy(version), (
            f"the interceptor did not adopt policy {version}"
        )

    def egress(self) -> dict[int, str]:
        """The interface each proxy family leaves through ("" = none), when both proxies agree."""
        assert self.inst is not None
        return self.inst.egress()

    def log(self, actor: str) -> str:
        assert self.inst is not None
        return self.inst.log(actor)


# --- clients: what a user runs, and what the server saw ------------------------------------------------


def url(address: str, path: str = "/") -> str:
    return f"http://[{address}]{path}" if ":" in address else f"http://{address}{path}"


def curl_details(lab: Lab, address: str) -> dict[str, Any]:
    """curl's answer (the address the server saw) plus its own byte counts and source port."""
    fmt = "\n%{size_request} %{size_header} %{size_download} %{local_ip} %{local_port}"
    proc = lab.exec("host", ["curl", "-s", "-m", "5", "-w", fmt, url(address)])
    assert proc.returncode == 0, f"curl {address}: exit {proc.returncode} {proc.stderr}"
    seen, stats = proc.stdout.rstrip("\n").rsplit("\n", 1)
    request, header, body, local_ip, local_port = stats.split()
    return {
        "seen": seen.strip(),
        "sent": int(request),
        "received": int(header) + int(body),
        "local_ip": local_ip,
        "local_port": int(local_port),
    }


def socat_udp(lab: Lab, address: str) -> str:
    """One datagram from socat, and its answer: the address the server saw."""
    target = f"UDP6:[{address}]:{UDP}" if ":" in address else f"UDP4:{address}:{UDP}"
    proc = lab.exec("host", ["socat", "-t", "1", "-", target], input="whoami\n", timeout=30)
    assert proc.returncode == 0, f"socat {address}: exit {proc.returncode} {proc.stderr}"
    return proc.stdout.strip()


def python_app(lab: Lab, proto: str, address: str, port: int | None = None) -> str:
    """The lab's whoami client: a Python app (process name "python") no app rule names. 15 s to answer: on the
    divert backend every packet crosses user space, and on a loaded 2-CPU machine (the other test worker) a
    connection can wait seconds there; which path it took is what is asserted, not how fast."""
    argv = [sys.executable, "-m", "splittun.lab.client", "--proto", proto, "--target", address, "--timeout", "15"]
    proc = lab.exec("host", [*argv, *(["--port", str(port)] if port else [])], timeout=30)
    assert proc.returncode == 0, f"python client {proto} {address}: {proc.stderr.strip()}"
    return proc.stdout.strip()


def lookup_fetch(lab: Lab, name: str, family: int) -> str:
    """Resolve `name` at the lab's DNS server, then fetch http://ADDRESS/ at once (one Python process)."""
    argv = [sys.executable, str(FIXTURES / "client.py"), "lookup-fetch", DNS[family], name, str(family)]
    proc = lab.exec("host", argv, timeout=30)
    assert proc.returncode == 0, f"lookup-fetch {name}: {proc.stderr.strip()}"
    return proc.stdout.strip()


def two_peers(lab: Lab, peer_a: str, peer_b: str, rounds: int) -> list[dict[str, str]]:
    """The answers one UDP socket got from talking to two peers at once (see the module docstring)."""
    argv = [sys.executable, str(FIXTURES_DIR / "two_peers.py"), str(UDP), str(rounds), peer_a, peer_b]
    proc = lab.exec("host", argv, timeout=60)
    assert proc.returncode == 0, f"two-peers client: {proc.stderr.strip()}"
    return [json.loads(line) for line in proc.stdout.splitlines()]


def private_e2e(base: str, rules: Sequence[Sequence[str]]) -> Iterator[E2E]:
    """A module's own lab with splittun up in the replaced style, at the baseline plus `rules` (each the
    arguments of `splittun rules add`); for tests that load the lab too hard to share it. Everything goes at
    the end, also when a test failed."""
    labs = own_lab(base)
    harness = E2E(next(labs))
    try:
        harness.ensure("replaced")
        harness.reset()
        for rule in rules:
            harness.apply("rules", "add", *rule)
        yield harness
    finally:
        try:
            harness.stop()
        finally:
            labs.close()
