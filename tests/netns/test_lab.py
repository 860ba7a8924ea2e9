"""The lab itself: both paths, both routing styles, a real TUN, no on-link luck, clean teardown.

Everything here runs inside lab namespaces (root namespace untouched). Fixtures: tests/support/lab.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from splittun.lab import Lab, LabError, lab_daemons, lab_names
from splittun.lab import topology as T
from splittun.lab.leakmon import LeakMonitor
from tests.support.lab import Leaks

VPN_EXIT = {4: T.VPNSRV_V4, 6: T.VPNSRV_V6}
ISP_ADDR = {4: T.HOST_V4, 6: T.HOST_V6}
CLIENT = [sys.executable, "-m", "splittun.lab.client"]
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000


# ----------------------------------------------------------------------------------- both paths


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_vpn_path_exits_at_vpn_server(lab_style: Lab, proto: str, family: int) -> None:
    assert lab_style.whoami(proto=proto, family=family) == VPN_EXIT[family]


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_isp_path_shows_host_address(lab_style: Lab, proto: str, family: int) -> None:
    assert lab_style.whoami(proto=proto, family=family, path="isp") == ISP_ADDR[family]


def test_curl_from_host_goes_through_vpn(lab_style: Lab) -> None:
    v4 = lab_style.exec("host", ["curl", "-s", "-m", "5", f"http://{T.WHOAMI_V4}/"])
    v6 = lab_style.exec("host", ["curl", "-s", "-6", "-m", "5", f"http://[{T.WHOAMI_V6}]/"])
    assert (v4.returncode, v4.stdout) == (0, f"{T.VPNSRV_V4}\n"), v4.stderr
    assert (v6.returncode, v6.stdout) == (0, f"{T.VPNSRV_V6}\n"), v6.stderr


def test_isp_path_leaves_no_rule_behind(lab_style: Lab) -> None:
    lab_style.whoami(path="isp")
    for fam in ("-4", "-6"):
        rules = lab_style.exec("host", ["ip", fam, "rule", "show"]).stdout
        table = lab_style.exec("host", ["ip", fam, "route", "show", "table", str(T.ISP_PATH_TABLE)])
        assert f"lookup {T.ISP_PATH_TABLE}" not in rules
        assert table.stdout.strip() == ""


def test_host_routing_matches_style(lab_style: Lab) -> None:
    st = lab_style.status()
    main4 = lab_style.exec("host", ["ip", "-4", "route", "show", "table", "main"]).stdout
    rules6 = lab_style.exec("host", ["ip", "-6", "rule", "show"]).stdout
    if st["style"] == "replaced":
        assert f"default dev {T.TUN_HOST_IF}" in main4
        assert f"{T.VPNSRV_V4} via {T.ISP_LAN_V4} dev {T.HOST_IF}" in main4
        every = lab_style.exec("host", ["ip", "route", "show", "table", "all"]).stdout
        every += lab_style.exec("host", ["ip", "-6", "route", "show", "table", "all"]).stdout
        assert not [r for r in every.splitlines() if r.startswith("default") and T.HOST_IF in r]
    else:
        assert f"default via {T.ISP_LAN_V4} dev {T.HOST_IF}" in main4
        assert f"not from all fwmark {T.WG_FWMARK:#x} lookup {T.WG_TABLE}" in rules6
        assert "lookup main suppress_prefixlength 0" in rules6
        wg6 = lab_style.exec("host", ["ip", "-6", "route", "show", "table", str(T.WG_TABLE)]).stdout
        assert f"default dev {T.TUN_HOST_IF}" in wg6
    nft = lab_style.exec("host", ["nft", "list", "ruleset"]).stdout
    assert ("fib saddr type != local drop" in nft) == st["antispoof"]


# --------------------------------------------------------------------------- no on-link luck


@pytest.mark.parametrize("family", [4, 6])
def test_bindtodevice_alone_cannot_reach_inet_when_vpn_replaced_default(lab_replaced: Lab, family: int) -> None:
    """No route via eth0 exists, so SO_BINDTODEVICE alone must fail: IPv4 tries the kernel's on-link
    fallback (ARP for the server on eth0, nobody answers), IPv6 reports no route at once."""
    t0 = time.monotonic()
    proc = lab_replaced.exec("host", [*CLIENT, "--family", str(family), "--bind-dev", T.HOST_IF, "--timeout", "2"])
    assert proc.returncode != 0, proc.stdout
    assert "error:" in proc.stderr
    assert time.monotonic() - t0 < 5


def test_isp_does_not_answer_for_foreign_addresses(lab: Lab) -> None:
    """The ISP only routes: no proxy ARP/NDP (on-link guesses stay unanswered), no NAT."""
    keys = ("net.ipv4.conf.all.proxy_arp", f"net.ipv4.conf.{T.ISP_LAN_IF}.proxy_arp", "net.ipv6.conf.all.proxy_ndp")
    for key in keys:
        assert lab.exec("isp", ["sysctl", "-n", key]).stdout.strip() == "0", key
    nat = lab.exec("isp", ["iptables-legacy-save"]).stdout + lab.exec("isp", ["nft", "list", "ruleset"]).stdout
    assert "MASQUERADE" not in nat and "masquerade" not in nat


def test_bindtodevice_alone_uses_main_default_in_wgquick(lab: Lab, leaks: Leaks) -> None:
    """wg-quick keeps the physical default in main, so a device-bound socket legitimately gets out."""
    leaks.allow(T.WHOAMI_V4, "tcp", T.WHOAMI_TCP_PORT)  # that socket, on purpose out of eth0
    lab.set_style("wgquick")
    try:
        proc = lab.exec("host", [*CLIENT, "--bind-dev", T.HOST_IF, "--timeout", "3"])
        assert (proc.returncode, proc.stdout.strip()) == (0, T.HOST_V4), proc.stderr
    finally:
        lab.set_style("replaced", antispoof=False)


def test_switching_styles_sends_nothing_out_of_eth0(lab: Lab) -> None:
    """While the host's routing is switched, unmarked traffic goes into the tunnel or nowhere: a sender trying
    both servers all along never gets a datagram out of the physical link (seen by the leak monitor)."""
    sender = (
        "import socket, sys, time\n"
        "socks = [(socket.socket(socket.AF_INET6 if ':' in a else socket.AF_INET, socket.SOCK_DGRAM), a)"
        " for a in sys.argv[1:]]\n"
        "while True:\n"
        "    for s, a in socks:\n"
        "        try: s.sendto(b'x', (a, 9))\n"
        "        except OSError: pass\n"
        "    time.sleep(0.0005)\n"
    )
    monitor = LeakMonitor(lab)
    monitor.mark()
    proc = lab.popen("host", [sys.executable, "-c", sender, T.SERVER_V4[1], T.SERVER_V6[1]])
    try:
        for _ in range(2):
            lab.set_style("wgquick", antispoof=False)
            lab.set_style("replaced", antispoof=False)
    finally:
        proc.kill()
        proc.wait()
    report = monitor.report()
    report.assert_no_leaks()
    assert report.carrier > 100  # the sender was heard, through the tunnel


# -------------------------------------------------------------------------------- the tunnel


def test_tunnel_is_a_real_tun(lab: Lab) -> None:
    flags = lab.exec("host", ["cat", f"/sys/class/net/{T.TUN_HOST_IF}/tun_flags"])
    assert flags.returncode == 0, flags.stderr
    assert int(flags.stdout, 16) & (IFF_TUN | IFF_NO_PI) == IFF_TUN | IFF_NO_PI
    (link,) = json.loads(lab.exec("host", ["ip", "-j", "link", "show", T.TUN_HOST_IF]).stdout)
    assert {"POINTOPOINT", "NOARP", "UP"} <= set(link["flags"])
    assert link["link_type"] == "none"
    assert link["mtu"] == T.TUN_MTU


def test_second_server_address_answers_from_itself(lab_replaced: Lab) -> None:
    """inet has several addresses; replies (UDP too) must come from the one that was asked."""
    for proto in ("tcp", "udp"):
        for target in (T.SERVER_V4[1], T.SERVER_V6[1]):
            proc = lab_replaced.exec("host", [*CLIENT, "--proto", proto, "--target", target, "--json"])
            assert proc.returncode == 0, proc.stderr
            answer = json.loads(proc.stdout)
            assert answer["server"] == target
            assert answer["seen"] == VPN_EXIT[6 if ":" in target else 4]


def test_antispoof_drops_tunnel_address_arriving_on_eth0(lab: Lab, leaks: Leaks) -> None:
    """wg-quick's preraw rule: packets for the tunnel address that did not come through the tunnel."""
    leaks.allow(T.ISP_LAN_V4, "tcp")  # without the rule the host answers isp's probe (RST) on the link
    route = ["ip", "route", "add", f"{T.TUN_HOST_V4}/32", "via", T.HOST_V4, "dev", T.ISP_LAN_IF]
    probe = [*CLIENT, "--target", T.TUN_HOST_V4, "--port", "9", "--timeout", "1"]
    assert lab.exec("isp", route).returncode == 0
    try:
        lab.set_style("wgquick", antispoof=False)
        assert "Connection refused" in lab.exec("isp", probe).stderr  # the host answered (RST)
        lab.set_style("wgquick", antispoof=True)
        assert "timeout" in lab.exec("isp", probe).stderr  # dropped in raw prerouting
    finally:
        lab.exec("isp", ["ip", "route", "del", f"{T.TUN_HOST_V4}/32"])
        lab.set_style("replaced", antispoof=False)


