"""What the resolver costs a DNS lookup, and how many cached answers one resolver process serves.

`python -m bench dns` builds its own lab (`dnsb`, the VPN owns the default route) with the lab's two DNS
servers (splittun.lab.geodns) and measures from the lab host, side by side in one run:
- off: splittun not running; the app asks the VPN's DNS server (tunnel-internal, 192.0.2.65) directly,
  through the tunnel: the upstream round trip the resolver adds to;
- uncached: splittun up, every query a new name (under geo.example.net): interceptor reroute + resolver +
  the same upstream round trip;
- cached: splittun up, the same name again and again: answered from the resolver's cache.
Latency: sequential queries, each from a new UDP socket (as glibc's stub resolver does, so each is a new
connection the interceptor decides), p50/p99. Rate: answers/s with 64 queries in flight on one socket
(off: the lab's Python DNS server itself is the limit; cached: one resolver process). The client runs as
uid 65534, as apps do. Everything is torn down at the end, also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

import dns.message

from bench.common import preflight, print_report
from splittun.lab import Lab
from splittun.lab import topology as T
from splittun.lab.geodns import GEO_NAME, GeoDns
from splittun.lab.instance import Instance

LAB_NAME = "dnsb"
SERVER = T.TUN_SRV_V4  # the VPN's DNS server, as resolv.conf names it
TOOL = [sys.executable, "-m", "bench.dns_bench", "tool"]
APP_UID = 65534
NEEDS = ("ip", "iptables-legacy", "setpriv")


def tool_latency(server: str, count: int, fresh: bool) -> None:
    """`count` sequential queries, each from a new socket; prints the latencies (ms) as JSON."""
    out: list[float] = []
    fixed = dns.message.make_query(f"bench.{GEO_NAME}", "A")
    for _ in range(count):
        query = dns.message.make_query(f"{uuid.uuid4().hex[:12]}.{GEO_NAME}", "A") if fresh else fixed
        wire = query.to_wire()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(2.0)
            started = time.perf_counter()
            sock.sendto(wire, (server, 53))
            try:
                sock.recv(4096)
            except TimeoutError:
                continue
            out.append((time.perf_counter() - started) * 1000)
    print(json.dumps(out))


def tool_rate(server: str, seconds: float, window: int = 64) -> None:
    """Answers/s for one cached name with `window` queries in flight on one socket; prints JSON."""
    wire = bytearray(dns.message.make_query(f"bench.{GEO_NAME}", "A").to_wire())
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((server, 53))
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sent = answered = 0
    deadline = time.monotonic() + seconds
    while sent - answered < window:
        sock.send(bytes(wire))
        sent += 1
    while time.monotonic() < deadline:
        if not sel.select(0.5):
            sent = answered  # lost ones: refill the window
        while True:
            try:
                sock.recv(4096)
            except BlockingIOError:
                break
            answered += 1
        while sent - answered < window:
            sock.send(bytes(wire))
            sent += 1
    print(json.dumps({"answers_per_s": answered / seconds}))


class Bench:
    def __init__(self, count: int, seconds: float) -> None:
        self.count, self.seconds = count, seconds
        self.lab = Lab(name=LAB_NAME, style="replaced")
        self.geo = GeoDns(self.lab)
        self.inst: Instance | None = None
        self.rows: dict[str, Any] = {}

    def tool(self, *args: str) -> Any:
        argv = ["setpriv", f"--reuid={APP_UID}", f"--regid={APP_UID}", "--clear-groups", *TOOL, *args]
        proc = self.lab.exec("host", argv, timeout=300, env={**os.environ, "PYTHONPATH": os.getcwd()})
        if proc.returncode != 0:
            raise RuntimeError(f"bench tool {args[0]}: {proc.stderr.strip()[-500:]}")
        return json.loads(proc.stdout)

    def latency(self, label: str, fresh: bool) -> None:
        if not fresh:
            self.tool("latency", SERVER, "3", "0")  # warm the cache (and the server's path)
        ms = sorted(self.tool("latency", SERVER, str(self.count), "1" if fresh else "0"))
        p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
        self.rows[label] = (statistics.median(ms), p99, self.count - len(ms))

    def run(self) -> None:
        self.lab.up()
        self.geo.__enter__()
        self.latency("off", fresh=True)
        self.rows["off rate"] = self.tool("rate", SERVER, str(self.seconds))["answers_per_s"]
        self.inst = Instance.start(self.lab)
        self.latency("uncached", fresh=True)
        self.latency("cached", fresh=False)
        self.rows["cached rate"] = self.tool("rate", SERVER, str(self.seconds))["answers_per_s"]

    def down(self) -> None:
        if self.inst is not None:
            self.inst.stop()
        self.geo.__exit__()
        self.lab.down()

    def table(self) -> str:
        off = self.rows["off"]
        lines = ["| what | p50 | p99 | vs off (p50) | lost |", "|---|---|---|---|---|"]
        for label, why in (("off", "no splittun: the VPN's DNS server through the tunnel"),
                           ("uncached", "splittun: reroute + resolver + the same upstream"),
                           ("cached", "splittun: answered from the resolver's cache")):  # fmt: skip
            p50, p99, lost = self.rows[label]
            lines.append(f"| {label} ({why}) | {p50:.2f} ms | {p99:.2f} ms | {p50 - off[0]:+.2f} ms | {lost} |")
        lines += ["", "| rate (64 in flight, one socket) | answers/s | goal |", "|---|---|---|",
                  f"| off: the lab's Python DNS server | {self.rows['off rate']:,.0f} | |",
                  f"| cached: one resolver process | {self.rows['cached rate']:,.0f} | ≥ 5,000/s |"]  # fmt: skip
        return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv[:1] == ["tool"]:
        cmd, *args = argv[1:]
        if cmd == "latency":
            tool_latency(args[0], int(args[1]), args[2] == "1")
        elif cmd == "rate":
            tool_rate(args[0], float(args[1]))
        else:
            print(f"unknown tool {cmd!r}", file=sys.stderr)
            return 2
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench dns", description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=400, help="sequential queries per latency row")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each rate run")
    args = parser.parse_args(argv)
    if not preflight("dns", NEEDS):
        return 1
    bench = Bench(args.queries, args.seconds)
    try:
        bench.run()
    except (RuntimeError, subprocess.SubprocessError) as exc:
        print(f"dns bench failed: {exc}", file=sys.stderr)
        return 1
    finally:
        bench.down()
    print_report(bench.table())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
