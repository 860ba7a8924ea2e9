"""Remove everything the interceptor can have put in this network namespace — no state needed.

`cleanup` (the firewall) is used by worker 0's own stop path, by `python -m actors.interceptor --cleanup`,
and by `splittun down` (after supervisord stopped, inside the namespace supervisord ran in), so a crash
(kill -9, power cut of the process) never leaves rules behind. Idempotent: a second run finds nothing and
changes nothing. What goes: our iptables/ip6tables chains and jumps (found by the SPLITTUN- prefix), the
src_valid_mark we changed (its old value is noted in our rules), conntrack entries carrying our marks, and
the shared name table file.

`remove_routing` (the split policy routing, kernel/routing.py: found by priority and table) is never run
on the interceptor's own stop: the proxies may still be using the routing. `splittun down` runs it once
supervisord (and so every proxy) has stopped, clean stop or not; `--cleanup` runs it too.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from core.dns.names import NAMES_FILE
from kernel.netns import netns_id
from runtime import paths


def write_marker(marker: Path) -> None:
    """Leave `marker` (runtime.paths.Home.rules_marker / routing_marker) with this namespace's identity."""
    marker.write_text(netns_id() + "\n")


def intercepting_here(proc_net: str = "/proc/net") -> bool:
    """Whether an interceptor's worker 0 holds its queue in this network namespace right now."""
    from messages.marks import Queue

    try:
        with open(f"{proc_net}/netfilter/nfnetlink_queue") as f:
            return any(line.split()[:1] == [str(int(Queue.IPV4_OUT))] for line in f)
    except OSError:
        return False


def remove_routing(run_dir: Path | None = None, unless_intercepting: bool = False) -> list[str]:
    """Remove the split rules and tables here (the proxies' and the kernel path's, and the ivpn actor's bypass
    routes, table 717); returns what was removed.

    `unless_intercepting`: leave them when an interceptor runs here now — another instance took over the
    queues after ours stopped, and the routing is its own."""
    from kernel.routing import BypassRouting, KernelPathRouting, SplitRouting

    removed = []
    if not (unless_intercepting and intercepting_here()):
        removed = SplitRouting().remove() + KernelPathRouting().remove() + BypassRouting().remove()
    if run_dir is not None:
        paths.routing_marker(Path(run_dir)).unlink(missing_ok=True)
    return removed


def cleanup(run_dir: Path | None = None) -> dict[str, Any]:
    """Returns what was removed: {"tables": [...], "conntrack": n, "names_file": bool}."""
    from kernel.conntrack import Conntrack
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
        from core.redirect import REDIRECTS_FILE  # the redirect table (split UDP owners; the diverter's redirects)

        (Path(run_dir) / REDIRECTS_FILE).unlink(missing_ok=True)
        paths.rules_marker(Path(run_dir)).unlink(missing_ok=True)
    return result
