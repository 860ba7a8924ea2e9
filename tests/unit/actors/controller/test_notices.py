"""Which notifications the config and the network call for (actors/controller/notices.py)."""

from __future__ import annotations

from actors.controller import notices
from core import config as cfg
from messages import InterfaceRecord, NetenvChanged

NOW = 1_800_000_000.0
ETH0 = InterfaceRecord(name="eth0", index=2, mac="02:00:00:00:00:01", addresses=["192.0.2.10/24"], ipv4="192.0.2.10")


def netenv(*interfaces: InterfaceRecord, uplink: str = "eth0") -> NetenvChanged:
    return NetenvChanged(seq=1, ts=NOW, interfaces=list(interfaces), uplink_ipv4=uplink)


def config(**data: object) -> cfg.Config:
    return cfg.from_json({"splittun/enable": True, **data})


def test_nothing_while_off_or_before_the_first_snapshot() -> None:
    assert notices.conditions(cfg.Config(), netenv(), NOW) == {}
    assert notices.conditions(config(), None, NOW) == {}


def test_the_split_interface_named_or_automatic() -> None:
    assert notices.conditions(config(), netenv(ETH0), NOW) == {}
    gone = notices.conditions(config(), netenv(uplink=""), NOW)
    assert list(gone) == [notices.INTERFACE_GONE] and "physical uplink" in gone[notices.INTERFACE_GONE].message
    named = config(**{"splittun/interface": "192.0.2.10"})
    assert notices.conditions(named, netenv(ETH0), NOW) == {}
    assert "'192.0.2.10'" in notices.conditions(named, netenv(), NOW)[notices.INTERFACE_GONE].message
    back = notices.interface_back(named, NOW)
    assert back.level == "info" and back.expires > NOW and "'192.0.2.10' again" in back.message


def test_a_rule_whose_interface_does_not_exist_can_never_match() -> None:
    rules = [{"id": "r1", "action": "split", "interface": "eth0"}, {"id": "r2", "action": "split", "interface": "wg9"}]
    found = notices.conditions(config(**{"splittun/rules": rules}), netenv(ETH0), NOW)
    assert list(found) == ["rule-never-matches-r2"]
    assert "'wg9'" in found["rule-never-matches-r2"].message
    assert [a.id for a in found["rule-never-matches-r2"].actions] == ["open-rules", "suppress"]
