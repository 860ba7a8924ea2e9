"""The bus and the actor runtime as real processes (no supervisord, no root needed).

The third-party subscriber here deliberately imports only `zmq` and `msgpack`: that is all an outside
program gets to inspect splittun with.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest
import zmq

from messages.control import Request
from messages.schema import encode_payload
from runtime import paths
from tests.support import REPO


class Procs:
    """Bus and actors started as plain processes sharing one runtime dir; all killed at teardown."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.env = {**os.environ, "SPLITTUN_RUN_DIR": str(run_dir), "PYTHONUNBUFFERED": "1"}
        self.env.pop("SUPERVISOR_PROCESS_NAME", None)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}

    def start(self, name: str, module: str) -> subprocess.Popen[bytes]:
        log = self.run_dir.parent / f"{name}.log"
        self.logs[name] = log
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", module], env=self.env, stderr=out, stdout=out, cwd=REPO)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return self.logs[name].read_text()

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    run = Path(f"/tmp/st-run-{os.getpid()}-{time.monotonic_ns()}")
    run.mkdir(mode=0o700)
    p = Procs(run)
    try:
        yield p
    finally:
        p.stop_all()
        for f in run.iterdir():
            f.unlink()
        run.rmdir()
        for log in p.logs.values():
            log.unlink(missing_ok=True)


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, step: float = 0.05) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout} s")


def encode_payload_dict(data: dict) -> bytes:
    return msgpack.packb({"v": 1, **data})


def third_party_subscriber(run_dir: Path, prefixes: list[bytes]) -> tuple[zmq.Context, zmq.Socket]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    for prefix in prefixes:
        sock.setsockopt(zmq.SUBSCRIBE, prefix)
    sock.connect(f"ipc://{run_dir}/bus-out.sock")
    return ctx, sock


