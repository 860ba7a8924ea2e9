"""`splittun up`, `down` and `status`: the life of one instance under supervisord."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import zmq

from core import access
from core.redirect import BACKEND_ENV, BACKENDS, DIVERT, selected_backend
from core.updates import staleness
from messages import Heartbeat, MessageError
from messages.control import Controller, RequestFailed
from messages.marks import MAX_INTERCEPTOR_WORKERS
from runtime import paths
from runtime.paths import Home
from runtime.transport import Subscriber, ask
from splittun.output import duration, table
from splittun.supervise import ProcessState, Supervisor, SupervisorError

from . import FAILED, NOT_RUNNING, OK, UserError, current_home, prepared_home, require_root
from .configure import load, presets_in_force

GAVE_UP_STATES = {"FATAL", "EXITED", "STOPPED", "UNKNOWN"}
#: Seconds `up` waits, once every process heartbeats, for all of them to say they are ready.
READY_GRACE = 5.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start every actor under supervisord and wait for their heartbeats")
    p.add_argument("--tcp-workers", type=_positive, default=1, help="proxy_tcp worker processes (default 1)")
    p.add_argument("--udp-workers", type=_positive, default=1, help="proxy_udp worker processes (default 1)")
    p.add_argument(
        "--interceptor-workers",
        type=_interceptor_workers,
        default=1,
        help=f"interceptor processes, one NFQUEUE slot each (--queue-balance; 1-{MAX_INTERCEPTOR_WORKERS}, default 1)",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=selected_backend(),
        help="how connections are intercepted: nfqueue (iptables NFQUEUE + NAT, Linux's default) or divert "
        "(a packet diverter rewriting split flows to the proxies: WinDivert on Windows, eBPFDivert on Linux)",
    )
    p.add_argument("--timeout", type=float, default=20.0, help="seconds to wait for heartbeats (default 20)")
    p.add_argument("--api-port", type=_port, default=817, help="the local HTTP API's port on loopback (default 817)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="stop everything (does nothing when nothing runs)")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("status", help="table of actors: state, pid, uptime, age of last heartbeat")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)


def _positive(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError("must be between 1 and 64")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be between 1 and 65535")
    return value


def _interceptor_workers(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_INTERCEPTOR_WORKERS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_INTERCEPTOR_WORKERS}")
    return value


# --- up ---------------------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    require_root("splittun up")
    if args.backend == DIVERT and args.interceptor_workers != 1:
        raise UserError("--backend divert runs one interceptor worker (one divert handle)")
    home = prepared_home()
    sup = Supervisor(home)
    running = sup.pid()
    if running is not None:
        raise UserError(
            f"splittun is already running (supervisord pid {running}, home {home.root}); 'splittun down' stops it"
        )
    access.generate(home.run_dir)  # fresh API tokens for every run (`splittun api token` prints them)
    ctx = zmq.Context()
    # Subscribe before starting: the bus comes up inside supervisord and the SUB socket reconnects to it.
    heartbeats = Subscriber(ctx, paths.bus_out(home.run_dir), ["actor.heartbeat"])
    try:
        try:
            pid = sup.start(
                args.tcp_workers,
                args.udp_workers,
                extra_env={BACKEND_ENV: args.backend},
                interceptor_workers=args.interceptor_workers,
                api_port=args.api_port,
            )
        except SupervisorError as exc:
            print(f"splittun: {exc}")
            return FAILED
        seen, states, exited = _wait_for_heartbeats(sup, heartbeats, args.timeout)
    finally:
        heartbeats.close()
        ctx.term()
    missing = [s for s in states if s.instance not in seen]
    # One that supervisord gave up on, or saw exit while we waited (a crash loop, caught between two of its
    # restarts or not), is the cause: name it, not those still starting.
    failed = [s for s in missing if s.state in GAVE_UP_STATES or s.instance in exited]
    if missing or not states:
        if failed:
            print(f"splittun: {len(failed)} of {len(states)} actors did not start:")
        else:
            print(f"splittun: {len(missing)} of {len(states)} actors sent no heartbeat within {args.timeout:g} s:")
        for state in failed or missing:
            print(f"  {state.instance}: {state.state} {state.description}".rstrip() + _last_log_line(home, state))
        print(f"splittun: stopping what did start (logs are in {home.log_dir})")
        sup.shutdown()
        return FAILED
    print(f"splittun is up: supervisord pid {pid}, {len(states)} processes heartbeating (home {home.root})")
    for instance, beat in sorted(seen.items()):
        if not beat.ready:  # running, but not doing its job yet: say so (its traffic stays in the VPN)
            print(f"splittun: warning: {instance} is not ready: {beat.not_ready}")
    return OK


def _wait_for_heartbeats(
    sup: Supervisor, heartbeats: Subscriber, timeout: float
) -> tuple[dict[str, Heartbeat], list[ProcessState], set[str]]:
    """Until every process heartbeats and says it is ready (ready gets READY_GRACE more seconds).

    Also returns the instances supervisord was seen restarting (BACKOFF) or giving up on meanwhile."""
    seen: dict[str, Heartbeat] = {}
    exited: set[str] = set()
    deadline = time.monotonic() + timeout
    states: list[ProcessState] = []
    next_poll = 0.0
    while time.monotonic() < deadline:
        if time.monotonic() >= next_poll:
            states = sup.processes()
            exited.update(s.instance for s in states if s.state == "BACKOFF" or s.state in GAVE_UP_STATES)
            next_poll = time.monotonic() + 0.25
            if states and all(s.instance in seen for s in states):
                if all(beat.ready for beat in seen.values()):
                    break
                deadline = min(deadline, time.monotonic() + READY_GRACE)
            if any(s.state in GAVE_UP_STATES and s.instance not in seen for s in states):
                break  # supervisord gave up on one: waiting longer cannot help
        try:
            msg = heartbeats.recv(timeout=0.2)
        except MessageError:
            continue
        if isinstance(msg, Heartbeat):
            seen[msg.instance] = msg
    return seen, states, exited


def _last_log_line(home: Home, state: ProcessState) -> str:
    try:
        lines = home.program_log(state.instance).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    tail = [line[:200] for line in lines[-3:]]
    return "".join(f"\n      | {line}" for line in tail)


# --- down -------------------------------------------------------------------------------------------


def cmd_down(args: argparse.Namespace) -> int:
    require_root("splittun down")
    home = current_home()
    if not home.run_dir.exists():
        print(f"splittun is not running (home {home.root}); nothing to stop")
        return OK
    sup = Supervisor(home)
    # The namespace splittun runs in, taken before supervisord exits: the interceptor's rules and the split
    # routing live there, whichever namespace this command runs in. The routing goes once every proxy stopped.
    netns_fd = sup.open_netns()
    stopped = sup.shutdown()
    try:
        cleaned = sup.cleanup_interceptor(netns_fd)
    except SupervisorError as exc:
        print(f"splittun: {exc}")
        return FAILED
    print("splittun stopped" if stopped else f"splittun is not running (home {home.root}); nothing to stop")
    if cleaned and (cleaned.get("tables") or cleaned.get("conntrack")):  # a crash: say what it left
        left = [*cleaned["tables"], *(["split routing"] if cleaned.get("routing") else [])]
        print(f"splittun: removed interceptor leftovers: {', '.join(left) or 'no rules'}")
    return OK


# --- status -----------------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    require_root("splittun status")
    home = current_home()
    sup = Supervisor(home)
    pid = sup.pid()
    if pid is None:
        raise UserError(f"splittun is not running (home {home.root}); start it with 'splittun up'", NOT_RUNNING)
    try:
        states = sup.processes()
    except SupervisorError as exc:
        raise UserError(str(exc), FAILED) from None
    beats = last_heartbeats(home, {s.instance for s in states if s.pid})
    rows = []
    for s in states:
        beat = beats.get(s.instance)
        row = {
            "actor": s.instance,
            "state": s.state,
            "pid": s.pid or None,
            "uptime": round(s.uptime, 1) if s.pid else None,
            "heartbeat_age": None if beat is None else round(beat.age, 2),
            "ready": beat is not None and not beat.not_ready,
            "not_ready": beat.not_ready if beat is not None else "",
        }
        if beat is not None and "sessions_refused" in beat.counters:  # a proxy: what it turned away
            row["sessions_refused"] = beat.counters.get("sessions_refused", 0)
            row["refused_session_limit"] = beat.counters.get("refused_session_limit", 0)
        rows.append(row)
    presets = presets_status(home)
    if args.json:
        print(json.dumps({"supervisord_pid": pid, "home": str(home.root), "actors": rows, "presets": presets}))
        return OK
    print(
        table(
            ["ACTOR", "STATE", "PID", "UPTIME", "LAST HEARTBEAT", "NOTE"],
            [
                [
                    r["actor"],
                    r["state"],
                    r["pid"] or "-",
                    duration(r["uptime"]),
                    "never" if r["heartbeat_age"] is None else f"{duration(r['heartbeat_age'])} ago",
                    _note(r),
                ]
                for r in rows
            ],
        )
    )
    if presets["stale"]:
        print(presets["message"])
    return OK


def presets_status(home: Home) -> dict[str, Any]:
    """The preset version in force and whether it is stale (older than splittun/updateStaleAfterDays)."""
    version, _ = presets_in_force(home)
    max_days = load(home).update_stale_days
    age = staleness(version.index, datetime.now(UTC), timedelta(days=max_days))
    message = ""
    if age is not None:
        message = (
            f"presets: {version.index.describe()} is stale, published {age.days} days ago (more than {max_days}): "
            "'splittun update apply' fetches a newer one"
        )
    return {"index": version.index.to_json(), "stale": age is not None, "message": message}


def _note(row: dict[str, Any]) -> str:
    """Why an actor is not ready, and what a proxy turned away (a full session table shows here)."""
    notes = [f"not ready: {row['not_ready']}"] if row["not_ready"] else []
    if row.get("sessions_refused"):
        limit = row.get("refused_session_limit", 0)
        notes.append(
            f"refused {row['sessions_refused']} sessions" + (f" ({limit} at the session limit)" if limit else "")
        )
    return "; ".join(notes)


@dataclass(frozen=True)
class Beat:
    """An actor's last heartbeat as `status` shows it."""

    age: float
    not_ready: str = ""
    counters: dict[str, int] = field(default_factory=dict)


def last_heartbeats(home: Home, instances: set[str]) -> dict[str, Beat]:
    """Each instance's last heartbeat: from the controller's registry, or heard on the bus when the
    controller cannot answer."""
    beats: dict[str, Beat] = {}
    try:
        for row in ask(paths.control(home.run_dir), Controller.ACTORS, timeout=1.0, who="controller"):
            beats[row.instance] = Beat(row.age, row.not_ready, dict(row.counters))
    except RequestFailed:
        pass
    missing = instances - beats.keys()
    if missing:
        beats.update(_listen_for_heartbeats(home, missing, 1.5))
    return beats


def _listen_for_heartbeats(home: Home, instances: set[str], timeout: float) -> dict[str, Beat]:
    ctx = zmq.Context()
    sub = Subscriber(ctx, paths.bus_out(home.run_dir), ["actor.heartbeat"])
    heard: dict[str, Beat] = {}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not instances <= heard.keys():
            try:
                msg = sub.recv(timeout=0.1)
            except MessageError:
                continue
            if isinstance(msg, Heartbeat):
                heard[msg.instance] = Beat(max(0.0, time.time() - msg.ts), msg.not_ready, dict(msg.counters))
    finally:
        sub.close()
        ctx.term()
    return heard
