"""The config: options named like Portmaster's, validated as a whole, stored as one JSON file.

Edits are the controller's ops (messages/control.py: enable, disable, interface.set, rules.add|remove|move,
config.set) and `edit()` below applies one to a config, validated: the controller does while splittun runs
(it is then the only writer of the file), the CLI itself only when splittun is not running. A save is
atomic (temporary file → fsync → rename, so a reader never sees half a file). A hand-edited file is
reloaded by the controller when it changes. Invalid config is refused with one message naming the key (or
the command-line flag) and the problem, and whatever config was in force stays in force.

Options carry an expertise level like Portmaster's: user ⊂ expert ⊂ developer. The split-tunnel
options are user level.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.dns.route import Server
from core.policy import RuleError, parse_endpoint, parse_ports
from core.policy import validate as validate_rule
from core.policy.rules import classify_dest, has_glob, normalize_domain
from messages import PolicyRule
from messages.control import ConfigSet, Controller, InterfaceChoice, Op, RuleAdd, RuleMove, RuleRef

LEVELS = ("user", "expert", "developer")

ENABLE = "splittun/enable"
INTERFACE = "splittun/interface"
RULES = "splittun/rules"
SPLIT_DNS = "splittun/splitDNS"
VPN_DOMAINS = "splittun/vpnDomains"


class ConfigError(ValueError):
    """Invalid config. `str()` is one line: `<key>: <problem>`."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")


class RuleNotFound(ConfigError):
    """An edit names a rule the config does not have."""


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected true or false, got {_json_type(value)}")
    return value


