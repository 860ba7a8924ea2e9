"""What netenv costs its callers.

- cached lookup: `get_interface(ip | mac | name)` and `best_physical_default_interfaces()` with a warm
  cache — what a proxy or the interceptor pays per call (goal ≤ 2 µs).
- full refresh with 100 interfaces: netlink dumps + /sys + the decisions, in a throwaway namespace
  holding 50 veth pairs with an IPv4 and an IPv6 address each (goal ≤ 5 ms). Also split into the read
  and the pure decision, and the `netenv.changed` encode the actor adds when something changed.
The namespace needs root; without it that part is skipped with the reason. It is deleted afterwards,
also on failure, and nothing is ever done in the namespace the benchmark runs in.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable

from bench.common import print_rows
from core.netenv import Netenv, best_physical_default_interfaces, get_interface
from core.netenv import default as shared
from core.netenv.linux import LinuxSource
from core.netenv.uplink import decide

PAIRS = 50  # 100 interfaces


def per_call_us(fn: Callable[[], object], n: int) -> float:
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def best_ms(fn: Callable[[], object], n: int = 50) -> float:
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def lookups() -> list[tuple[str, str]]:
    """Against this machine's own interfaces (read-only), through the shared cache."""
    snap = shared.snapshot()
    if not snap.interfaces:
        return [("cached lookup", "skipped: no usable interface here")]
    iface = snap.interfaces[0]
    ip = iface.ipv4 or iface.ipv6
    shared.max_age = 3600.0  # keep it warm for the whole measurement: we measure the hit, not the refresh
    try:
        rows = [
            ("cached get_interface(ip)", f"{per_call_us(lambda: get_interface(ip), 200_000):.2f} µs"),
            ("cached get_interface(name)", f"{per_call_us(lambda: get_interface(iface.name), 200_000):.2f} µs"),
        ]
        if iface.mac:
            mac = iface.mac
            rows.append(("cached get_interface(mac)", f"{per_call_us(lambda: get_interface(mac), 200_000):.2f} µs"))
        rows.append(
            (
                "cached best_physical_default_interfaces()",
                f"{per_call_us(best_physical_default_interfaces, 100_000):.2f} µs",
            )
        )
    finally:
        shared.max_age = 1.0
    return rows


def inner() -> int:
    """Runs inside the 100-interface namespace: prints the refresh timings as JSON."""
    env = Netenv()
    snap = env.refresh()
    source = LinuxSource()
    raw = source.read()
    out = {
        "links": len(snap.all_interfaces),
        "usable": len(snap.interfaces),
        "refresh_ms": best_ms(env.refresh),
        "read_ms": best_ms(source.read),
        "decide_ms": best_ms(lambda: decide(raw)),
        "encode_ms": best_ms(lambda: snap.to_message(1).encode()),
        "message_bytes": len(snap.to_message(1).encode()[1]),
    }
    print(json.dumps(out))
    return 0


def refresh_in_namespace() -> list[tuple[str, str]]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return [("full refresh, 100 interfaces", "skipped: needs root and iproute2 (a throwaway namespace)")]
    ns = f"splittun-bench-ne-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        lines = ["link set lo up"]
        for i in range(PAIRS):
            lines += [
                f"link add nb{i}a type veth peer name nb{i}b",
                f"addr add 198.51.100.{i + 1}/32 dev nb{i}a",
                f"addr add 2001:db8:b0:{i:x}::1/64 dev nb{i}a nodad",
                f"addr add 203.0.113.{i + 1}/32 dev nb{i}b",
                f"link set nb{i}a up",
                f"link set nb{i}b up",
            ]
        lines += ["addr add 192.0.2.10/24 dev nb0a", "route add default via 192.0.2.1 dev nb0a"]
        subprocess.run(["ip", "-n", ns, "-batch", "-"], input="\n".join(lines) + "\n", text=True, check=True)
        code = "import sys; from bench.netenv_bench import inner; sys.exit(inner())"
        done = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        r = json.loads(done.stdout)
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    return [
        (f"full refresh, {r['links']} links ({r['usable']} usable)", f"{r['refresh_ms']:.2f} ms"),
        ("  of which: read (netlink dumps, /sys)", f"{r['read_ms']:.2f} ms"),
        ("  of which: decide (pure)", f"{r['decide_ms']:.2f} ms"),
        ("encode netenv.changed (only when it changed)", f"{r['encode_ms']:.2f} ms, {r['message_bytes']:,} bytes"),
    ]


def main(argv: list[str]) -> int:
    rows = lookups() + refresh_in_namespace()
    print_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
