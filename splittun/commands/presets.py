"""`splittun presets list|show|apply|remove` and `splittun update check|apply|rollback`.

A preset is applied as one rule (core/presets); the presets in force are a version on disk ($SPLITTUN_HOME/presets,
the built-in set until an update; core/updates/store.py). `update apply` downloads and verifies the version the
`splittun/updateSource` offers into a staging directory here, in the command's own process (the controller never
waits on the network); the controller then checks the upgrade rules against the version in force, switches
atomically and republishes the policy. When splittun is not running the command switches itself, with the same
code. Every refusal is one line naming the rule or the problem; the presets in force stay in force.
"""

from __future__ import annotations

import argparse
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.presets import INDEX_NAME, BadPreset, parse_preset, preset_store
from core.updates import Refused
from core.updates.source import UpdateError, open_source
from core.updates.store import BUILTIN, Switched, pack
from messages.control import Controller, Edited, NoArgs, PresetApply, PresetRef, UpdateApply, UpdateOutcome, to_plain
from splittun.output import table

from . import OK, UserError, current_home, prepared_home, require_root
from .configure import ask_controller, controller_running, edit, load, presets_in_force


def register(sub: argparse._SubParsersAction) -> None:
    presets = sub.add_parser("presets", help="list, show, apply and remove rule presets (services' published lists)")
    psub = presets.add_subparsers(dest="presets_command", required=True, metavar="{list,show,apply,remove}")
    p = psub.add_parser("list", help="the presets in force and which are applied")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)
    p = psub.add_parser("show", help="a preset's destinations and where each comes from")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)
    p = psub.add_parser("apply", help="split (or --keep) a preset's connections: one rule that follows updates")
    p.add_argument("name")
    p.add_argument("--keep", action="store_true", help="keep the preset's connections in the VPN (an exception)")
    p.add_argument("--interface", default="", metavar="IFACE", help="leave through this interface instead")
    p.add_argument("--position", type=int, default=0, help="1 = first; default: last")
    p.set_defaults(func=cmd_apply)
    p = psub.add_parser("remove", help="remove an applied preset's rule")
    p.add_argument("name")
    p.set_defaults(func=cmd_remove)

    update = sub.add_parser("update", help="check, apply or roll back preset updates (splittun/updateSource)")
    usub = update.add_subparsers(dest="update_command", required=True, metavar="{check,apply,rollback,pack}")
    for name, func, text in (
        ("check", cmd_check, "what the update source offers and whether the upgrade rules allow it"),
        ("apply", cmd_update_apply, "download, verify and switch to the offered version"),
        ("rollback", cmd_rollback, "go back to the previous version"),
    ):
        p = usub.add_parser(name, help=text)
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)
    p = usub.add_parser("pack", help="publish a preset directory: write its index.json (sizes, sha256)")
    p.add_argument("directory", type=Path)
    p.add_argument("--version", required=True, help="semantic version, e.g. 1.2.0")
    p.add_argument("--name", default=INDEX_NAME)
    p.add_argument("--local", action="store_true", help="mark the index as generated locally")
    p.set_defaults(func=cmd_pack)


# --- presets --------------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    home = current_home()
    version, presets = presets_in_force(home)
    applied = {r.preset: r for r in load(home).rules if r.preset}
    if args.json:
        rows = [
            {"name": p.name, "title": p.title, "entries": len(p.entries),
             "applied": {"rule": applied[p.name].id, "action": applied[p.name].action} if p.name in applied else None}
            for p in sorted(presets.values(), key=lambda p: p.name)
        ]  # fmt: skip
        print(json.dumps({"version": _version_json(version), "presets": rows}))
        return OK
    print(f"presets in force: {version.index.describe()}{' (built in)' if version.label == BUILTIN else ''}")
    rows = []
    for p in sorted(presets.values(), key=lambda p: p.name):
        rule = applied.get(p.name)
        rows.append([p.name, p.title, len(p.entries), f"{rule.id} ({rule.action})" if rule else "-"])
    print(table(["NAME", "TITLE", "ENTRIES", "APPLIED AS"], rows))
    missing = sorted(set(applied) - set(presets))
    if missing:
        print(f"applied but not in force (match nothing until an update brings them back): {', '.join(missing)}")
    return OK


