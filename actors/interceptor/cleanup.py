"""Remove everything the interceptor can have put in this network namespace — no state needed.

`cleanup` (the firewall) is used by worker 0's own stop path, by `python -m actors.interceptor --cleanup`,
and by `splittun down` (after supervisord stopped, inside the namespace supervisord ran in), so a crash
(kill -9, power cut of the process) never leaves rules behind. Idempotent: a second run finds nothing and
changes nothing. What goes: our iptables/ip6tables chains and jumps (found by the SPLITTUN- prefix), the
src_valid_mark we changed (its old value is noted in our rules), conntrack entries carrying our marks, and
the shared name table file.

`remove_routing` (the split policy routing, actors/routing.py: found by priority and table) is never run
on the interceptor's own stop: the proxies may still be using the routing. `splittun down` runs it once
supervisord (and so every proxy) has stopped, clean stop or not; `--cleanup` runs it too.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

NAMES_FILE = "interceptor-names.table"
#: Present in the run dir while worker 0's rules may be installed; holds the network namespace's identity
#: (st_dev:st_ino of /proc/self/ns/net). `splittun down` cleans up only when it exists, so a second
#: instance that never intercepted (passive) never removes another instance's rules.
RULES_MARKER = "interceptor.rules"
#: The same for the split routing: written by worker 0 before it first applies the routing, removed only with
#: the routing (`remove_routing`), so it outlives the interceptor's stops; `splittun down` removes the
#: routing only when it exists.
ROUTING_MARKER = "interceptor.routing"


def netns_id(path: str = "/proc/self/ns/net") -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def write_rules_marker(run_dir: Path, name: str = RULES_MARKER) -> None:
    (Path(run_dir) / name).write_text(netns_id() + "\n")


def write_routing_marker(run_dir: Path) -> None:
    write_rules_marker(run_dir, ROUTING_MARKER)


def intercepting_here(proc_net: str = "/proc/net") -> bool:
    """Whether an interceptor's worker 0 holds its queue in this network namespace right now."""
    from messages.marks import Queue

    try:
        with open(f"{proc_net}/netfilter/nfnetlink_queue") as f:
            return any(line.split()[:1] == [str(int(Queue.IPV4_OUT))] for line in f)
    except OSError:
        return False


def remove_routing(run_dir: Path | None = None, unless_intercepting: bool = False) -> list[str]:
    """Remove the split rule and table here; returns what was removed.

    `unless_intercepting`: leave them when an interceptor runs here now — another instance took over the
    queues after ours stopped, and the routing is its own."""
    from actors.routing import SplitRouting

    removed = [] if unless_intercepting and intercepting_here() else SplitRouting().remove()
    if run_dir is not None:
        (Path(run_dir) / ROUTING_MARKER).unlink(missing_ok=True)
    return removed


def cleanup(run_dir: Path | None = None) -> dict[str, Any]:
    """Returns what was removed: {"tables": [...], "conntrack": n, "names_file": bool}."""
    from actors.conntrack import Conntrack
    from messages.marks import VERDICT_MASK

    from .firewall import CONNTRACK_MARKS
    from .platform import firewall

    result: dict[str, Any] = {"tables": firewall(1).remove(), "conntrack": 0, "names_file": False}
    with contextlib.suppress(OSError):
        ct = Conntrack()
        try:
            before = sum(1 for e in ct.dump() if e.mark & VERDICT_MASK in CONNTRACK_MARKS)
            ct.flush_marks(CONNTRACK_MARKS, VERDICT_MASK)
            result["conntrack"] = before
        finally:
            ct.close()
    if run_dir is not None:
        path = Path(run_dir) / NAMES_FILE
        if path.exists():
            path.unlink(missing_ok=True)
            result["names_file"] = True
        (Path(run_dir) / RULES_MARKER).unlink(missing_ok=True)
    return result
