"""The config file: validation messages name the key, writes are atomic, bad config changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core import config as cfg


def test_defaults_when_no_file(tmp_path: Path) -> None:
    loaded = cfg.load(tmp_path / "config.json")
    assert loaded == cfg.Config() and loaded.enable is False and loaded.interface == "" and loaded.rules == ()


def test_round_trip_and_atomic_save(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    config = cfg.from_json(
        {
            "splittun/enable": True,
            "splittun/interface": "eth0",
            "splittun/rules": [
                {"id": "r1", "action": "split", "app_name": "curl", "dest": "203.0.113.0/24"},
                {"id": "r2", "endpoint": "- 203.0.113.81 tcp/80"},
            ],
        }
    )
    cfg.save(path, config)
    assert cfg.load(path) == config
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary file left behind
    stored = json.loads(path.read_text())
    assert stored["splittun/rules"][0] == {"id": "r1", "action": "split", "app_name": "curl", "dest": "203.0.113.0/24"}
    assert stored["splittun/rules"][1]["source"] == "- 203.0.113.81 tcp/80"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"splittun/enable": "yes"}, "splittun/enable: expected true or false, got a string"),
        ({"splittun/colour": "red"}, "splittun/colour: unknown key"),
        ({"splittun/interface": 5}, "splittun/interface: expected a string"),
        ({"splittun/rules": {"id": "r1"}}, "splittun/rules: expected a list of rules, got an object"),
        (
            {"splittun/rules": [{"id": "r1", "action": "split", "dest": "10.0.0.0/33"}]},
            "splittun/rules[0].dest: '10.0.0.0/33' is not a valid CIDR",
        ),
        (
            {"splittun/rules": [{"id": "r1", "action": "split", "port_lo": "80"}]},
            "splittun/rules[0].port_lo: expected int, got a string",
        ),
        (
            {"splittun/rules": [{"id": "r1", "action": "split", "colour": "red"}]},
            "splittun/rules[0].colour: unknown rule field",
        ),
        ({"splittun/rules": [{"action": "split"}]}, "splittun/rules[0].id: missing"),
        (
            {"splittun/rules": [{"id": "a", "action": "split"}, {"id": "a", "action": "keep"}]},
            "splittun/rules[1].id: duplicate rule id 'a'",
        ),
        ({"splittun/rules": [{"id": "e", "endpoint": "+ AS123"}]}, "splittun/rules[0].endpoint: '+ AS123': ASN"),
        ([1, 2], "config: expected a JSON object"),
    ],
)
def test_invalid_config_names_key_and_problem(data: object, message: str) -> None:
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.from_json(data)
    assert str(caught.value).startswith(message), str(caught.value)
    assert "\n" not in str(caught.value)


def test_unknown_interface_is_refused_when_checked() -> None:
    known = {"eth0", "192.0.2.10", "02:00:00:00:00:01"}.__contains__
    assert cfg.from_json({"splittun/interface": "192.0.2.10"}, known).interface == "192.0.2.10"
    with pytest.raises(cfg.ConfigError, match=r"^splittun/interface: unknown interface 'wlan9'"):
        cfg.from_json({"splittun/interface": "wlan9"}, known)
    rules = {"splittun/rules": [{"id": "r1", "action": "split", "interface": "wlan9"}]}
    with pytest.raises(cfg.ConfigError, match=r"^splittun/rules\[0\]\.interface: unknown interface"):
        cfg.from_json(rules, known)


def test_broken_file_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"splittun/enable": tru')
    with pytest.raises(cfg.ConfigError, match=r"config.json: not valid JSON .* line 1 column"):
        cfg.load(path)


def test_set_value_from_cli_text() -> None:
    base = cfg.Config()
    assert cfg.set_value(base, "splittun/enable", "true").enable is True
    assert cfg.set_value(base, "splittun/interface", "auto").interface == ""
    rules = cfg.set_value(base, "splittun/rules", '[{"id": "r1", "action": "keep"}]').rules
    assert [r.id for r in rules] == ["r1"]
    with pytest.raises(cfg.ConfigError, match="splittun/enable: expected true or false"):
        cfg.set_value(base, "splittun/enable", "maybe")
    with pytest.raises(cfg.ConfigError, match="splittun/rules: not valid JSON"):
        cfg.set_value(base, "splittun/rules", "[{")
    with pytest.raises(cfg.ConfigError, match="nope: unknown key"):
        cfg.set_value(base, "nope", "1")


def test_levels_and_next_rule_id() -> None:
    assert {o.key for o in cfg.options_for_level("user")} == {"splittun/enable", "splittun/interface", "splittun/rules"}
    assert all(o.description and o.level in cfg.LEVELS for o in cfg.OPTIONS.values())
    config = cfg.from_json({"splittun/rules": [{"id": "r2", "action": "keep"}, {"id": "custom", "action": "keep"}]})
    assert config.next_rule_id() == "r3"
