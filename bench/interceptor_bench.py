"""What interception costs a new connection: latency, connections/s, packets to user space, attribution.

`python -m bench interceptor` builds its own lab (`ib`, the VPN owns the default route), starts a tiny
HTTP origin in `inet` (haproxy, both server addresses) and measures the same client workload from the lab
host side by side in one run:
- off: splittun not running (measured before `splittun up` and again after `splittun down`);
- bare NFQUEUE: no splittun; every new TCP connection goes through a bare Python NFQUEUE loop
  (netfilterqueue, accept with a mark): the floor any Python interceptor starts from;
- dest policy: `splittun up` in the host namespace (its own SPLITTUN_HOME), split tunnelling enabled with
  destination-only rules, so the verdict needs no process;
- app policy: the same with app rules in front, so every verdict needs the connection's process;
- divert: `splittun up --backend divert` with the dest policy (pydivert's eBPF backend: the WinDivert way,
  split flows rewritten to the proxies in user space instead of NFQUEUE + NAT).
Each policy is measured for a destination that stays in the VPN (203.0.113.80: the interceptor's cost
alone) and one that is split (203.0.113.81), once per data path of split TCP (`splittun/dataPath`):
kernel (re-routed by its mark and source-NATed) and proxy (through the TCP proxy).
- bulk: iperf3 upload and download to the split destination, in rounds (`--bulk-runs`, `--bulk-seconds`
  each) that alternate which side goes first: without splittun, direct (a uid rule sends the client via
  the ISP, the route a split connection takes) and direct + conntrack (one no-op conntrack rule in the
  host namespace and nf_conntrack_acct on, as while splittun runs: what tracking every packet costs);
  with splittun up (a fresh start per round) the kernel path, and the proxy path in the first round only.
  The report gives median and range per variant; the goal ratio is the kernel path's median over direct's.

- handler (only with `--only handler`): the dest policy with and without the external verdict handler (the
  IVPN interop, core/ivpn/interop.py), alternating twice: what the handler costs a connection it has no
  opinion on.

Measurements:
- latency: sequential connections, each from a freshly forked small process with few fds (as with curl):
  connect() and first response byte, p50/p99;
- rate: new connections/s with wrk (-c64, `Connection: close`, so one connection per request; wrk holds
  ~70 fds, the case where finding a socket's process is most expensive);
- packets that reached user space per connection, from the host's /proc/net/netfilter/nfnetlink_queue
  (divert: the diverter's own count of packets read);
- split bulk throughput (iperf3 upload and download through the split path, NFQUEUE and divert), with the
  packets that reached user space per MB;
- the interceptor's own time per connection (its busy_us and verdict_us counters) and the share of
  connections whose process it did not find;
- what the connection's events cost the rest of splittun: CPU time of the bus and the controller per
  connection (/proc/<pid>/schedstat; robust against a busy machine, unlike connections/s);
- process attribution in-process with the real attribution code (sock_diag, /proc, the process cache), in
  the lab host namespace; a new socket of a process holding 500 and 5,000 fds side by side with the old
  path (the whole fd table read: `Attributor(probe_fds=False)`). `--only attr` runs this part alone.
The clients run as uid 65534, as apps run as a user while splittun runs as root. One run takes about a
minute; everything is torn down at the end, also on failure. `python -m bench.interceptor_bench --help`
has the knobs (sections, sizes).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import goals
from bench.common import errors_note, preflight, print_report, raise_nofile
from splittun.lab import Lab
from splittun.lab import topology as T
from splittun.lab.instance import Instance

LAB_NAME = "ib"
KEEP_DST = T.SERVER_V4[0]  # no rule: stays in the VPN
SPLIT_DST = T.SERVER_V4[1]  # split by the policies below
PORTS = range(8100, 8140)  # one origin port per measurement: no TIME_WAIT/conntrack state shared between runs
PY = sys.executable
TOOL = [PY, "-m", "bench.interceptor_bench", "tool"]
CLIENT_NAME = "ibclient"  # comm of the latency client, so app rules can name it
APP_UID = 65534  # the clients run as a user, as apps do; splittun runs as root
BARE_QUEUE = 17040
NEEDS = ("ip", "iptables-legacy", "haproxy", "wrk", "setpriv", "iperf3")
DIRECT_UID = 65533  # the bulk baseline: a uid rule sends it via the ISP, as the split path does, no splittun
DIRECT_TABLE, DIRECT_PREF = 1650, 1650
IPERF_PORT = 5201
BULK_RUNS = 5  # rounds of the bulk measure: one 5 s run of each variant per round (single runs move by ±15 %)
BULK_SECONDS = 5.0
#: The no-op rule of the "direct + conntrack" variant: it makes the host namespace track every packet.
CONNTRACK_RULE = ["POSTROUTING", "-m", "conntrack", "--ctstate", "INVALID", "-j", "RETURN"]
ACCT_SYSCTL = "/proc/sys/net/netfilter/nf_conntrack_acct"
DATA_PATHS = ("kernel", "proxy")
OUT_QUEUES = range(17040, 17080)  # outbound queue groups (v4 17040+i, v6 17060+i)
REQUEST = b"GET / HTTP/1.1\r\nHost: origin\r\nConnection: close\r\n\r\n"

DEST_POLICY: list[dict[str, Any]] = [
    {"id": "dest", "action": "split", "dest": SPLIT_DST},
    {"id": "vpn-net", "action": "keep", "dest": "198.51.100.0/24"},
    {"id": "by-name", "action": "split", "dest": ".split.example.com"},
]
APP_POLICY: list[dict[str, Any]] = [
    {"id": "firefox", "action": "split", "app_path": "/usr/bin/firefox", "children": True},
    {"id": "client", "action": "split", "app_name": CLIENT_NAME, "dest": SPLIT_DST},
    {"id": "wrk", "action": "split", "app_path": "/usr/bin/wrk", "dest": SPLIT_DST},
    *DEST_POLICY[1:],
]


# --- tools that run inside the lab host namespace -------------------------------------------------------


def _set_comm(name: str) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(15, name.encode(), 0, 0, 0)  # PR_SET_NAME


def _one_connection(ip: str, port: int) -> tuple[int, int]:
    """(connect ns, first response byte ns) of one HTTP/1.1 request on a new connection."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        t0 = time.perf_counter_ns()
        s.connect((ip, port))
        t1 = time.perf_counter_ns()
        s.sendall(REQUEST)
        if not s.recv(1):
            raise ConnectionError("closed before answering")
        t2 = time.perf_counter_ns()
        while s.recv(4096):
            pass
    return t1 - t0, t2 - t0


