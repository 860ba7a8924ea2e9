"""The web panel with a long history and a busy bus: how long the history takes to load, how late a new
connection shows up, and how much of the page's main thread the live stream takes.

`python -m bench panel` builds its own lab (`pnb`), starts splittun in it, logs a headless Debian chromium
(Selenium, as the browser tests drive it; tests/support/browser.py) into the panel, and for each history size
(`--sizes`, default 1,000 and 10,000 closed connections written into the state database):
- load: from navigating to / until every history row is in the page (performance.now in the page);
- live: `--rate` synthetic connections/s (conn.new, conn.verdict, conn.end on the bus, as the interceptor
  publishes them) for `--seconds`; per connection, from publishing conn.new until its row is in the DOM
  (p50, p95), and what the main thread spent in long tasks (> 50 ms) per second, and frames drawn per second.
Everything runs on the same CPUs (chromium, splittun, the publisher); compare the rows of one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import zmq

from bench.common import preflight, print_report
from core.state import StateDB
from messages import ConnEnd, ConnNew, ConnVerdict, ProcessInfo, Verdict, verdict_verb
from messages.control import ConnectionInfo
from runtime import paths
from runtime.transport import Publisher, Subscriber
from splittun.lab import Lab
from splittun.lab import topology as T
from splittun.lab.instance import Instance
from tests.support import browser as B

LAB_NAME = "pnb"
BASE = "http://127.0.0.1:817"

# In the page: resolve with performance.now() once the line under the list counts `arguments[0]` rows.
WAIT_LOADED = """const [want, done] = arguments;
const tick = () => {
  const n = Number(((document.getElementById('shown-count') || {}).textContent || '').match(/\\d+/g)?.pop() || 0);
  if (n >= want) done(performance.now()); else setTimeout(tick, 10);
};
tick();"""

# In the page: note when each new row appears, long tasks, and frames.
WATCH = """window.bench = { seen: {}, longMs: 0, longCount: 0, frames: 0, t0: performance.now() };
new MutationObserver((records) => {
  const now = Date.now();
  for (const r of records) for (const n of r.addedNodes) {
    const id = n.dataset && n.dataset.connId;
    if (id && id.startsWith('live-') && !(id in window.bench.seen)) window.bench.seen[id] = now;
  }
}).observe(document.getElementById('conn-rows'), { childList: true });
new PerformanceObserver((list) => {
  for (const e of list.getEntries()) { window.bench.longMs += e.duration; window.bench.longCount++; }
}).observe({ type: 'longtask' });
const frame = () => { window.bench.frames++; requestAnimationFrame(frame); };
requestAnimationFrame(frame);"""

RESULT = "return { ...window.bench, elapsed: performance.now() - window.bench.t0 };"


def history_row(i: int, now: float, size: int) -> ConnectionInfo:
    return ConnectionInfo(
        conn_id=f"hist{size}-{i}", started=now - 120 - i * 0.3, protocol="tcp", src_ip=T.HOST_V4,
        src_port=20000 + i % 40000, dst_ip=f"198.51.100.{i % 250 + 1}", dst_port=443, pid=5000 + i % 100,
        exe=f"/usr/bin/app{i % 50:02d}", process_name=f"app{i % 50:02d}", verdict=int(Verdict.ACCEPT),
        verb=verdict_verb(Verdict.ACCEPT), ended=now - 119 - i * 0.3, state="closed",
    )  # fmt: skip


def publish(inst: Instance, prefix: str, rate: float, seconds: float) -> dict[str, float]:
    """`rate` connections/s on the bus for `seconds`; conn_id → when its conn.new was published (epoch s)."""
    ctx = zmq.Context()
    pub = Publisher(ctx, paths.bus_in(inst.run_dir))
    probe = Subscriber(ctx, paths.bus_out(inst.run_dir), ["conn.end"])
    while probe.recv_frames(timeout=0.05) is None:  # until what we publish flows through the bus
        pub.publish(ConnEnd(conn_id="bench-warmup", ts=time.time()))
    probe.close()
    proc = ProcessInfo(pid=4343, ppid=1, uid=0, name="benchlive", exe="/usr/bin/benchlive", cmdline=["benchlive"])
    sent: dict[str, float] = {}
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < seconds:
            conn_id, now = f"{prefix}-{len(sent)}", time.time()
            pub.publish(ConnNew(conn_id=conn_id, ts=now, ip_version=4, protocol=6, src_ip=T.HOST_V4,
                                src_port=30000 + len(sent) % 30000, dst_ip="198.51.100.99", dst_port=443,
                                process=proc))  # fmt: skip
            sent[conn_id] = now
            pub.publish(ConnVerdict(conn_id=conn_id, ts=now, verdict=Verdict.ACCEPT, reason="bench"))
            pub.publish(ConnEnd(conn_id=conn_id, ts=now + 0.01, reason="closed"))
            time.sleep(max(0.0, len(sent) / rate - (time.monotonic() - t0)))
    finally:
        pub.close()
        ctx.term()
    return sent


def measure(inst: Instance, b: B.Browser, size: int, rate: float, seconds: float) -> dict[str, Any]:
    db = StateDB.open(inst.paths.state_db)
    try:
        now = time.time()
        db.prune(now, 0, 0)  # only this size's history
        db.save_connections(history_row(i, now, size) for i in range(size))
    finally:
        db.close()
    b.run(lambda d: d.set_script_timeout(120))
    b.run(lambda d: d.get(f"{BASE}/"))
    load_ms = b.run(lambda d: d.execute_async_script(WAIT_LOADED, size))
    b.run(lambda d: d.execute_script(WATCH))
    sent = publish(inst, f"live-{size}", rate, seconds)
    time.sleep(1.0)  # the last ones arrive
    got = b.run(lambda d: d.execute_script(RESULT))
    lags = sorted((got["seen"][k] / 1000 - v) * 1000 for k, v in sent.items() if k in got["seen"])
    elapsed = got["elapsed"] / 1000
    return {
        "size": size,
        "load_ms": load_ms,
        "sent": len(sent),
        "shown": len(lags),
        "lag_p50": statistics.median(lags) if lags else float("nan"),
        "lag_p95": lags[int(len(lags) * 0.95) - 1] if lags else float("nan"),
        "long_ms_per_s": got["longMs"] / elapsed,
        "long_count": got["longCount"],
        "fps": got["frames"] / elapsed,
    }


def table(results: list[dict[str, Any]], rate: float, seconds: float) -> str:
    lines = [
        f"| history | load (navigate → all rows in the page) | {rate:.0f} new/s for {seconds:.0f} s: new row in the "
        "DOM after conn.new, p50 / p95 | main thread in long tasks | frames/s |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['size']:,} | {r['load_ms']:,.0f} ms | {r['lag_p50']:.0f} / {r['lag_p95']:.0f} ms "
            f"({r['shown']}/{r['sent']} shown) | {r['long_ms_per_s']:.0f} ms/s ({r['long_count']} tasks) "
            f"| {r['fps']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench panel", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000", help="history sizes, comma-separated")
    parser.add_argument("--rate", type=float, default=50.0, help="new connections per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long the live stream runs")
    parser.add_argument("--json", action="store_true", help="the numbers as JSON too")
    args = parser.parse_args(argv)
    if not preflight("panel", ["ip", "iptables"]):
        return 2
    if (why := B.unavailable_reason()) is not None:
        print(f"panel bench: {why}", flush=True)
        return 2
    lab = Lab(name=LAB_NAME, style="replaced")
    results: list[dict[str, Any]] = []
    try:
        lab.up()
        inst = Instance.start(lab)
        try:
            url = inst.cli("ui").stdout.strip()
            with B.browser_in(lab.ns_host) as b:
                b.run(lambda d: d.get(url))
                for size in (int(s) for s in args.sizes.split(",")):
                    results.append(measure(inst, b, size, args.rate, args.seconds))
        finally:
            inst.stop()
    finally:
        lab.down()
    print_report(table(results, args.rate, args.seconds))
    if args.json:
        print(json.dumps(results))
    return 0
