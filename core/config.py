"""The config: options named like Portmaster's, validated as a whole, stored as one JSON file.

Edits are the controller's ops (messages/control.py: enable, disable, interface.set, rules.add|remove|move,
config.set) and `edit()` below applies one to a config, validated: the controller does while splittun runs
(it is then the only writer of the file), the CLI itself only when splittun is not running. A save is
atomic (temporary file → fsync → rename, so a reader never sees half a file). A hand-edited file is
reloaded by the controller when it changes. Invalid config is refused with one message naming the key (or
the command-line flag) and the problem, and whatever config was in force stays in force.

Options carry an expertise level like Portmaster's: user ⊂ expert ⊂ developer. The split-tunnel
options are user level; how long the connection history is kept (`splittun/history/…`) is expert level.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import tempfile
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.dns.route import Server
from core.policy import RuleError, parse_endpoint, parse_ports
from core.policy import validate as validate_rule
from core.policy.rules import classify_dest, has_glob, normalize_domain
from core.state.timespec import TimeSpecError, parse_duration
from messages import PolicyRule
from messages.control import (
    ConfigSet,
    Controller,
    InterfaceChoice,
    Op,
    PresetApply,
    PresetRef,
    RuleAdd,
    RuleMove,
    RuleRef,
)

LEVELS = ("user", "expert", "developer")

ENABLE = "splittun/enable"
INTERFACE = "splittun/interface"
RULES = "splittun/rules"
UPDATE_SOURCE = "splittun/updateSource"
UPDATE_CA_FILE = "splittun/updateCAFile"
UPDATE_STALE_DAYS = "splittun/updateStaleAfterDays"
DATA_PATH = "splittun/dataPath"
DATA_PATHS = ("kernel", "proxy")
HISTORY_MAX_AGE = "splittun/history/maxAge"
HISTORY_MAX_ROWS = "splittun/history/maxRows"
DEFAULT_HISTORY_MAX_AGE = "7d"  # a laptop's week of connections…
DEFAULT_HISTORY_MAX_ROWS = 100_000  # …in at most some 50 MB
SPLIT_DNS = "splittun/splitDNS"
VPN_DOMAINS = "splittun/vpnDomains"
BYPASS_HOSTS = "splittun/bypassHosts"


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


def _data_path(key: str, value: Any) -> str:
    if not isinstance(value, str) or value.strip().lower() not in DATA_PATHS:
        shown = value if isinstance(value, str) else _json_type(value)
        raise ConfigError(key, f"expected {' or '.join(DATA_PATHS)}, got {shown!r}")
    return value.strip().lower()


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


def _hosts(key: str, value: Any) -> list[str]:
    """Addresses or CIDRs (IPv4 or IPv6), normalised, each once: hosts routed outside the VPN."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(key, f"expected a list of IP addresses or CIDRs, got {_json_type(value)}")
    out: list[str] = []
    for text in value:
        try:
            net = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            raise ConfigError(key, f"{text.strip()!r} is not an IP address or CIDR") from None
        if net.is_loopback or net.is_multicast or net.is_unspecified or net.prefixlen == 0:
            raise ConfigError(key, f"{net} cannot bypass the VPN (loopback, multicast, unspecified or everything)")
        if str(net) not in out:
            out.append(str(net))
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


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string, got {_json_type(value)}")
    return value.strip()


