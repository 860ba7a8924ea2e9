"""`splittun ivpn [status] [--json]`: IVPN as the ivpn actor (actors/ivpn) last heard it from the IVPN daemon."""

from __future__ import annotations

import argparse
import json
from typing import Any

from messages.control import UNAVAILABLE, Ivpn, RequestFailed, to_plain
from runtime import paths
from runtime.transport import ask as ask_op

from . import FAILED, NOT_RUNNING, OK, UserError, current_home, require_root


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ivpn", help="the IVPN client beside splittun: daemon, VPN state, server, DNS, kill switch")
    p.add_argument("--json", action="store_true", help="the status as JSON")
    isub = p.add_subparsers(dest="ivpn_command", metavar="{status}")
    status = isub.add_parser("status", help="the same as plain `splittun ivpn`")
    status.add_argument("--json", action="store_true", help="the status as JSON")
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    require_root("splittun ivpn")
    home = current_home()
    try:
        status = to_plain(ask_op(paths.actor_endpoint(home.run_dir, "ivpn"), Ivpn.STATUS, None, timeout=3, who="ivpn"))
    except RequestFailed as exc:
        raise UserError(str(exc), NOT_RUNNING if exc.code == UNAVAILABLE else FAILED) from None
    if args.json:
        print(json.dumps(status))
    else:
        print("\n".join(describe(status)))
    return OK


def describe(s: dict[str, Any]) -> list[str]:
    """The status in a few lines a user reads: is the daemon there, is the VPN up, through what."""
    lines = [f"daemon: running ({s['daemon_version'] or 'version unknown'})" if s["daemon"] else "daemon: not running"]
    state = s["state"].lower() + (" (paused)" if s["paused"] else "")
    lines.append(f"vpn: {state}")
    if s["server_ip"]:
        proto = "tcp" if s["is_tcp"] else "udp"
        via = f" on {s['interface']}" if s["interface"] else ""
        lines.append(f"  {s['vpn_type'] or 'vpn'} to {s['server_ip']}:{s['server_port']}/{proto}{via}")
        lines.append(f"  exit {s['exit_hostname'] or '?'}, client {s['client_ip'] or '-'} {s['client_ipv6']}".rstrip())
    dns = ", ".join(f"{d['address']} ({d['encryption']})" for d in s["dns"]) or "IVPN default"
    lines.append(f"dns: {dns}")
    lines.append(f"kill switch: {'on' if s['kill_switch'] else 'off'}")
    if s["last_error"]:
        lines.append(f"last error: {s['last_error']}")
    return lines