def _drop_to(uid: int) -> None:
    """Run as the app would: not as root (the interpreter lives under /root, so drop after starting)."""
    if uid >= 0 and os.geteuid() == 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)


def tool_connect(ip: str, port: int, n: int, uid: int) -> None:
    """n sequential connections, each from a new forked process (few fds, never seen before, like curl)."""
    _set_comm(CLIENT_NAME)
    _drop_to(uid)
    times: list[tuple[int, int]] = []
    failed = 0
    for _ in range(n):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                out = "{} {}".format(*_one_connection(ip, port))
            except OSError:
                out = "-"
            os.write(w, out.encode())
            os._exit(0)
        os.close(w)
        data = os.read(r, 64).decode()
        os.close(r)
        os.waitpid(pid, 0)
        if data.count(" ") == 1:
            a, b = data.split()
            times.append((int(a), int(b)))
        else:
            failed += 1
    print(json.dumps({"connect": [a for a, _ in times], "first_byte": [b for _, b in times], "failed": failed}))


def tool_nfqueue(queue: int) -> None:
    """The floor: a bare Python NFQUEUE loop (netfilterqueue, blocking recv) that accepts every packet
    with a mark, doing nothing else."""
    from netfilterqueue import NetfilterQueue

    def verdict(pkt: Any) -> None:
        pkt.get_payload()
        pkt.set_mark(0)
        pkt.accept()

    q = NetfilterQueue()
    q.bind(queue, verdict, max_len=4096, range=256)
    print("ready", flush=True)
    try:
        q.run()
    finally:
        q.unbind()