def _interface(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string (empty = auto, or a name, IP or MAC), got {_json_type(value)}")
    value = value.strip()
    return "" if value.lower() == "auto" else value


def _servers(key: str, value: Any) -> list[str]:
    """DNS server addresses (IPv4 or IPv6, port 53; tls://ADDRESS[#NAME] for DNS over TLS), each once, in order."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(key, f"expected a list of IP addresses, got {_json_type(value)}")
    out: list[str] = []
    for text in value:
        try:
            server = Server.parse(text)
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None
        ip = ipaddress.ip_address(server.address)
        if ip.is_loopback or ip.is_unspecified or ip.is_multicast:
            raise ConfigError(key, f"{ip} cannot be a split DNS server (loopback, unspecified or multicast)")
        if str(server) not in out:
            out.append(str(server))
    return out


def _domains(key: str, value: Any) -> list[str]:
    """Domain names (a name covers its subdomains), lower case, each once."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(key, f"expected a list of domain names, got {_json_type(value)}")
    out: list[str] = []
    for text in value:
        name = normalize_domain(text).lstrip(".")
        try:
            if classify_dest(name) != "domain" or has_glob(name):
                raise RuleError("dest", "")
        except RuleError:
            raise ConfigError(key, f"{text.strip()!r} is not a domain name") from None
        if name not in out:
            out.append(name)
    return out


def _parse_list_text(text: str) -> Any:
    """CLI text of a list option: a JSON list, or comma-separated values ("" = none)."""
    if text.strip().startswith("["):
        return _parse_json_text(text)
    return [part.strip() for part in text.split(",") if part.strip()]


def _rules(key: str, value: Any) -> list[PolicyRule]:
    if not isinstance(value, list):
        raise ConfigError(key, f"expected a list of rules, got {_json_type(value)}")
    out: list[PolicyRule] = []
    seen: set[str] = set()
    for index, item in enumerate(value):
        where = f"{key}[{index}]"
        rule = rule_from_json(where, item)
        if rule.id in seen:
            raise ConfigError(f"{where}.id", f"duplicate rule id {rule.id!r}")
        seen.add(rule.id)
        out.append(rule)
    return out


@dataclass(frozen=True)
class Option:
    key: str
    level: str
    default: Any
    description: str
    check: Callable[[str, Any], Any]  # (key, JSON value) → canonical value, or ConfigError
    parse_text: Callable[[str], Any]  # CLI text → JSON value

    def value_text(self, value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, list):
            return json.dumps([rule_to_json(r) if isinstance(r, PolicyRule) else r for r in value])
        return str(value) if value != "" else '""'


def _parse_bool_text(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "yes", "on", "1"):
        return True
    if low in ("false", "no", "off", "0"):
        return False
    return text  # let the check name the problem


def _parse_json_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        return _Unparsable(f"not valid JSON ({exc.msg} at column {exc.colno})")


@dataclass(frozen=True)
class _Unparsable:
    problem: str


OPTIONS: dict[str, Option] = {
    opt.key: opt
    for opt in (
        Option(
            ENABLE,
            "user",
            False,
            "Split tunnelling on or off. When off, every connection stays in the VPN.",
            _bool,
            _parse_bool_text,
        ),
        Option(
            INTERFACE,
            "user",
            "",
            "Interface split connections leave through: empty (auto) = the physical adapter that carries the "
            "default route; or an interface name, IP address or MAC address.",
            _interface,
            lambda text: text,
        ),
        Option(
            RULES,
            "user",
            [],
            "Which connections are split, first match wins; a connection no rule matches stays in the VPN. "
            "Edit with `splittun rules`.",
            _rules,
            _parse_json_text,
        ),
        Option(
            SPLIT_DNS,
            "user",
            [],
            "DNS servers that split apps' queries go to, out of the split interface (IP addresses, or "
            "tls://ADDRESS#NAME for DNS over TLS; comma-separated on the command line). Empty = the servers "
            "netenv learned for that interface.",
            _servers,
            _parse_list_text,
        ),
        Option(
            VPN_DOMAINS,
            "user",
            [],
            "Domains (with their subdomains) that always resolve through the VPN, also for split apps: "
            "an intranet behind the VPN (comma-separated on the command line).",
            _domains,
            _parse_list_text,
        ),
    )
}


@dataclass(frozen=True)
class Config:
    enable: bool = False
    interface: str = ""
    rules: tuple[PolicyRule, ...] = ()
    split_dns: tuple[str, ...] = ()
    vpn_domains: tuple[str, ...] = ()

    def value(self, key: str) -> Any:
        return {ENABLE: self.enable, INTERFACE: self.interface, RULES: list(self.rules),
                SPLIT_DNS: list(self.split_dns), VPN_DOMAINS: list(self.vpn_domains)}[key]  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        data = {ENABLE: self.enable, INTERFACE: self.interface, RULES: [rule_to_json(r) for r in self.rules]}
        if self.split_dns:
            data[SPLIT_DNS] = list(self.split_dns)
        if self.vpn_domains:
            data[VPN_DOMAINS] = list(self.vpn_domains)
        return data

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def next_rule_id(self) -> str:
        numbers = [int(r.id[1:]) for r in self.rules if r.id[:1] == "r" and r.id[1:].isdigit()]
        return f"r{max(numbers, default=0) + 1}"


# --- rules as JSON --------------------------------------------------------------------------------------

_RULE_FIELDS = {f.name: f for f in dataclasses.fields(PolicyRule)}
_RULE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(PolicyRule) if f.default is not dataclasses.MISSING}


def rule_to_json(rule: PolicyRule) -> dict[str, Any]:
    """Only what differs from the defaults: short, readable config files."""
    data = {"id": rule.id, "action": rule.action}
    for name, default in _RULE_DEFAULTS.items():
        value = getattr(rule, name)
        if value != default:
            data[name] = value
    return data


def rule_from_json(where: str, item: Any) -> PolicyRule:
    if isinstance(item, str):  # a Portmaster endpoint-list line is a rule too
        raise ConfigError(where, 'endpoint strings need an id: use {"id": ..., "endpoint": "+ ..."}')
    if not isinstance(item, dict):
        raise ConfigError(where, f"expected a rule object, got {_json_type(item)}")
    if "endpoint" in item:
        extra = set(item) - {"id", "endpoint", "interface"}
        if extra:
            raise ConfigError(f"{where}.{sorted(extra)[0]}", "unknown field next to 'endpoint'")
        try:
            rule = parse_endpoint(str(item["endpoint"]), str(item.get("id", "")))
            return validate_rule(dataclasses.replace(rule, interface=str(item.get("interface", ""))))
        except RuleError as exc:
            raise ConfigError(f"{where}.{exc.field}", exc.problem) from None
    values: dict[str, Any] = {}
    for name, value in item.items():
        spec = _RULE_FIELDS.get(name)
        if spec is None:
            raise ConfigError(f"{where}.{name}", "unknown rule field")
        expected = {"str": str, "int": int, "bool": bool}[str(spec.type)]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ConfigError(f"{where}.{name}", f"expected {expected.__name__}, got {_json_type(value)}")
        values[name] = value
    for required in ("id", "action"):
        if required not in values:
            raise ConfigError(f"{where}.{required}", "missing")
    try:
        return validate_rule(PolicyRule(**values))
    except RuleError as exc:
        raise ConfigError(f"{where}.{exc.field}", exc.problem) from None


