"""The bus: an XSUB/XPUB forwarder every actor publishes into and anyone subscribes to.

Run as `python -m runtime.bus` (supervisord program `bus`). Publishers connect to `bus-in.sock`,
subscribers to `bus-out.sock` in the runtime dir; subscriptions travel upstream so publishers only send
what somebody wants. A slow subscriber loses events at its high-water mark; nobody ever blocks.
Consecutive messages of one topic that are waiting together are forwarded as one message (wire version 2,
messages/schema.py: `[topic, payload, payload, …]`, order kept): every subscriber then wakes and receives
once for them — the heartbeats of every process, which beat at the same instant, and bursts of events.
Nothing waits for a join: the bus forwards what it has each time it wakes.
The bus sends its own `actor.heartbeat` so `splittun status` shows it like any actor.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import zmq

from messages.events import HEARTBEAT_FAST, HEARTBEAT_INTERVAL, HEARTBEAT_STARTUP, Heartbeat
from messages.schema import MAX_BATCH

from . import log as logmod
from . import paths
from .loop import Loop, die_with_parent, until_slot

BATCH = 256


class Bus:
    def __init__(self, run_dir: os.PathLike[str] | str, log: logmod.EventLog, loop: Loop) -> None:
        self.log = log
        self.loop = loop
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.ctx = zmq.Context()
        self.xsub = self.ctx.socket(zmq.XSUB)
        self.xpub = self.ctx.socket(zmq.XPUB)
        for sock in (self.xsub, self.xpub):
            sock.setsockopt(zmq.LINGER, 0)
        self.xsub.setsockopt(zmq.RCVHWM, 100_000)
        self.xpub.setsockopt(zmq.SNDHWM, 100_000)
        self.in_endpoint = paths.bus_in(self.run_dir)
        self.out_endpoint = paths.bus_out(self.run_dir)
        self.xsub.bind(self.in_endpoint)
        self.xpub.bind(self.out_endpoint)
        self.forwarded = 0  # messages received from publishers
        self.joined = 0  # of them, forwarded inside the message before them (same topic, waiting together)
        self.subscription_changes = 0
        self.started = time.time()
        self.instance = os.environ.get("SUPERVISOR_PROCESS_NAME", "bus")
        loop.add_socket(self.xsub, self._forward_events)
        loop.add_socket(self.xpub, self._forward_subscriptions)

        # Like every actor: fast while starting (`up` waits for it), then at the steady cadence, on the same
        # wall-clock slots as every actor's beats (runtime/actor.py).
        def beat() -> None:
            self._heartbeat()
            steady = time.time() - self.started >= HEARTBEAT_STARTUP
            loop.call_later(until_slot(HEARTBEAT_INTERVAL if steady else HEARTBEAT_FAST), beat)

        loop.call_later(0.0, beat)

    def _forward_events(self) -> None:
        run: list[zmq.Frame] | None = None  # the message being built: a topic and its payloads
        topic = b""
        for _ in range(BATCH):
            try:
                frames = self.xsub.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            self.forwarded += 1
            head = frames[0].bytes if len(frames) >= 2 else None
            if run is not None and head == topic and len(run) + len(frames) - 2 <= MAX_BATCH:
                run += frames[1:]
                self.joined += 1
                continue
            if run is not None:
                self._send(run)
            run, topic = frames, head or b""
            if head is None:  # not [topic, payload, …]: forwarded as it came, joined to nothing
                self._send(run)
                run = None
        if run is not None:
            self._send(run)

    def _send(self, frames: list[zmq.Frame]) -> None:
        with contextlib.suppress(zmq.Again):
            self.xpub.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)

    def _forward_subscriptions(self) -> None:
        for _ in range(BATCH):
            try:
                frame = self.xpub.recv(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            self.subscription_changes += 1
            self.xsub.send(frame)

    def _heartbeat(self) -> None:
        now = time.time()
        beat = Heartbeat(
            name="bus",
            instance=self.instance,
            pid=os.getpid(),
            started=self.started,
            uptime=now - self.started,
            ts=now,
            counters={
                "forwarded": self.forwarded,
                "joined": self.joined,
                "subscription_changes": self.subscription_changes,
            },
        )
        with contextlib.suppress(zmq.Again):
            self.xpub.send_multipart(beat.encode(), flags=zmq.NOBLOCK)

    def close(self) -> None:
        self.xsub.close(linger=0)
        self.xpub.close(linger=0)
        self.ctx.term()
        for address in (self.in_endpoint, self.out_endpoint):
            path = paths.endpoint_file(address)
            if path is not None:
                path.unlink(missing_ok=True)


def main() -> int:
    log = logmod.setup(os.environ.get("SUPERVISOR_PROCESS_NAME", "bus"))
    die_with_parent()
    loop = Loop(log)
    loop.install_signal_handlers()
    try:
        bus = Bus(paths.run_dir(), log, loop)
    except (paths.EndpointError, zmq.ZMQError, OSError) as exc:
        log.error("bus.start_failed", error=str(exc))
        return 1
    log.info("bus.started", bus_in=bus.in_endpoint, bus_out=bus.out_endpoint)
    try:
        loop.run()
    finally:
        bus.close()
        loop.close()
        log.info("bus.stopped", reason=loop.stop_reason or "loop ended", forwarded=bus.forwarded)
    return 0


if __name__ == "__main__":
    sys.exit(main())
