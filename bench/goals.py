"""The data-path goal table (issue 17): each bench area reports its goal measures here as it finishes, and
`python -m bench` (= `make bench`) prints them together at the end, with today's numbers from this one run.

A measure that was not run says so; "met" is judged on this run alone — RESULTS.md keeps the ranges over
several runs and, where a goal is missed, where the time goes.
"""

from __future__ import annotations

from dataclasses import dataclass

BULK_KERNEL = "split TCP bulk, kernel path / direct (upload / download)"
CONN_DEST_VPN = "new connections/s, dest rules, VPN path / no splittun"
CONN_APP_VPN = "new connections/s, app rules, VPN path / no splittun"
CONN_SPLIT_KERNEL = "new connections/s, split path (kernel) / no splittun"
LATENCY_DEST = "added connect latency p50 / p99, dest rules"
ATTRIBUTION_FDS = "attribution, new socket of a process with many fds"
PROXY_TCP_VS_HAPROXY = "proxy path: new TCP sessions/s vs haproxy (1 thread)"
PROXY_UDP_SESSIONS = "proxy path: UDP new sessions/s"
IDLE_CPU = "idle CPU, all processes"
IDLE_RSS = "resident memory, default instance (RSS sum / PSS)"

#: measure → (goal as the issue states it, the area whose run measures it)
GOALS: dict[str, tuple[str, str]] = {
    BULK_KERNEL: ("≥ 0.95×", "interceptor"),
    CONN_DEST_VPN: ("≥ 0.8×", "interceptor"),
    CONN_APP_VPN: ("≥ 0.7×", "interceptor"),
    CONN_SPLIT_KERNEL: ("≥ 0.7×", "interceptor"),
    LATENCY_DEST: ("≤ +0.1 / ≤ +0.5 ms", "interceptor"),
    ATTRIBUTION_FDS: ("≤ 0.2 ms (5,000 fds)", "interceptor"),
    PROXY_TCP_VS_HAPROXY: ("≥ 1.0×", "proxy"),
    PROXY_UDP_SESSIONS: ("≥ 10,000/s", "proxy"),
    IDLE_CPU: ("≤ 0.5 % of a core", "idle"),
    IDLE_RSS: ("≤ 120 MiB RSS", "idle"),
}


@dataclass(frozen=True)
class Measured:
    today: str  # as printed: the number(s) of this run
    met: bool


_measured: dict[str, Measured] = {}


def record(measure: str, today: str, met: bool) -> None:
    """A bench area's result for one goal measure (a name from GOALS)."""
    if measure not in GOALS:
        raise KeyError(f"not a goal measure: {measure!r}")
    _measured[measure] = Measured(today, met)


def recorded() -> bool:
    return bool(_measured)


def table() -> str:
    """The goal table, in the issue's order; measures whose area did not run say how to get them."""
    lines = ["| measure | today | goal | met |", "|---|---|---|---|"]
    for measure, (goal, area) in GOALS.items():
        found = _measured.get(measure)
        if found is None:
            lines.append(f"| {measure} | not run (`python -m bench {area}`) | {goal} | |")
        else:
            lines.append(f"| {measure} | {found.today} | {goal} | {'yes' if found.met else '**no**'} |")
    return "\n".join(lines)
