"""The state database and the local API: does history keep up, how fast does it answer, what SSE costs the bus.

- db: inserts/s of closed connections (executemany, 100 a batch, as the controller writes them) and the
  p50 of listing 1,000 rows from a history of `--rows` (in-process, core/state).
- controller: a bus, a controller and the api actor in a namespace of their own (`ip netns exec`, never in
  the root namespace); `--conns` connections (conn.new + conn.verdict + conn.end) published at `--rate`
  connections/s — the interceptor's peak is ~5,400 new connections/s (bench/RESULTS.md, "interceptor") — then
  how many reached the database and how long after the last event; then, after restarting the controller
  (memory empty: history only), the p50 of the `connections` op for 1,000 rows and of GET /api/v1/connections
  with limit=1000 (from a urllib client in the namespace).
- sse: events/s one publisher gets through the bus to one subscriber, with no SSE clients and with 10
  (each subscribed to every topic), side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

from bench.common import preflight, print_rows, pump_through_bus
from core.access import load_or_generate
from core.state import ConnectionFilter, StateDB
from messages import ConnEnd, ConnNew, ConnVerdict, ProcessInfo, Verdict
from messages.control import AnyActor, ConnectionInfo, ConnectionsArgs, Controller, SplitInfo
from runtime import paths
from runtime.transport import Publisher, Subscriber, ask

NS = "splittun-stbench" + os.environ.get("SPLITTUN_TEST_TAG", "")
PROC = ProcessInfo(pid=4242, ppid=1, uid=1000, name="curl", exe="/usr/bin/curl", cmdline=["curl", "-s", "x"])


def info(i: int, now: float) -> ConnectionInfo:
    port = 40000 + i % 20000
    split = SplitInfo(session_id=f"s{i}", worker="proxy_tcp_00", interface="eth0", local_ip="192.0.2.10",
                      local_port=port, opened=now, closed=now + 1, bytes_up=100, bytes_down=5000)  # fmt: skip
    return ConnectionInfo(
        conn_id=f"c{i}", started=now - i * 0.01, protocol="tcp", src_ip="192.0.2.10", src_port=40000 + i % 20000,
        dst_ip="203.0.113.80", dst_port=443, pid=4242, exe="/usr/bin/curl", process_name="curl",
        cmdline=["curl", "-s", "x"], verdict=int(Verdict.REROUTE_TO_SPLIT_TUN), verb="split tunneled",
        ended=now - i * 0.01 + 1, state="closed", split=split if i % 2 else None,
    )  # fmt: skip


def p50_ms(fn, n: int = 30) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def db_bench(rows: int) -> list[tuple[str, str]]:
    tmp = Path(tempfile.mkdtemp(prefix="stb-db-"))
    try:
        db = StateDB.open(tmp / "state.db")
        now = time.time()
        records = [info(i, now) for i in range(rows)]
        t0 = time.perf_counter()
        for start in range(0, rows, 100):
            db.save_connections(records[start : start + 100])
        rate = rows / (time.perf_counter() - t0)
        listed = p50_ms(lambda: db.connections(ConnectionFilter(since=now - 3600 * 24, limit=1000)))
        app = p50_ms(lambda: db.connections(ConnectionFilter(app="curl", limit=1000)))
        db.close()
        return [
            (f"db: insert closed connections (batches of 100, {rows:,} rows)", f"{rate:,.0f} rows/s"),
            (f"db: list 1,000 of {rows:,} rows, newest first (--since 1d)", f"p50 {listed:.1f} ms"),
            ("db: the same with --app curl", f"p50 {app:.1f} ms"),
        ]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Namespace:
    """A network namespace with only loopback, a bus, a controller and the api actor in it."""

    def __init__(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="stb-", dir="/tmp"))
        self.run = self.home / "run"
        self.env = {**os.environ, "SPLITTUN_HOME": str(self.home), "PYTHONUNBUFFERED": "1"}
        self.env.pop("SPLITTUN_RUN_DIR", None)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)
        subprocess.run(["ip", "netns", "add", NS], check=True)
        subprocess.run(["ip", "-n", NS, "link", "set", "lo", "up"], check=True)
        self.run.mkdir(mode=0o700, parents=True)
        self.tokens = load_or_generate(self.run)
        self.start("bus", "runtime.bus")
        self.start("controller", "actors.controller")
        self.start("api", "actors.api", "--port", "817")
        self.ctx = zmq.Context()
        self.wait_answering("controller")
        self.wait_answering("api")

    def start(self, name: str, module: str, *args: str) -> None:
        log = open(self.home / f"{name}.log", "ab")  # noqa: SIM115 (the process keeps it)
        argv = ["ip", "netns", "exec", NS, sys.executable, "-m", module, *args]
        self.procs[name] = subprocess.Popen(argv, env=self.env, stdout=log, stderr=log)

    def wait_answering(self, instance: str) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                ask(paths.actor_endpoint(self.run, instance), AnyActor.PING, timeout=1, who=instance)
                return
            except Exception:
                time.sleep(0.1)
        raise RuntimeError(f"{instance} did not start: {(self.home / f'{instance}.log').read_text()[-500:]}")

    def restart(self, name: str, module: str, *args: str) -> None:
        self.procs[name].send_signal(signal.SIGTERM)
        self.procs[name].wait(timeout=10)
        self.start(name, module, *args)
        self.wait_answering(name)

    def in_ns(self, code: str, *args: str) -> str:
        argv = ["ip", "netns", "exec", NS, sys.executable, "-c", code, *args]
        return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120).stdout

    def close(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.ctx.term()
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)
        shutil.rmtree(self.home, ignore_errors=True)


def stored(home: Path) -> int:
    try:
        with sqlite3.connect(home / "state.db", timeout=5) as db:
            return int(db.execute("SELECT count(*) FROM connections").fetchone()[0])
    except sqlite3.Error:
        return 0


def controller_bench(ns: Namespace, conns: int, rate: float) -> list[tuple[str, str]]:
    pub = Publisher(ns.ctx, paths.bus_in(ns.run), hwm=200_000)
    probe = Subscriber(ns.ctx, paths.bus_out(ns.run), ["conn."])
    warm = ConnEnd(conn_id="warmup", ts=time.time())
    while probe.recv_frames(timeout=0.05) is None:  # until our publisher's events flow through the bus
        pub.publish(warm)
    probe.close()
    before = stored(ns.home)
    t0 = time.perf_counter()
    now = time.time()
    for i in range(conns):
        conn_id = f"bench-{i}"
        pub.publish(ConnNew(conn_id=conn_id, ts=now, ip_version=4, protocol=6, src_ip="192.0.2.10",
                            src_port=10000 + i % 50000, dst_ip="203.0.113.80", dst_port=443, process=PROC))  # fmt: skip
        pub.publish(ConnVerdict(conn_id=conn_id, ts=now, verdict=Verdict.ACCEPT, reason="bench"))
        pub.publish(ConnEnd(conn_id=conn_id, ts=now, reason="closed"))
        ahead = (i + 1) / rate - (time.perf_counter() - t0)
        if ahead > 0:
            time.sleep(ahead)
    sent = time.perf_counter()
    published_rate = conns / (sent - t0)
    deadline = sent + 30
    count = stored(ns.home) - before
    while count < conns and time.perf_counter() < deadline:
        time.sleep(0.05)
        count = stored(ns.home) - before
    done = time.perf_counter()
    lag, sustained = done - sent, count / (done - t0)
    pub.close()
    rows = [
        (f"controller: {conns:,} connections at {published_rate:,.0f}/s ({published_rate * 3:,.0f} events/s)",
         f"{count:,} stored ({conns - count:,} lost), all in the database {lag * 1000:.0f} ms after the last event "
         f"({sustained:,.0f} connections/s end to end)"),
    ]  # fmt: skip
    ns.restart("controller", "actors.controller")  # memory empty: what follows comes from the history
    control = paths.control(ns.run)
    args = ConnectionsArgs(limit=1000, since=time.time() - 3600)
    got = ask(control, Controller.CONNECTIONS, args, timeout=10)
    op = p50_ms(lambda: ask(control, Controller.CONNECTIONS, args, timeout=10))
    rows.append((f"`connections` op, 1,000 of {stored(ns.home):,} rows, history only", f"p50 {op:.1f} ms"))
    client = (
        "import json, statistics, sys, time, urllib.request\n"
        "req = urllib.request.Request('http://127.0.0.1:817/api/v1/connections?since=1h&limit=1000',"
        " headers={'Authorization': 'Bearer ' + sys.argv[1]})\n"
        "times = []\n"
        "for _ in range(30):\n"
        "    t0 = time.perf_counter(); rows = json.load(urllib.request.urlopen(req)); "
        "times.append((time.perf_counter() - t0) * 1000)\n"
        "print(json.dumps([len(rows), statistics.median(times)]))\n"
    )
    n, http = json.loads(ns.in_ns(client, ns.tokens.read))
    rows.append(("GET /api/v1/connections?limit=1000 (urllib, JSON)", f"p50 {http:.1f} ms ({n} rows)"))
    assert len(got) == 1000 and n == 1000
    return rows


def bus_rate(ns: Namespace, n: int = 100_000) -> float:
    """Events/s from one publisher through the bus to one subscriber (topic bench.)."""
    sub = Subscriber(ns.ctx, paths.bus_out(ns.run), ["conn.end"])
    pub = Publisher(ns.ctx, paths.bus_in(ns.run), hwm=200_000)
    frames = ConnEnd(conn_id="b", ts=time.time(), reason="bench").encode()
    received, elapsed = pump_through_bus(pub, sub, frames, n)
    pub.close()
    sub.close()
    return received / elapsed


SSE_CLIENTS = (
    "import sys, threading, time, urllib.request\n"
    "counts = [0] * 10\n"
    "def read(i):\n"
    "    req = urllib.request.Request('http://127.0.0.1:817/api/v1/events', headers={'Authorization': 'Bearer ' + "
    "sys.argv[1]})\n"
    "    with urllib.request.urlopen(req, timeout=60) as r:\n"
    "        for line in r:\n"
    "            counts[i] += line.startswith(b'event: ')\n"
    "for i in range(10): threading.Thread(target=read, args=(i,), daemon=True).start()\n"
    "sys.stdin.readline()\n"
    "print(min(counts), max(counts), flush=True)\n"
)


def sse_bench(ns: Namespace) -> list[tuple[str, str]]:
    without = bus_rate(ns)
    argv = ["ip", "netns", "exec", NS, sys.executable, "-c", SSE_CLIENTS, ns.tokens.read]
    clients = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            counters = ask(paths.actor_endpoint(ns.run, "api"), AnyActor.COUNTERS)
            if counters.get("sse_clients") == 10:
                break
            time.sleep(0.1)
        with_sse = bus_rate(ns)
        time.sleep(1.0)
        out, _ = clients.communicate("done\n", timeout=30)
    finally:
        clients.kill()
    low, high = out.split()
    return [
        ("bus: 1 publisher → bus → 1 subscriber, no SSE clients", f"{without:,.0f} events/s"),
        ("the same with 10 SSE clients on every topic", f"{with_sse:,.0f} events/s ({with_sse / without:.2f}×); "
         f"each client got {int(low):,}–{int(high):,} events"),
    ]  # fmt: skip


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench state", description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000, help="history size for the db list (default 100000)")
    parser.add_argument("--conns", type=int, default=20_000, help="connections published (default 20000)")
    parser.add_argument("--rate", type=float, default=5_500, help="connections/s published (default 5500)")
    args = parser.parse_args(argv)
    rows = db_bench(args.rows)
    if not preflight("state", ["ip"]):
        print_rows(rows)
        return 1
    ns = Namespace()
    try:
        rows += controller_bench(ns, args.conns, args.rate)
        rows += sse_bench(ns)
    finally:
        ns.close()
    print_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