def test_status(lab_replaced: Lab) -> None:
    st = lab_replaced.status()
    assert st["name"] == lab_replaced.name and st["exists"] and st["style"] == "replaced" and st["antispoof"] is False
    assert st["namespaces"] == dict.fromkeys(T.ROLES, True)
    assert set(st["processes"]) == {"servers", "tunnel-host", "tunnel-vpnsrv", "leakmon"}
    assert all(p["alive"] and p["pid"] for p in st["processes"].values())
    assert lab_replaced.name in lab_names()
    with pytest.raises(ValueError):
        lab_replaced.set_style("openvpn")


# ------------------------------------------------------------------------------------ lifecycle


def _assert_gone(lab: Lab) -> None:
    assert not lab.exists()
    assert not [ns for ns in lab.namespaces.values() if Path("/run/netns", ns).exists()]
    assert lab.name not in lab_names()
    assert lab_daemons(lab.name) == {}
    assert not lab.state_dir.exists()
    st = lab.status()
    assert not st["exists"] and not any(p["alive"] for p in st["processes"].values())


def test_lifecycle_crash_and_rebuild(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab("tlife", style="wgquick", antispoof=True)
    try:
        lab.down()  # nothing there: must not fail
        _assert_gone(lab)
        lab.up()
        assert lab.whoami() == T.VPNSRV_V4
        pids = lab_daemons(lab.name)
        assert len(pids) == 4  # servers, both tunnel ends, the leak monitor
        # Simulated crash: the daemons die hard, namespaces and state stay behind.
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
        assert Lab(lab.name).exists()
        with pytest.raises(LabError):
            lab.whoami(timeout=1)
        Lab(lab.name).down()  # a fresh object: everything it needs is on disk / in the kernel
        _assert_gone(lab)
        lab.down()
        # up over an existing lab replaces it.
        lab.up()
        lab.up()
        assert lab.whoami(family=6, proto="udp") == T.VPNSRV_V6
        assert lab.status()["style"] == "wgquick" and lab.status()["antispoof"] is True
        # status() without its state file: style guessed from the host, daemons found by command line.
        (lab.state_dir / "state.json").unlink()
        st = Lab(lab.name).status()
        assert (st["style"], st["antispoof"]) == ("wgquick", True)
        assert all(p["alive"] for p in st["processes"].values())
    finally:
        lab.down()
    _assert_gone(lab)


def test_down_cleans_half_built_lab(make_lab: Callable[..., Lab]) -> None:
    """A crash mid-up(): some namespaces, a stray process in one, no state dir."""
    lab = make_lab("thalf")
    try:
        subprocess.run(["ip", "netns", "add", lab.ns_isp], check=True)
        sleeper = lab.popen("isp", ["sleep", "60"])
        assert lab.exists() and lab.name in lab_names()
        assert not lab.status()["namespaces"]["host"]
        lab.down()
        assert sleeper.wait(timeout=5) != 0
        _assert_gone(lab)
    finally:
        lab.down()
