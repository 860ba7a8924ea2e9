"""The lab's processes: which ones live in its namespaces, its daemons found by command line, and stopping them.

`Lab.down()` must work on half-built and crashed labs and must never touch the root namespace (the real
machine): namespaces are matched by inode, never the caller's own nor init's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

NETNS_DIR = Path("/run/netns")
_MODULES = ("splittun.lab.tunnel", "splittun.lab.servers", "splittun.lab.leakmon")

#: Popen objects of daemons this process started, so they can be reaped (no zombies) after a kill.
CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def ns_inode(path: str | Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def root_inodes() -> set[tuple[int, int] | None]:
    """Namespaces that must never be matched: ours and init's (the real machine)."""
    return {ns_inode("/proc/self/ns/net"), ns_inode("/proc/1/ns/net")}


def pids_in(inodes: set[tuple[int, int]]) -> set[int]:
    """PIDs whose network namespace is one of ``inodes`` (one /proc scan for all of them)."""
    inodes = inodes - root_inodes()
    if not inodes:
        return set()
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and ns_inode(f"/proc/{entry}/ns/net") in inodes:
            pids.add(int(entry))
    pids.discard(os.getpid())
    return pids


def netns_pids(ns: str) -> set[int]:
    """PIDs whose network namespace is ``ns`` (what ``ip netns pids`` does), never the root one's."""
    target = ns_inode(NETNS_DIR / ns)
    return pids_in({target}) if target else set()


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def alive(pid: int) -> bool:
    """True for a running (not zombie) process; reaps our own finished children on the way."""
    child = CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        CHILDREN.pop(pid, None)
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def lab_daemons(name: str | None = None) -> dict[int, list[str]]:
    """Lab daemon processes found by command line (``-m splittun.lab.* ... --lab NAME``)."""
    found: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        argv = cmdline(int(entry))
        if not any(m in argv for m in _MODULES) or "--lab" not in argv:
            continue
        i = argv.index("--lab")
        if name is None or (i + 1 < len(argv) and argv[i + 1] == name):
            found[int(entry)] = argv
    return found


def kill(pids: set[int], grace: float = 1.0) -> None:
    """SIGTERM, then SIGKILL what is left after ``grace`` seconds; reap our own children."""
    pids = {p for p in pids if p > 1 and p != os.getpid()}
    if not pids:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        end = time.monotonic() + grace
        while time.monotonic() < end:
            pids = {p for p in pids if alive(p)}
            if not pids:
                break
            time.sleep(0.02)
        if not pids:
            break
    for pid in list(CHILDREN):
        if not alive(pid):
            CHILDREN.pop(pid, None)