def cmd_show(args: argparse.Namespace) -> int:
    _, presets = presets_in_force(current_home())
    preset = presets.get(args.name)
    if preset is None:
        raise UserError(f"{args.name}: no such preset (presets in force: {', '.join(sorted(presets))})")
    if args.json:
        entries = [{"destination": preset.describe_entry(e), "source": e.source} for e in preset.entries]
        data = {"name": preset.name, "title": preset.title, "description": preset.description}
        print(json.dumps(data | {"sources": list(preset.sources), "entries": entries}))
        return OK
    print(f"{preset.name}: {preset.title}")
    if preset.description:
        print(preset.description)
    print("sources:\n" + "\n".join(f"  {s}" for s in preset.sources))
    print(table(["DESTINATION", "SOURCE"], [[preset.describe_entry(e), e.source] for e in preset.entries]))
    return OK


def cmd_apply(args: argparse.Namespace) -> int:
    spec = PresetApply(name=args.name, keep=args.keep, interface=args.interface, position=args.position)
    return edit(Controller.APPLY_PRESET, spec, _applied)


def _applied(edited: Edited) -> str:
    rule = edited.rule
    return "applied a preset" if rule is None else f"preset {rule.preset} applied as {rule.id} ({rule.action})"


def cmd_remove(args: argparse.Namespace) -> int:
    return edit(Controller.REMOVE_PRESET, PresetRef(name=args.name), lambda r: f"preset {args.name} removed")


# --- updates --------------------------------------------------------------------------------------


def _source(home: Any) -> Any:
    config = load(home)
    try:
        return open_source(config.update_source, config.update_ca_file)
    except UpdateError as exc:
        raise UserError(str(exc)) from None


def cmd_check(args: argparse.Namespace) -> int:
    home = current_home()
    source = _source(home)
    try:
        current, candidate, decision = preset_store(home.root).check(source, datetime.now(UTC))
    except UpdateError as exc:
        raise UserError(str(exc)) from None
    if isinstance(decision, Refused):
        refused, line = decision.rule, decision.line()
    else:
        refused, line = "", f"{decision.line(current.index, candidate)}: 'splittun update apply' installs it"
    if args.json:
        print(json.dumps({"source": source.url, "current": _version_json(current), "offered": candidate.to_json(),
                          "accepted": not refused, "rule": refused, "message": line}))  # fmt: skip
        return OK
    print(f"in force: {current.index.describe()}")
    print(f"offered:  {candidate.describe()} at {source.url}")
    print(line)
    return OK


def cmd_update_apply(args: argparse.Namespace) -> int:
    require_root("updating presets")
    home = prepared_home()
    source = _source(home)
    store = preset_store(home.root)
    try:
        staging = store.stage(source, datetime.now(UTC))
    except UpdateError as exc:
        raise UserError(str(exc)) from None
    try:
        return _switch(args, home, Controller.APPLY_UPDATE, UpdateApply(staging=staging.name),
                       lambda: store.install(staging, datetime.now(UTC)))  # fmt: skip
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once installed or refused


def cmd_rollback(args: argparse.Namespace) -> int:
    require_root("rolling back presets")
    home = prepared_home()
    store = preset_store(home.root)
    return _switch(args, home, Controller.ROLLBACK_UPDATE, NoArgs(), store.rollback)


def _switch(args: argparse.Namespace, home: Any, op: Any, op_args: Any, locally: Any) -> int:
    """Through the controller while it runs (it republishes the policy), else on disk here."""
    outcome: UpdateOutcome | None = ask_controller(home, op, op_args) if controller_running(home) else None
    applied = outcome is not None
    if outcome is None:
        try:
            switched: Switched = locally()
        except UpdateError as exc:
            raise UserError(str(exc)) from None
        outcome = UpdateOutcome(
            kind=switched.kind,
            current=switched.current.index.describe(),
            previous=switched.previous.index.describe(),
            version=0,
        )
    if args.json:
        print(json.dumps(to_plain(outcome) | {"applied": applied}))
        return OK
    done = f"presets {outcome.kind}: {outcome.previous} → {outcome.current}"
    if applied:
        print(f"{done}: applied (policy version {outcome.version})")
    else:
        print(f"{done}: installed; splittun is not running, it applies at 'splittun up'")
    return OK


def cmd_pack(args: argparse.Namespace) -> int:
    """Every preset file in the directory is checked before the index names it."""
    if not args.directory.is_dir():
        raise UserError(f"{args.directory}: not a directory")
    for path in sorted(args.directory.glob("*.json")):
        if path.name != "index.json":
            try:
                parse_preset(path.name, path.read_bytes())
            except BadPreset as exc:
                raise UserError(str(exc)) from None
    try:
        index = pack(args.directory, args.name, args.version, datetime.now(UTC), args.local)
    except ValueError as exc:
        raise UserError(f"--version: {exc}") from None
    print(f"{args.directory / 'index.json'}: {index.describe()}, {len(index.files)} files")
    return OK


def _version_json(version: Any) -> dict[str, Any]:
    return version.index.to_json() | {"label": version.label}
