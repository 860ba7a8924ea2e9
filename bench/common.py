"""What the lab benchmarks share: preflight checks, the machine line, small formatting helpers."""

from __future__ import annotations

import os
import platform
import resource
import shutil
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def pump_through_bus(pub: Any, sub: Any, frames: list[bytes], n: int) -> tuple[int, float]:
    """Send `frames` n times from `pub` while draining `sub`; (received, seconds). Waits first until the
    subscription reached the publisher (the slow-joiner window), so every message sent can arrive."""
    while sub.recv_frames(timeout=0.05) is None:
        pub.send_frames(frames)
    while sub.recv_frames(timeout=0.2) is not None:
        pass
    received = 0
    t0 = time.perf_counter()
    for _ in range(n):
        pub.send_frames(frames)
        while sub.recv_frames_nowait() is not None:
            received += 1
    while sub.recv_frames(timeout=0.3) is not None:
        received += 1
    return received, time.perf_counter() - t0


def preflight(name: str, needs: Iterable[str]) -> bool:
    """Root and the tools a lab benchmark runs; one line on stderr saying what is missing."""
    if os.geteuid() != 0:
        print(f"{name} bench: needs root (lab namespaces)", file=sys.stderr)
        return False
    missing = [t for t in needs if shutil.which(t) is None]
    if missing:
        print(f"{name} bench: missing {', '.join(missing)} (`make deps` installs them)", file=sys.stderr)
        return False
    return True


def raise_nofile() -> None:
    """Child processes (proxy workers, servers) may hold tens of thousands of sockets: soft = hard limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def errors_note(n: int) -> str:
    return f" ({n} errors)" if n else ""


def print_rows(rows: list[tuple[str, str]]) -> None:
    """The micro-benchmarks' output: name and value, the values in one column."""
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")


def print_report(table: str) -> None:
    """A lab benchmark's result: date and machine, then its markdown table (pasted into RESULTS.md)."""
    print(f"{time.strftime('%Y-%m-%d')}, {machine()}\n")
    print(table)


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    return f"{os.cpu_count()} CPUs ({cpu}), kernel {platform.release()}, CPython {platform.python_version()}"
