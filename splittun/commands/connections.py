"""`splittun connections` and `splittun conn show ID`: live connections from the controller's registry, older ones
from its history (the state database), with `--since 1h` / `--until …` to pick a time window."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from core.state import TimeSpecError, parse_when
from messages.control import (
    ConnectionArgs,
    ConnectionsArgs,
    Controller,
    Op,
)
from messages.flows import endpoint_text
from splittun.output import duration, table

from . import OK, UserError, ask_actor


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("connections", help="recent connections with their verdicts and split-tunnel details")
    p.add_argument("--verdict", help="split, accept, block… (a verb, name or number)")
    p.add_argument("--app", help="text in the process name, path or command line")
    p.add_argument("--since", help="seen since: 1h, 30m, 7d ago, an ISO time or epoch seconds")
    p.add_argument("--until", help="started until: same forms as --since")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_connections)

    conn = sub.add_parser("conn", help="one connection")
    csub = conn.add_subparsers(dest="conn_command", required=True, metavar="{show}")
    p = csub.add_parser("show", help="everything known about one connection")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_conn_show)


def ask(op: Op[Any, Any], args: Any) -> Any:
    """The controller's answer, as plain maps and lists (what --json prints)."""
    return ask_actor(f"splittun {op.name}", "controller", op, args)


def _app(row: dict[str, Any]) -> str:
    return row["process_name"] or (row["exe"].rsplit("/", 1)[-1] if row["exe"] else "?")


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def when(flag: str, text: str | None, now: float) -> float:
    """A --since/--until value as epoch seconds (0 = not given); a wrong one is the user's one-line error."""
    if not text:
        return 0.0
    try:
        return parse_when(text, now)
    except TimeSpecError as exc:
        raise UserError(f"{flag}: {exc}") from None


def cmd_connections(args: argparse.Namespace) -> int:
    now = time.time()
    since, until = when("--since", args.since, now), when("--until", args.until, now)
    rows = ask(
        Controller.CONNECTIONS,
        ConnectionsArgs(verdict=args.verdict or "", app=args.app or "", limit=args.limit, since=since, until=until),
    )
    if args.json:
        print(json.dumps(rows))
        return OK
    now = time.time()
    out = []
    for r in rows:
        split = r.get("split") or {}
        out.append(
            [
                r["conn_id"],
                _app(r),
                r["protocol"],
                endpoint_text(r["dst_ip"], r["dst_port"]) + (f" ({r['domain']})" if r["domain"] else ""),
                r["verb"],
                r["rule"] or "-",
                split.get("interface") or r["interface"] or "-",
                endpoint_text(split["local_ip"], split["local_port"]) if split.get("local_ip") else "-",
                _bytes(split.get("bytes_up", 0)) if split else "-",
                _bytes(split.get("bytes_down", 0)) if split else "-",
                "open " + duration(now - r["started"]) if r["state"] == "open" else "closed " + ago(now, r),
            ]
        )
    if not out:
        print("no connections recorded yet")
        return OK
    print(table(["ID", "APP", "PROTO", "DESTINATION", "VERDICT", "RULE", "IFACE", "LOCAL", "UP", "DOWN", "STATE"], out))
    return OK


def ago(now: float, row: dict[str, Any]) -> str:
    """How long ago a closed connection was last seen: `3m05s ago`."""
    split = row.get("split") or {}
    last = row.get("ended") or split.get("closed") or row["started"]
    return duration(max(0.0, now - last)) + " ago"


def cmd_conn_show(args: argparse.Namespace) -> int:
    row = ask(Controller.CONNECTION, ConnectionArgs(id=args.id))
    if args.json:
        print(json.dumps(row))
        return OK
    split = row.pop("split", None)
    for key, value in row.items():
        print(f"{key:>12}: {value}")
    if split:
        print("  split tunnel:")
        for key, value in split.items():
            print(f"{key:>14}: {value}")
    return OK
