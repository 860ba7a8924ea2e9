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
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest
import zmq

from messages import ConnEnd, ConnNew, ConnVerdict, Verdict
from messages.control import Request
from messages.schema import MAX_BATCH, encode_payload
from runtime import paths
from runtime.bus import Bus
from runtime.log import EventLog
from runtime.loop import Loop
from runtime.transport import Publisher, Subscriber
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
            topic, *payloads = sock.recv_multipart()  # wire version 2: one or more events of one topic
            if topic.decode() == want:
                return msgpack.unpackb(payloads[0])
    raise AssertionError(f"no {want} within {timeout} s")


def messages(sock: zmq.Socket, quiet_ms: int = 300) -> list[tuple[bytes, list[dict]]]:
    """Every bus message until `quiet_ms` pass without one: (topic, its events' maps)."""
    out = []
    while sock.poll(quiet_ms):
        topic, *payloads = sock.recv_multipart()
        out.append((topic, [msgpack.unpackb(p) for p in payloads]))
    return out


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


def test_one_turns_events_leave_in_one_message_per_run_of_a_topic_in_order(procs: Procs) -> None:
    """What an actor publishes in one loop turn reaches a third party as one message per run of one topic,
    in publishing order (the bus joins only what is next to each other in its stream); a publisher that
    does not hold turns (another thread) still sends each event alone."""
    procs.start("bus", "runtime.bus")
    ctx, sub = third_party_subscriber(procs.run_dir, [b"conn.end", b"conn.verdict", b"conn.new"])
    loop = Loop(EventLog("test-batch"))
    pub = Publisher(ctx, paths.bus_in(procs.run_dir))
    try:

        def end(i: int) -> ConnEnd:
            return ConnEnd(conn_id=f"c{i}", ts=1.0)

        wait_for(lambda: pub.publish(end(0)) and sub.poll(100))  # slow joiner (this thread: sent at once)
        messages(sub)
        sent, sent_messages = pub.sent, pub.messages
        loop.at_turn_end(pub.holds_turns())
        turn = [end(1), end(2), end(3), ConnNew(conn_id="n", ts=1.0, ip_version=4, protocol=6, src_ip="192.0.2.1",
                src_port=1, dst_ip="198.51.100.1", dst_port=2), end(4), ConnVerdict(conn_id="c4", ts=1.0,
                verdict=Verdict.ACCEPT), end(5), end(6)]  # fmt: skip
        loop.call_later(0.0, lambda: [pub.publish(m) for m in turn])
        loop.call_later(0.0, lambda: loop.stop("turn over"))
        loop.run()
        got = [(topic, [e["conn_id"] for e in events]) for topic, events in messages(sub)]
        assert got == [
            (b"conn.end", ["c1", "c2", "c3"]),
            (b"conn.new", ["n"]),
            (b"conn.end", ["c4"]),
            (b"conn.verdict", ["c4"]),
            (b"conn.end", ["c5", "c6"]),
        ]
        assert (pub.sent - sent, pub.messages - sent_messages) == (len(turn), 5)
    finally:
        pub.close()
        sub.close(linger=0)
        loop.close()
        ctx.term()


def test_an_actor_gets_every_event_of_a_batch_one_by_one(procs: Procs) -> None:
    """A controller handed several heartbeats in one bus message (a bad one among them) registers each good
    one: actor code sees single events, whatever the framing."""
    procs.start("bus", "runtime.bus")
    procs.start("controller", "actors.controller")
    wait_for(lambda: paths.ipc_path(procs.run_dir, "controller.ctl").exists())
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.connect(f"ipc://{procs.run_dir}/bus-in.sock")

    def beat(i: int) -> bytes:
        return encode_payload_dict(
            {"name": "fake", "instance": f"fake_{i}", "pid": 90 + i, "started": 0.0, "uptime": 1.0, "ts": time.time()}
        )

    try:

        def registered() -> set[str]:
            pub.send_multipart([b"actor.heartbeat", beat(1), b"\xc1bad", beat(2), beat(3)])
            reply = _ask(procs.run_dir, encode_payload(Request(op="actors")))
            return {row["instance"] for row in reply["result"]} & {"fake_1", "fake_2", "fake_3"}

        assert wait_for(registered) == {"fake_1", "fake_2", "fake_3"}
        assert "payload is not valid msgpack" in procs.log("controller")
    finally:
        pub.close(linger=0)
        ctx.term()


