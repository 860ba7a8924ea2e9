"""The split proxies on the lab path, side by side with the direct path, haproxy and socat.

`python -m bench proxy` builds its own lab (`pxb`, VPN owning the default route), starts the servers in
`inet` (iperf3; haproxy answering a tiny HTTP response; a hold-open server) and splittun's proxy actors
in `host` (bus + proxy_tcp / proxy_udp workers, events drained by a subscriber as the controller would),
runs every measurement, prints one table and tears everything down.

Paths (all from the host namespace to 203.0.113.80 in inet, over the ISP link, never through the VPN):
- direct: the client's own socket, via the ISP;
- splittun: nat OUTPUT DNAT (matching the client's uid, as the interceptor would match the app) to
  127.0.0.17:719; the proxy dials the original destination with the split mark, SO_BINDTODEVICE eth0
  and the split routing table (applied here, as the interceptor keeps it under supervisord);
- haproxy: the same DNAT to haproxy (tcp mode, `server 0.0.0.0` = the original destination, splice-auto);
- socat: the same DNAT to `socat ... fork` (fixed target: socat cannot read the original destination).
With `--pin` the load generator (wrk, the origin server, the bus and its subscriber) runs on CPU 0 and the
proxies under test (splittun's workers, haproxy, socat) on CPU 1 (`taskset`), so a proxy never competes
with its own load for a CPU; the kernel's networking runs where the sending process runs. Either way the
new-sessions rows say how each splittun worker's sessions and CPU time (per session, from /proc) split.

The redirected client ("the app") runs as uid 65534 and, like an app on a laptop whose VPN owns the
default route, sends from the tunnel address; direct clients and the haproxy/socat processes run as uid
65533, which a uid routing rule sends via the ISP. Everything shares the machine's
CPUs (clients, proxies, servers, kernel); compare columns within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import goals
from bench.common import errors_note, preflight, print_report, raise_nofile
from core.egress import plan_routes, static_egress
from kernel.routing import SplitRouting
from runtime import paths
from runtime.transport import request
from splittun.lab import Lab
from splittun.lab import topology as T

LAB_NAME = "pxb"
SERVER = T.SERVER_V4[0]
APP_UID = 65534  # "the app": its flows are redirected to the proxy under test; it has the VPN's route
DIRECT_UID = 65533  # direct clients and the haproxy/socat processes: a uid routing rule sends them via the ISP
IPERF_PORT, HOLD_PORT = 5201, 9000
HTTP_PORTS = range(8081, 8087)  # one origin port per variant: no TIME_WAIT/conntrack state shared between runs
SPLITTUN_PORT, HAPROXY_PORT, SOCAT_PORT = 719, 7191, 7192
DIRECT_TABLE, DIRECT_PREF = 5201, 30000  # after splittun's rule 1720, before the main table
PY = sys.executable
TOOLS = [PY, "-m", "bench.proxy_tools"]
SECTIONS = ("bulk", "conn", "udp", "mem")
NEEDS = ("ip", "iptables-legacy", "iperf3", "haproxy", "socat", "wrk", "setpriv", "taskset")
LOAD_CPU, PROXY_CPU = "0", "1"  # --pin


class Bench:
    def __init__(
        self, seconds: float, sessions: int, only: set[str] | None = None, quiet: bool = False, pin: bool = False
    ) -> None:
        self.only = only or set(SECTIONS)
        self.pin = pin
        self.seconds = seconds
        self.sessions = sessions
        self.quiet = quiet
        self.lab = Lab(name=LAB_NAME, style="replaced")
        self.tmp = Path(tempfile.mkdtemp(prefix="pxb-", dir="/tmp"))
        self.tmp.chmod(0o755)  # haproxy runs as another uid and reads its config from here
        self.run_dir = self.tmp / "run"
        self.env = {**os.environ, "SPLITTUN_RUN_DIR": str(self.run_dir), "PYTHONPATH": os.getcwd()}
        self.procs: list[subprocess.Popen[Any]] = []
        self.workers: dict[str, subprocess.Popen[Any]] = {}
        self.rows: list[tuple[str, str, str, str]] = []

    # --- plumbing -------------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"  {text}", file=sys.stderr, flush=True)

    def on_cpu(self, cpu: str, argv: list[str]) -> list[str]:
        """`argv` pinned to `cpu` with --pin (LOAD_CPU or PROXY_CPU), else unchanged."""
        return ["taskset", "-c", cpu, *argv] if self.pin else argv

    def popen(self, role: str, argv: list[str], log: str, **kw: Any) -> subprocess.Popen[Any]:
        out = open(self.tmp / f"{log}.log", "ab")  # noqa: SIM115 - kept open for the process's life
        kw.setdefault("stdout", out)
        proc = self.lab.popen(role, argv, stderr=out, env=self.env, preexec_fn=raise_nofile, **kw)
        self.procs.append(proc)
        return proc

    def sh(self, role: str, argv: list[str], timeout: float = 60) -> str:
        done = self.lab.exec(role, argv, capture_output=True, text=True, timeout=timeout, env=self.env)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    @staticmethod
    def as_uid(uid: int, argv: list[str]) -> list[str]:
        return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]

    def as_app(self, argv: list[str]) -> list[str]:
        return self.as_uid(APP_UID, argv)

    def redirect(self, proto: str = "tcp", port: int = 0, to: int = 0) -> None:
        """Only the benchmark client's flows to SERVER:port go to the proxy listening on 127.0.0.17:to.
        Conntrack starts empty for each run, so no NAT binding of an earlier variant lingers."""
        self.sh("host", ["iptables-legacy", "-w", "-t", "nat", "-F", "OUTPUT"])
        for role in ("host", "inet"):
            self.lab.exec(role, ["conntrack", "-F"], capture_output=True)
        if to:
            self.sh("host", ["iptables-legacy", "-w", "-t", "nat", "-A", "OUTPUT", "-p", proto, "-d", SERVER,
                             "--dport", str(port), "-m", "owner", "--uid-owner", str(APP_UID),
                             "-j", "DNAT", "--to-destination", f"127.0.0.17:{to}"])  # fmt: skip

    def wait_port(self, role: str, proto: str, addr: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        flag = "-tln" if proto == "tcp" else "-uln"
        while addr not in self.sh(role, ["ss", "-H", flag]):
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {proto} {addr} in {role}")
            time.sleep(0.05)

    # --- lifecycle ------------------------------------------------------------------------------------

    def up(self) -> None:
        self.say("building lab pxb")
        self.lab.up()
        self.sh("host", ["ip", "route", "add", "default", "via", T.ISP_LAN_V4, "dev", T.HOST_IF,
                         "table", str(DIRECT_TABLE)])  # fmt: skip
        self.sh("host", ["ip", "rule", "add", "uidrange", f"{DIRECT_UID}-{DIRECT_UID}", "lookup", str(DIRECT_TABLE),
                         "pref", str(DIRECT_PREF)])  # fmt: skip
        # The split rule and table the workers' upstream sockets need (they go with the lab).
        egress = static_egress(T.HOST_IF, source4=T.HOST_V4, gateway4=T.ISP_LAN_V4)
        SplitRouting(netns=self.lab.ns_host).apply(plan_routes(egress.all()))
        self.popen("inet", ["iperf3", "-s", "-B", SERVER, "-p", str(IPERF_PORT)], "iperf3")
        cfg = self.tmp / "origin.cfg"
        cfg.write_text(
            "global\n    nbthread 1\n    maxconn 9000\n"
            "defaults\n    mode http\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n"
            f"frontend web\n    bind {SERVER}:{HTTP_PORTS[0]}-{HTTP_PORTS[-1]}\n"
            '    http-request return status 200 content-type text/plain string "ok\\n"\n'
        )
        self.popen("inet", self.on_cpu(LOAD_CPU, ["haproxy", "-db", "-f", str(cfg)]), "origin")
        self.popen("inet", [*TOOLS, "hold-server", SERVER, str(HOLD_PORT)], "hold", stdout=subprocess.DEVNULL)
        for proto, port in (("tcp", IPERF_PORT), ("tcp", HTTP_PORTS[0]), ("tcp", HOLD_PORT)):
            self.wait_port("inet", proto, f"{SERVER}:{port}")
        self.popen("host", self.on_cpu(LOAD_CPU, [PY, "-m", "runtime.bus"]), "bus")
        deadline = time.monotonic() + 10
        while not (self.run_dir / "bus-out.sock").exists():
            if time.monotonic() > deadline:
                raise RuntimeError("bus did not start")
            time.sleep(0.05)
        self.drain = self.popen("host", self.on_cpu(LOAD_CPU, [*TOOLS, "drain", paths.bus_out(self.run_dir)]), "drain",
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert self.drain.stdout is not None and self.drain.stdout.readline().strip() == "ready"

    def down(self) -> None:
        for proc in self.procs[::-1]:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.lab.down()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def worker(self, kind: str, index: int, *extra: str) -> None:
        """Start splittun worker <kind>_<index>: static egress = the lab's ISP side."""
        name = f"{kind}_{index:02d}"
        argv = [PY, "-m", f"actors.{kind}", "--instance", name, "--interface", T.HOST_IF,
                "--source4", T.HOST_V4, "--gateway4", T.ISP_LAN_V4, "--listen", f"127.0.0.17:{SPLITTUN_PORT}",
                "--max-sessions", str(max(4 * self.sessions, 2048)), *extra]  # fmt: skip
        self.workers[name] = self.popen("host", self.on_cpu(PROXY_CPU, argv), name)
        deadline = time.monotonic() + 10
        while not (self.run_dir / f"{name}.ctl.sock").exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start; see its log")
            time.sleep(0.05)

    def stop_worker(self, name: str) -> None:
        proc = self.workers.pop(name)
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)

    def counters(self, name: str) -> dict[str, int]:
        return request(paths.actor_endpoint(self.run_dir, name), "counters", timeout=5, who=name)

    @contextlib.contextmanager
    def haproxy(self, threads: int) -> Iterator[None]:
        cfg = self.tmp / f"haproxy{threads}.cfg"
        cfg.write_text(
            f"global\n    nbthread {threads}\n    maxconn 4000\n"
            "defaults\n    mode tcp\n    timeout connect 10s\n    timeout client 300s\n    timeout server 300s\n"
            "    option splice-auto\n"
            f"frontend f\n    bind 127.0.0.17:{HAPROXY_PORT}\n    default_backend b\n"
            "backend b\n    server s 0.0.0.0\n"  # the original destination (SO_ORIGINAL_DST)
        )
        with self._comparison(["haproxy", "-db", "-f", str(cfg)], f"haproxy{threads}", HAPROXY_PORT):
            yield

    def socat(self, port: int) -> contextlib.AbstractContextManager[None]:
        argv = ["socat", f"TCP-LISTEN:{SOCAT_PORT},bind=127.0.0.17,reuseaddr,fork,backlog=4096", f"TCP:{SERVER}:{port}"]
        return self._comparison(argv, "socat", SOCAT_PORT)

    @contextlib.contextmanager
    def _comparison(self, argv: list[str], name: str, port: int) -> Iterator[None]:
        """A proxy we compare with, listening on 127.0.0.17:`port` for the block's duration (as DIRECT_UID:
        a uid rule routes its upstream via the ISP, like the proxy's own); stopped also when it never came up."""
        proc = self.popen("host", self.on_cpu(PROXY_CPU, self.as_uid(DIRECT_UID, argv)), name)
        try:
            self.wait_port("host", "tcp", f"127.0.0.17:{port}")
            yield
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)

    # --- measurements ---------------------------------------------------------------------------------

    def iperf(self, reverse: bool = False, udp: bool = False, uid: int = APP_UID) -> dict[str, Any]:
        argv = ["iperf3", "-c", SERVER, "-p", str(IPERF_PORT), "-t", f"{self.seconds:g}", "-J"]
        if reverse:
            argv.append("-R")
        if udp:
            argv += ["-u", "-l", "64", "-b", "0"]
        for attempt in range(3):  # iperf3's server refuses a test while the last one is still closing
            done = self.lab.exec("host", self.as_uid(uid, argv), capture_output=True, text=True,
                                 timeout=self.seconds + 30)  # fmt: skip
            try:
                result = json.loads(done.stdout)
            except ValueError:
                result = {"error": done.stderr.strip() or "no output"}
            if "error" not in result:
                return result["end"]
            time.sleep(0.5 * (attempt + 1))
        raise RuntimeError(f"iperf3 {' '.join(argv[1:])}: {result['error']}")

    def gbits(self, reverse: bool, uid: int = APP_UID) -> float:
        return self.iperf(reverse, uid=uid)["sum_received"]["bits_per_second"] / 1e9

    def udp_pps(self, uid: int = APP_UID) -> float:
        s = self.iperf(udp=True, uid=uid)["sum"]
        return (s["packets"] - s["lost_packets"]) / s["seconds"]

    def wrk(self, port: int, connections: int = 64, uid: int = APP_UID) -> tuple[float, int]:
        argv = ["wrk", "-t2", f"-c{connections}", f"-d{self.seconds:g}s", "-H", "Connection: close",
                f"http://{SERVER}:{port}/"]  # fmt: skip
        out = self.sh("host", self.on_cpu(LOAD_CPU, self.as_uid(uid, argv)), timeout=self.seconds + 30)
        rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
        errors += int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
        return rate, errors

    def new_udp_sessions(self, n: int) -> tuple[float, int]:
        """n fresh UDP flows in one burst; the worker's sessions_created over time."""
        before = self.counters("proxy_udp_00").get("sessions_created", 0)
        client = self.lab.popen("host", self.as_app([*TOOLS, "udp-flows", SERVER, str(T.WHOAMI_UDP_PORT), str(n)]),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=self.env)  # fmt: skip
        try:
            assert client.stdout is not None and client.stdin is not None
            assert client.stdout.readline().strip() == "ready"
            t0 = time.monotonic()
            client.stdin.write("go\n")
            client.stdin.flush()
            last, last_t = before, t0
            while time.monotonic() - last_t < 1.0:
                time.sleep(0.02)
                now = self.counters("proxy_udp_00").get("sessions_created", 0)
                if now != last:
                    last, last_t = now, time.monotonic()
                if now - before >= n:
                    break
            created = last - before
            return created / max(last_t - t0, 1e-6), created
        finally:
            client.kill()
            client.wait()

    def idle_memory(self, n: int, workers: list[str]) -> tuple[float, float, float]:
        """RSS of fresh proxy_tcp workers before and with n idle sessions spread over them (SO_REUSEPORT):
        (before MiB, after MiB, KiB per session). Several workers because each session holds two sockets
        and one process may only open `ulimit -Hn` files."""
        pids = [self._pid_of(name) for name in workers]
        rss0 = sum(_rss_kib(pid) for pid in pids)
        client = self.lab.popen("host", self.as_app([*TOOLS, "tcp-holders", SERVER, str(HOLD_PORT), str(n)]),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=self.env,
                                preexec_fn=raise_nofile)  # fmt: skip

        def active() -> int:
            return sum(self.counters(name).get("sessions_active", 0) for name in workers)

        try:
            assert client.stdout is not None
            if client.stdout.readline().strip() != "ready":
                raise RuntimeError("tcp-holders failed")
            deadline = time.monotonic() + 30
            while active() < n and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)
            held = active()
            rss1 = sum(_rss_kib(pid) for pid in pids)
            return rss0 / 1024, rss1 / 1024, (rss1 - rss0) / max(held, 1)
        finally:
            client.kill()
            client.wait()

    def worker_load(self, names: list[str]) -> list[tuple[int, float]]:
        """Per worker: sessions created so far and CPU seconds used (user + system, all its threads)."""
        return [(self.counters(n).get("sessions_created", 0), _cpu_seconds(self._pid_of(n))) for n in names]

    def _pid_of(self, name: str) -> int:
        return int(request(paths.actor_endpoint(self.run_dir, name), "ping", timeout=5, who=name)["pid"])

    # --- the run --------------------------------------------------------------------------------------

    def row(self, bench: str, variant: str, result: str, relative: str = "") -> None:
        self.rows.append((bench, variant, result, relative))
        self.say(f"{bench:38} {variant:24} {result:>16} {relative}")

    def run(self) -> None:
        self.up()
        self.worker("proxy_tcp", 0)
        self.worker("proxy_udp", 0)
        if "bulk" in self.only:
            self.bulk()
        if "conn" in self.only:
            self.conn()
        if "udp" in self.only:
            self.udp()
        if "mem" in self.only:
            self.mem()
        self.redirect()

    def bulk(self) -> None:
        for reverse, label in ((False, "TCP bulk upload (iperf3)"), (True, "TCP bulk download (iperf3 -R)")):
            self.redirect()
            direct = self.gbits(reverse, uid=DIRECT_UID)
            self.row(label, "direct", f"{direct:.2f} Gbit/s", "1.00×")
            self.redirect("tcp", IPERF_PORT, SPLITTUN_PORT)
            value = self.gbits(reverse)
            self.row(label, "splittun (1 worker)", f"{value:.2f} Gbit/s", f"{value / direct:.2f}×")
            with self.haproxy(1):
                self.redirect("tcp", IPERF_PORT, HAPROXY_PORT)
                value = self.gbits(reverse)
            self.row(label, "haproxy (1 thread)", f"{value:.2f} Gbit/s", f"{value / direct:.2f}×")
            with self.socat(IPERF_PORT):
                self.redirect("tcp", IPERF_PORT, SOCAT_PORT)
                value = self.gbits(reverse)
            self.row(label, "socat", f"{value:.2f} Gbit/s", f"{value / direct:.2f}×")

    def conn(self) -> None:
        label = "TCP new sessions/s (wrk, Connection: close)"
        ports = iter(HTTP_PORTS)
        self.redirect()
        direct, err = self.wrk(next(ports), uid=DIRECT_UID)
        self.row(label, "direct", f"{direct:,.0f}/s" + errors_note(err), "1.00×")
        port = next(ports)
        self.redirect("tcp", port, SPLITTUN_PORT)
        workers = ["proxy_tcp_00"]
        before = self.worker_load(workers)
        one, err = self.wrk(port)
        note = load_note(before, self.worker_load(workers))
        self.row(label, "splittun (1 worker)", f"{one:,.0f}/s" + errors_note(err), f"{one / direct:.2f}×; {note}")
        self.worker("proxy_tcp", 1)
        port = next(ports)
        self.redirect("tcp", port, SPLITTUN_PORT)
        workers.append("proxy_tcp_01")
        before = self.worker_load(workers)
        two, err = self.wrk(port)
        note = load_note(before, self.worker_load(workers))
        scaling = f"{two / direct:.2f}× ({two / one:.2f}× of 1 worker); {note}"
        self.row(label, "splittun (2 workers)", f"{two:,.0f}/s" + errors_note(err), scaling)
        self.stop_worker("proxy_tcp_01")
        for threads in (1, 2):
            port = next(ports)
            with self.haproxy(threads):
                self.redirect("tcp", port, HAPROXY_PORT)
                value, err = self.wrk(port)
            self.row(label, f"haproxy ({threads} thread{'s' if threads > 1 else ''})",
                     f"{value:,.0f}/s" + errors_note(err), f"{value / direct:.2f}×")  # fmt: skip
            if threads == 1 and value:
                goals.record(goals.PROXY_TCP_VS_HAPROXY, f"{one / value:.2f}× ({one:,.0f} vs {value:,.0f}/s)",
                             one >= value)  # fmt: skip
        port = next(ports)
        with self.socat(port):
            self.redirect("tcp", port, SOCAT_PORT)
            value, err = self.wrk(port)
        self.row(label, "socat", f"{value:,.0f}/s" + errors_note(err), f"{value / direct:.2f}×")

    def udp(self) -> None:
        label = "UDP datagrams/s, 64 B (iperf3 -u -b 0)"
        self.redirect()
        direct_pps = self.udp_pps(uid=DIRECT_UID)
        self.row(label, "direct", f"{direct_pps:,.0f}/s", "1.00×")
        self.redirect("udp", IPERF_PORT, SPLITTUN_PORT)
        value = self.udp_pps()
        self.row(label, "splittun (1 worker)", f"{value:,.0f}/s", f"{value / direct_pps:.2f}×")
        self.redirect("udp", T.WHOAMI_UDP_PORT, SPLITTUN_PORT)
        rate, created = self.new_udp_sessions(self.sessions)
        self.row(f"UDP new sessions/s ({self.sessions:,} flows in a burst)", "splittun (1 worker)",
                 f"{rate:,.0f}/s", f"{created:,} created")  # fmt: skip
        goals.record(goals.PROXY_UDP_SESSIONS, f"{rate:,.0f}/s", rate >= 10_000)

    def mem(self) -> None:
        """Fresh workers, so earlier runs leave nothing behind."""
        self.stop_worker("proxy_tcp_00")
        self.stop_worker("proxy_udp_00")
        workers = [f"proxy_tcp_{i:02d}" for i in range(2)]
        for i in range(2):
            self.worker("proxy_tcp", i)
        self.redirect("tcp", HOLD_PORT, SPLITTUN_PORT)
        before, after, per = self.idle_memory(self.sessions, workers)
        self.row(f"RSS with {self.sessions:,} idle TCP sessions", "splittun (2 workers)",
                 f"{per:.1f} KiB/session", f"{before:.1f} → {after:.1f} MiB")  # fmt: skip

    def table(self) -> str:
        lines = ["| benchmark | variant | result | relative |", "|---|---|---|---|"]
        lines += [f"| {b} | {v} | {r} | {rel} |" for b, v, r, rel in self.rows]
        return "\n".join(lines)