# --- whole config ---------------------------------------------------------------------------------------


def from_json(data: Any, interface_exists: Callable[[str], bool] | None = None) -> Config:
    """Validate a decoded config file. `interface_exists` checks names/IPs/MACs when given."""
    if not isinstance(data, dict):
        raise ConfigError("config", f"expected a JSON object of options, got {_json_type(data)}")
    values: dict[str, Any] = {}
    for key, raw in data.items():
        option = OPTIONS.get(key)
        if option is None:
            raise ConfigError(key, f"unknown key (known: {', '.join(OPTIONS)})")
        values[key] = option.check(key, raw)
    config = Config(
        enable=values.get(ENABLE, False),
        interface=values.get(INTERFACE, ""),
        rules=tuple(values.get(RULES, ())),
        split_dns=tuple(values.get(SPLIT_DNS, ())),
        vpn_domains=tuple(values.get(VPN_DOMAINS, ())),
    )
    if interface_exists is not None:
        check_interfaces(config, interface_exists)
    return config


def check_interfaces(config: Config, interface_exists: Callable[[str], bool]) -> None:
    if config.interface and not interface_exists(config.interface):
        raise ConfigError(
            INTERFACE,
            f"unknown interface {config.interface!r} (no usable interface — up, with a routable address, not "
            "loopback — has that name, IP or MAC)",
        )
    for index, rule in enumerate(config.rules):
        if rule.interface and not interface_exists(rule.interface):
            raise ConfigError(f"{RULES}[{index}].interface", f"unknown interface {rule.interface!r}")


def set_value(config: Config, key: str, text: str) -> Config:
    """Apply `splittun config set KEY VALUE` to a config (not yet saved)."""
    option = OPTIONS.get(key)
    if option is None:
        raise ConfigError(key, f"unknown key (known: {', '.join(OPTIONS)})")
    raw = option.parse_text(text)
    if isinstance(raw, _Unparsable):
        raise ConfigError(key, raw.problem)
    data = config.to_json()
    data[key] = raw
    return from_json(data)


# --- edits ------------------------------------------------------------------------------------------


def live_interface_exists(text: str) -> bool:
    """Does a usable interface with this name, IP or MAC exist in this network namespace (read now)?"""
    from core.netenv import get_interface  # the netenv library: no actor needed

    return get_interface(text) is not None


def add_rule(config: Config, spec: RuleAdd, interface_exists: Callable[[str], bool]) -> tuple[Config, PolicyRule]:
    """`rules add`: the new rule gets the next free id. A flag's mistake names the flag (`--interface`)."""
    if spec.interface and not interface_exists(spec.interface):  # name what the user typed: the flag
        raise ConfigError("--interface", f"unknown interface {spec.interface!r}")
    rule_id = config.next_rule_id()
    if spec.endpoint:
        conditions = (spec.app, spec.name, spec.uid >= 0, spec.children, spec.dest, spec.proto, spec.port, spec.keep)
        if any(conditions):
            raise ConfigError("--endpoint", "cannot be combined with other conditions or --keep")
        rule = parse_endpoint(spec.endpoint, rule_id)
        rule = validate_rule(dataclasses.replace(rule, interface=spec.interface))
    else:
        lo, hi = parse_ports(spec.port)
        rule = validate_rule(
            PolicyRule(
                id=rule_id,
                action="keep" if spec.keep else "split",
                app_path=spec.app,
                app_name=spec.name,
                uid=spec.uid,
                children=spec.children,
                dest=spec.dest,
                proto=spec.proto,
                port_lo=lo,
                port_hi=hi,
                interface=spec.interface,
            )
        )
    rules = list(config.rules)
    rules.insert(_index(spec.position, len(rules) + 1), rule)
    return config.replace(rules=tuple(rules)), rule