def _days(key: str, value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 3650:
        raise ConfigError(key, f"expected a number of days from 1 to 3650, got {value!r}")
    return value


def _duration(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a duration like 7d, 12h or 30m, got {_json_type(value)}")
    try:
        if parse_duration(value) <= 0:
            raise ConfigError(key, "must be longer than 0")
    except TimeSpecError as exc:
        raise ConfigError(key, str(exc)) from None
    return value.strip()


def _row_count(key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(key, f"expected a positive whole number, got {value!r}")
    return value


def _parse_int_text(text: str) -> Any:
    try:
        return int(text.strip())
    except ValueError:
        return text  # let the check name the problem


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
            UPDATE_SOURCE,
            "expert",
            "",
            "Where preset updates come from: an absolute directory path or an https:// URL holding index.json "
            "(`splittun update`). Empty: no updates, the presets shipped with splittun stay in force.",
            _text,
            lambda text: text,
        ),
        Option(
            UPDATE_CA_FILE,
            "expert",
            "",
            "A PEM file of CA certificates an https update source is verified against; empty = the system's CAs.",
            _text,
            lambda text: text,
        ),
        Option(
            UPDATE_STALE_DAYS,
            "expert",
            30,
            "Days after its publication that the preset index in force counts as stale (`status` says so).",
            _days,
            lambda text: text,
        ),
        Option(
            DATA_PATH,
            "expert",
            "kernel",
            "How split TCP connections leave: kernel = re-routed and source-NATed by the kernel (no copy "
            "through a user-space proxy; Linux with the NFQUEUE interceptor); proxy = through splittun's TCP "
            "proxy. Split UDP always goes through the UDP proxy, which checks every datagram's socket.",
            _data_path,
            lambda text: text,
        ),
        Option(
            HISTORY_MAX_AGE,
            "expert",
            DEFAULT_HISTORY_MAX_AGE,
            "How long closed connections stay in the history (state database), e.g. 7d, 12h, 30m.",
            _duration,
            lambda text: text,
        ),
        Option(
            HISTORY_MAX_ROWS,
            "expert",
            DEFAULT_HISTORY_MAX_ROWS,
            "At most this many closed connections stay in the history; the oldest go first.",
            _row_count,
            _parse_int_text,
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
        Option(
            BYPASS_HOSTS,
            "expert",
            [],
            "Hosts (IP addresses or CIDRs) routed outside the VPN via the physical gateway while IVPN connects "
            "or holds its tunnel: another tunnel's or overlay's servers, whose packets may come from the kernel "
            "with no process to split (route table and rule 717; comma-separated on the command line).",
            _hosts,
            _parse_list_text,
        ),
    )
}


@dataclass(frozen=True)
class Config:
    enable: bool = False
    interface: str = ""
    rules: tuple[PolicyRule, ...] = ()
    update_source: str = ""
    update_ca_file: str = ""
    update_stale_days: int = 30
    data_path: str = "kernel"
    history_max_age: str = DEFAULT_HISTORY_MAX_AGE
    history_max_rows: int = DEFAULT_HISTORY_MAX_ROWS
    split_dns: tuple[str, ...] = ()
    vpn_domains: tuple[str, ...] = ()
    bypass_hosts: tuple[str, ...] = ()

    def value(self, key: str) -> Any:
        return {
            ENABLE: self.enable,
            INTERFACE: self.interface,
            RULES: list(self.rules),
            UPDATE_SOURCE: self.update_source,
            UPDATE_CA_FILE: self.update_ca_file,
            UPDATE_STALE_DAYS: self.update_stale_days,
            DATA_PATH: self.data_path,
            HISTORY_MAX_AGE: self.history_max_age,
            HISTORY_MAX_ROWS: self.history_max_rows,
            SPLIT_DNS: list(self.split_dns),
            VPN_DOMAINS: list(self.vpn_domains),
            BYPASS_HOSTS: list(self.bypass_hosts),
        }[key]

    def to_json(self) -> dict[str, Any]:
        """As in the file: the split-tunnel options always, the others only when not at their default."""
        data = {ENABLE: self.enable, INTERFACE: self.interface, RULES: [rule_to_json(r) for r in self.rules]}
        for key in OPTIONS:
            if key not in data and self.value(key) != OPTIONS[key].default:
                data[key] = self.value(key)
        return data

    @property
    def history_max_age_seconds(self) -> float:
        return parse_duration(self.history_max_age)

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
        update_source=values.get(UPDATE_SOURCE, ""),
        update_ca_file=values.get(UPDATE_CA_FILE, ""),
        update_stale_days=values.get(UPDATE_STALE_DAYS, 30),
        data_path=values.get(DATA_PATH, OPTIONS[DATA_PATH].default),
        history_max_age=values.get(HISTORY_MAX_AGE, DEFAULT_HISTORY_MAX_AGE),
        history_max_rows=values.get(HISTORY_MAX_ROWS, DEFAULT_HISTORY_MAX_ROWS),
        split_dns=tuple(values.get(SPLIT_DNS, ())),
        vpn_domains=tuple(values.get(VPN_DOMAINS, ())),
        bypass_hosts=tuple(values.get(BYPASS_HOSTS, ())),
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


def apply_preset(
    config: Config, spec: PresetApply, interface_exists: Callable[[str], bool], presets: Collection[str]
) -> tuple[Config, PolicyRule]:
    """`presets apply`: one rule standing for the preset (core/presets expands it when the policy is compiled)."""
    if spec.name not in presets:
        raise RuleNotFound(spec.name, f"no such preset (presets in force: {', '.join(sorted(presets)) or 'none'})")
    applied = next((r for r in config.rules if r.preset == spec.name), None)
    if applied is not None:
        raise ConfigError(spec.name, f"preset already applied as rule {applied.id} (remove it first to change it)")
    if spec.interface and not interface_exists(spec.interface):
        raise ConfigError("--interface", f"unknown interface {spec.interface!r}")
    action = "keep" if spec.keep else "split"
    rule = PolicyRule(id=config.next_rule_id(), action=action, preset=spec.name, interface=spec.interface)
    rule = validate_rule(rule)
    rules = list(config.rules)
    rules.insert(_index(spec.position, len(rules) + 1), rule)
    return config.replace(rules=tuple(rules)), rule


def remove_preset(config: Config, name: str) -> Config:
    for rule in config.rules:
        if rule.preset == name:
            return remove_rule(config, rule.id)
    applied = ", ".join(r.preset for r in config.rules if r.preset) or "none"
    raise RuleNotFound(name, f"preset not applied (applied presets: {applied})")


_Edit = Callable[[Config, Any, Callable[[str], bool], Collection[str]], tuple[Config, PolicyRule | None]]

#: What each edit op does to a config (its arguments are the op's record; then how to check that an interface
#: exists, and the names of the presets in force).
EDITS: dict[str, _Edit] = {
    Controller.ENABLE.name: lambda c, a, x, p: (set_value(c, ENABLE, "true"), None),
    Controller.DISABLE.name: lambda c, a, x, p: (set_value(c, ENABLE, "false"), None),
    Controller.SET_INTERFACE.name: lambda c, a, x, p: (set_value(c, INTERFACE, _arg(a, InterfaceChoice).choice), None),
    Controller.ADD_RULE.name: lambda c, a, x, p: add_rule(c, _arg(a, RuleAdd), x),
    Controller.REMOVE_RULE.name: lambda c, a, x, p: (remove_rule(c, _arg(a, RuleRef).id), None),
    Controller.MOVE_RULE.name: lambda c, a, x, p: (move_rule(c, _arg(a, RuleMove).id, a.position), None),
    Controller.SET_CONFIG.name: lambda c, a, x, p: (set_value(c, _arg(a, ConfigSet).key, a.value), None),
    Controller.APPLY_PRESET.name: lambda c, a, x, p: apply_preset(c, _arg(a, PresetApply), x, p),
    Controller.REMOVE_PRESET.name: lambda c, a, x, p: (remove_preset(c, _arg(a, PresetRef).name), None),
}


def _arg(args: Any, cls: type[Any]) -> Any:
    if not isinstance(args, cls):
        raise TypeError(f"expected {cls.__name__}, got {type(args).__name__}")
    return args


def edit(
    config: Config,
    op: Op[Any, Any],
    args: Any,
    interface_exists: Callable[[str], bool] | None = None,
    presets: Collection[str] = (),
) -> tuple[Config, PolicyRule | None]:
    """Apply one edit op to `config`: the new config, validated as a whole (named interfaces must exist), and
    the rule it added (rules.add, presets.apply) or None. `presets` are the names of the presets in force.
    ConfigError (RuleNotFound for a rule id or preset nobody has) when refused; `str()` is the one line the
    user sees."""
    change = EDITS.get(op.name)
    if change is None or op.actor != Controller.actor:
        raise ValueError(f"{op!r} is not a config edit")
    exists = interface_exists or live_interface_exists
    try:
        new, rule = change(config, args, exists, presets)
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