def tool_spawner(ip: str, port: int) -> None:
    """For each line on stdin, fork a process that connects to ip:port, prints "pid port" and waits to
    be killed (it is reaped at once: SIGCHLD is ignored)."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    for _line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            c = socket.create_connection((ip, port))
            print(os.getpid(), c.getsockname()[1], flush=True)
            signal.pause()
            os._exit(0)


def _median_us(samples: list[int]) -> float:
    return statistics.median(samples) / 1000


def tool_attribution(rounds: int, fd_counts: tuple[int, ...] = (500, 5000)) -> None:
    """Process attribution with the real attribution code (sock_diag, /proc) on this namespace's sockets."""
    from actors.interceptor.attribution import Attributor
    from kernel.procfs import ProcReader
    from kernel.sockdiag import SockDiag, SocketEvents
    from messages.flows import FiveTuple, IpProtocol

    raise_nofile()
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4096)
    dst, dport = srv.getsockname()

    def new_client() -> tuple[socket.socket, int]:
        c = socket.create_connection((dst, dport))
        srv.accept()[0].close()
        return c, c.getsockname()[1]

    results: dict[str, float] = {}

    def churn_us(n: int) -> float:
        """Per loopback connection: connect, accept, close both (the kernel's work for a short connection)."""
        t0 = time.perf_counter_ns()
        for _ in range(n):
            c = socket.create_connection((dst, dport))
            srv.accept()[0].close()
            c.close()
        return (time.perf_counter_ns() - t0) / n / 1000

    # What listening to TCP destroy notices costs every connection of the namespace (before any attributor
    # listens): alternating blocks without and with a listener, whose queue is drained after each block.
    churn: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(6):
        churn["without"].append(churn_us(200))
        notices = SocketEvents(tcp=True)
        churn["with"].append(churn_us(200))
        notices.read(0)
        notices.close()
    for label, blocks in churn.items():
        results[f"connect + close on loopback, TCP destroy notices listened to, {label}"] = statistics.median(blocks)
    diag = SockDiag()
    reader = ProcReader()
    shared = Attributor(diag, reader)
    held: list[socket.socket] = []

    def timed(fn: Any) -> float:
        samples = []
        for _ in range(rounds):
            t0 = time.perf_counter_ns()
            fn()
            samples.append(time.perf_counter_ns() - t0)
        return _median_us(samples)

    def new_socket(attributor: Attributor = shared, pattern: str = "reused", rounds: int = rounds) -> float:
        """A connection made now by this (already known) process: its socket is new, the process is not.
        `pattern` says which fd number the new socket gets: "reused" (the previous new socket was closed:
        the same number again), "top" (the previous one stays open: the next number up), "hole" (a socket
        held since long ago was closed just before: a number in the middle of the table, as in a browser)."""
        samples = []
        for i in range(rounds):
            if pattern == "hole":
                victim = held.pop(len(held) // 3 + i % max(len(held) // 2, 1))
                victim.close()
            sock, port = new_client()
            t0 = time.perf_counter_ns()
            found = attributor.attribute(FiveTuple(IpProtocol.TCP, dst, port, dst, dport))
            samples.append(time.perf_counter_ns() - t0)
            if pattern == "reused":
                sock.close()
            else:
                held.append(sock)
            assert found is not None and found.pid == os.getpid(), "attribution found another process"
        return _median_us(samples)

    def fd_count() -> int:
        return len(os.listdir("/proc/self/fd"))

    def grow_to(n: int) -> None:
        """Open connections until this process holds n fds; each is attributed as it opens (with app rules,
        the interceptor sees every connection of an app)."""
        while fd_count() < n:
            sock, port = new_client()
            held.append(sock)
            shared.attribute(FiveTuple(IpProtocol.TCP, dst, port, dst, dport))

    def by_fd_count(n: int) -> None:
        """Before (a recent owner's whole fd table read for each new socket) and after (single fds read
        first) side by side, for each way a new socket gets its fd number."""
        grow_to(n)
        samples = max(20, rounds * 500 // n)  # "before" reads the whole table: ~25 ms at 5,000 fds
        for pattern in ("reused", "top", "hole"):
            for label, attributor in (("before", before), ("after", shared)):
                results[f"new socket of a known process with {n} fds, fd {pattern}, {label}"] = new_socket(
                    attributor, pattern, samples
                )
                while fd_count() > n:  # the "top" rows held theirs: back to n fds
                    held.pop().close()
                grow_to(n)

    def new_process(attributor: Attributor = shared, count: int = 100) -> list[int]:
        """A connection made by a process started a moment ago (curl): new socket, new pid, known parents.
        Another process forks them, as a shell would: a process that forks pays for it afterwards in
        copy-on-write faults, which would be charged to the attribution measured here."""
        spawner = subprocess.Popen([*TOOL, "spawner", dst, str(dport)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert spawner.stdin is not None and spawner.stdout is not None
        samples = []
        try:
            for _ in range(min(rounds, count)):
                spawner.stdin.write("\n")
                spawner.stdin.flush()
                pid, port = map(int, spawner.stdout.readline().split())
                srv.accept()[0].close()
                time.sleep(0.002)  # as the interceptor would: it was idle while the process started
                t0 = time.perf_counter_ns()
                found = attributor.attribute(FiveTuple(IpProtocol.TCP, dst, port, dst, dport))
                samples.append(time.perf_counter_ns() - t0)
                os.kill(pid, signal.SIGKILL)
                assert found is not None and found.pid == pid, "attribution found another process"
        finally:
            spawner.kill()
            spawner.wait()
        return samples

    try:
        c, sport = new_client()
        held.append(c)
        flow = FiveTuple(IpProtocol.TCP, dst, sport, dst, dport)
        results["sock_diag lookup alone"] = timed(lambda: diag.lookup(flow))
        results["cold: nothing cached (/proc scan, process and its parents described)"] = timed(
            lambda: Attributor(diag, reader).attribute(flow)
        )
        shared.attribute(flow)
        results["the same socket again (cached)"] = timed(lambda: shared.attribute(flow))
        before = Attributor(diag, reader, probe_fds=False)
        before.attribute(flow)  # this process is a known owner for both
        curl: dict[str, list[int]] = {"before": [], "after": []}
        for _ in range(4):  # alternating blocks: the machine's load drifts; the guesses must not slow this down
            for label, attributor in (("before", before), ("after", shared)):
                curl[label] += new_process(attributor, 25)
        for label, samples in curl.items():
            results[f"new process, parents known (curl), {label}"] = _median_us(samples)
        results[f"new socket of a known process with {fd_count()} fds"] = new_socket()
        for n in fd_counts:
            by_fd_count(n)
    finally:
        for s in held:
            s.close()
        srv.close()
        diag.close()
    print(json.dumps(results))


# --- the benchmark --------------------------------------------------------------------------------------


def _pair(values: list[int]) -> str:
    return f"{pct(values, 0.5):.3f} / {pct(values, 0.99):.3f}"


def _added(values: list[int], base: list[int]) -> str:
    return f"{pct(values, 0.5) - pct(base, 0.5):+.3f} / {pct(values, 0.99) - pct(base, 0.99):+.3f}"


def pct(values: list[int], q: float) -> float:
    """q-quantile in ms (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6


@dataclass
class Run:
    """One measurement: a variant (off / dest policy / app policy), a path, what it gave."""

    kind: str
    variant: str
    path: str
    connect: list[int] = field(default_factory=list)
    first_byte: list[int] = field(default_factory=list)
    rate: float = 0.0
    errors: int = 0
    connections: int = 0
    queued: int = 0
    busy_us: int = 0
    verdict_us: int = 0
    decided: int = 0
    unattributed: int = 0  # connections whose process was not found
    events_ns: int = 0  # CPU time of the bus and the controller (what the connection's events cost them)
    mbytes: float = 0.0  # bulk: megabytes moved


class Bench:
    def __init__(
        self,
        connects: int,
        seconds: float,
        quiet: bool = False,
        bulk_runs: int = BULK_RUNS,
        bulk_seconds: float = BULK_SECONDS,
    ) -> None:
        self.connects = connects
        self.seconds = seconds
        self.bulk_runs = bulk_runs
        self.bulk_seconds = bulk_seconds
        self.quiet = quiet
        self.lab = Lab(name=LAB_NAME, style="replaced")
        self.tmp = Path(tempfile.mkdtemp(prefix="ib-", dir="/tmp"))
        self.home = self.tmp / "home"
        self.env = {**os.environ, "PYTHONPATH": os.getcwd(), "SPLITTUN_HOME": str(self.home)}
        self.env.pop("SPLITTUN_RUN_DIR", None)
        self.procs: list[subprocess.Popen[Any]] = []
        self.ports = iter(PORTS)
        self.runs: list[Run] = []
        self.attribution: dict[str, float] = {}
        self.inst: Instance | None = None
        self.backend = "nfqueue"
        self.bare = False

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"  {text}", file=sys.stderr, flush=True)

    def sh(self, role: str, argv: list[str], timeout: float = 60) -> str:
        done = self.lab.exec(role, argv, capture_output=True, text=True, timeout=timeout, env=self.env)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    # --- lifecycle ------------------------------------------------------------------------------------

    def up(self) -> None:
        self.say(f"building lab {LAB_NAME}")
        self.lab.up()
        # The bulk baseline's route: DIRECT_UID leaves via the ISP without splittun (a split connection's way)
        self.sh("host", ["ip", "route", "add", "default", "via", T.ISP_LAN_V4, "dev", T.HOST_IF,
                         "table", str(DIRECT_TABLE)])  # fmt: skip
        self.sh("host", ["ip", "rule", "add", "uidrange", f"{DIRECT_UID}-{DIRECT_UID}", "lookup", str(DIRECT_TABLE),
                         "pref", str(DIRECT_PREF)])  # fmt: skip
        iperf_log = open(self.tmp / "iperf3.log", "ab")  # noqa: SIM115 - kept open for the process's life
        self.procs.append(self.lab.popen("inet", ["iperf3", "-s", "-B", SPLIT_DST, "-p", str(IPERF_PORT)],
                                         stdout=iperf_log, stderr=iperf_log))  # fmt: skip
        self.home.mkdir()
        cfg = self.tmp / "origin.cfg"
        binds = "".join(f"    bind {ip}:{PORTS[0]}-{PORTS[-1]}\n" for ip in (KEEP_DST, SPLIT_DST))
        cfg.write_text(
            "global\n    nbthread 1\n    maxconn 8000\n"
            "defaults\n    mode http\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n"
            f"frontend web\n{binds}"
            '    http-request return status 200 content-type text/plain string "ok\\n"\n'
        )
        log = open(self.tmp / "origin.log", "ab")  # noqa: SIM115 - kept open for the process's life
        self.procs.append(self.lab.popen("inet", ["haproxy", "-db", "-f", str(cfg)], stdout=log, stderr=log,
                                         preexec_fn=raise_nofile))  # fmt: skip
        deadline = time.monotonic() + 10
        while f"{SPLIT_DST}:{PORTS[-1]}" not in self.sh("inet", ["ss", "-Htln"]):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the origin did not start: {(self.tmp / 'origin.log').read_text()[-500:]}")
            time.sleep(0.05)
        while f"{SPLIT_DST}:{IPERF_PORT}" not in self.sh("inet", ["ss", "-Htln"]):
            if time.monotonic() > deadline:
                raise RuntimeError("iperf3 did not start")
            time.sleep(0.05)

    def down(self) -> None:
        if self.inst is not None:
            with contextlib.suppress(Exception):
                self.stop_splittun()
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.lab.down()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def splittun(self, *args: str, timeout: float = 60) -> str:
        """`splittun ARGS` for the running instance (splittun.lab.instance: the driver the tests use too)."""
        assert self.inst is not None
        done = self.inst.cli(*args, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"splittun {' '.join(args)}: {done.stdout.strip()} {done.stderr.strip()}")
        return done.stdout

    @property
    def splittun_up(self) -> bool:
        return self.inst is not None

    def start_splittun(self, backend: str = "nfqueue", env: dict[str, str] | None = None) -> None:
        self.say(f"splittun up --backend {backend}" + "".join(f" {k}={v!r}" for k, v in (env or {}).items()))
        self.backend = backend
        self.inst = Instance.start(self.lab, "--backend", backend, env=env)

    def stop_splittun(self) -> None:
        self.say("splittun down")
        inst, self.inst = self.inst, None
        if inst is not None:
            inst.stop()

    def ask(self, instance: str, op: str) -> Any:
        assert self.inst is not None
        return self.inst.ask(instance, op)

    def set_data_path(self, data_path: str) -> None:
        """`splittun config set splittun/dataPath`; until the interceptor's rules follow."""
        self.splittun("config", "set", "splittun/dataPath", data_path)
        deadline = time.monotonic() + 15
        while self.ask("interceptor", "status")["data_path"] != data_path:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the interceptor did not switch to the {data_path} data path")
            time.sleep(0.05)

    def set_policy(self, rules: list[dict[str, Any]]) -> None:
        """Through the real controller (config file, reload, policy.snapshot); wait until the interceptor
        decides with it."""
        self.splittun("config", "set", "splittun/rules", json.dumps(rules))
        self.splittun("enable")
        assert self.inst is not None
        if not self.inst.wait_policy(self.ask("controller", "policy")["version"], timeout=10):
            raise RuntimeError("the interceptor did not adopt the policy")

    # --- measurements ---------------------------------------------------------------------------------

    def fresh_port(self) -> int:
        """A port nobody used in this run, so no connection of an earlier one shares a conntrack entry.
        Conntrack is not flushed: that would re-queue the packets of earlier runs' closing connections
        and flood the interceptor with their ends while the next run starts."""
        return next(self.ports)

    def queue_total(self) -> int:
        if self.splittun_up and self.backend == "divert":  # every packet the diverter read
            return int(self.ask("interceptor", "counters").get("divert_diverted", 0))
        text = self.sh("host", ["cat", "/proc/net/netfilter/nfnetlink_queue"])
        fields = (line.split() for line in text.splitlines())
        return sum(int(f[7]) for f in fields if len(f) >= 8 and int(f[0]) in OUT_QUEUES)

    def engine_counters(self) -> tuple[int, int, int, int]:
        """(busy_us, verdict_us, decided, unattributed) of the interceptor (one worker here)."""
        if not self.splittun_up:
            return 0, 0, 0, 0
        c = self.ask("interceptor", "counters")
        return c.get("busy_us", 0), c.get("verdict_us", 0), c.get("decided", 0), c.get("unattributed", 0)

    def events_cpu_ns(self) -> int:
        """CPU time so far of the bus and the controller (the processes every event passes), in ns."""
        if not self.splittun_up:
            return 0
        pids = [a["pid"] for a in self.ask("controller", "actors") if a["name"] in ("bus", "controller")]
        total = 0
        for pid in pids:
            with contextlib.suppress(OSError):
                total += int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
        return total

    @contextlib.contextmanager
    def counted(self, run: Run) -> Iterator[None]:
        queueing = self.splittun_up or self.bare
        q0 = self.queue_total() if queueing else 0
        e0 = self.engine_counters()
        c0 = self.events_cpu_ns()
        yield
        if queueing:
            run.queued = self.queue_total() - q0
        if self.splittun_up:
            run.events_ns = self.events_cpu_ns() - c0
            run.busy_us, run.verdict_us, run.decided, run.unattributed = (
                b - a for a, b in zip(e0, self.engine_counters(), strict=True)
            )

    @contextlib.contextmanager
    def bare_queue(self) -> Iterator[None]:
        """The floor for comparison: every new TCP connection queued to a bare Python NFQUEUE loop."""
        proc = self.lab.popen("host", [*TOOL, "nfqueue", str(BARE_QUEUE)], stdout=subprocess.PIPE, text=True,
                              env=self.env)  # fmt: skip
        self.procs.append(proc)
        rule = ["OUTPUT", "-p", "tcp", "-m", "conntrack", "--ctstate", "NEW",
                "-j", "NFQUEUE", "--queue-num", str(BARE_QUEUE), "--queue-bypass"]  # fmt: skip
        try:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("the bare NFQUEUE loop did not start")
            self.sh("host", ["iptables-legacy", "-w", "-t", "mangle", "-A", *rule])
            self.bare = True
            yield
        finally:
            self.bare = False
            self.lab.exec("host", ["iptables-legacy", "-w", "-t", "mangle", "-D", *rule])
            proc.send_signal(signal.SIGTERM)
            proc.wait(5)

    def latency(self, variant: str, path: str, dst: str) -> Run:
        run = Run("latency", variant, path)
        port = self.fresh_port()
        with self.counted(run):
            out = self.sh("host", [*TOOL, "connect", dst, str(port), str(self.connects), str(APP_UID)], timeout=120)
        data = json.loads(out)
        run.connect, run.first_byte, run.errors = data["connect"], data["first_byte"], data["failed"]
        run.connections = len(run.connect) + run.errors
        self.runs.append(run)
        self.say(
            f"latency {variant:12} {path:6} connect p50 {pct(run.connect, 0.5):.3f} p99 {pct(run.connect, 0.99):.3f} "
            f"first byte p50 {pct(run.first_byte, 0.5):.3f} p99 {pct(run.first_byte, 0.99):.3f} ms"
            f"{self._per_conn(run)}"
        )
        return run

    def rate(self, variant: str, path: str, dst: str) -> Run:
        run = Run("rate", variant, path)
        port = self.fresh_port()
        with self.counted(run):
            out = self.sh("host", ["setpriv", f"--reuid={APP_UID}", f"--regid={APP_UID}", "--clear-groups",
                                   "wrk", "-t2", "-c64", f"-d{self.seconds:g}s", "-H", "Connection: close",
                                   f"http://{dst}:{port}/"], timeout=self.seconds + 30)  # fmt: skip
        run.rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        run.errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
        requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
        run.connections = requests + run.errors
        self.runs.append(run)
        self.say(f"rate    {variant:12} {path:6} {run.rate:,.0f}/s{errors_note(run.errors)}{self._per_conn(run)}")
        return run

    @staticmethod
    def _per_conn(run: Run) -> str:
        if not run.queued:
            return ""
        return (
            f"  [{run.queued / max(run.connections, 1):.2f} pkt/conn to user space, "
            f"{run.busy_us / max(run.decided, 1):.0f} µs/conn in the interceptor "
            f"({run.verdict_us / max(run.decided, 1):.0f} to the verdict), "
            f"{run.unattributed} of {run.decided} without process, "
            f"bus + controller {run.events_ns / 1000 / max(run.decided, 1):.0f} µs/conn]"
        )

    def bulk(self, variant: str, uid: int = APP_UID) -> None:
        """iperf3 upload and download to the split destination (as an app, uid 65534; the direct baseline as
        DIRECT_UID, which a uid rule sends via the ISP without splittun)."""
        for reverse, path in ((False, "upload"), (True, "download")):
            run = Run("bulk", variant, path)
            argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "iperf3", "-c",
                    SPLIT_DST, "-p", str(IPERF_PORT), "-t", f"{self.bulk_seconds:g}", "-J"]  # fmt: skip
            argv += ["-R"] if reverse else []
            with self.counted(run):
                for attempt in range(3):  # the server refuses a test while the last one is still closing
                    done = self.lab.exec("host", argv, capture_output=True, text=True,
                                         timeout=self.bulk_seconds + 30, env=self.env)  # fmt: skip
                    result = json.loads(done.stdout or "{}")
                    if "error" not in result or attempt == 2:
                        break
                    time.sleep(1)
            if "error" in result:
                raise RuntimeError(f"iperf3: {result['error']}")
            received = result["end"]["sum_received"]
            run.rate = received["bits_per_second"] / 1e9
            run.mbytes = received["bytes"] / 1e6
            run.connections = 1
            self.runs.append(run)
            self.say(f"bulk    {variant:30} {path:9} {run.rate:.2f} Gbit/s, "
                     f"{run.queued / max(run.mbytes, 1e-9):,.0f} packets to user space per MB")  # fmt: skip

    @contextlib.contextmanager
    def conntrack_only(self) -> Iterator[None]:
        """No splittun, but the host namespace tracks every packet (one no-op conntrack rule) with accounting
        on, as while splittun runs: separates conntrack's own cost from our chains'."""
        acct = self.sh("host", ["cat", ACCT_SYSCTL]).strip()
        self.sh("host", ["iptables-legacy", "-w", "-t", "mangle", "-A", *CONNTRACK_RULE])
        try:
            self.sh("host", ["sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1"])
            yield
        finally:
            self.lab.exec("host", ["sysctl", "-qw", f"net.netfilter.nf_conntrack_acct={acct}"])
            self.lab.exec("host", ["iptables-legacy", "-w", "-t", "mangle", "-D", *CONNTRACK_RULE])

    def bulk_rounds(self) -> None:
        """The bulk variants in rounds; odd rounds start with splittun up, so drift over the run (the shared
        machine's load) does not favour either side."""
        for i in range(self.bulk_runs):
            self.say(f"bulk round {i + 1} of {self.bulk_runs}")
            sides = [self._bulk_without_splittun, lambda first=i == 0: self._bulk_with_splittun(first)]
            for side in sides if i % 2 == 0 else sides[::-1]:
                side()

    def _bulk_without_splittun(self) -> None:
        self.bulk("direct", uid=DIRECT_UID)
        with self.conntrack_only():
            self.bulk("direct + conntrack", uid=DIRECT_UID)

    def _bulk_with_splittun(self, first: bool) -> None:
        self.start_splittun()
        try:
            self.set_policy(DEST_POLICY)
            self.set_data_path("kernel")
            self.bulk("splittun, kernel path")
            if first:
                self.set_data_path("proxy")
                self.bulk("splittun, proxy path")
        finally:
            self.stop_splittun()

    def attribution_bench(self) -> None:
        out = self.sh("host", [*TOOL, "attribution", "200"], timeout=300)
        self.attribution = json.loads(out)
        for what, us in self.attribution.items():
            self.say(f"attribution {what}: {us:.1f} µs")

    def handler_comparison(self, rounds: int = 2) -> None:
        """The dest policy with and without the external verdict handler (the IVPN interop), alternating, so
        what the handler costs a connection it has no opinion on shows side by side in one run."""
        from actors.interceptor.actor import DEFAULT_HANDLER  # the interceptor's own default, not a copy

        measure = (self.latency, self.rate)
        for fn in measure:
            fn("off", "vpn", KEEP_DST)
        for _ in range(rounds):
            for name, handler in (("dest, no handler", ""), ("dest, IVPN handler", DEFAULT_HANDLER)):
                self.start_splittun(env={"SPLITTUN_VERDICT_HANDLER": handler})
                self.set_policy(DEST_POLICY)
                self.set_data_path("kernel")
                for fn in measure:
                    fn(name, "vpn", KEEP_DST)
                    fn(name, "split (kernel)", SPLIT_DST)
                self.stop_splittun()
        for fn in measure:
            fn("off", "vpn", KEEP_DST)

    def run(self, sections: set[str]) -> None:
        self.up()
        if "handler" in sections:
            self.handler_comparison()
            return
        if "attr" in sections:
            self.attribution_bench()
            if not sections - {"attr"}:
                return
        measure = [m for m in (("latency", self.latency), ("rate", self.rate)) if m[0] in sections]
        if measure:
            self.connection_measures(measure)
        if "divert" in sections:
            self.start_splittun("divert")
            self.set_policy(DEST_POLICY)
            for _, fn in measure:
                fn("divert dest", "vpn", KEEP_DST)
                fn("divert dest", "split", SPLIT_DST)
            if "bulk" in sections:
                self.bulk("divert dest")
            self.stop_splittun()
        for _, fn in measure:
            fn("off", "vpn", KEEP_DST)
        if "bulk" in sections:
            self.bulk_rounds()

    def connection_measures(self, measure: list[tuple[str, Any]]) -> None:
        """Latency and connections/s: off, the bare queue, then splittun with each policy and data path."""
        for _, fn in measure:
            fn("off", "vpn", KEEP_DST)
        with self.bare_queue():
            for _, fn in measure:
                fn("bare NFQUEUE", "vpn", KEEP_DST)
        self.start_splittun()
        for name, rules in (("dest policy", DEST_POLICY), ("app policy", APP_POLICY)):
            self.set_policy(rules)
            for _, fn in measure:
                fn(name, "vpn", KEEP_DST)
            for data_path in DATA_PATHS:
                self.set_data_path(data_path)
                for _, fn in measure:
                    fn(name, f"split ({data_path})", SPLIT_DST)
        self.stop_splittun()

    # --- report ---------------------------------------------------------------------------------------

    def table(self) -> str:
        lines = []
        lat = [r for r in self.runs if r.kind == "latency"]
        if lat:
            base_c = [x for r in lat if r.variant == "off" for x in r.connect]
            base_f = [x for r in lat if r.variant == "off" for x in r.first_byte]
            lines += [
                f"Latency: {self.connects} sequential connections per row, each from a new process (like curl), "
                "in ms; added = minus the two off rows together.",
                "",
                "| variant | path | connect p50 / p99 | added | first byte p50 / p99 | added "
                "| packets to user space / conn | interceptor µs / conn (to verdict) | without process |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for r in lat:
                off = r.variant == "off"
                lines.append(
                    f"| {r.variant} | {r.path} | {_pair(r.connect)} | {'' if off else _added(r.connect, base_c)} "
                    f"| {_pair(r.first_byte)} | {'' if off else _added(r.first_byte, base_f)} "
                    f"| {self._pkts(r)} | {self._busy(r)} | {self._unattributed(r)} |"
                )
            lines.append("")
        rates = [r for r in self.runs if r.kind == "rate"]
        if rates:
            base = statistics.mean(r.rate for r in rates if r.variant == "off")
            lines += [
                f"New connections/s: wrk -t2 -c64 -d{self.seconds:g}s, `Connection: close`; × = of the off rows' mean.",
                "",
                "| variant | path | connections/s | × off | packets to user space / conn "
                "| interceptor µs / conn (to verdict) | without process | bus + controller µs / conn |",
                "|---|---|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {r.variant} | {r.path} | {r.rate:,.0f}{errors_note(r.errors)} | {r.rate / base:.2f}× "
                f"| {self._pkts(r)} | {self._busy(r)} | {self._unattributed(r)} "
                f"| {f'{r.events_ns / 1000 / r.decided:.0f}' if r.decided else '–'} |"
                for r in rates
            ]
            lines.append("")
        bulk = [r for r in self.runs if r.kind == "bulk"]
        if bulk:
            lines += [
                f"TCP bulk (iperf3, {self.bulk_seconds:g} s each, {self.bulk_runs} rounds alternating which side "
                "goes first) to the split destination; × = of direct's median (no "
                "splittun, the same ISP route by a uid rule); per round = this round's run over direct's.",
                "",
                "| variant | direction | runs | Gbit/s median (range) | × direct | per round × direct "
                "| packets to user space / MB |",
                "|---|---|---|---|---|---|---|",
            ]
            for direction in ("upload", "download"):
                rows = [r for r in bulk if r.path == direction]
                direct = [r.rate for r in rows if r.variant == "direct"]
                base = statistics.median(direct) if direct else 0.0
                for variant in dict.fromkeys(r.variant for r in rows):
                    mine = [r for r in rows if r.variant == variant]
                    rates = [r.rate for r in mine]
                    paired = [a / b for a, b in zip(rates, direct, strict=False)]
                    lines.append(
                        f"| {variant} | {direction} | {len(rates)} | {statistics.median(rates):.2f} "
                        f"({min(rates):.2f}–{max(rates):.2f}) "
                        f"| {statistics.median(rates) / base if base else 0:.2f}× "
                        f"| {min(paired, default=0):.2f}–{max(paired, default=0):.2f}× "
                        f"| {sum(r.queued for r in mine) / max(sum(r.mbytes for r in mine), 1e-9):,.1f} |"
                    )
            lines.append("")
        if self.attribution:
            lines += ["Process attribution (the real attribution code in the lab host namespace, median):", ""]
            lines += ["| what | µs |", "|---|---|"]
            sides = {what: us for what, us in self.attribution.items() if what.endswith((", before", ", after"))}
            lines += [f"| {what} | {us:.1f} |" for what, us in self.attribution.items() if what not in sides]
            lines += [
                "",
                "Before = a recent owner's whole fd table read (`Attributor(probe_fds=False)`), after = single fds "
                "read first; a new socket of a known process holding many fds, by the fd number it gets: reused "
                "(the previous new socket was closed), top (it stays open), hole (an old socket was closed just "
                "before) (µs, median):",
                "",
                "| lookup | before | after | × before |",
                "|---|---|---|---|",
            ]
            for what, us in sides.items():
                if what.endswith(", after"):
                    was = sides[what.removesuffix(", after") + ", before"]
                    lines.append(f"| {what.removesuffix(', after')} | {was:,.1f} | {us:,.1f} | {us / was:.3f}× |")
        return "\n".join(lines)

    def record_goals(self) -> None:
        """This run's numbers for the data-path goal table (bench/goals.py)."""
        rates = [r for r in self.runs if r.kind == "rate"]
        off = [r.rate for r in rates if r.variant == "off"]
        for measure, variant, path, goal in (
            (goals.CONN_DEST_VPN, "dest policy", "vpn", 0.8),
            (goals.CONN_APP_VPN, "app policy", "vpn", 0.7),
            (goals.CONN_SPLIT_KERNEL, "dest policy", "split (kernel)", 0.7),
        ):
            found = [r.rate for r in rates if (r.variant, r.path) == (variant, path)]
            if off and found:
                ratio = statistics.mean(found) / statistics.mean(off)
                goals.record(measure, f"{ratio:.2f}×", ratio >= goal)
        lat = [r for r in self.runs if r.kind == "latency"]
        base = [x for r in lat if r.variant == "off" for x in r.connect]
        dest = [x for r in lat if (r.variant, r.path) == ("dest policy", "vpn") for x in r.connect]
        if base and dest:
            p50, p99 = (pct(dest, q) - pct(base, q) for q in (0.5, 0.99))
            goals.record(goals.LATENCY_DEST, f"{p50:+.2f} / {p99:+.2f} ms", p50 <= 0.1 and p99 <= 0.5)
        bulk = [r for r in self.runs if r.kind == "bulk"]
        ratios = []
        for direction in ("upload", "download"):
            direct = [r.rate for r in bulk if r.variant == "direct" and r.path == direction]
            kernel = [r.rate for r in bulk if r.variant == "splittun, kernel path" and r.path == direction]
            if direct and kernel:
                ratios.append(statistics.median(kernel) / statistics.median(direct))
        if len(ratios) == 2:
            goals.record(goals.BULK_KERNEL, " / ".join(f"{x:.2f}×" for x in ratios) + f" (medians of {self.bulk_runs})",
                         min(ratios) >= 0.95)  # fmt: skip
        # the new path's rows (", after") for the most fds: the worst of the ways a new socket gets its fd number
        rows = [(int(m.group(1)), us) for what, us in self.attribution.items()
                if what.endswith(", after") and (m := re.search(r"known process with (\d+) fds", what))]  # fmt: skip
        if rows:
            fds = max(n for n, _ in rows)
            worst = max(us for n, us in rows if n == fds)
            goals.record(goals.ATTRIBUTION_FDS, f"{worst / 1000:.2f} ms ({fds:,} fds, slowest fd pattern)",
                         worst <= 200 and fds >= 5000)  # fmt: skip

    @staticmethod
    def _pkts(r: Run) -> str:
        return f"{r.queued / max(r.connections, 1):.2f}" if r.queued else "–"

    @staticmethod
    def _busy(r: Run) -> str:
        """Interceptor time per connection: all of it (events included), and until the verdict."""
        if not r.decided:
            return "–"
        return (
            f"{r.busy_us / r.decided:.0f} ({r.verdict_us / r.decided:.0f})"
            if r.verdict_us
            else f"{r.busy_us / r.decided:.0f}"
        )

    @staticmethod
    def _unattributed(r: Run) -> str:
        return f"{100 * r.unattributed / r.decided:.1f} %" if r.decided else "–"


SECTIONS = ("latency", "rate", "attr", "divert", "bulk")
#: Only on request (`--only handler`): the dest policy with and without the external verdict handler.
EXTRA_SECTIONS = ("handler",)


def main(argv: list[str]) -> int:
    if argv[:1] == ["tool"]:
        cmd, *args = argv[1:]
        if cmd == "connect":
            tool_connect(args[0], int(args[1]), int(args[2]), int(args[3]))
        elif cmd == "nfqueue":
            tool_nfqueue(int(args[0]))
        elif cmd == "spawner":
            tool_spawner(args[0], int(args[1]))
        elif cmd == "attribution":
            tool_attribution(int(args[0]))
        else:
            print(f"unknown tool {cmd!r}", file=sys.stderr)
            return 2
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench interceptor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--connects", type=int, default=500, help="sequential connections per latency row")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each wrk run")
    parser.add_argument("--bulk-runs", type=int, default=BULK_RUNS, help="rounds of the bulk variants")
    parser.add_argument("--bulk-seconds", type=float, default=BULK_SECONDS, help="length of each iperf3 run")
    parser.add_argument("--only", action="append", choices=SECTIONS + EXTRA_SECTIONS,
                        help="run only these parts (repeatable); handler: the verdict handler's cost")  # fmt: skip
    args = parser.parse_args(argv)
    if not preflight("interceptor", NEEDS):
        return 1
    bench = Bench(args.connects, args.seconds, bulk_runs=args.bulk_runs, bulk_seconds=args.bulk_seconds)
    try:
        bench.run(set(args.only or SECTIONS))
    finally:
        bench.down()
    bench.record_goals()
    print_report(bench.table())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
