"""`splittun lab up|down|status`: the project's own network namespaces (see splittun/lab)."""

from __future__ import annotations

import argparse
import json

from . import FAILED, NOT_RUNNING, OK, UserError, require_root


def register(sub: argparse._SubParsersAction) -> None:
    lab = sub.add_parser("lab", help="the test lab: host, isp, vpnsrv and inet namespaces")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True, metavar="{up,down,status}")

    p = lab_sub.add_parser("up", help="build the lab (replacing a leftover one of the same name)")
    p.add_argument(
        "--style",
        choices=("replaced", "wgquick"),
        default="replaced",
        help="how the VPN routes: replaced default route (OpenVPN) or wg-quick fwmark rules",
    )
    p.add_argument("--antispoof", action="store_true", help="add wg-quick's raw-table anti-spoofing rule")
    p.add_argument("--name", default="lab", help="lab name; namespaces are splittun-NAME-{host,isp,vpnsrv,inet}")
    p.set_defaults(func=cmd_lab_up)

    p = lab_sub.add_parser("down", help="remove the lab and everything in it (idempotent)")
    p.add_argument("--name", default="lab")
    p.add_argument("--all", action="store_true", help="remove every splittun lab on this machine")
    p.set_defaults(func=cmd_lab_down)

    p = lab_sub.add_parser("status", help="what exists of the lab")
    p.add_argument("--name", default="lab")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_lab_status)


def _lab_module():
    from splittun import lab  # imported lazily: only lab commands need it

    return lab


def cmd_lab_up(args: argparse.Namespace) -> int:
    require_root("splittun lab up")
    lab_mod = _lab_module()
    lab = lab_mod.Lab(name=args.name, style=args.style, antispoof=args.antispoof)
    try:
        lab.up()
    except lab_mod.LabError as exc:
        lab.down()
        raise UserError(f"lab up failed: {exc}", FAILED) from None
    print(f"lab {args.name!r} is up ({args.style} routing); host namespace: {lab.ns_host}")
    print(f"  run splittun there:  ip netns exec {lab.ns_host} splittun up")
    return OK


def cmd_lab_down(args: argparse.Namespace) -> int:
    require_root("splittun lab down")
    lab_mod = _lab_module()
    if args.all:
        lab_mod.down_all()
        print("every splittun lab removed")
    else:
        lab_mod.Lab(name=args.name).down()
        print(f"lab {args.name!r} removed")
    return OK


def cmd_lab_status(args: argparse.Namespace) -> int:
    require_root("splittun lab status")
    status = _lab_module().Lab(name=args.name).status()
    if args.json:
        print(json.dumps(status))
        return OK if status.get("exists") else NOT_RUNNING
    if not status.get("exists"):
        print(f"lab {args.name!r} does not exist")
        return NOT_RUNNING
    print(
        f"lab {args.name!r}: {status.get('style') or 'unknown'} routing"
        + (", anti-spoofing rule" if status.get("antispoof") else "")
    )
    for ns, present in status.get("namespaces", {}).items():
        print(f"  namespace {ns}: {'present' if present else 'MISSING'}")
    for proc, info in status.get("processes", {}).items():
        print(f"  process {proc}: {info}")
    return OK
