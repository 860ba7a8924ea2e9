"""`splittun ivpn [status] [--json]`: IVPN as the ivpn actor (actors/ivpn) last heard it from the IVPN daemon."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from messages.control import Ivpn, Op

from . import OK, ask_actor

PING_WAIT = 0.5


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ivpn", help="the IVPN client beside splittun: daemon, VPN state, server, DNS, kill switch")
    p.add_argument("--json", action="store_true", help="the status as JSON")
    isub = p.add_subparsers(dest="ivpn_command", metavar="{status,ping}")
    status = isub.add_parser("status", help="the same as plain `splittun ivpn`")
    # SUPPRESS: a subcommand's own --json must not reset `splittun ivpn --json status` to False.
    status.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="the status as JSON")
    ping = isub.add_parser("ping", help="look for the IVPN daemon now (it is looked for with backoff)")
    ping.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="the status as JSON")
    ping.set_defaults(func=cmd_ping)
    p.set_defaults(func=cmd_status)


def ask(op: Op[Any, Any]) -> dict[str, Any]:
    return ask_actor(f"splittun ivpn {op.name}", "ivpn", op)


def cmd_ping(args: argparse.Namespace) -> int:
    ask(Ivpn.CONNECT)
    time.sleep(PING_WAIT)  # one connection attempt: port file, TCP connect, Hello, state
    return cmd_status(args)


def cmd_status(args: argparse.Namespace) -> int:
    status = ask(Ivpn.STATUS)
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
    delegated = " (splittun's resolver asks it for VPN apps)" if s.get("dns_delegated") else ""
    lines.append(f"dns: {dns}{delegated}")
    lines.append(f"kill switch: {'on' if s['kill_switch'] else 'off'}")
    if s.get("bypass"):
        lines.append(f"bypass: {s['bypass']}")
    if s["last_error"]:
        lines.append(f"last error: {s['last_error']}")
    return lines
