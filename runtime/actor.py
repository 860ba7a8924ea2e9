"""The runtime every actor process shares: bus connection, heartbeats, requests, signals, logging.

An actor is a subclass of `Actor`; its package's `__main__` calls `main(TheActor)`. The runtime then
- connects a publisher to the bus and subscribes to the actor's topic prefixes,
- binds the actor's request endpoint (`<instance>.ctl.sock`) and answers the ops declared in
  messages/control.py: `ping` and `counters` for every actor, the rest through the methods an actor binds
  with `@answers(OP)` (arguments decoded into the op's record, the result encoded; docs/control-plane.md),
- publishes `actor.heartbeat` (name, pid, uptime, counters, readiness): every second while starting or not
  ready, then every HEARTBEAT_INTERVAL seconds (messages/events.py: the cadence is part of the contract), on
  the wall clock's multiples of them, so every process beats at the same instant (runtime/loop.py until_slot),
- sends what the actor publishes on its loop thread at the end of each loop turn, one bus message per run
  of one topic (runtime/transport.py; wire version 2, messages/schema.py), and hands every event of every
  bus message it receives to `on_message` one by one: actor code sees single events either way,
- decodes every event; a malformed one is logged in one line, counted and dropped,
- stops on SIGTERM/SIGINT (or when supervisord dies: PR_SET_PDEATHSIG) within 2 s, closing its
  sockets and removing its ipc file.
Actor code runs on the loop thread; worker threads may call `publish` (it is thread-safe).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import zmq

from messages.control import INVALID_ARGUMENT, UNKNOWN_OP, AnyActor, NoArgs, Op, Ops, Ping, Request, RequestFailed
from messages.events import HEARTBEAT_FAST, HEARTBEAT_INTERVAL, HEARTBEAT_STARTUP, Heartbeat
from messages.schema import Message, MessageError, decode, unbatch
from runtime import log as logmod
from runtime import paths
from runtime.log import describe
from runtime.loop import Loop, die_with_parent, until_slot
from runtime.transport import Publisher, ReplyServer, Subscriber
from runtime.transport import ask as send_ask
from runtime.transport import request as send_request

_MESSAGE_BATCH = 256
_MALFORMED_LOG_LINES_PER_SECOND = 5

Handler = TypeVar("Handler", bound=Callable[..., Any])
R = TypeVar("R")


def answers(op: Op[Any, Any]) -> Callable[[Handler], Handler]:
    """Bind the decorated method to a declared op (messages/control.py). The method gets the op's argument
    record, decoded and validated, and returns the op's result; it raises RequestFailed(code, message) to
    answer with an error. The op must belong to `AnyActor` or to the actor's own `control` group."""

    def bind(method: Handler) -> Handler:
        method.__control_op__ = op  # type: ignore[attr-defined]
        return method

    return bind


def _handlers(cls: type[Actor]) -> dict[str, tuple[Op[Any, Any], str]]:
    """op name → (op, method name) for `cls`, inherited bindings included (a subclass's own win)."""
    table: dict[str, tuple[Op[Any, Any], str]] = {}
    for klass in reversed(cls.__mro__):
        own: set[str] = set()
        for attr, value in vars(klass).items():
            op = getattr(value, "__control_op__", None)
            if not isinstance(op, Op):
                continue
            if op.actor != AnyActor.actor and (cls.control is None or op.actor != cls.control.actor):
                answered = cls.control.__name__ if cls.control else "only AnyActor's ops"
                raise TypeError(f"{klass.__name__}.{attr} answers {op!r}, but {cls.__name__} answers {answered}")
            if op.name in own:
                raise TypeError(f"{klass.__name__} binds op {op.name!r} twice")
            own.add(op.name)
            table[op.name] = (op, attr)
    return table


def dispatch(actor: Actor, req: Request) -> Any:
    """Answer one request: find the op's handler, decode the arguments, call it, encode the result.

    Unknown op → unknown_op; arguments that do not fit the op's record → invalid_argument naming the
    field; a handler raising anything but RequestFailed → internal (the reply server's catch-all)."""
    entry = type(actor).handlers.get(req.op)
    if entry is None:
        raise RequestFailed(UNKNOWN_OP, f"{actor.name} has no op {req.op!r}")
    op, method = entry
    try:
        args = op.decode_args(req.args)
    except MessageError as exc:
        raise RequestFailed(INVALID_ARGUMENT, str(exc)) from None
    return op.encode_result(getattr(actor, method)(args))


