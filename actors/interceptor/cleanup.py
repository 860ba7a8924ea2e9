"""Remove everything the interceptor can have put in this network namespace — no state needed.

Used by worker 0's own stop path, by `python -m actors.interceptor --cleanup`, and by `splittun down`
(after supervisord stopped, inside the namespace supervisord ran in), so a crash (kill -9, power cut of
the process) never leaves rules behind. Idempotent: a second run finds nothing and changes nothing.

What goes: our iptables/ip6tables chains and jumps (found by the SPLITTUN- prefix), conntrack entries
carrying our verdict marks, and the shared name table file. The interceptor sets no sysctl and no
route rule (see README.md: DNAT to 127.0.0.17 from OUTPUT needs no route_localnet), so none to undo.
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


def netns_id(path: str = "/proc/self/ns/net") -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def write_rules_marker(run_dir: Path) -> None:
    (Path(run_dir) / RULES_MARKER).write_text(netns_id() + "\n")


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
