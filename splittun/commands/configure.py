"""`splittun enable|disable`, `interface`, `rules …` and `config …`: the config.

While splittun runs, the controller is the only writer of the config file: every edit is sent to it as an
op (messages/control.py), and it validates it (including that a named interface exists), writes the file
atomically and applies it, or refuses it with one line and changes nothing. When splittun is not running
the command edits the file itself with the same code (core/config.py `edit`). Reading (`rules list`,
`config get|list`, `interface`) reads the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from core import config as cfg
from core.policy import describe
from core.presets import Preset, preset_store, presets_of
from core.updates.source import UpdateError
from core.updates.store import BUILTIN, Installed
from messages import PolicyRule
from messages.control import (
    INVALID_ARGUMENT,
    NOT_FOUND,
    UNAVAILABLE,
    ConfigSet,
    Controller,
    Edited,
    InterfaceChoice,
    Op,
    RequestFailed,
    RuleAdd,
    RuleMove,
    RuleRef,
)
from runtime import paths
from runtime.paths import Home
from runtime.transport import ask
from splittun.output import table
from splittun.supervise import Supervisor

from . import FAILED, OK, UserError, current_home, prepared_home, require_root

#: Seconds an edit waits for the controller (it validates, writes the file with fsync and compiles).
EDIT_TIMEOUT = 5.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("enable", help="turn split tunnelling on")
    p.set_defaults(func=lambda a: edit(Controller.ENABLE, None, lambda r: "split tunnelling enabled"))
    p = sub.add_parser("disable", help="turn split tunnelling off (everything stays in the VPN)")
    p.set_defaults(func=lambda a: edit(Controller.DISABLE, None, lambda r: "split tunnelling disabled"))

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
    p.set_defaults(
        func=lambda a: edit(Controller.SET_CONFIG, ConfigSet(key=a.key, value=a.value), lambda r: f"{a.key} set")
    )


# --- load / edit -------------------------------------------------------------------------------------


def load(home: Home) -> cfg.Config:
    try:
        return cfg.load(home.config_file)
    except cfg.ConfigError as exc:
        raise UserError(f"the config file is invalid, fix or remove it first: {exc}") from None


def controller_running(home: Home) -> bool:
    path = paths.endpoint_file(paths.control(home.run_dir))
    return path is not None and path.exists()


def edit(op: Op[Any, Edited], args: Any, done: Callable[[Edited], str]) -> int:
    """Make one config edit: through the controller while it runs, else in the file. Prints `<done>: <outcome>`;
    a refusal is a UserError with the one line that says why."""
    require_root("changing the config")
    home = prepared_home()
    if controller_running(home):
        edited = ask_controller(home, op, args)
        if edited is not None:
            print(f"{done(edited)}: applied (policy version {edited.version})")
            return OK
    try:
        new, rule = cfg.edit(load(home), op, args, presets=presets_in_force(home)[1])
    except cfg.ConfigError as exc:
        raise UserError(str(exc)) from None
    cfg.save(home.config_file, new)
    saved = Edited(applied=False, version=0, rule=rule)
    print(f"{done(saved)}: saved; splittun is not running, it applies at 'splittun up'")
    return OK


def presets_in_force(home: Home) -> tuple[Installed, dict[str, Preset]]:
    """The preset version in force on disk (the controller loads the same), the built-in set when it is unusable."""
    store = preset_store(home.root)
    try:
        version = store.current()
    except UpdateError as exc:
        print(f"splittun: warning: {exc}; the built-in presets are in force", file=sys.stderr)
        version = store.load(BUILTIN)
    return version, presets_of(version)


def ask_controller(home: Home, op: Op[Any, Any], args: Any) -> Any:
    """The controller's answer to an edit; None when its socket is a leftover (supervisord is gone), so the
    file is ours to edit."""
    try:
        return ask(paths.control(home.run_dir), op, args, timeout=EDIT_TIMEOUT, who="controller")
    except RequestFailed as exc:
        if exc.code in (INVALID_ARGUMENT, NOT_FOUND):
            raise UserError(exc.message) from None  # refused: the same line as when editing the file
        if exc.code == UNAVAILABLE:
            if Supervisor(home).pid() is None:
                return None
            raise UserError(
                f"{exc}: the change may or may not be in force ('splittun config list' shows the file)", FAILED
            ) from None
        raise UserError(f"the controller could not make the change: {exc}", FAILED) from None


# --- interface ----------------------------------------------------------------------------------------


def cmd_interface(args: argparse.Namespace) -> int:
    if args.choice is not None:
        choice = InterfaceChoice(choice=args.choice)
        return edit(Controller.SET_INTERFACE, choice, lambda r: f"interface set to {args.choice}")
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
    dest = f"preset {rule.preset}" if rule.preset else rule.dest or "*"
    return [position, rule.id, rule.action, app or "*", dest, proto, rule.interface or "(global)"]


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
    spec = RuleAdd(
        app=args.app,
        name=args.name,
        uid=args.uid,
        children=args.children,
        dest=args.dest,
        proto=args.proto,
        port=args.port,
        keep=args.keep,
        interface=args.interface,
        endpoint=args.endpoint,
        position=args.position,
    )
    return edit(Controller.ADD_RULE, spec, _added)


def _added(edited: Edited) -> str:
    rule = edited.rule
    return "added a rule" if rule is None else f"added {rule.id}: {describe(rule)}"


def cmd_rules_remove(args: argparse.Namespace) -> int:
    return edit(Controller.REMOVE_RULE, RuleRef(id=args.id), lambda r: f"removed {args.id}")


def cmd_rules_move(args: argparse.Namespace) -> int:
    move = RuleMove(id=args.id, position=args.position)
    return edit(Controller.MOVE_RULE, move, lambda r: f"moved {args.id} to position {args.position}")


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
