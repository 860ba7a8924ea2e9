"""The split path where the interceptor, the proxies and the host's own setup meet: strict rp_filter,
a rule's own interface (a second uplink), wg-quick's anti-spoofing rule. Driven through the CLI in labs
of their own, checking what the internet server saw and what is left after `splittun down`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from splittun.lab import Lab
from splittun.lab import topology as T
from tests.support.cli import SPLITTUN
from tests.support.lab import Leaks, own_lab


class Instance:
    """splittun running in a lab's host namespace, driven like a user would."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.home = Path(tempfile.mkdtemp(prefix="st-", dir="/tmp"))

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            ["ip", "netns", "exec", self.lab.ns_host, *SPLITTUN, *args],
            env={"SPLITTUN_HOME": str(self.home), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"splittun {' '.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout

    def seen(self, proto: str = "tcp", target: str = T.WHOAMI_V4, app: str = "curl") -> str:
        """What the server saw, asked by a client whose process name is `app` (rules match names)."""
        family = 6 if ":" in target else 4
        args = ["--proto", proto, "--family", str(family), "--target", target, "--timeout", "3"]
        # The lab client under another process name (/proc/PID/comm, what name rules match): PR_SET_NAME.
        script = (
            f"import ctypes, runpy, sys; ctypes.CDLL(None).prctl(15, {app.encode()!r}, 0, 0, 0); "
            f"sys.argv = ['client', *{args!r}]; runpy.run_module('splittun.lab.client', run_name='__main__')"
        )
        done = self.lab.exec("host", [sys.executable, "-c", script])
        return done.stdout.strip() or f"error: {done.stderr.strip()}"

    def sysctl(self, key: str) -> str:
        return self.lab.exec("host", ["sysctl", "-n", key]).stdout.strip()

    def close(self) -> None:
        subprocess.run(["ip", "netns", "exec", self.lab.ns_host, *SPLITTUN, "down"],
                       env={"SPLITTUN_HOME": str(self.home)}, capture_output=True, timeout=60)  # fmt: skip
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture
def strict_lab() -> Iterator[Lab]:
    yield from own_lab("sirp", rp_filter=1)


def test_split_works_with_strict_rp_filter_and_down_restores_everything(strict_lab: Lab, leaks: Leaks) -> None:
    lab = strict_lab
    leaks.allow(T.WHOAMI_V4, "tcp", T.WHOAMI_TCP_PORT)  # "curl"
    leaks.allow(T.WHOAMI_V4, "udp", T.WHOAMI_UDP_PORT)
    firewall_before = lab.firewall_rules()
    valid_mark_before = lab.exec("host", ["sysctl", "-n", "net.ipv4.conf.all.src_valid_mark"]).stdout.strip()
    assert valid_mark_before == "0"
    st = Instance(lab)
    try:
        st.cli("up")
        st.cli("rules", "add", "--name", "curl")
        st.cli("enable")
        # Replies to the proxy's upstream arrive on eth0 while the VPN owns the default route: strict
        # rp_filter drops them unless they carry the egress mark and src_valid_mark lets the check use it.
        assert st.seen("tcp") == T.HOST_V4
        assert st.seen("udp") == T.HOST_V4
        assert st.seen("tcp", app="wget") == T.VPNSRV_V4  # no rule: stays in the VPN
        assert st.sysctl("net.ipv4.conf.all.src_valid_mark") == "1"
        st.cli("down")
        assert st.sysctl("net.ipv4.conf.all.src_valid_mark") == valid_mark_before
        assert lab.firewall_rules() == firewall_before
    finally:
        st.close()


@pytest.fixture
def antispoof_lab() -> Iterator[Lab]:
    yield from own_lab("sias", style="wgquick", antispoof=True)


def test_split_replies_pass_wgquick_antispoof_and_its_table_is_left_as_found(antispoof_lab: Lab, leaks: Leaks) -> None:
    lab = antispoof_lab
    leaks.allow(T.WHOAMI_V4, "tcp", T.WHOAMI_TCP_PORT)  # "curl"
    leaks.allow(T.WHOAMI_V4, "udp", T.WHOAMI_UDP_PORT)
    leaks.allow(T.WHOAMI_V6, "tcp", T.WHOAMI_TCP_PORT)
    nft_before = lab.exec("host", ["nft", "list", "ruleset"]).stdout
    st = Instance(lab)
    try:
        st.cli("up")
        st.cli("rules", "add", "--name", "curl")
        st.cli("enable")
        # The app sends from the tunnel address; the proxy's un-NATed replies arrive on lo addressed to it
        # from the original peer: without the exemption wg-quick's raw rule drops them.
        for proto, target, expected in (
            ("tcp", T.WHOAMI_V4, T.HOST_V4),
            ("udp", T.WHOAMI_V4, T.HOST_V4),
            ("tcp", T.WHOAMI_V6, T.HOST_V6),
        ):
            assert st.seen(proto, target) == expected, (proto, target)
        assert st.seen("tcp", app="wget") == T.VPNSRV_V4
        spoofed = lab.exec("host", ["nft", "list", "ruleset"]).stdout
        assert spoofed.count('iifname "lo"') == 2  # one exemption per family, before wg-quick's drop
        st.cli("down")
        assert lab.exec("host", ["nft", "list", "ruleset"]).stdout == nft_before
    finally:
        st.close()


@pytest.fixture
def two_uplinks() -> Iterator[Lab]:
    yield from own_lab("siif", style="wgquick", second_uplink=True)


def test_a_rule_leaves_through_its_own_interface(two_uplinks: Lab, leaks: Leaks) -> None:
    lab = two_uplinks
    leaks.allow(T.SERVER_V4[1], via=T.HOST2_IF)  # .81 by its rule's interface, whatever the app
    leaks.allow(T.SERVER_V6[1], "tcp", T.WHOAMI_TCP_PORT, via=T.HOST2_IF)
    leaks.allow(T.SERVER_V4[0], "tcp", T.WHOAMI_TCP_PORT, via=T.HOST_IF)  # "curl", the global choice
    leaks.allow(T.SERVER_V6[0], "udp", T.WHOAMI_UDP_PORT, via=T.HOST_IF)
    st = Instance(lab)
    try:
        st.cli("up")
        st.cli("rules", "add", "--dest", T.SERVER_V4[1], "--interface", T.HOST2_IF)  # .81 via the second uplink
        st.cli("rules", "add", "--dest", T.SERVER_V6[1], "--interface", T.HOST2_IF)
        st.cli("rules", "add", "--name", "curl")  # everything else curl does: the global choice (auto = eth0)
        st.cli("enable")
        assert st.seen("tcp", T.SERVER_V4[0]) == T.HOST_V4
        assert st.seen("tcp", T.SERVER_V4[1]) == T.HOST2_V4
        assert st.seen("udp", T.SERVER_V4[1]) == T.HOST2_V4
        assert st.seen("tcp", T.SERVER_V6[1]) == T.HOST2_V6
        assert st.seen("udp", T.SERVER_V6[0]) == T.HOST_V6
        assert st.seen("tcp", T.SERVER_V4[1], app="wget") == T.HOST2_V4  # a destination rule: any app
        assert st.seen("tcp", T.SERVER_V4[0], app="wget") == T.VPNSRV_V4
        rows = json.loads(st.cli("connections", "--json", "--verdict", "split"))
        assert {r["split"]["interface"] for r in rows if r.get("split")} == {T.HOST_IF, T.HOST2_IF}
        table = lab.exec("host", ["ip", "route", "show", "table", "1720"]).stdout
        assert f"dev {T.HOST_IF}" in table and f"dev {T.HOST2_IF}" in table  # a route per interface in use
        st.cli("down")
        assert lab.exec("host", ["ip", "route", "show", "table", "1720"]).stdout == ""
    finally:
        st.close()
