"""No leak, ever: a reused local port never sends a connection down another app's path.

Two apps share a handful of local ports in a tight loop (tests/fixtures/faults/port_reuse.py: each round binds
the next free one of 20 ports, asks the whoami server which address it saw, closes), so they keep reusing each
other's ports — and conntrack tuples — while a split rule names only one of them (`--name splitapp --dest A`).
What a user would check: every answer the VPN app gets shows the VPN's exit address (nothing left through the
ISP), every answer the split app gets shows the ISP address; the leak monitor on the physical link agrees.

TCP: a new connection reusing a port whose old conntrack entry is still in TIME_WAIT (the server closed first)
gets a fresh entry: it is queued and decided for its own app, with its own conn.new — zero wrong paths.
UDP: an entry outlives its socket; when the other app's socket sends before the kernel announced the old
socket's end (its destroy notice comes from a kernel worker, after the close), its datagram may still follow
the old entry. Through the split proxy that never gets out (the proxy drops another socket's datagrams);
through the VPN it stays in the VPN. So the VPN app never leaks, and the split app's VPN answers are printed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from splittun.lab import topology as T
from tests.support import FIXTURES_DIR
from tests.support.e2e import E2E, private_e2e
from tests.support.interceptor import ISP, VPN
from tests.support.lab import Leaks

CLIENT = FIXTURES_DIR / "faults" / "port_reuse.py"
SERVER = {4: T.SERVER_V4[0], 6: T.SERVER_V6[0]}
PORT = {"tcp": T.WHOAMI_TCP_PORT, "udp": T.WHOAMI_UDP_PORT}
ROUNDS = 5000  # of each app
LOCAL_PORTS = (41000, 20)
#: UDP on 20 ports only: datagrams dropped rather than sent down another app's path (the proxy's check, late
#: answers to a removed flow), so their exchange times out. Measured: under 0.5 %.
UDP_LOST = 0.05


@pytest.fixture(scope="module")
def reuse() -> Iterator[E2E]:
    yield from private_e2e("noleak", [("--name", "splitapp", "--dest", SERVER[family]) for family in (4, 6)])


def run_apps(st: E2E, proto: str, family: int, rounds: int) -> dict[str, dict[str, Any]]:
    """Both apps at once, sharing LOCAL_PORTS; their summaries by name."""
    first, count = LOCAL_PORTS
    procs = {
        name: st.lab.popen(
            "host",
            [
                sys.executable,
                str(CLIENT),
                name,
                proto,
                SERVER[family],
                str(PORT[proto]),
                str(first),
                str(count),
                str(rounds),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("splitapp", "vpnapp")
    }
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {stderr}"
        out[name] = json.loads(stdout)
    return out


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_apps_fighting_over_twenty_ports_never_leak(reuse: E2E, leaks: Leaks, proto: str, family: int) -> None:
    """Both apps take turns on the same 20 ports, each grabbing a port the moment the other frees it."""
    leaks.allow(SERVER[family], proto, PORT[proto])  # the split app's destination
    result = run_apps(reuse, proto, family, ROUNDS)
    split, vpn = result["splitapp"], result["vpnapp"]
    print(f"\n{proto}{family} 20 ports: splitapp {split}\n{proto}{family} 20 ports: vpnapp {vpn}")
    assert split["ports"] == vpn["ports"] == LOCAL_PORTS[1]  # they really shared the ports
    # The VPN app never leaves outside the VPN: not one answer with the ISP address.
    assert vpn["answers"].get(ISP[family], 0) == 0, vpn
    if proto == "tcp":  # a new TCP connection always gets its own verdict: zero wrong paths, no failure
        assert vpn["answers"] == {VPN[family]: ROUNDS} and vpn["errors"] == 0, vpn
        assert split["answers"] == {ISP[family]: ROUNDS} and split["errors"] == 0, split
        return
    # UDP: the split app's datagrams sent before the kernel told of the old socket's end may stay in the VPN
    # (fail-closed; how many depends on the machine's load: 0-20 % seen alone, up to 52 % with other labs
    # busy on both cores — here every round reuses a port the other app freed a moment before, which real
    # apps with kernel-chosen ports seldom do). Never the other way round, and the split app keeps working.
    assert set(split["answers"]) <= {ISP[family], VPN[family]}, split
    assert split["answers"].get(ISP[family], 0) >= ROUNDS // 3, split
    assert split["errors"] + vpn["errors"] <= UDP_LOST * ROUNDS, (split, vpn)