def load_note(before: list[tuple[int, float]], after: list[tuple[int, float]]) -> str:
    """How the workers shared a run: each one's share of the sessions (SO_REUSEPORT spreading them) and its CPU
    time per session."""
    sessions = [a[0] - b[0] for a, b in zip(after, before, strict=True)]
    cpu_us = [(a[1] - b[1]) * 1e6 / max(n, 1) for a, b, n in zip(after, before, sessions, strict=True)]
    if len(sessions) == 1:
        return f"{cpu_us[0]:.0f} µs CPU/session"
    total = max(sum(sessions), 1)
    shares = " / ".join(f"{100 * n / total:.0f} %" for n in sessions)
    return f"sessions {shares}, {' / '.join(f'{c:.0f}' for c in cpu_us)} µs CPU/session"


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (/proc/PID/stat, clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_kib(pid: int) -> int:
    """RSS of the worker: `ip netns exec` execs python, so the pid is the worker itself."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each iperf3/wrk run")
    parser.add_argument("--sessions", type=int, default=10_000, help="UDP flows / idle TCP sessions")
    parser.add_argument("--only", action="append", choices=SECTIONS, help="run only these parts (repeatable)")
    parser.add_argument("--pin", action="store_true",
                        help=f"load generator on CPU {LOAD_CPU}, proxies on CPU {PROXY_CPU} (taskset)")  # fmt: skip
    args = parser.parse_args(argv)
    if not preflight("proxy", NEEDS):
        return 1
    bench = Bench(args.seconds, args.sessions, set(args.only or SECTIONS), pin=args.pin)
    try:
        bench.run()
    finally:
        bench.down()
    print_report(bench.table())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
