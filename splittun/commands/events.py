"""`splittun events [PREFIX ...] [--json]`: live decoded bus events, one per line.

This is exactly what a third-party subscriber does: connect a SUB socket to the bus's `bus-out` socket,
subscribe to topic prefixes and decode `[topic, msgpack payload]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import zmq

from messages.compat import legacy_shapes, legacy_subscriptions, wanted
from messages.schema import MessageError, decode, decode_loose, schema_for_topic
from runtime import paths
from runtime.transport import Subscriber

from . import NOT_RUNNING, OK, UserError, current_home, require_root


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("events", help="print live events from the bus, one per line")
    p.add_argument("prefixes", nargs="*", metavar="TOPIC_PREFIX", help="e.g. conn. proxy.session actor.heartbeat")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--count", type=int, default=0, help="exit after N events")
    p.add_argument("--duration", type=float, default=0.0, help="exit after S seconds")
    p.set_defaults(func=cmd_events)


def cmd_events(args: argparse.Namespace) -> int:
    require_root("splittun events")
    home = current_home()
    bus_out = paths.bus_out(home.run_dir)
    sock_file = paths.endpoint_file(bus_out)
    if sock_file is None or not sock_file.exists():
        raise UserError(f"splittun is not running (no bus at {sock_file}); start it with 'splittun up'", NOT_RUNNING)
    ctx = zmq.Context()
    prefixes = args.prefixes or [""]
    sub = Subscriber(ctx, bus_out, legacy_subscriptions(prefixes))  # conn.verdict travels in conn.new…
    deadline = time.monotonic() + args.duration if args.duration > 0 else None
    printed = 0
    try:
        while args.count <= 0 or printed < args.count:
            wait = 0.5 if deadline is None else deadline - time.monotonic()
            if wait <= 0:
                break
            frames = sub.recv_frames(timeout=min(wait, 0.5))
            if frames is None:
                continue
            for line in render(frames, as_json=args.json, prefixes=prefixes):
                print(line, flush=True)
                printed += 1
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `splittun events | head`
        sys.stderr.close()
    finally:
        sub.close()
        ctx.term()
    return OK


def render(frames: list[bytes], as_json: bool, prefixes: list[str]) -> list[str]:
    """The printable lines of a bus message in the version 1 shapes (messages/compat.py: a conn.new carrying
    its verdict prints as conn.new + conn.verdict, as before), those the prefixes ask for; a malformed one is
    reported on stderr and skipped."""
    try:
        topic, data = decode_loose(frames)
        if schema_for_topic(topic) is not None:
            decode(frames)  # validate against the schema; unknown (newer) topics print as they are
    except MessageError as exc:
        print(f"malformed event dropped: {exc}", file=sys.stderr, flush=True)
        return []
    return [_line(t, d, as_json) for t, d in legacy_shapes(topic, data) if wanted(t, prefixes)]


def _line(topic: str, data: dict[str, Any], as_json: bool) -> str:
    if as_json:
        return json.dumps({"topic": topic, **data}, default=_jsonable, separators=(",", ":"))
    ts = data.pop("ts", None)
    stamp = time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int((ts % 1) * 1000):03d}" if ts else "--:--:--"
    fields = " ".join(f"{k}={_text(v)}" for k, v in data.items() if v not in ("", None, [], {}))
    return f"{stamp} {topic} {fields}".rstrip()


def _text(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value) if (" " in value or not value) else value
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict):  # human view: zero counters are noise (--json keeps everything)
        value = {k: v for k, v in value.items() if v not in (0, "", None)}
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=_jsonable, separators=(",", ":"))
    return str(value)


def _jsonable(value: Any) -> Any:
    return value.hex() if isinstance(value, bytes) else str(value)
