"""Faults a user meets: an actor killed under load, garbage on every socket. Nothing leaks; splittun recovers.

Load: four apps ask the lab's whoami server over and over (tests/fixtures/faults/load.py) — a split app
(`--name splitapp --dest A`) and a VPN app, each over TCP and UDP. Then one actor is killed with SIGKILL.
What a user would check: the VPN app's answers never show the ISP address (and the leak monitor on the physical
link agrees), and the split app's answers show the ISP address again within seconds (the recovery time is
printed). While the interceptor is away its queues bypass: new connections go through the VPN, never around it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import zmq

from runtime import paths
from splittun.lab import topology as T
from tests.support import FIXTURES_DIR
from tests.support.cli import splittun
from tests.support.e2e import E2E, private_e2e
from tests.support.interceptor import ISP, VPN, wait_until
from tests.support.lab import Leaks

LOAD = FIXTURES_DIR / "faults" / "load.py"
SERVER = T.SERVER_V4[0]
PORT = {"tcp": T.WHOAMI_TCP_PORT, "udp": T.WHOAMI_UDP_PORT}
ACTORS = ("bus", "controller", "netenv", "ivpn", "api", "interceptor", "proxy_tcp_00", "proxy_udp_00", "resolver")
RECOVERY_LIMIT = 15.0  # seconds: supervisord restarts a program at once, the actor is ready in about one


@pytest.fixture(scope="module")
def faults() -> Iterator[E2E]:
    yield from private_e2e("faults", [("--name", "splitapp", "--dest", SERVER)])


class Load:
    """The four apps, running until stopped; their rounds by (name, proto), followed as they come."""

    def __init__(self, st: E2E) -> None:
        self.st = st
        self.stop_file = Path(tempfile.mkdtemp(prefix="st-load-")) / "stop"
        self.procs: dict[tuple[str, str], subprocess.Popen[str]] = {}
        self.rounds: dict[tuple[str, str], list[tuple[float, str]]] = {}
        self._readers: list[threading.Thread] = []

    def __enter__(self) -> Load:
        for name in ("splitapp", "vpnapp"):
            for proto in ("tcp", "udp"):
                argv = [sys.executable, str(LOAD), name, proto, SERVER, str(PORT[proto]), str(self.stop_file)]
                proc = self.st.lab.popen("host", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                self.procs[(name, proto)] = proc
                rounds = self.rounds[(name, proto)] = []
                reader = threading.Thread(target=self._follow, args=(proc, rounds), daemon=True)
                reader.start()
                self._readers.append(reader)
        return self

    @staticmethod
    def _follow(proc: subprocess.Popen[str], rounds: list[tuple[float, str]]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            t, answer = json.loads(line)
            rounds.append((t, answer))

    def answers_since(self, key: tuple[str, str], since: float) -> list[str]:
        return [a for t, a in list(self.rounds[key]) if t > since]

    def stop(self) -> None:
        self.stop_file.touch()
        for proc in self.procs.values():
            proc.wait(timeout=30)
        for reader in self._readers:  # they own stdout until its end; communicate() would close it under them
            reader.join(timeout=5)
        for key, proc in self.procs.items():
            assert proc.stderr is not None
            assert proc.returncode == 0, f"{key}: {proc.stderr.read()}"

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.stop_file.unlink(missing_ok=True)
        self.stop_file.parent.rmdir()


def actor_pid(st: E2E, instance: str) -> int:
    rows = json.loads(st.ok("status", "--json"))["actors"]
    row = next(r for r in rows if r["actor"] == instance)
    return int(row["pid"] or 0) if row["state"] == "RUNNING" else 0


def all_ready(st: E2E) -> bool:
    rows = json.loads(st.ok("status", "--json"))["actors"]
    return all(r["state"] == "RUNNING" and r["ready"] for r in rows)


@pytest.mark.parametrize("actor", ACTORS)
def test_an_actor_killed_under_load_leaks_nothing_and_splittun_recovers(faults: E2E, leaks: Leaks, actor: str) -> None:
    st = faults
    for proto, port in PORT.items():
        leaks.allow(SERVER, proto, port)  # the split app's destination
    with Load(st) as load:
        assert wait_until(lambda: all_ready(st), timeout=20)
        time.sleep(1.0)  # warm: every app has answers on its normal path
        pid = actor_pid(st, actor)
        assert pid
        killed = time.time()
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: actor_pid(st, actor) not in (0, pid), timeout=RECOVERY_LIMIT), (
            f"{actor} not restarted"
        )
        assert wait_until(lambda: all_ready(st), timeout=RECOVERY_LIMIT), f"not ready again after {actor} was killed"
        ready = time.time()

        def split_app_answers_again() -> bool:  # three answers from each split app once everything is ready
            return all(len(load.answers_since(("splitapp", proto), ready)) >= 3 for proto in PORT)

        assert wait_until(split_app_answers_again, timeout=RECOVERY_LIMIT)
        load.stop()
    # Nothing the VPN app sent left outside the VPN: not one answer with the ISP address.
    for proto in PORT:
        answers = [a for _t, a in load.rounds[("vpnapp", proto)]]
        assert ISP[4] not in answers, f"vpnapp {proto}: {answers.count(ISP[4])} answers through the ISP"
        assert answers.count(VPN[4]) >= len(answers) // 2, f"vpnapp {proto} barely worked: {answers[:5]}"
    # The split app: the ISP address before the kill, possibly failures or the VPN meanwhile, then ISP again.
    recovery = 0.0
    for proto in PORT:
        rounds = load.rounds[("splitapp", proto)]
        before = [a for t, a in rounds if t < killed]
        assert before and all(a == ISP[4] for a in before[-3:]), f"splitapp {proto} before the kill: {before[-3:]}"
        bad = [t for t, a in rounds if t >= killed and a != ISP[4]]
        recovery = max(recovery, (bad[-1] - killed) if bad else 0.0)
        after = [a for t, a in rounds if t > (bad[-1] if bad else killed)]
        assert len(after) >= 3 and all(a == ISP[4] for a in after), f"splitapp {proto} after the kill: {after[:5]}"
    print(f"\nkill -9 {actor}: split path back after {recovery:.2f} s; VPN app: 0 answers outside the VPN")
    assert recovery < RECOVERY_LIMIT


# --- garbage on every socket ------------------------------------------------------------------------------

GARBAGE = 300


def garbage_frames(rng: random.Random) -> list[list[bytes]]:
    """Requests no client should send: random bytes, msgpack of the wrong shape, unknown ops, huge args."""
    out: list[list[bytes]] = []
    for i in range(GARBAGE):
        kind = i % 5
        if kind == 0:
            out.append([rng.randbytes(rng.randint(0, 200))])
        elif kind == 1:
            out.append([msgpack.packb([1, 2, 3])])
        elif kind == 2:
            out.append([msgpack.packb({"op": 7, "args": "nope", "v": 1})])
        elif kind == 3:
            out.append([msgpack.packb({"op": f"no_such_op_{i}", "args": {}, "v": 1})])
        else:
            out.append([msgpack.packb({"op": "status", "args": {"x": "y" * 10000}, "v": 99}), b"extra frame"])
    return out


def log_lines(st: E2E, instance: str) -> int:
    return len(st.log(instance).splitlines())


def test_garbage_on_every_socket_is_refused_logged_sparingly_and_nothing_stops(faults: E2E) -> None:
    st = faults
    assert wait_until(lambda: all_ready(st), timeout=20)
    rows = json.loads(st.ok("status", "--json"))["actors"]
    instances = [r["actor"] for r in rows if r["actor"] != "bus"]
    pids = {i: actor_pid(st, i) for i in [*instances, "bus"]}
    lines = {i: log_lines(st, i) for i in pids}
    rng = random.Random(1719)
    ctx = zmq.Context()
    try:
        # Every control endpoint: each garbage request is answered (an error) or dropped, never a crash.
        for instance in instances:
            address = paths.actor_endpoint(st.home / "run", instance)
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(address)
            for frames in garbage_frames(rng):
                sock.send_multipart([b"", *frames])
            sock.close()
        # The bus: garbage under every topic the actors listen to.
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.connect(paths.bus_in(st.home / "run"))
        time.sleep(0.3)  # slow joiner: let the subscription reach us
        for i, topic in enumerate([b"policy.snapshot", b"netenv.changed", b"ivpn.status", b"actor.heartbeat",
                                   b"conn.new", b"proxy.session.open"] * (GARBAGE // 6)):  # fmt: skip
            pub.send_multipart([topic, rng.randbytes(i % 64) if i % 2 else msgpack.packb({"v": 1, "seq": "x"})])
        pub.close()
    finally:
        ctx.term()
    # The proxies' listening sockets, reached directly (no original destination): refused, nothing relayed.
    for family, proxy in ((socket.AF_INET, "127.0.0.17"), (socket.AF_INET6, "::1")):
        for _ in range(20):
            st.lab.exec("host", [sys.executable, "-c", _RAW_CLIENT, str(family), proxy, str(rng.randint(0, 1 << 30))])
    time.sleep(1.5)
    # Everything still runs (same pids), answers and is ready; each log grew by a handful of lines at most.
    assert wait_until(lambda: all_ready(st), timeout=10)
    for instance, pid in pids.items():
        assert actor_pid(st, instance) == pid, f"{instance} was restarted"
        grown = log_lines(st, instance) - lines[instance]
        assert grown <= 40, f"{instance}: {grown} log lines for {GARBAGE} garbage requests and messages"
    for instance in instances:
        assert st.inst is not None and st.inst.ask(instance, "ping")["pid"] == pids[instance]
    result = splittun("status", home=st.home, ns=st.lab.ns_host)
    assert result.returncode == 0, result.stdout + result.stderr
    # What the proxies turned away (here: datagrams with no original destination) shows in `status`.
    udp_row = next(line for line in result.stdout.splitlines() if line.startswith("proxy_udp_00"))
    assert "refused" in udp_row and "sessions" in udp_row, result.stdout
    rows = json.loads(st.ok("status", "--json"))["actors"]
    assert next(r for r in rows if r["actor"] == "proxy_udp_00")["sessions_refused"] > 0


_RAW_CLIENT = """
import random, socket, sys
family, proxy, seed = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
rng = random.Random(seed)
for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
    try:
        with socket.socket(family, kind) as s:
            s.settimeout(0.5)
            s.connect((proxy, 719))
            s.send(rng.randbytes(rng.randint(1, 512)))
            s.recv(100)
    except OSError:
        pass
"""
