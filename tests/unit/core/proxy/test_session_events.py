"""A proxy session's bus events: a short session is one proxy.session.close carrying its open (schema version
2); a longer one's open leaves on its own within `hold` seconds, and the proxy calls the flush that sends it."""

from __future__ import annotations

import socket
import threading

import zmq

from core.proxy import ProxyConfig, Session, TcpProxy, UpstreamPlan
from core.proxy.service import BusHooks
from messages import Message, ProxySessionClose, ProxySessionOpen, ProxySessionStats
from runtime.transport import Publisher
from tests.support.proxy import WAIT, Hooks, Server, echo, recv_all, wait_until


class FakeRuntime:
    instance = "proxy_tcp_00"
    publisher = None  # BusHooks then publishes each event through `publish`

    def __init__(self) -> None:
        self.published: list[Message] = []

    def publish(self, msg: Message) -> bool:
        self.published.append(msg)
        return True


def session(n: int) -> Session:
    s = Session(f"s{n}", "tcp", ("127.0.0.1", 40000 + n), ("127.0.0.17", 719), ("203.0.113.80", 80))
    s.split_key = f"tcp 192.0.2.10:{40000 + n} 203.0.113.80:80"
    s.local = ("192.0.2.10", 50000 + n)
    return s


def test_a_session_that_ends_before_its_open_left_is_one_close_carrying_it() -> None:
    rt = FakeRuntime()
    hooks = BusHooks(rt)  # type: ignore[arg-type]
    short = session(1)
    hooks.on_open(short)
    short.close_reason = "closed"
    hooks.on_close(short)
    [close] = rt.published
    assert isinstance(close, ProxySessionClose) and close.opened is not None
    assert (close.opened.session_id, close.opened.local_port, close.opened.orig_dst_port) == ("s1", 50001, 80)
    hooks.flush()
    assert len(rt.published) == 1  # nothing left to send


def test_a_longer_session_has_its_open_at_the_flush_and_a_plain_close() -> None:
    rt = FakeRuntime()
    hooks = BusHooks(rt)  # type: ignore[arg-type]
    long, other = session(1), session(2)
    hooks.on_open(long)
    hooks.on_open(other)
    assert rt.published == [] and hooks.hold > 0
    hooks.flush()  # both opens leave together
    assert [m.session_id for m in rt.published if isinstance(m, ProxySessionOpen)] == ["s1", "s2"]
    hooks.on_close(long)
    assert isinstance(rt.published[-1], ProxySessionClose) and rt.published[-1].opened is None


def test_stats_never_come_before_the_open() -> None:
    rt = FakeRuntime()
    hooks = BusHooks(rt)  # type: ignore[arg-type]
    s = session(1)
    hooks.on_open(s)
    hooks.on_stats(s)
    assert [type(m) for m in rt.published] == [ProxySessionOpen, ProxySessionStats]


class HoldingHooks(Hooks):
    hold = 0.05

    def __init__(self) -> None:
        super().__init__()
        self.flushes: list[threading.Thread] = []

    def flush(self) -> None:
        with self.cond:
            self.flushes.append(threading.current_thread())
            self.cond.notify_all()


def test_the_proxy_flushes_held_events_soon_after_an_open_on_its_data_thread() -> None:
    hooks = HoldingHooks()
    server = Server("127.0.0.1", echo)
    proxy = TcpProxy([("127.0.0.1", 0)], lambda _req: UpstreamPlan(server.address), ProxyConfig(), hooks=hooks)
    proxy.start()
    try:
        with socket.create_connection(proxy.addresses[0], timeout=WAIT) as c:
            c.sendall(b"x")
            assert c.recv(10) == b"x"
            assert hooks.wait(lambda: bool(hooks.flushes))  # within `hold` of the open, the session still up
            assert hooks.flushes == [proxy.loop.thread] and len(hooks.opened) == 1 and not hooks.closed
            c.shutdown(socket.SHUT_WR)
            assert recv_all(c) == b""
        hooks.wait_closed()
    finally:
        proxy.shutdown(0.0)
        server.close()
    assert len(hooks.flushes) == 2  # and once more when it stopped


class RecordingRuntime:
    """A runtime whose publisher records each bus message (with the thread that sent it) instead of sending."""

    instance = "proxy_tcp_00"

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.publisher = Publisher(self.ctx, f"inproc://proxy-events-{id(self)}")
        self.sent: list[tuple[list[bytes], threading.Thread]] = []

        def send_frames(frames: list[bytes]) -> bool:
            self.sent.append((frames, threading.current_thread()))
            return True

        self.publisher.send_frames = send_frames  # type: ignore[method-assign]

    def publish(self, msg: Message) -> bool:
        raise AssertionError("the data thread publishes through its batch")

    def close(self) -> None:
        self.publisher.close()
        self.ctx.term()


def test_what_one_turn_of_the_data_loop_publishes_leaves_in_one_message_at_its_end() -> None:
    rt = RecordingRuntime()
    hooks = BusHooks(rt)  # type: ignore[arg-type]
    server = Server("127.0.0.1", echo)
    proxy = TcpProxy([("127.0.0.1", 0)], lambda _req: UpstreamPlan(server.address), ProxyConfig(), hooks=hooks)
    proxy.start()
    try:
        clients = [socket.create_connection(proxy.addresses[0], timeout=WAIT) for _ in range(3)]
        for c in clients:
            c.sendall(b"x")
            assert c.recv(10) == b"x"
        assert wait_until(lambda: any(f[0] == b"proxy.session.open" for f, _ in rt.sent))  # left within `hold`
        before = len(rt.sent)
        proxy.close_all("test")  # one turn on the data thread closes all three
        assert wait_until(lambda: any(f[0] == b"proxy.session.close" for f, _ in rt.sent[before:]))
        closes = [frames for frames, _ in rt.sent[before:] if frames[0] == b"proxy.session.close"]
        assert [len(frames) - 1 for frames in closes] == [3]  # three events, one bus message
        assert {thread for _, thread in rt.sent} == {proxy.loop.thread}
        for c in clients:
            c.close()
    finally:
        proxy.shutdown(0.0)
        server.close()
        rt.close()
