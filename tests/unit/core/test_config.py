"""The config file: validation messages name the key, writes are atomic, bad config changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core import config as cfg
from messages.control import ConfigSet, Controller, InterfaceChoice, NoArgs, RuleAdd, RuleMove, RuleRef


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
    assert {o.key for o in cfg.options_for_level("user")} == {
        "splittun/enable",
        "splittun/interface",
        "splittun/rules",
        "splittun/splitDNS",
        "splittun/vpnDomains",
    }
    assert all(o.description and o.level in cfg.LEVELS for o in cfg.OPTIONS.values())
    config = cfg.from_json({"splittun/rules": [{"id": "r2", "action": "keep"}, {"id": "custom", "action": "keep"}]})
    assert config.next_rule_id() == "r3"


# --- edits (the controller's ops; the CLI's own when splittun is not running) ----------------------------

KNOWN = {"eth0", "192.0.2.10"}.__contains__


def test_edits_build_the_new_config_and_name_the_rule_they_added() -> None:
    config, rule = cfg.edit(cfg.Config(), Controller.ADD_RULE, RuleAdd(name="curl", port="80-90"), KNOWN)
    assert rule is not None and (rule.id, rule.app_name, rule.port_lo, rule.port_hi) == ("r1", "curl", 80, 90)
    config, rule = cfg.edit(config, Controller.ADD_RULE, RuleAdd(endpoint="+ .example.com tcp/443", position=1), KNOWN)
    assert rule is not None and rule.id == "r2" and [r.id for r in config.rules] == ["r2", "r1"]
    config, _ = cfg.edit(config, Controller.MOVE_RULE, RuleMove(id="r2", position=2), KNOWN)
    assert [r.id for r in config.rules] == ["r1", "r2"]
    config, _ = cfg.edit(config, Controller.REMOVE_RULE, RuleRef(id="r1"), KNOWN)
    assert [r.id for r in config.rules] == ["r2"]
    config, nothing = cfg.edit(config, Controller.ENABLE, NoArgs(), KNOWN)
    assert config.enable is True and nothing is None
    assert cfg.edit(config, Controller.DISABLE, NoArgs(), KNOWN)[0].enable is False
    config, _ = cfg.edit(config, Controller.SET_INTERFACE, InterfaceChoice(choice="192.0.2.10"), KNOWN)
    assert config.interface == "192.0.2.10"
    config, _ = cfg.edit(config, Controller.SET_CONFIG, ConfigSet(key="splittun/interface", value="auto"), KNOWN)
    assert config.interface == ""


@pytest.mark.parametrize(
    ("op", "args", "message"),
    [
        (Controller.ADD_RULE, RuleAdd(interface="nosuch0"), "--interface: unknown interface 'nosuch0'"),
        (Controller.ADD_RULE, RuleAdd(endpoint="+ 192.0.2.1", keep=True), "--endpoint: cannot be combined"),
        (Controller.ADD_RULE, RuleAdd(dest="10.0.0.0/33"), "dest: '10.0.0.0/33' is not a valid CIDR"),
        (Controller.ADD_RULE, RuleAdd(port="99999"), "port"),
        (Controller.ADD_RULE, RuleAdd(position=5), "position: must be between 1 and 2, got 5"),
        (Controller.MOVE_RULE, RuleMove(id="r1", position=0), "r1: no such rule (rules: a)"),
        (Controller.REMOVE_RULE, RuleRef(id="zz"), "zz: no such rule (rules: a)"),
        (Controller.SET_INTERFACE, InterfaceChoice(choice="wlan9"), "splittun/interface: unknown interface 'wlan9'"),
        (Controller.SET_CONFIG, ConfigSet(key="splittun/rules", value="[{"), "splittun/rules: not valid JSON"),
        (Controller.SET_CONFIG, ConfigSet(key="nope", value="1"), "nope: unknown key"),
    ],
)
def test_a_refused_edit_is_one_line_naming_the_flag_or_key(op: object, args: object, message: str) -> None:
    base = cfg.Config(rules=(cfg.rule_from_json("r", {"id": "a", "action": "keep"}),))
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.edit(base, op, args, KNOWN)  # type: ignore[arg-type]
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value), str(caught.value)
    assert isinstance(caught.value, cfg.RuleNotFound) == ("no such rule" in message)


def test_an_edit_checks_the_interfaces_of_the_whole_config() -> None:
    base = cfg.from_json({"splittun/rules": [{"id": "r1", "action": "split", "interface": "wlan9"}]})
    with pytest.raises(cfg.ConfigError, match=r"^splittun/rules\[0\]\.interface: unknown interface 'wlan9'"):
        cfg.edit(base, Controller.ENABLE, NoArgs(), KNOWN)
    with pytest.raises(ValueError, match="not a config edit"):
        cfg.edit(base, Controller.POLICY, NoArgs(), KNOWN)


def test_split_dns_servers_and_vpn_domains_are_lists_set_comma_separated_and_validated() -> None:
    from core.config import SPLIT_DNS, VPN_DOMAINS, Config, ConfigError, from_json, set_value

    config = set_value(Config(), SPLIT_DNS, "203.0.113.53, 2001:db8::53,203.0.113.53")
    config = set_value(config, VPN_DOMAINS, ".Corp.Example")
    assert (config.split_dns, config.vpn_domains) == (("203.0.113.53", "2001:db8::53"), ("corp.example",))
    assert from_json(config.to_json()) == config
    assert set_value(config, SPLIT_DNS, "").split_dns == ()
    assert set_value(config, SPLIT_DNS, '["192.0.2.1"]').split_dns == ("192.0.2.1",)
    assert set_value(config, SPLIT_DNS, "TLS://192.0.2.1#DNS.isp.test").split_dns == ("tls://192.0.2.1#dns.isp.test",)
    for key, bad, problem in ((SPLIT_DNS, "dns.example", "'dns.example' is not an IP address (or tls://ADDRESS[#NAME])"),
                              (SPLIT_DNS, "::1", "::1 cannot be a split DNS server (loopback, unspecified or multicast)"),  # noqa: E501
                              (VPN_DOMAINS, "*.corp", "'*.corp' is not a domain name")):  # fmt: skip
        with pytest.raises(ConfigError) as err:
            set_value(config, key, bad)
        assert str(err.value) == f"{key}: {problem}"
