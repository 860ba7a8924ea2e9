"""Idle cost of a default splittun instance: CPU, wakeups and memory of every process while nothing happens.

Starts splittun in a lab (`splittun up`, default workers), waits until it is ready and a few seconds more,
then samples every process under supervisord (supervisord included) over `--seconds`:
- CPU: utime + stime + the reaped children's time (an actor's helper commands count) as % of one core;
- wakeups/s: voluntary + involuntary context switches — each one is the process woken without need when
  nothing happens; of the main thread, and of all its threads (ZeroMQ's I/O threads, the proxies' data
  thread, the interceptor's routing keepers);
- memory: RSS and PSS (PSS splits shared pages — the interpreter's — fairly between processes).

Nothing talks to splittun during the sample; the lab's own daemons are not counted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from splittun.lab import Lab
from splittun.lab.instance import Instance

from . import goals
from .common import preflight, print_report

LAB_NAME = "stidle"
NEEDS = ("ip", "iptables-legacy")
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Sample:
    """One process at one moment (from /proc)."""

    name: str
    cpu_ticks: int  # utime + stime + cutime + cstime
    switches: int  # voluntary + involuntary context switches (main thread)
    all_switches: int  # the same, every thread
    rss_kib: int
    pss_kib: int


def sample(pid: int, name: str) -> Sample | None:
    """The process's counters, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu = sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime (fields 14–17)

    def kib(text: str, key: str) -> int:
        line = next((ln for ln in text.splitlines() if ln.startswith(key)), f"{key} 0 kB")
        return int(line.split()[1])

    def switches(text: str) -> int:
        return kib(text, "voluntary_ctxt_switches:") + kib(text, "nonvoluntary_ctxt_switches:")

    every = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            every += switches((task / "status").read_text())
        except OSError:
            continue  # a thread that just ended
    return Sample(name, cpu, switches(status), every, kib(status, "VmRSS:"), kib(rollup, "Pss:"))


def processes(inst: Instance) -> dict[int, str]:
    """supervisord and the actors it runs (pid → name)."""
    sup = inst.supervisord_pid()
    out = {sup: "supervisord"}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) != sup:
            continue
        # ip netns exec execs, so supervisord's child is the actor itself
        module = next((a.decode() for a in cmdline if a.startswith((b"actors.", b"runtime."))), entry.name)
        out[int(entry.name)] = f"{module} ({entry.name})"
    return out


@dataclass(frozen=True)
class Result:
    seconds: float
    rows: list[tuple[str, float, float, float, int, int]]  # name, cpu %, wakeups/s (main, all threads), RSS, PSS KiB


def measure(inst: Instance, seconds: float) -> Result:
    pids = processes(inst)
    before = {pid: s for pid, name in pids.items() if (s := sample(pid, name)) is not None}
    t0 = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    rows = []
    for pid, old in before.items():
        new = sample(pid, old.name)
        if new is None:
            continue
        cpu = 100 * (new.cpu_ticks - old.cpu_ticks) / TICKS / elapsed
        wake = (new.switches - old.switches) / elapsed
        every = (new.all_switches - old.all_switches) / elapsed
        rows.append((new.name, cpu, wake, every, new.rss_kib, new.pss_kib))
    return Result(elapsed, sorted(rows))


def table(result: Result) -> str:
    lines = [
        f"Idle for {result.seconds:.0f} s after ready (default instance, nothing connecting):\n",
        "| process | CPU (% of one core) | wakeups/s | all threads' wakeups/s | RSS MiB | PSS MiB |",
        "|---|---|---|---|---|---|",
    ]
    for name, cpu, wake, every, rss, pss in result.rows:
        lines.append(f"| {name} | {cpu:.2f} | {wake:.1f} | {every:.1f} | {rss / 1024:.1f} | {pss / 1024:.1f} |")
    cpu, wake, every = (sum(r[i] for r in result.rows) for i in (1, 2, 3))
    rss, pss = (sum(r[i] for r in result.rows) / 1024 for i in (4, 5))
    total = f"**all {len(result.rows)} processes**"
    lines.append(f"| {total} | **{cpu:.2f}** | **{wake:.1f}** | **{every:.1f}** | **{rss:.0f}** | **{pss:.0f}** |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench idle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the idle sample")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds to wait after ready before sampling")
    args = parser.parse_args(argv)
    if not preflight("idle", NEEDS):
        return 1
    lab = Lab(name=LAB_NAME, style="replaced")
    inst: Instance | None = None
    try:
        lab.up()
        inst = Instance.start(lab)
        time.sleep(args.settle)
        result = measure(inst, args.seconds)
    finally:
        if inst is not None:
            inst.stop()
        lab.down()
    cpu = sum(r[1] for r in result.rows)
    rss, pss = (sum(r[i] for r in result.rows) / 1024 for i in (4, 5))
    goals.record(goals.IDLE_CPU, f"{cpu:.2f} % ({len(result.rows)} processes)", cpu <= 0.5)
    goals.record(goals.IDLE_RSS, f"{rss:.0f} / {pss:.0f} MiB", rss <= 120)
    print_report(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
