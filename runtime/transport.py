"""Small helpers over pyzmq: publish, subscribe, request and reply.

Publishing is fire-and-forget: a full send queue drops the event and counts it, it never blocks the
caller (the hot-path rule). On an actor's loop thread the events of one loop turn leave together at its
end, one bus message per run of one topic (wire version 2, messages/schema.py); a thread with a loop of its
own (the proxies' data thread) does the same through a `Publisher.batch()` it flushes at its turns' ends.
Requests are for the control plane only; each call uses a fresh REQ socket with a deadline, so a dead server
costs a timeout, never a stuck client. `ask(endpoint, OP, args)` sends an op declared in messages/control.py
and returns its decoded result; `request(endpoint, "op", {...})` is the raw form (op by name, arguments and
result as plain msgpack values).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import zmq

from messages import control
from messages.control import Op, Reply, Request, RequestFailed
from messages.schema import MAX_BATCH, Message, MessageError, decode, decode_payload, encode_payload, unbatch

from .log import EventLog, LineBudget, describe
from .paths import endpoint_file

R = TypeVar("R")

DEFAULT_HWM = 10_000
#: Log lines a second for malformed requests (each one is still answered and counted).
BAD_REQUEST_LINES_PER_SECOND = 5


class Batch:
    """Events one thread holds until its loop's turn ends, then sends as one bus message per run of one topic,
    up to `max_batch` events each (messages/schema.py, wire version 2): the bus and every subscriber pay per
    message, not per event. Only its owner thread may use it; publishing only appends to a list (never
    blocks, never waits on a timer). Made by `Publisher.holds_turns` (an actor's loop thread) or
    `Publisher.batch` (a thread with a loop of its own: the proxies' data thread)."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self._held: list[list[bytes]] = []  # messages waiting for the end of the turn

    def publish(self, msg: Message) -> bool:
        """Hold `msg` for the end of the turn; True (a held event is dropped, if ever, when it leaves:
        the publisher's `dropped` counts it)."""
        frames = msg.encode()
        held = self._held
        last = held[-1] if held else None
        limit = self.publisher.max_batch
        if last is not None and last[0] == frames[0] and len(last) <= limit:
            last.append(frames[1])  # the same topic as the event before it: one more payload
            full = len(last) > limit
        else:
            held.append(frames)
            full = len(held) >= limit
        if full:  # a turn that publishes thousands (a re-evaluation) sends them as they fill, not all at its end
            self.flush()
        return True

    def flush(self) -> None:
        """Send what is held, one message per run of one topic (the owner's loop turn ends)."""
        if self._held:
            batch, self._held = self._held, []
            for frames in batch:
                self.publisher.send_frames(frames)


class Publisher:
    """A PUB socket connected to the bus. Thread-safe; never blocks.

    A thread that `holds_turns` (an actor's loop thread) does not send at once: what it publishes waits for
    the end of its loop's turn (`flush`, before the loop sleeps again) in a `Batch`. Other threads (and a
    publisher nobody told) send every event at once, unless they publish through a `batch()` of their own."""

    def __init__(self, ctx: zmq.Context, endpoint: str, hwm: int = DEFAULT_HWM, max_batch: int = MAX_BATCH) -> None:
        self.sock = ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.SNDHWM, hwm)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._held: dict[int, Batch] = {}  # thread → what it holds until the end of its loop's turn
        self.sent = 0  # events
        self.messages = 0  # bus messages they left in
        self.dropped = 0

    def holds_turns(self) -> Callable[[], None]:
        """From now on hold what the calling thread publishes until its loop's turn ends; returns the flush
        that loop must call at the end of every turn (`Loop.at_turn_end`)."""
        return self._held.setdefault(threading.get_ident(), Batch(self)).flush

    def batch(self) -> Batch:
        """A batch for one thread that runs a loop of its own: publish through it, call its `flush` at the end
        of each of that loop's turns."""
        return Batch(self)

    def publish(self, msg: Message) -> bool:
        """Fire-and-forget; False when the event was dropped (a held event is dropped, if ever, when it
        leaves: `dropped` counts it)."""
        held = self._held.get(threading.get_ident())
        if held is None:
            return self.send_frames(msg.encode())
        return held.publish(msg)

    def flush(self) -> None:
        """Send what the calling thread holds, one message per run of one topic (its loop's turn ends)."""
        held = self._held.get(threading.get_ident())
        if held is not None:
            held.flush()

    def send_frames(self, frames: list[bytes]) -> bool:
        """Send one bus message now (`[topic, payload, …]`)."""
        events = max(len(frames) - 1, 1)
        with self._lock:
            try:
                self.sock.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.Again:
                self.dropped += events
                return False
            except zmq.ZMQError:
                self.dropped += events  # socket closing during shutdown
                return False
            self.sent += events
            self.messages += 1
            return True

    def close(self) -> None:
        self.flush()
        with self._lock:
            self.sock.close(linger=0)


class Subscriber:
    """A SUB socket on the bus for the given topic prefixes (None = everything). `recv_frames` and `recv` give
    one event at a time, also from a bus message that carries several (wire version 2); `recv_message_nowait`
    gives a whole bus message."""

    def __init__(self, ctx: zmq.Context, endpoint: str, prefixes: Iterable[str] | None = None) -> None:
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        for prefix in [""] if prefixes is None else prefixes:
            self.sock.setsockopt(zmq.SUBSCRIBE, prefix.encode())
        self.sock.connect(endpoint)
        self._pending: collections.deque[list[bytes]] = collections.deque()  # the rest of a batch

    def recv_frames(self, timeout: float | None = None) -> list[bytes] | None:
        """Next event as `[topic, payload]`, or None after `timeout` seconds (None = wait forever)."""
        if self._pending:
            return self._pending.popleft()
        if timeout is not None and not self.sock.poll(int(timeout * 1000)):
            return None
        return self._one(self.sock.recv_multipart())

    def recv_frames_nowait(self) -> list[bytes] | None:
        if self._pending:
            return self._pending.popleft()
        frames = self.recv_message_nowait()
        return None if frames is None else self._one(frames)

    def recv_message_nowait(self) -> list[bytes] | None:
        """The next bus message as it came: `[topic, payload, …]`."""
        try:
            return self.sock.recv_multipart(flags=zmq.NOBLOCK)
        except zmq.Again:
            return None

    def _one(self, frames: list[bytes]) -> list[bytes]:
        if len(frames) <= 2:
            return frames  # one event (or a malformed message, for decode to name)
        events = unbatch(frames)
        self._pending.extend(events[1:])
        return events[0]

    def recv(self, timeout: float | None = None) -> Message | None:
        """Next decoded event; raises MessageError for a malformed one."""
        frames = self.recv_frames(timeout)
        return None if frames is None else decode(frames)

    def close(self) -> None:
        self.sock.close(linger=0)


class ReplyServer:
    """A ROUTER answering `Request`s with the handler's result.

    The handler returns a msgpack-able result or raises RequestFailed(code, message). A malformed
    request gets a `bad_request` error reply; an exception in the handler an `internal` one. Either
    way the server keeps serving.
    """

    def __init__(self, ctx: zmq.Context, endpoint: str, handler: Callable[[Request], Any], log: EventLog) -> None:
        self.endpoint = endpoint
        self.handler = handler
        self.log = log
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.handled = 0
        self.bad_requests = 0
        self._bad_lines = LineBudget(BAD_REQUEST_LINES_PER_SECOND)  # garbage is answered, and logged sparingly

    def handle_ready(self) -> None:
        for _ in range(64):  # bounded batch: keep the loop fair to other sockets
            try:
                frames = self.sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(frames)

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            self._bad(f"{len(frames)} frame(s), expected envelope+body")
            return
        envelope, body = frames[:-1], frames[-1]
        try:
            req = decode_payload(Request, body, "request")
        except MessageError as exc:
            self._bad(str(exc))
            self._send(envelope, _error_reply(control.BAD_REQUEST, str(exc)))
            return
        try:
            reply = Reply(ok=True, result=self.handler(req))
        except RequestFailed as exc:
            reply = _error_reply(exc.code, exc.message)
        except Exception as exc:
            self.log.error("request.failed", op=req.op, error=describe(exc))
            reply = _error_reply(control.INTERNAL, f"{req.op} failed: {describe(exc)}")
        self.handled += 1
        self._send(envelope, reply)

    def _bad(self, reason: str) -> None:
        self.bad_requests += 1
        if self._bad_lines.allow():
            self.log.warning("request.malformed", reason=reason, total=self.bad_requests)

    def _send(self, envelope: list[bytes], reply: Reply) -> None:
        try:
            payload = encode_payload(reply)
        except (TypeError, ValueError) as exc:  # result not msgpack-able: a bug, but answer anyway
            payload = encode_payload(_error_reply(control.INTERNAL, f"unencodable result: {exc}"))
        try:
            self.sock.send_multipart([*envelope, payload], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self.log.warning("reply.dropped", error=str(exc))

    def close(self) -> None:
        self.sock.close(linger=0)
        path = endpoint_file(self.endpoint)
        if path is not None:
            path.unlink(missing_ok=True)


def _error_reply(code: str, message: str) -> Reply:
    return Reply(ok=False, error=control.ErrorInfo(code=code, message=message))


def request(
    endpoint: str,
    op: str,
    args: dict[str, Any] | None = None,
    *,
    timeout: float = 3.0,
    ctx: zmq.Context | None = None,
    who: str = "server",
) -> Any:
    """Send one request and return the result; RequestFailed on an error reply or no answer."""
    path = endpoint_file(endpoint)
    if path is not None and not Path(path).exists():
        raise RequestFailed(control.UNAVAILABLE, f"{who} is not running (no socket {path})")
    context = ctx or zmq.Context.instance()
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(encode_payload(Request(op=op, args=args or {})))
        if not sock.poll(int(timeout * 1000)):
            raise RequestFailed(control.UNAVAILABLE, f"{who} did not answer {op!r} within {timeout:g} s")
        reply = decode_payload(Reply, sock.recv(), "reply")
    except MessageError as exc:
        raise RequestFailed(control.BAD_REQUEST, f"{who} sent a malformed reply: {exc}") from None
    finally:
        sock.close(linger=0)
    if not reply.ok:
        err = reply.error or control.ErrorInfo(code=control.INTERNAL, message="error without details")
        raise RequestFailed(err.code, err.message)
    return reply.result


def ask(
    endpoint: str,
    op: Op[Any, R],
    args: Any = None,
    *,
    timeout: float = 3.0,
    ctx: zmq.Context | None = None,
    who: str = "server",
) -> R:
    """Send a declared op with its argument record (None = the record's defaults) and return the result
    decoded as the op declares it. RequestFailed on an error reply, no answer, or a reply that does not fit."""
    raw = request(endpoint, op.name, op.encode_args(args), timeout=timeout, ctx=ctx, who=who)
    try:
        return op.decode_result(raw)
    except MessageError as exc:
        raise RequestFailed(control.BAD_REQUEST, f"{who} sent a malformed reply: {exc}") from None