class Actor:
    """Base class of the actors. Override what the actor needs; everything has a safe default."""

    name: ClassVar[str] = ""
    #: Topic prefixes this actor receives in `on_message`.
    subscriptions: ClassVar[tuple[str, ...]] = ()
    #: The group of ops (messages/control.py) this actor answers with `@answers` methods, besides AnyActor's.
    control: ClassVar[type[Ops] | None] = None
    #: op name → (op, method name); built for every subclass.
    handlers: ClassVar[dict[str, tuple[Op[Any, Any], str]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.handlers = _handlers(cls)

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.log = rt.log

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add actor-specific command-line options."""

    def start(self) -> None:
        """Open resources and register fds or timers with `self.rt.loop`. Raising aborts the process."""

    def on_message(self, msg: Message) -> None:
        """One decoded bus message on a subscribed topic."""

    @answers(AnyActor.PING)
    def answer_ping(self, args: NoArgs) -> Ping:
        rt = self.rt
        return Ping(name=rt.name, instance=rt.instance, pid=rt.pid, uptime=rt.uptime())

    @answers(AnyActor.COUNTERS)
    def answer_counters(self, args: NoArgs) -> dict[str, int]:
        return self.rt.all_counters(self)

    def counters(self) -> dict[str, int]:
        """The actor's own counters, sent in every heartbeat."""
        return {}

    def readiness(self) -> str:
        """ "" when the actor can do its job, else why not (sent in every heartbeat; `up` waits for it)."""
        return ""

    def stop(self) -> None:
        """Release resources; must return quickly (the whole stop has 2 s)."""


Actor.handlers = _handlers(Actor)


class Runtime:
    """What an actor gets from its process: identity, log, loop, bus, requests."""

    def __init__(self, name: str, instance: str, args: argparse.Namespace, log: logmod.EventLog) -> None:
        self.name = name
        self.instance = instance
        self.args = args
        self.log = log
        self.pid = os.getpid()
        self.started = time.time()
        self.run_dir = paths.run_dir()
        self.loop = Loop(log)
        self.ctx = zmq.Context()
        self.publisher: Publisher | None = None
        self.subscriber: Subscriber | None = None
        self.server: ReplyServer | None = None
        self.received = 0
        self.malformed = 0
        self.handler_errors = 0
        self._malformed_lines = logmod.LineBudget(_MALFORMED_LOG_LINES_PER_SECOND)

    # --- for actors -------------------------------------------------------------------------------

    @property
    def worker_index(self) -> int:
        """0 for a single process; N for supervisord's `<program>_NN` workers."""
        tail = self.instance.rsplit("_", 1)[-1]
        return int(tail) if tail.isdigit() and self.instance != self.name else 0

    def publish(self, msg: Message) -> bool:
        """Fire-and-forget; False when the event was dropped (full queue or shutting down)."""
        return self.publisher.publish(msg) if self.publisher else False

    def ask(self, instance: str, op: Op[Any, R], args: Any = None, timeout: float = 2.0) -> R:
        """Ask another actor a declared op; its decoded result (control plane only; never from a packet path)."""
        address = paths.actor_endpoint(self.run_dir, instance)
        return send_ask(address, op, args, timeout=timeout, ctx=self.ctx, who=instance)

    def request(self, instance: str, op: str, args: dict[str, Any] | None = None, timeout: float = 2.0) -> Any:
        """Ask another actor by op name with raw arguments; the raw result."""
        address = paths.actor_endpoint(self.run_dir, instance)
        return send_request(address, op, args, timeout=timeout, ctx=self.ctx, who=instance)

    def stat(self) -> dict[str, int]:
        pub = self.publisher
        return {
            "received": self.received,
            "malformed": self.malformed,
            "handler_errors": self.handler_errors + self.loop.errors,
            "published": pub.sent if pub else 0,
            "published_messages": pub.messages if pub else 0,
            "dropped": pub.dropped if pub else 0,
            "requests": self.server.handled if self.server else 0,
            "bad_requests": self.server.bad_requests if self.server else 0,
        }

    # --- wiring -----------------------------------------------------------------------------------

    def open(self, actor: Actor) -> None:
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.publisher = Publisher(self.ctx, paths.bus_in(self.run_dir))
        self.loop.at_turn_end(self.publisher.holds_turns())  # this (the loop's) thread's events leave per turn
        if actor.subscriptions:
            self.subscriber = Subscriber(self.ctx, paths.bus_out(self.run_dir), actor.subscriptions)
            self.loop.add_socket(self.subscriber.sock, lambda: self._drain_bus(actor))
        self.server = ReplyServer(
            self.ctx,
            paths.actor_endpoint(self.run_dir, self.instance),
            lambda r: dispatch(actor, r),
            self.log,
        )
        self.loop.add_socket(self.server.sock, self.server.handle_ready)

    def _drain_bus(self, actor: Actor) -> None:
        assert self.subscriber is not None
        events = 0
        while events < _MESSAGE_BATCH:  # bounded: keep the loop fair to the other sockets
            frames = self.subscriber.recv_message_nowait()
            if frames is None:
                return
            try:
                batch = unbatch(frames)
            except MessageError as exc:
                self.received += 1
                self.malformed += 1
                self._log_malformed(exc)
                continue
            events += len(batch)
            for one in batch:
                self._dispatch(actor, one)

    def _dispatch(self, actor: Actor, frames: list[bytes]) -> None:
        self.received += 1
        try:
            msg = decode(frames)
        except MessageError as exc:
            self.malformed += 1
            self._log_malformed(exc)
            return
        try:
            actor.on_message(msg)
        except Exception as exc:  # the message was valid; the actor failed on it: log, go on
            self.handler_errors += 1
            self.log.error("message.failed", topic=msg.wire_topic(), error=describe(exc))

    def _log_malformed(self, exc: MessageError) -> None:
        if self._malformed_lines.allow():
            self.log.warning("message.malformed", reason=str(exc), total=self.malformed)

    def uptime(self) -> float:
        return time.time() - self.started

    def all_counters(self, actor: Actor) -> dict[str, int]:
        counters = self.stat()
        try:
            counters.update(actor.counters())
        except Exception as exc:
            self.log.error("counters.failed", error=describe(exc))
        return counters

    def heartbeats(self, actor: Actor) -> None:
        """Beat now; then every HEARTBEAT_FAST s while starting or not ready (and once more when readiness
        changed), else every HEARTBEAT_INTERVAL s. A ready, idle actor wakes once per interval: each beat
        also wakes every subscriber, so an idle instance beating every second was never idle. Beats fall on
        the wall clock's multiples of their period, the same instant in every process: the bus forwards
        them together and a subscriber takes them in one wakeup, not one per process."""
        last_not_ready: str | None = None

        def tick() -> None:
            nonlocal last_not_ready
            not_ready = self.readiness(actor)
            self.heartbeat(actor, not_ready)
            steady = not not_ready and not_ready == last_not_ready and self.uptime() >= HEARTBEAT_STARTUP
            last_not_ready = not_ready
            self.loop.call_later(until_slot(HEARTBEAT_INTERVAL if steady else HEARTBEAT_FAST), tick)

        self.loop.call_later(0.0, tick)

    def readiness(self, actor: Actor) -> str:
        try:
            return actor.readiness()
        except Exception as exc:
            return f"readiness check failed: {describe(exc)}"

    def heartbeat(self, actor: Actor, not_ready: str | None = None) -> None:
        now = time.time()
        if not_ready is None:
            not_ready = self.readiness(actor)
        self.publish(
            Heartbeat(
                name=self.name,
                instance=self.instance,
                pid=self.pid,
                started=self.started,
                uptime=now - self.started,
                ts=now,
                counters=self.all_counters(actor),
                ready=not not_ready,
                not_ready=not_ready,
            )
        )

    def close(self) -> None:
        for closer in (self.server, self.subscriber, self.publisher):
            if closer is not None:
                with contextlib.suppress(Exception):
                    closer.close()
        self.ctx.term()
        if self.server is not None:
            path = paths.endpoint_file(self.server.endpoint)
            if path is not None:
                Path(path).unlink(missing_ok=True)
        self.loop.close()


def main(actor_cls: type[Actor], argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m actors.{actor_cls.name}", description=actor_cls.__doc__)
    parser.add_argument("--instance", help="instance name (default: supervisord's process name)")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default: SPLITTUN_LOG_LEVEL)")
    actor_cls.add_arguments(parser)
    args = parser.parse_args(argv)
    instance = args.instance or os.environ.get("SUPERVISOR_PROCESS_NAME") or actor_cls.name
    log = logmod.setup(instance, args.log_level)
    die_with_parent()
    try:
        rt = Runtime(actor_cls.name, instance, args, log)
    except paths.EndpointError as exc:
        log.error("actor.start_failed", error=str(exc))
        return 2
    rt.loop.install_signal_handlers()
    actor = actor_cls(rt)
    try:
        rt.open(actor)
        actor.start()
    except Exception as exc:
        log.error("actor.start_failed", error=describe(exc))
        with contextlib.suppress(Exception):
            actor.stop()
        rt.close()
        return 1
    rt.heartbeats(actor)
    log.info("actor.started", pid=rt.pid, run_dir=rt.run_dir)
    try:
        rt.loop.run()
    finally:
        try:
            actor.stop()
        except Exception as exc:
            log.error("actor.stop_failed", error=describe(exc))
        rt.close()
        log.info("actor.stopped", reason=rt.loop.stop_reason or "loop ended", uptime=f"{rt.uptime():.1f}s")
    return 0
