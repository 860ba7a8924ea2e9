"""`splittun interfaces`: the table and the JSON, answered by the library without the actors."""

from __future__ import annotations

import json

import pytest

import core.netenv as netenv
from core.netenv.linux import LinuxSource
from core.netenv.raw import RawState
from splittun import cli
from tests.support import FIXTURES_DIR

FIXTURES = FIXTURES_DIR / "netenv"


class FailingSource:
    def read(self) -> RawState:
        raise OSError("netlink went away")

    def close(self) -> None:
        pass


@pytest.fixture
def fixture_netenv(monkeypatch: pytest.MonkeyPatch) -> netenv.Netenv:
    """The library's process-wide cache, reading the vpn_replaced tree (an OpenVPN-style VPN is on)."""
    env = netenv.Netenv(LinuxSource.from_tree(FIXTURES / "vpn_replaced"))
    monkeypatch.setattr(netenv, "default", env)
    return env


# --- the CLI ----------------------------------------------------------------------------------------


def test_cli_json_and_table(fixture_netenv: netenv.Netenv, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["interfaces", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["uplink"] == {"ipv4": "eth0", "ipv6": "eth0"}
    assert {i["name"]: i["kind"] for i in data["interfaces"]} == {"eth0": "physical", "wgivpn": "tunnel"}
    assert data["default_route"] == {"ipv4": "wgivpn", "ipv6": "wgivpn"}
    assert cli.main(["interfaces"]) == 0
    out = capsys.readouterr().out
    assert "uplink ipv4:  eth0 via 192.0.2.1" in out and "default now:  ipv4 wgivpn" in out
    eth0_row = next(line for line in out.splitlines() if line.startswith("eth0"))
    assert "physical" in eth0_row and "ipv4,ipv6" in eth0_row
    assert cli.main(["interfaces", "--all", "--json"]) == 0
    assert "lo" in {i["name"] for i in json.loads(capsys.readouterr().out)["interfaces"]}


def test_cli_without_any_uplink(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(netenv, "default", netenv.Netenv(LinuxSource.from_tree(FIXTURES / "no_default")))
    assert cli.main(["interfaces", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["uplink"] == {"ipv4": None, "ipv6": None}


def test_cli_reports_an_unreadable_state(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(netenv, "default", netenv.Netenv(FailingSource()))
    assert cli.main(["interfaces"]) == 1
    assert "cannot read the network state" in capsys.readouterr().err
