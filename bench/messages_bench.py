"""What publishing costs the verdict path, and what the bus carries.

- encode: build + msgpack-encode one `conn.new` (with process info) — paid per new connection.
- publish: encode + non-blocking send into the bus — what the interceptor pays per verdict.
- decode: validate + decode one `conn.new` — paid by each subscriber.
- bus: events/s from one publisher through a real bus process to one subscriber, and the share lost
  (a publisher never blocks, so an overloaded bus drops instead of slowing verdicts).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

from bench.common import print_rows, pump_through_bus
from messages import ConnNew, ProcessInfo, decode
from runtime import paths
from runtime.transport import Publisher, Subscriber

SAMPLE = ConnNew(
    conn_id="c-000001",
    ts=time.time(),
    ip_version=4,
    protocol=6,
    src_ip="192.0.2.10",
    src_port=43210,
    dst_ip="203.0.113.80",
    dst_port=443,
    process=ProcessInfo(pid=4242, ppid=1, uid=1000, name="curl", exe="/usr/bin/curl", cmdline=["curl", "-s", "x"]),
    domain="www.example.com",
)


def per_call_us(fn, n: int) -> float:
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def bus_throughput(n: int = 200_000) -> tuple[float, float]:
    run = Path(tempfile.mkdtemp(prefix="stb-", dir="/tmp"))
    env = {**os.environ, "SPLITTUN_RUN_DIR": str(run)}
    bus = subprocess.Popen([sys.executable, "-m", "runtime.bus"], env=env, stderr=subprocess.DEVNULL)
    ctx = zmq.Context()
    try:
        deadline = time.monotonic() + 5
        while not (run / "bus-out.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        sub = Subscriber(ctx, paths.bus_out(run), ["conn."])
        pub = Publisher(ctx, paths.bus_in(run), hwm=100_000)
        received, elapsed = pump_through_bus(pub, sub, SAMPLE.encode(), n)
        pub.close()
        sub.close()
        return received / elapsed, 1 - received / n
    finally:
        ctx.term()
        bus.terminate()
        bus.wait()
        for f in run.iterdir():
            f.unlink()
        run.rmdir()


def main(argv: list[str]) -> int:
    frames = SAMPLE.encode()
    ctx = zmq.Context()
    run = Path(tempfile.mkdtemp(prefix="stb-", dir="/tmp"))
    pub = Publisher(ctx, paths.bus_in(run))  # nobody listening: measures our cost only
    rows = [
        ("encode conn.new", f"{per_call_us(SAMPLE.encode, 20_000):.2f} µs"),
        ("encode + publish (non-blocking)", f"{per_call_us(lambda: pub.publish(SAMPLE), 20_000):.2f} µs"),
        ("decode + validate conn.new", f"{per_call_us(lambda: decode(frames), 20_000):.2f} µs"),
    ]
    pub.close()
    ctx.term()
    run.rmdir()
    rate, lost = bus_throughput()
    rows.append(("bus: 1 publisher → bus → 1 subscriber", f"{rate:,.0f} events/s ({lost:.1%} dropped)"))
    print_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