def receive(sock: zmq.Socket, want: str, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sock.poll(100):
            topic, payload = sock.recv_multipart()
            data = msgpack.unpackb(payload)
            if topic.decode() == want:
                return data
    raise AssertionError(f"no {want} within {timeout} s")


def test_third_party_subscriber_with_only_pyzmq_and_msgpack(procs: Procs) -> None:
    procs.start("bus", "runtime.bus")
    procs.start("controller", "actors.controller")
    ctx, sub = third_party_subscriber(procs.run_dir, [b"actor.heartbeat"])
    try:
        beats = {}
        deadline = time.monotonic() + 10
        while len(beats) < 2 and time.monotonic() < deadline:
            data = receive(sub, "actor.heartbeat")
            beats[data["instance"]] = data
        assert set(beats) == {"bus", "controller"}
        controller = beats["controller"]
        assert controller["v"] == 1 and controller["pid"] == procs.procs["controller"].pid
        assert controller["uptime"] >= 0 and "malformed" in controller["counters"]
    finally:
        sub.close(linger=0)
        ctx.term()


def test_prefix_subscription_filters_topics(procs: Procs) -> None:
    procs.start("bus", "runtime.bus")
    ctx, sub = third_party_subscriber(procs.run_dir, [b"conn."])
    pub = ctx.socket(zmq.PUB)
    pub.connect(f"ipc://{procs.run_dir}/bus-in.sock")
    try:
        event = {"v": 1, "conn_id": "c9", "ts": 1.0, "reason": "test"}

        def delivered() -> bool:
            pub.send_multipart([b"conn.end", msgpack.packb(event)])
            return bool(sub.poll(100))

        wait_for(delivered)  # slow joiner: subscriptions reach the publisher asynchronously
        topics = set()
        while sub.poll(300):
            topics.add(sub.recv_multipart()[0])
        assert topics == {b"conn.end"}  # the bus's heartbeats were filtered out by prefix
    finally:
        pub.close(linger=0)
        sub.close(linger=0)
        ctx.term()


def _ask(run_dir: Path, body: bytes, timeout_ms: int = 3000) -> dict:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(paths.control(run_dir))
    try:
        sock.send(body)
        assert sock.poll(timeout_ms), "no reply"
        return msgpack.unpackb(sock.recv())
    finally:
        sock.close()
        ctx.term()


def test_malformed_messages_are_logged_dropped_and_survived(procs: Procs) -> None:
    procs.start("bus", "runtime.bus")
    controller = procs.start("controller", "actors.controller")
    wait_for(lambda: paths.ipc_path(procs.run_dir, "controller.ctl").exists())
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.connect(f"ipc://{procs.run_dir}/bus-in.sock")
    good = encode_payload_dict(
        {"name": "fake", "instance": "fake_01", "pid": 99, "started": 0.0, "uptime": 1.0, "ts": time.time()}
    )
    bad = [
        [b"actor.heartbeat", good[:-4]],  # truncated
        [b"actor.heartbeat", msgpack.packb({"v": 1, "name": 5})],  # wrong type
        [b"actor.heartbeat", msgpack.packb([1, 2, 3])],  # not a map
        [b"actor.heartbeat", b"\xc1garbage"],  # not msgpack at all
        [b"actor.heartbeat", good, b"extra frame"],
    ]
    try:

        def registered() -> bool:
            for frames in bad:
                pub.send_multipart(frames)
            pub.send_multipart([b"actor.heartbeat", good])
            reply = _ask(procs.run_dir, encode_payload(Request(op="actors")))
            return any(row["instance"] == "fake_01" for row in reply["result"])

        wait_for(registered)  # the valid heartbeat after the bad ones was still processed
        assert controller.poll() is None, "controller died on malformed input"
        log = procs.log("controller")
        assert "message.malformed" in log
        assert "actor.heartbeat: field 'name': expected str, got int" in log
        assert "payload is not valid msgpack" in log
        assert "expected 2 frames" in log
        assert "Traceback" not in log
        counters = _ask(procs.run_dir, encode_payload(Request(op="counters")))["result"]
        assert counters["malformed"] >= len(bad)
    finally:
        pub.close(linger=0)
        ctx.term()


def test_malformed_requests_get_error_replies(procs: Procs) -> None:
    procs.start("bus", "runtime.bus")
    controller = procs.start("controller", "actors.controller")
    wait_for(lambda: paths.ipc_path(procs.run_dir, "controller.ctl").exists())
    garbage = _ask(procs.run_dir, b"\xc1\xc1")
    assert garbage["ok"] is False and garbage["error"]["code"] == "bad_request"
    wrong = _ask(procs.run_dir, msgpack.packb({"v": 1, "op": 12}))
    assert wrong["error"]["code"] == "bad_request" and "field 'op'" in wrong["error"]["message"]
    unknown = _ask(procs.run_dir, encode_payload(Request(op="launch-rockets")))
    assert unknown["error"]["code"] == "unknown_op"
    ping = _ask(procs.run_dir, encode_payload(Request(op="ping")))
    assert ping["ok"] and ping["result"]["pid"] == controller.pid
    assert controller.poll() is None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_actor_stops_within_two_seconds_and_removes_its_socket(procs: Procs, signum: int) -> None:
    procs.start("bus", "runtime.bus")
    actor = procs.start("quiet", "tests.fixtures.runtime.quiet_actor")  # no product actor in the root namespace
    sock = paths.ipc_path(procs.run_dir, "quiet.ctl")
    wait_for(sock.exists)
    wait_for(lambda: "actor.started" in procs.log("quiet"))
    started = time.monotonic()
    actor.send_signal(signum)
    assert actor.wait(timeout=5) == 0
    assert time.monotonic() - started < 2.0
    assert not sock.exists()
    assert f"actor.stopped reason={signal.Signals(signum).name}" in procs.log("quiet")


def test_bus_stops_and_removes_its_sockets(procs: Procs) -> None:
    bus = procs.start("bus", "runtime.bus")
    wait_for(lambda: (procs.run_dir / "bus-out.sock").exists())
    bus.terminate()
    assert bus.wait(timeout=2) == 0
    assert not (procs.run_dir / "bus-in.sock").exists()
    assert not (procs.run_dir / "bus-out.sock").exists()


def test_log_lines_have_one_consistent_shape(procs: Procs) -> None:
    procs.start("bus", "runtime.bus")
    actor = procs.start("quiet", "tests.fixtures.runtime.quiet_actor")
    wait_for(lambda: "actor.started" in procs.log("quiet"))
    actor.terminate()
    actor.wait(timeout=5)
    shape = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR) quiet\[\d+\] [a-z_.]+( |$)")
    lines = procs.log("quiet").strip().splitlines()
    assert lines and all(shape.match(line) for line in lines), lines