def test_the_bus_joins_waiting_messages_of_one_topic(tmp_path: Path) -> None:
    """Messages of one topic waiting at the bus together leave as one (order kept, at most MAX_BATCH events);
    another topic in between ends the join. Run in-process so the test decides when the bus forwards."""
    run = Path(f"/tmp/st-join-{os.getpid()}-{time.monotonic_ns()}")
    loop = Loop(EventLog("test-bus"))
    bus = Bus(run, EventLog("test-bus"), loop)
    ctx, sub = third_party_subscriber(run, [b"actor.", b"conn."])
    pub = ctx.socket(zmq.PUB)
    pub.connect(bus.in_endpoint)
    try:

        def joined() -> bool:
            bus._forward_subscriptions()
            pub.send_multipart([b"conn.end", msgpack.packb({"v": 1, "conn_id": "probe", "ts": 1.0})])
            time.sleep(0.02)
            bus._forward_events()
            return bool(sub.poll(50))

        wait_for(joined)  # both subscriptions reached the publisher
        messages(sub)
        sends = [(b"actor.heartbeat", {"instance": f"a{i}"}) for i in range(MAX_BATCH + 2)]
        sends += [(b"conn.end", {"conn_id": "x"}), (b"actor.heartbeat", {"instance": "last"})]
        for topic, event in sends:
            pub.send_multipart([topic, msgpack.packb({"v": 1, **event})])
        time.sleep(1.0)  # all waiting at the bus (ZeroMQ moves them in microseconds; a loaded machine may not run it)
        bus._forward_events()
        got = [(topic, len(events)) for topic, events in messages(sub)]
        assert got == [
            (b"actor.heartbeat", MAX_BATCH),
            (b"actor.heartbeat", 2),
            (b"conn.end", 1),
            (b"actor.heartbeat", 1),
        ]
        assert bus.joined == MAX_BATCH - 1 + 1
    finally:
        pub.close(linger=0)
        sub.close(linger=0)
        ctx.term()
        bus.close()
        loop.close()
        run.rmdir()


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
        [b"actor.heartbeat"],  # no payload
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
        assert "expected [topic, payload, ...], got 1 frame(s)" in log
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


def test_a_subscriber_hands_out_a_batch_one_event_at_a_time() -> None:
    """`splittun events`, `up` and the tests read events through Subscriber: a batch arrives as its events."""
    sock_file = Path(f"/tmp/st-sub-{os.getpid()}-{time.monotonic_ns()}.sock")
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind(f"ipc://{sock_file}")
    sub = Subscriber(ctx, f"ipc://{sock_file}", ["conn."])
    try:

        def end(i: int) -> bytes:
            return ConnEnd(conn_id=f"c{i}", ts=1.0).encode()[1]

        wait_for(lambda: pub.send_multipart([b"conn.end", end(0)]) or sub.recv_frames(timeout=0.05))
        while sub.recv_frames(timeout=0.1) is not None:
            pass
        pub.send_multipart([b"conn.end", end(1), end(2), end(3)])
        got = [sub.recv(timeout=2.0) for _ in range(3)]
        assert [e.conn_id for e in got if isinstance(e, ConnEnd)] == ["c1", "c2", "c3"]
        assert sub.recv_frames(timeout=0.1) is None
    finally:
        pub.close(linger=0)
        sub.close()
        ctx.term()
        sock_file.unlink(missing_ok=True)


def test_a_turn_that_publishes_thousands_sends_full_messages_as_they_fill() -> None:
    """A re-evaluation may publish an event per live connection in one turn: full messages leave at once
    (bounded memory, no end-of-turn burst), the rest at the turn's end; nothing is lost or reordered."""
    sock_file = Path(f"/tmp/st-pub-{os.getpid()}-{time.monotonic_ns()}.sock")
    ctx = zmq.Context()
    pub = Publisher(ctx, f"ipc://{sock_file}")
    sent: list[list[bytes]] = []
    pub.send_frames = lambda frames: sent.append(frames) or True  # type: ignore[method-assign]
    try:
        flush = pub.holds_turns()
        for i in range(2 * MAX_BATCH + 3):
            pub.publish(ConnEnd(conn_id=f"c{i}", ts=1.0))
        assert [len(m) - 1 for m in sent] == [MAX_BATCH, MAX_BATCH]  # before the turn ended
        flush()
        assert [len(m) - 1 for m in sent] == [MAX_BATCH, MAX_BATCH, 3]
        ids = [msgpack.unpackb(p)["conn_id"] for m in sent for p in m[1:]]
        assert ids == [f"c{i}" for i in range(2 * MAX_BATCH + 3)]
    finally:
        pub.close()
        ctx.term()
        sock_file.unlink(missing_ok=True)


def test_a_batch_holds_what_its_thread_publishes_until_its_flush() -> None:
    """A thread with a loop of its own (the proxies' data thread) publishes through a batch: nothing leaves
    before its flush, then one message per run of one topic; the publisher's other threads are unaffected."""
    sock_file = Path(f"/tmp/st-pub-{os.getpid()}-{time.monotonic_ns()}.sock")
    ctx = zmq.Context()
    pub = Publisher(ctx, f"ipc://{sock_file}")
    sent: list[list[bytes]] = []
    pub.send_frames = lambda frames: sent.append(frames) or True  # type: ignore[method-assign]
    try:
        batch = pub.batch()

        def data_thread() -> None:
            for i in range(3):
                batch.publish(ConnEnd(conn_id=f"c{i}", ts=1.0))

        worker = threading.Thread(target=data_thread)
        worker.start()
        worker.join()
        pub.publish(ConnEnd(conn_id="main", ts=1.0))  # this thread holds nothing: sent at once
        assert [len(m) - 1 for m in sent] == [1]
        batch.flush()
        assert [[msgpack.unpackb(p)["conn_id"] for p in m[1:]] for m in sent] == [["main"], ["c0", "c1", "c2"]]
    finally:
        pub.close()
        ctx.term()
        sock_file.unlink(missing_ok=True)
