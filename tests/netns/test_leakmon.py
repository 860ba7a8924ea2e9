"""The leak monitor's calibration in the lab (splittun.lab.leakmon): a packet deliberately sent out of the
physical link to a destination nobody allowed is exactly one leak; the same with the probe TTL is a probe;
traffic through the VPN is carrier only; an allowed destination is counted as allowed; a second uplink is
watched too; and a monitor that is not running fails the check instead of seeing nothing."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

import pytest

from splittun.lab import Lab
from splittun.lab import topology as T
from splittun.lab.leakmon import (
    Allowance,
    LeakMonitor,
    LeakMonitorError,
)
from tests.support.lab import Leaks

ISP = {4: T.HOST_V4, 6: T.HOST_V6}
VPN = {4: T.VPNSRV_V4, 6: T.VPNSRV_V6}
TARGET = {4: T.SERVER_V4[1], 6: T.SERVER_V6[1]}
PORT = {"tcp": T.WHOAMI_TCP_PORT, "udp": T.WHOAMI_UDP_PORT}


def out_of_eth0(lab: Lab, proto: str, target: str, ttl: int = 0, dev: str = T.HOST_IF) -> str:
    """The lab client, deliberately out of the physical link (SO_MARK to the forced ISP path + SO_BINDTODEVICE),
    with the probe TTL only when asked: what a leak looks like on the wire."""
    argv = [sys.executable, "-m", "splittun.lab.client", "--proto", proto, "--target", target, "--timeout", "3",
            "--bind-dev", dev, *(["--mark", hex(T.ISP_PATH_MARK)] if dev == T.HOST_IF else []),
            *(["--ttl", str(ttl)] if ttl else [])]  # fmt: skip
    if dev == T.HOST_IF:
        with lab._isp_path():
            proc = lab.exec("host", argv)
    else:
        proc = lab.exec("host", argv)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


CALIBRATION = [pytest.param(proto, family, id=f"{proto}{family}") for proto in ("tcp", "udp") for family in (4, 6)]


@pytest.mark.parametrize(("proto", "family"), CALIBRATION)
def test_calibration_a_packet_out_of_the_physical_link_is_exactly_one_leak(
    lab_replaced: Lab, leaks: Leaks, proto: str, family: int
) -> None:
    lab, target = lab_replaced, TARGET[family]
    monitor = LeakMonitor(lab)
    monitor.mark()
    assert out_of_eth0(lab, proto, target) == ISP[family]
    report = monitor.report()
    assert [(r["proto"], r["src"], r["dst"], r["dport"], r["iface"]) for r in report.leaks] == [
        (proto, ISP[family], target, PORT[proto], T.ISP_LAN_IF)
    ]
    assert report.leaks[0]["ttl"] != T.PROBE_TTL and report.allowed == [] and report.drops == 0
    with pytest.raises(AssertionError, match=f"1 flow outside the VPN.*\n  LEAK {proto} "):
        report.assert_no_leaks()
    leaks.allow(target, proto, PORT[proto])  # sent on purpose: the leak check after this test must not count it


@pytest.mark.parametrize(("proto", "family"), CALIBRATION)
def test_calibration_the_same_with_the_probe_ttl_is_a_probe(lab_replaced: Lab, proto: str, family: int) -> None:
    lab = lab_replaced
    monitor = LeakMonitor(lab)
    monitor.mark()
    assert out_of_eth0(lab, proto, TARGET[family], ttl=T.PROBE_TTL) == ISP[family]
    report = monitor.report()
    assert report.leaks == [] and report.allowed == [] and "candidate" not in report.flows
    assert report.flows["probe"] == 1 and report.probes >= (1 if proto == "udp" else 4)  # SYN, ACK, request, FIN
    report.assert_no_leaks()


@pytest.mark.parametrize(("proto", "family"), CALIBRATION)
def test_calibration_traffic_through_the_vpn_is_carrier_only(lab_replaced: Lab, proto: str, family: int) -> None:
    lab = lab_replaced
    monitor = LeakMonitor(lab)
    monitor.mark()
    assert lab.whoami(proto=proto, family=family, target=TARGET[family]) == VPN[family]  # type: ignore[arg-type]
    report = monitor.report()
    assert report.leaks == [] and "candidate" not in report.flows and "probe" not in report.flows
    assert report.flows["carrier"] == 1 and report.carrier >= (1 if proto == "udp" else 4)
    report.assert_no_leaks()


@pytest.mark.parametrize(("proto", "family"), CALIBRATION)
def test_calibration_an_allowed_destination_is_counted_as_allowed(
    lab_replaced: Lab, leaks: Leaks, proto: str, family: int
) -> None:
    lab, target = lab_replaced, TARGET[family]
    monitor = LeakMonitor(lab)
    monitor.mark()
    out_of_eth0(lab, proto, target)
    allowed = monitor.report(allow=[Allowance.of(target, proto, PORT[proto])])
    assert allowed.leaks == [] and [(r["dst"], r["dport"]) for r in allowed.allowed] == [(target, PORT[proto])]
    allowed.assert_no_leaks()
    assert "1 split flow allowed" in allowed.summary()
    # Only what the allowance names: another port, another protocol or another uplink is still a leak.
    other = "udp" if proto == "tcp" else "tcp"
    for wrong in (Allowance.of(target, proto, PORT[proto] + 1), Allowance.of(target, other),
                  Allowance.of(TARGET[10 - family], proto), Allowance.of(target, via=T.HOST2_IF)):  # fmt: skip
        assert len(monitor.report(allow=[wrong]).leaks) == 1, wrong
    leaks.allow(target, proto, PORT[proto])


def test_calibration_a_second_uplink_is_watched_too(make_lab: Callable[..., Lab], leaks: Leaks) -> None:
    lab = make_lab("tlm2", second_uplink=True)
    lab.up()
    monitor = LeakMonitor(lab)
    assert monitor.watched() == [T.HOST_IF, T.HOST2_IF]
    monitor.mark()
    assert out_of_eth0(lab, "tcp", T.SERVER_V4[1], dev=T.HOST2_IF) == T.HOST2_V4
    assert out_of_eth0(lab, "udp", T.SERVER_V6[1], dev=T.HOST2_IF) == T.HOST2_V6
    report = monitor.report()
    assert sorted((r["proto"], r["src"], r["dst"], r["iface"]) for r in report.leaks) == [
        ("tcp", T.HOST2_V4, T.SERVER_V4[1], T.ISP_LAN2_IF),
        ("udp", T.HOST2_V6, T.SERVER_V6[1], T.ISP_LAN2_IF),
    ]
    assert monitor.report(allow=[Allowance.of("203.0.113.0/24", via=T.HOST_IF)]).leaks != []
    leaks.allow(T.SERVER_V4[1], "tcp", T.WHOAMI_TCP_PORT, via=T.HOST2_IF)
    leaks.allow(T.SERVER_V6[1], "udp", T.WHOAMI_UDP_PORT, via=T.HOST2_IF)


def test_calibration_a_monitor_that_is_not_running_fails_the_check(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab("tlmdead")
    lab.up()
    monitor = LeakMonitor(lab)
    monitor.mark()
    pid = lab.status()["processes"]["leakmon"]["pid"]
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(LeakMonitorError, match="did not log sync"):
        monitor.report(timeout=0.5)
    lab.down()  # the lab is gone, so the check after the test has nothing left to vouch for
    with pytest.raises(LeakMonitorError, match="no leak monitor"):
        monitor.report(timeout=0.5)