def remove_rule(config: Config, rule_id: str) -> Config:
    rules = list(config.rules)
    del rules[_find_rule(config, rule_id)]
    return config.replace(rules=tuple(rules))


def move_rule(config: Config, rule_id: str, position: int) -> Config:
    rules = list(config.rules)
    rule = rules.pop(_find_rule(config, rule_id))
    rules.insert(_index(position, len(rules) + 1), rule)
    return config.replace(rules=tuple(rules))


def _index(position: int, count: int) -> int:
    """A 1-based position (0 = last) among `count` places → a list index."""
    if position == 0:
        return count - 1
    if not 1 <= position <= count:
        raise ConfigError("position", f"must be between 1 and {count}, got {position}")
    return position - 1


def _find_rule(config: Config, rule_id: str) -> int:
    for i, rule in enumerate(config.rules):
        if rule.id == rule_id:
            return i
    known = ", ".join(r.id for r in config.rules) or "none"
    raise RuleNotFound(rule_id, f"no such rule (rules: {known})")


_Edit = Callable[[Config, Any, Callable[[str], bool]], tuple[Config, PolicyRule | None]]

#: What each edit op does to a config (its arguments are the op's record).
EDITS: dict[str, _Edit] = {
    Controller.ENABLE.name: lambda c, a, x: (set_value(c, ENABLE, "true"), None),
    Controller.DISABLE.name: lambda c, a, x: (set_value(c, ENABLE, "false"), None),
    Controller.SET_INTERFACE.name: lambda c, a, x: (set_value(c, INTERFACE, _arg(a, InterfaceChoice).choice), None),
    Controller.ADD_RULE.name: lambda c, a, x: add_rule(c, _arg(a, RuleAdd), x),
    Controller.REMOVE_RULE.name: lambda c, a, x: (remove_rule(c, _arg(a, RuleRef).id), None),
    Controller.MOVE_RULE.name: lambda c, a, x: (move_rule(c, _arg(a, RuleMove).id, a.position), None),
    Controller.SET_CONFIG.name: lambda c, a, x: (set_value(c, _arg(a, ConfigSet).key, a.value), None),
}


def _arg(args: Any, cls: type[Any]) -> Any:
    if not isinstance(args, cls):
        raise TypeError(f"expected {cls.__name__}, got {type(args).__name__}")
    return args


def edit(
    config: Config, op: Op[Any, Any], args: Any, interface_exists: Callable[[str], bool] | None = None
) -> tuple[Config, PolicyRule | None]:
    """Apply one edit op to `config`: the new config, validated as a whole (named interfaces must exist), and
    the rule it added (rules.add) or None. ConfigError (RuleNotFound for a rule id nobody has) when refused;
    `str()` is the one line the user sees."""
    change = EDITS.get(op.name)
    if change is None or op.actor != Controller.actor:
        raise ValueError(f"{op!r} is not a config edit")
    exists = interface_exists or live_interface_exists
    try:
        new, rule = change(config, args, exists)
    except RuleError as exc:
        raise ConfigError(exc.field, exc.problem) from None
    check_interfaces(new, exists)
    return new, rule


def load(path: Path, interface_exists: Callable[[str], bool] | None = None) -> Config:
    """The config in `path`; defaults when the file does not exist."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Config()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(str(path), f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    return from_json(data, interface_exists)


def save(path: Path, config: Config) -> None:
    """Atomic write: a reader sees the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config.to_json(), indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".config-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def options_for_level(level: str) -> list[Option]:
    allowed = LEVELS[: LEVELS.index(level) + 1]
    return [o for o in OPTIONS.values() if o.level in allowed]


def _json_type(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
        type(None): "null",
    }.get(type(value), type(value).__name__)
