"""The TCP proxy library on loopback (no root): what a client and a server on either side notice.

The decider points every session at a test server, so no NAT is needed; the kernel parts (original
destination, egress binding, routing) are covered in test_proxy_netns.py and test_proxy_lab.py.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from core.proxy import ProxyConfig, Refusal, SessionRequest, TcpProxy, UpstreamPlan
from core.proxy.tcp import HAS_SPLICE
from messages.flows import IpProtocol
from tests.support.proxy import IPV6, WAIT, Hooks, Server, echo, expect_reset, recv_all, wait_until

LINGER_RST = struct.pack("ii", 1, 0)
MODES = [
    pytest.param({"splice": True, "edge_triggered": True}, id="splice-epoll-et",
                 marks=pytest.mark.skipif(not HAS_SPLICE, reason="no os.splice")),
    pytest.param({"splice": False, "edge_triggered": False}, id="copy-selectors"),
]  # fmt: skip

ProxyFactory = Callable[..., TcpProxy]


@pytest.fixture
def make_proxy(hooks: Hooks) -> Iterator[ProxyFactory]:
    made: list[TcpProxy] = []

    def make(target: Any, ip: str = "127.0.0.1", **config: Any) -> TcpProxy:
        decider = target if callable(target) else (lambda _req: UpstreamPlan(target))
        proxy = TcpProxy([(ip, 0)], decider, ProxyConfig(**config), hooks=hooks)
        proxy.start()
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.shutdown(0.0)


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    made: list[Server] = []
    yield made
    for server in made:
        server.close()


def serve(servers: list[Server], handler: Callable[[socket.socket], None], ip: str = "127.0.0.1") -> Server:
    server = Server(ip, handler)
    servers.append(server)
    return server


def connect(proxy: TcpProxy, index: int = 0) -> socket.socket:
    sock = socket.create_connection(proxy.addresses[index], timeout=WAIT)
    sock.settimeout(WAIT)
    return sock


@pytest.mark.parametrize("ip", ["127.0.0.1", IPV6])
def test_echo_through_proxy(make_proxy: ProxyFactory, servers: list[Server], hooks: Hooks, ip: str) -> None:
    server = serve(servers, echo, ip)
    proxy = make_proxy(server.address, ip=ip)
    with connect(proxy) as c:
        c.sendall(b"hello proxy")
        assert c.recv(100) == b"hello proxy"
        c.shutdown(socket.SHUT_WR)
        assert recv_all(c) == b""
    (session,) = hooks.wait_closed()
    assert session.close_reason == "closed"
    assert (session.bytes_up, session.bytes_down) == (11, 11)
    assert hooks.opened == [session] and session.local is not None


@pytest.mark.parametrize("mode", MODES)
def test_large_transfer_both_ways_keeps_every_byte(
    make_proxy: ProxyFactory, servers: list[Server], hooks: Hooks, mode: dict[str, Any]
) -> None:
    server = serve(servers, echo)
    proxy = make_proxy(server.address, **mode)
    data = os.urandom(24 << 20)
    with connect(proxy) as c:

        def send() -> None:
            c.sendall(data)
            c.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        got = recv_all(c)
        sender.join(WAIT)
    assert len(got) == len(data)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    (session,) = hooks.wait_closed()
    assert (session.bytes_up, session.bytes_down) == (len(data), len(data))
    assert session.packets_up > 0 and session.packets_down > 0
    assert proxy.counters().get("spliced_directions", 0) == (2 if mode["splice"] else 0)


@pytest.mark.parametrize("mode", MODES)
def test_half_close_from_client(
    make_proxy: ProxyFactory, servers: list[Server], hooks: Hooks, mode: dict[str, Any]
) -> None:
    """Client sends and half-closes; the server sees EOF first, then answers on the still-open half."""

    def answer_after_eof(conn: socket.socket) -> None:
        request = recv_all(conn)  # returns only once the client's FIN came through the proxy
        conn.sendall(b"got " + request)
        conn.shutdown(socket.SHUT_WR)

    proxy = make_proxy(serve(servers, answer_after_eof).address, **mode)
    with connect(proxy) as c:
        c.sendall(b"question")
        c.shutdown(socket.SHUT_WR)
        assert recv_all(c) == b"got question"
    assert hooks.wait_closed()[0].close_reason == "closed"


@pytest.mark.parametrize("mode", MODES)
def test_half_close_from_server(
    make_proxy: ProxyFactory, servers: list[Server], hooks: Hooks, mode: dict[str, Any]
) -> None:
    """Server greets and half-closes at once; the client sees EOF yet can still send, and is heard."""
    heard: list[bytes] = []

    def greet_then_listen(conn: socket.socket) -> None:
        conn.sendall(b"banner")
        conn.shutdown(socket.SHUT_WR)
        heard.append(recv_all(conn))

    proxy = make_proxy(serve(servers, greet_then_listen).address, **mode)
    with connect(proxy) as c:
        assert recv_all(c) == b"banner"  # EOF reached the client
        c.sendall(b"late words")
        c.shutdown(socket.SHUT_WR)
    assert wait_until(lambda: bool(heard))
    assert heard == [b"late words"]
    assert hooks.wait_closed()[0].close_reason == "closed"


def test_reset_from_client_reaches_server(make_proxy: ProxyFactory, servers: list[Server], hooks: Hooks) -> None:
    outcome: list[BaseException | bytes] = []
    started = threading.Event()

    def wait_for_reset(conn: socket.socket) -> None:
        conn.sendall(b"x")
        started.set()
        try:
            outcome.append(recv_all(conn))
        except ConnectionResetError as exc:
            outcome.append(exc)

    server = serve(servers, wait_for_reset)
    proxy = make_proxy(server.address)
    c = connect(proxy)
    assert c.recv(1) == b"x"
    assert started.wait(WAIT)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    c.close()
    (session,) = hooks.wait_closed()
    assert session.close_reason.startswith("reset by client")
    assert wait_until(lambda: bool(outcome))
    assert isinstance(outcome[0], ConnectionResetError)


def test_reset_from_server_reaches_client(make_proxy: ProxyFactory, servers: list[Server], hooks: Hooks) -> None:
    def reset(conn: socket.socket) -> None:
        conn.recv(10)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)

    proxy = make_proxy(serve(servers, reset).address)
    with connect(proxy) as c:
        c.sendall(b"hi")
        with pytest.raises(ConnectionResetError):
            recv_all(c)
    assert hooks.wait_closed()[0].close_reason.startswith("reset by upstream")


def test_upstream_that_never_answers_hits_dial_timeout(
    make_proxy: ProxyFactory, hooks: Hooks, blackhole: tuple[str, int]
) -> None:
    proxy = make_proxy(blackhole, dial_timeout=0.3)
    with connect(proxy) as c:
        c.sendall(b"anyone?")
        with pytest.raises(ConnectionResetError):
            recv_all(c)
    (session,) = hooks.wait_closed()
    assert session.close_reason == "dial failed: timed out"
    assert hooks.opened == []


def test_refused_upstream_resets_client(make_proxy: ProxyFactory, hooks: Hooks) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()
    proxy = make_proxy(closed_port)
    expect_reset(proxy.addresses[0])
    assert hooks.wait_closed()[0].close_reason == "dial failed: Connection refused"


def test_silent_session_is_evicted(make_proxy: ProxyFactory, servers: list[Server], hooks: Hooks) -> None:
    proxy = make_proxy(serve(servers, echo).address, read_timeout=0.3)
    with connect(proxy) as c:
        c.sendall(b"ping")
        assert c.recv(4) == b"ping"
        assert recv_all(c) == b""  # nothing more is said: the proxy closes the session
    (session,) = hooks.wait_closed()
    assert session.close_reason == "idle"
    assert proxy.table.active == 0


def test_peer_that_stops_reading_hits_write_timeout(
    make_proxy: ProxyFactory, servers: list[Server], hooks: Hooks
) -> None:
    never_read = threading.Event()
    server = serve(servers, lambda conn: never_read.wait(WAIT))
    proxy = make_proxy(server.address, write_timeout=0.3, read_timeout=60)
    outcome: list[BaseException] = []
    with connect(proxy) as c:

        def flood() -> None:  # until every buffer on the way is full and the proxy gives up
            try:
                while True:
                    c.sendall(b"x" * 65536)
            except OSError as exc:
                outcome.append(exc)

        sender = threading.Thread(target=flood, daemon=True)
        sender.start()
        (session,) = hooks.wait_closed()
        assert session.close_reason == "write timeout"
        sender.join(WAIT)
    never_read.set()
    assert outcome and isinstance(outcome[0], (ConnectionResetError, BrokenPipeError))


def test_session_limit_refuses_cleanly_and_counts(
    make_proxy: ProxyFactory, servers: list[Server], hooks: Hooks
) -> None:
    server = serve(servers, echo)
    proxy = make_proxy(server.address, max_sessions=2)
    first, second = connect(proxy), connect(proxy)
    for c in (first, second):
        c.sendall(b"in")
        assert c.recv(2) == b"in"
    expect_reset(proxy.addresses[0])
    assert hooks.wait_closed()[0].close_reason == "refused: session limit 2 reached"
    first.sendall(b"still")
    assert first.recv(5) == b"still"
    assert proxy.table.metrics() == {"active": 2, "created": 2, "closed": 0, "refused": 1}
    assert server.accepted == 2
    first.close()
    second.close()


def test_decider_refusal_never_dials(make_proxy: ProxyFactory, servers: list[Server], hooks: Hooks) -> None:
    server = serve(servers, echo)
    seen: list[SessionRequest] = []

    def decide(req: SessionRequest) -> UpstreamPlan | Refusal:
        seen.append(req)
        return Refusal("not this one")

    proxy = make_proxy(decide)
    expect_reset(proxy.addresses[0])
    assert hooks.wait_closed()[0].close_reason == "refused: not this one"
    assert server.accepted == 0
    (req,) = seen
    assert req.listen == proxy.addresses[0] and req.orig_dst is None and req.protocol == IpProtocol.TCP


def test_failing_decider_refuses_and_worker_keeps_serving(
    make_proxy: ProxyFactory, servers: list[Server], hooks: Hooks
) -> None:
    server = serve(servers, echo)
    calls = []

    def flaky(req: SessionRequest) -> UpstreamPlan:
        calls.append(req)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return UpstreamPlan(server.address)

    proxy = make_proxy(flaky)
    expect_reset(proxy.addresses[0])
    with connect(proxy) as c:
        c.sendall(b"ok?")
        assert c.recv(3) == b"ok?"
    assert hooks.wait_closed()[0].close_reason == "refused: decider failed: RuntimeError"


def test_loop_to_itself_is_refused(make_proxy: ProxyFactory, hooks: Hooks) -> None:
    holder: list[TcpProxy] = []
    proxy = make_proxy(lambda req: UpstreamPlan(holder[0].addresses[0]))
    holder.append(proxy)
    expect_reset(proxy.addresses[0])
    assert hooks.wait_closed()[0].close_reason == "refused: loop: the remote is this proxy"


def test_egress_index_finds_live_sessions(make_proxy: ProxyFactory, servers: list[Server], hooks: Hooks) -> None:
    server = serve(servers, echo)
    proxy = make_proxy(server.address)
    with connect(proxy) as c:
        c.sendall(b"a")
        assert c.recv(1) == b"a"
        (found,) = proxy.table.by_upstream(*server.address)
        assert found.remote == server.address and found.local is not None
        assert found.to_dict()["session_id"] == found.id
        assert proxy.table.by_upstream(server.address[0], server.address[1] + 1) == []
    hooks.wait_closed()
    assert proxy.table.by_upstream(*server.address) == []


def test_long_session_reports_stats(make_proxy: ProxyFactory, servers: list[Server], hooks: Hooks) -> None:
    proxy = make_proxy(serve(servers, echo).address, stats_interval=0.05)
    with connect(proxy) as c:
        c.sendall(b"abc")
        assert c.recv(3) == b"abc"
        assert hooks.wait(lambda: any(up == 3 and down == 3 for _, up, down in hooks.stats))


def test_session_close_from_outside_resets_both(make_proxy: ProxyFactory, servers: list[Server], hooks: Hooks) -> None:
    proxy = make_proxy(serve(servers, echo).address)
    with connect(proxy) as c:
        c.sendall(b"a")
        assert c.recv(1) == b"a"
        (session,) = proxy.table.sessions()
        session.close("policy changed")
        with pytest.raises(ConnectionResetError):
            recv_all(c)
    assert hooks.wait_closed()[0].close_reason == "policy changed"


def test_graceful_shutdown_drains_then_closes(servers: list[Server], hooks: Hooks) -> None:
    server = serve(servers, echo)
    proxy = TcpProxy([("127.0.0.1", 0)], lambda _r: UpstreamPlan(server.address), ProxyConfig(), hooks=hooks)
    proxy.start()
    address = proxy.addresses[0]
    live, finishing = connect(proxy), connect(proxy)
    for c in (live, finishing):
        c.sendall(b"1")
        assert c.recv(1) == b"1"
    release = threading.Event()
    done = threading.Event()

    def shut() -> None:
        release.wait(WAIT)
        proxy.shutdown(drain_timeout=0.5)
        done.set()

    threading.Thread(target=shut, daemon=True).start()
    release.set()
    assert wait_until(lambda: proxy.draining)
    with pytest.raises(ConnectionRefusedError):  # no longer accepting
        socket.create_connection(address, timeout=WAIT)
    live.sendall(b"2")  # live sessions keep working while the proxy drains
    assert live.recv(1) == b"2"
    finishing.shutdown(socket.SHUT_WR)
    assert recv_all(finishing) == b""
    assert done.wait(WAIT)
    assert recv_all(live) == b""  # the deadline passed: the proxy closed what was left
    assert sorted(hooks.reasons()) == ["closed", "shutdown"]
    assert proxy.table.active == 0 and proxy.stopped.is_set()
    live.close()
    finishing.close()


def test_ended_sessions_leave_nothing_for_the_cycle_collector(
    make_proxy: ProxyFactory, servers: list[Server], hooks: Hooks
) -> None:
    """An ended session is freed by reference counting: none of its objects waits for the cyclic garbage
    collector, whose passes would otherwise take the data thread's CPU under many short sessions."""
    import gc

    proxy = make_proxy(serve(servers, echo).address)
    sessions = 50
    gc.collect()
    gc.disable()
    try:
        for _ in range(sessions):
            with connect(proxy) as c:
                c.sendall(b"x")
                c.shutdown(socket.SHUT_WR)
                assert recv_all(c) == b"x"
        hooks.wait_closed(sessions)
        with hooks.cond:  # the test's hooks keep every session; the bus hooks keep none
            hooks.opened.clear()
            hooks.closed.clear()
        assert gc.collect() < sessions  # before: a dozen objects per session (session ↔ its closer ↔ conn)
    finally:
        gc.enable()
