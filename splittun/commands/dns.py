"""`splittun dns` and `splittun dns flush`: the resolver (actors/resolver), the host's DNS path while splittun runs."""

from __future__ import annotations

import argparse
import json
from typing import Any

from messages.control import Op, Resolver
from splittun.output import table

from . import OK, ask_actor


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dns", help="the resolver: where split and VPN apps' queries go, cache, recent queries")
    p.add_argument("--json", action="store_true", help="everything the resolver reports, recent queries included")
    dsub = p.add_subparsers(dest="dns_command", metavar="{flush}")
    flush = dsub.add_parser("flush", help="forget every cached answer")
    flush.set_defaults(func=cmd_flush)
    p.set_defaults(func=cmd_dns)


def ask(op: Op[Any, Any]) -> Any:
    return ask_actor(f"splittun dns {op.name}", "resolver", op)


def cmd_dns(args: argparse.Namespace) -> int:
    status = ask(Resolver.STATUS)
    if args.json:
        print(json.dumps(status))
        return OK
    mode = "rerouting every app's DNS here" if status["rerouting"] else f"not rerouting: {status['not_ready']}"
    print(f"resolver: {' '.join(status['listen'])} (udp, tcp): {mode}")
    for path, servers in status["upstreams"].items():
        source = f" [{status['split_dns_source']}]" if path == "split" else ""
        if path == "vpn" and status.get("vpn_dns_source"):
            source = f" [{status['vpn_dns_source']}]"
        print(f"  {path:>5} apps → {', '.join(servers)}{source}")
    if status["vpn_domains"]:
        print(f"  always through the VPN: {', '.join(status['vpn_domains'])}")
    counters = status["counters"]
    print(f"cache: {status['cache_entries']} answers, hit rate {status['cache_hit_rate']:.0%}")
    print("queries: " + ", ".join(f"{k} {v}" for k, v in counters.items() if v))
    rows = [_row(q) for q in status["recent"][-15:]]
    if rows:
        print(table(["NAME", "TYPE", "PATH", "UPSTREAM", "IFACE", "RCODE", "ANSWERS", "MS"], rows))
    return OK


def _row(q: dict[str, Any]) -> list[str]:
    upstream = q["upstream"] or ("cache" if q["cached"] else "-")
    return [q["name"], q["qtype"], q["path"] or "-", upstream, q["interface"] or "-", q["rcode"], str(q["answers"]),
            f"{q['latency_ms']:.1f}"]  # fmt: skip


def _row(q: dict[str, Any]) -> list[str]:
    upstream = q["upstream"] or ("cache" if q["cached"] else "-")
    answers, ms = str(q["answers"]), f"{q['latency_ms']:.1f}"
    return [q["name"], q["qtype"], q["path"] or "-", upstream, q["interface"] or "-", q["rcode"], answers, ms]


def cmd_flush(args: argparse.Namespace) -> int:
    print(f"flushed {ask(Resolver.FLUSH)['dropped']} cached answers")
    return OK
