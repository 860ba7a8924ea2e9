"""What publishing costs the verdict path, and what the bus carries.

- encode: build + msgpack-encode one `conn.new` (with process info) — paid per new connection.
- publish: encode + non-blocking send into the bus — what the interceptor pays per verdict.
- decode: validate + decode one `conn.new` — paid by each subscriber.
- bus: events/s from one publisher through a real bus process to one subscriber, and the share lost
  (a publisher never blocks, so an overloaded bus drops instead of slowing verdicts); one event per loop
  turn (every event its own message, as wire version 1 sent them) against 4 and 16 per turn (wire
  version 2: a turn's events of one topic leave as one message), side by side in one bus process.
- per connection, side by side in one run: the messages of one connection as version 1 sent them
  (conn.new + conn.verdict + conn.end; through a proxy also proxy.session.open + .close) and as version 2
  sends them (conn.new carrying its verdict + conn.end; a short session's open inside its close): what the
  interceptor pays to publish them, what the controller pays to decode them and update its registry
  (CPU time, each connection its own id), and how many messages the bus forwards.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq

from actors.controller.registry import ConnectionRegistry
from bench.common import print_rows
from messages import (
    ConnEnd,
    ConnNew,
    ConnVerdict,
    Message,
    ProcessInfo,
    ProxySessionClose,
    ProxySessionOpen,
    SessionCounters,
    Verdict,
    decode,
)
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


def connection(i: int, version: int, proxied: bool) -> list[Message]:
    """The messages of one split connection as schema `version` sends them."""
    cid, port = f"c-{i}", 1024 + i % 60000
    key = f"tcp 192.0.2.10:{port} 203.0.113.80:443"
    new = dataclasses.replace(SAMPLE, conn_id=cid, src_port=port)
    verdict = dict(verdict=Verdict.REROUTE_TO_SPLIT_TUN, rule="r1", split_key=key, interface="eth0", data_path="proxy")
    end = ConnEnd(conn_id=cid, ts=2.0, reason="closed")
    if not proxied:
        verdict["data_path"] = "kernel"
    out: list[Message] = (
        [new, ConnVerdict(conn_id=cid, ts=1.0, **verdict)] if version == 1 else [dataclasses.replace(new, **verdict)]
    )
    if proxied:
        where = dict(client_ip="192.0.2.10", client_port=port, orig_dst_ip="203.0.113.80", orig_dst_port=443)
        opened = ProxySessionOpen(session_id=f"s-{i}", worker="proxy_tcp_00", protocol="tcp", split_key=key, ts=1.1,
                                  local_ip="192.0.2.10", local_port=port, interface="eth0", **where)  # fmt: skip
        counters = SessionCounters(bytes_up=100, bytes_down=500, packets_up=2, packets_down=3)
        close = ProxySessionClose(session_id=f"s-{i}", worker="proxy_tcp_00", split_key=key, ts=1.9,
                                  counters=counters, duration=0.8, reason="closed")  # fmt: skip
        out += [opened, close] if version == 1 else [dataclasses.replace(close, opened=opened)]
    return [*out, end]


def per_connection(n: int = 5_000) -> list[tuple[str, str]]:
    """Publishing and consuming one connection's messages, version 1 against version 2 (CPU µs per connection)."""
    rows = []
    for proxied in (False, True):
        path = "split via proxy" if proxied else "kernel path / vpn"
        cost: dict[int, tuple[float, float, int]] = {}
        for version in (1, 2):
            made = [connection(i, version, proxied) for i in range(n)]
            t0 = time.process_time()
            wire = [[msg.encode() for msg in conn] for conn in made]
            encoded = (time.process_time() - t0) / n * 1e6
            registry = ConnectionRegistry(max_closed=n, max_active=n)
            t0 = time.process_time()
            for frames in wire:
                for f in frames:
                    registry.handle(decode(f))
            consumed = (time.process_time() - t0) / n * 1e6
            cost[version] = (encoded, consumed, len(made[0]))
        (e1, c1, m1), (e2, c2, m2) = cost[1], cost[2]
        rows += [
            (f"{path}: messages per connection, v1 → v2", f"{m1} → {m2}"),
            (f"{path}: interceptor+proxy encode, v1 → v2", f"{e1:.1f} → {e2:.1f} µs ({e2 / e1:.2f}×)"),
            (f"{path}: controller decode + registry, v1 → v2", f"{c1:.1f} → {c2:.1f} µs ({c2 / c1:.2f}×)"),
        ]
    return rows


class _Encoded:
    """A message encoded once: the pump measures the bus, not msgpack (`encode` is a row of its own)."""

    def __init__(self, msg: Message) -> None:
        self.frames = msg.encode()

    def encode(self) -> list[bytes]:
        return list(self.frames)


def pump_turns(pub: Publisher, sub: Subscriber, event: Message, n: int, per_turn: int) -> tuple[int, float]:
    """Publish `event` n times, `per_turn` events per loop turn (then the turn's flush), draining `sub`;
    (events received, seconds). As pump_through_bus, waits out the slow-joiner window first."""
    msg: Any = _Encoded(event)
    flush = pub.holds_turns()
    while sub.recv_frames(timeout=0.05) is None:
        pub.publish(msg)
        flush()
    while sub.recv_frames(timeout=0.2) is not None:
        pass
    received = 0
    t0 = time.perf_counter()
    for _ in range(n // per_turn):
        for _ in range(per_turn):
            pub.publish(msg)
        flush()
        while sub.recv_frames_nowait() is not None:
            received += 1
    while sub.recv_frames(timeout=0.3) is not None:
        received += 1
    return received, time.perf_counter() - t0


def bus_throughput(n: int = 100_000, per_turn: tuple[int, ...] = (1,)) -> list[tuple[int, float, float]]:
    """(events per turn, events/s, share lost) through one real bus process, for each `per_turn`."""
    run = Path(tempfile.mkdtemp(prefix="stb-", dir="/tmp"))
    env = {**os.environ, "SPLITTUN_RUN_DIR": str(run)}
    bus = subprocess.Popen([sys.executable, "-m", "runtime.bus"], env=env, stderr=subprocess.DEVNULL)
    ctx = zmq.Context()
    out = []
    try:
        deadline = time.monotonic() + 5
        while not (run / "bus-out.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        for k in per_turn:
            sub = Subscriber(ctx, paths.bus_out(run), ["conn."])
            pub = Publisher(ctx, paths.bus_in(run), hwm=100_000)
            received, elapsed = pump_turns(pub, sub, SAMPLE, n, k)
            out.append((k, received / elapsed, 1 - received / (n // k * k)))
            pub.close()
            sub.close()
        return out
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
    flush = pub.holds_turns()  # this thread is a loop's now: one turn publishes 16 connections' conn.new
    turn = [dataclasses.replace(SAMPLE, conn_id=f"c-{i}") for i in range(16)]

    def one_turn() -> None:
        for msg in turn:
            pub.publish(msg)
        flush()

    rows.append(("encode + publish, 16 per loop turn (wire v2)", f"{per_call_us(one_turn, 2_000) / 16:.2f} µs"))
    pub.close()
    ctx.term()
    run.rmdir()
    for k, rate, lost in bus_throughput(per_turn=(1, 4, 16, 1, 4, 16)):
        turn = "1 event per loop turn (1 per message)" if k == 1 else f"{k} events per loop turn (batched)"
        rows.append((f"bus: 1 publisher → bus → 1 subscriber, {turn}", f"{rate:,.0f} events/s ({lost:.1%} dropped)"))
    rows += per_connection()
    print_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
