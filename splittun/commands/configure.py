"""`splittun enable|disable`, `interface`, `rules …` and `config …`: editing the config file.

Every edit is validated first (including that a named interface exists), written atomically, and —
when splittun is running — applied at once by asking the controller to reload; if the controller
refuses it, the previous file is put back, so the file always matches the config in force.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from typing import Any

from core import config as cfg
from core.policy import RuleError, describe, parse_endpoint, parse_ports, validate
from messages import PolicyRule
from messages.control import RequestFailed
from runtime import paths
from runtime.paths import Home
from runtime.transport import request
from splittun.output import table

from . import OK, UserError, current_home, prepared_home, require_root


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("enable", help="turn split tunnelling on")
    p.set_defaults(func=lambda a: set_option(cfg.ENABLE, "true", "split tunnelling enabled"))
    p = sub.add_parser("disable", help="turn split tunnelling off (everything stays in the VPN)")
    p.set_defaults(func=lambda a: set_option(cfg.ENABLE, "false", "split tunnelling disabled"))

    p = sub.add_parser("interface", help="show or choose the interface split connections leave through")
    p.add_argument("choice", nargs="?", metavar="auto|NAME|IP|MAC")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_interface)

    rules = sub.add_parser("rules", help="list, add, remove and order split-tunnel rules")
    rsub = rules.add_subparsers(dest="rules_command", required=True, metavar="{list,add,remove,move}")
    p = rsub.add_parser("list", help="the rules in order (first match wins)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rules_list)
    p = rsub.add_parser("add", help="add a rule (split unless --keep); every condition given must hold")
    p.add_argument("--app", default="", metavar="PATH_OR_GLOB", help="executable path or glob, e.g. /usr/bin/curl")
    p.add_argument("--name", default="", metavar="PROCESS", help="process name, e.g. curl")
    p.add_argument("--uid", type=int, default=-1)
    p.add_argument("--children", action="store_true", help="also the app's child processes")
    p.add_argument("--dest", default="", metavar="DOMAIN|IP|CIDR", help="e.g. .example.com, 203.0.113.0/24")
    p.add_argument("--proto", default="", choices=("tcp", "udp", ""))
    p.add_argument("--port", default="", metavar="N|A-B")
    p.add_argument("--keep", action="store_true", help="keep matching connections in the VPN (an exception)")
    p.add_argument("--interface", default="", metavar="IFACE", help="leave through this interface instead")
    p.add_argument("--endpoint", default="", metavar="'+ .example.com tcp/443'", help="a Portmaster endpoint line")
    p.add_argument("--position", type=int, default=0, help="1 = first; default: last")
    p.set_defaults(func=cmd_rules_add)
    p = rsub.add_parser("remove", help="remove a rule")
    p.add_argument("id")
    p.set_defaults(func=cmd_rules_remove)
    p = rsub.add_parser("move", help="move a rule to a position (1 = first)")
    p.add_argument("id")
    p.add_argument("position", type=int)
    p.set_defaults(func=cmd_rules_move)

    conf = sub.add_parser("config", help="list, get and set options")
    csub = conf.add_subparsers(dest="config_command", required=True, metavar="{list,get,set}")
    p = csub.add_parser("list", help="options up to an expertise level")
    p.add_argument("--level", choices=cfg.LEVELS, default="developer")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_config_list)
    p = csub.add_parser("get", help="one option's value")
    p.add_argument("key")
    p.set_defaults(func=cmd_config_get)
    p = csub.add_parser("set", help="set one option (validated; applied at once when running)")
    p.add_argument("key")
    p.add_argument("value")
    p.set_defaults(func=lambda a: set_option(a.key, a.value, f"{a.key} set"))


# --- load / save / apply ------------------------------------------------------------------------------


def interface_exists(text: str) -> bool:
    """Does an interface with this name, IP or MAC exist (in this namespace)?"""
    from core.netenv import get_interface  # the netenv library answers without the actors running

    return get_interface(text) is not None


def load(home: Home) -> cfg.Config:
    try:
        return cfg.load(home.config_file)
    except cfg.ConfigError as exc:
        raise UserError(f"the config file is invalid, fix or remove it first: {exc}") from None


def controller_running(home: Home) -> bool:
    path = paths.endpoint_file(paths.control(home.run_dir))
    return path is not None and path.exists()


def save_and_apply(home: Home, old: cfg.Config, new: cfg.Config) -> str:
    """Validate, write atomically, apply; returns a one-line outcome. UserError when refused."""
    try:
        cfg.check_interfaces(new, interface_exists)
    except cfg.ConfigError as exc:
        raise UserError(str(exc)) from None
    cfg.save(home.config_file, new)
    if not controller_running(home):
        return "saved; splittun is not running, it applies at 'splittun up'"
    try:
        outcome = request(paths.control(home.run_dir), "reload", timeout=3, who="controller")
    except RequestFailed as exc:
        return f"saved; the controller did not confirm ({exc}), it applies the file when it sees it"
    if not outcome.get("applied"):
        cfg.save(home.config_file, old)
        raise UserError(f"refused by the controller: {outcome.get('error')}; the previous config stays in force")
    return f"applied (policy version {outcome.get('version')})"


def edit(mutate: Callable[[cfg.Config], tuple[cfg.Config, str]]) -> int:
    """Apply `mutate` (→ new config, what it did) to the config file, validated and atomically."""
    require_root("changing the config")
    home = prepared_home()
    old = load(home)
    try:
        new, done = mutate(old)
    except (cfg.ConfigError, RuleError) as exc:
        raise UserError(str(exc)) from None
    outcome = save_and_apply(home, old, new)
    print(f"{done}: {outcome}")
    return OK


def set_option(key: str, value: str, done: str) -> int:
    return edit(lambda c: (cfg.set_value(c, key, value), done))


# --- interface ----------------------------------------------------------------------------------------


def cmd_interface(args: argparse.Namespace) -> int:
    if args.choice is not None:
        return set_option(cfg.INTERFACE, args.choice, f"interface set to {args.choice}")
    home = current_home()
    choice = load(home).interface
    from core.netenv import best_physical_default_interfaces

    uplinks = best_physical_default_interfaces()
    auto = {family: (iface.name if iface else None) for family, iface in uplinks.items()}
    if args.json:
        print(json.dumps({"interface": choice or "auto", "auto": auto}))
        return OK
    resolved = ", ".join(f"{fam}: {name or 'none'}" for fam, name in auto.items())
    print(f"interface: {choice or 'auto'}")
    print(f"auto resolves to {resolved}" + ("" if not choice else " (not used while a choice is set)"))
    return OK


# --- rules --------------------------------------------------------------------------------------------


def rule_row(position: int, rule: PolicyRule) -> list[Any]:
    ports = (
        ""
        if not rule.port_lo
        else (str(rule.port_lo) if rule.port_lo == rule.port_hi else f"{rule.port_lo}-{rule.port_hi}")
    )
    app = " ".join(
        x
        for x in (
            rule.app_path,
            f"name={rule.app_name}" if rule.app_name else "",
            f"uid={rule.uid}" if rule.uid >= 0 else "",
            "+children" if rule.children else "",
        )
        if x
    )
    proto = f"{rule.proto or '*'}/{ports or '*'}" if (rule.proto or ports) else "*"
    return [position, rule.id, rule.action, app or "*", rule.dest or "*", proto, rule.interface or "(global)"]


def cmd_rules_list(args: argparse.Namespace) -> int:
    rules = load(current_home()).rules
    if args.json:
        print(json.dumps([cfg.rule_to_json(r) for r in rules]))
        return OK
    if not rules:
        print("no rules: every connection stays in the VPN (add one with 'splittun rules add')")
        return OK
    print(
        table(
            ["#", "ID", "ACTION", "APP", "DEST", "PROTO/PORT", "INTERFACE"],
            [rule_row(i, r) for i, r in enumerate(rules, 1)],
        )
    )
    print("first match wins; connections no rule matches stay in the VPN")
    return OK


def cmd_rules_add(args: argparse.Namespace) -> int:
    def mutate(config: cfg.Config) -> tuple[cfg.Config, str]:
        if args.interface and not interface_exists(args.interface):  # name what the user typed: the flag
            raise cfg.ConfigError("--interface", f"unknown interface {args.interface!r}")
        rule_id = config.next_rule_id()
        if args.endpoint:
            if any((args.app, args.name, args.uid >= 0, args.children, args.dest, args.proto, args.port, args.keep)):
                raise cfg.ConfigError("--endpoint", "cannot be combined with other conditions or --keep")
            rule = parse_endpoint(args.endpoint, rule_id)
            rule = validate(dataclasses.replace(rule, interface=args.interface))
        else:
            lo, hi = parse_ports(args.port)
            rule = validate(
                PolicyRule(
                    id=rule_id,
                    action="keep" if args.keep else "split",
                    app_path=args.app,
                    app_name=args.name,
                    uid=args.uid,
                    children=args.children,
                    dest=args.dest,
                    proto=args.proto,
                    port_lo=lo,
                    port_hi=hi,
                    interface=args.interface,
                )
            )
        rules = list(config.rules)
        rules.insert(_index(args.position, len(rules) + 1), rule)
        return config.replace(rules=tuple(rules)), f"added {rule.id}: {describe(rule)}"

    return edit(mutate)


def _index(position: int, count: int) -> int:
    if position == 0:
        return count - 1
    if not 1 <= position <= count:
        raise cfg.ConfigError("position", f"must be between 1 and {count}, got {position}")
    return position - 1


def _find(config: cfg.Config, rule_id: str) -> int:
    for i, rule in enumerate(config.rules):
        if rule.id == rule_id:
            return i
    known = ", ".join(r.id for r in config.rules) or "none"
    raise cfg.ConfigError(rule_id, f"no such rule (rules: {known})")


def cmd_rules_remove(args: argparse.Namespace) -> int:
    def mutate(config: cfg.Config) -> tuple[cfg.Config, str]:
        rules = list(config.rules)
        del rules[_find(config, args.id)]
        return config.replace(rules=tuple(rules)), f"removed {args.id}"

    return edit(mutate)


def cmd_rules_move(args: argparse.Namespace) -> int:
    def mutate(config: cfg.Config) -> tuple[cfg.Config, str]:
        rules = list(config.rules)
        rule = rules.pop(_find(config, args.id))
        rules.insert(_index(args.position, len(rules) + 1), rule)
        return config.replace(rules=tuple(rules)), f"moved {args.id} to position {args.position}"

    return edit(mutate)


# --- config -------------------------------------------------------------------------------------------


def cmd_config_list(args: argparse.Namespace) -> int:
    config = load(current_home())
    options = cfg.options_for_level(args.level)
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "key": o.key,
                        "level": o.level,
                        "value": json.loads(_json_value(config.value(o.key))),
                        "default": json.loads(_json_value(o.default)),
                        "description": o.description,
                    }
                    for o in options
                ]
            )
        )
        return OK
    rows = [[o.key, o.level, _short(o.value_text(config.value(o.key))), o.description] for o in options]
    print(table(["KEY", "LEVEL", "VALUE", "DESCRIPTION"], rows))
    return OK


def cmd_config_get(args: argparse.Namespace) -> int:
    if args.key not in cfg.OPTIONS:
        raise UserError(f"{args.key}: unknown key (known: {', '.join(cfg.OPTIONS)})")
    print(_json_value(load(current_home()).value(args.key)))
    return OK


def _json_value(value: Any) -> str:
    if isinstance(value, list):
        return json.dumps([cfg.rule_to_json(r) if isinstance(r, PolicyRule) else r for r in value])
    return json.dumps(value)


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
