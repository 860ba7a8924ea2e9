"""The UDP proxy library on loopback (no root): sessions, bursts, eviction, limits.

Without NAT the proxy has no original destination to look up, so the decider names the server. The
multi-peer case needs the kernel's NAT and conntrack and lives in test_proxy_netns.py and the lab tests.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from core.proxy import ProxyConfig, Refusal, SessionRequest, UdpProxy, UpstreamPlan
from tests.support.proxy import IPV6, WAIT, Hooks, UdpEcho, family_of, wait_until

ProxyFactory = Callable[..., UdpProxy]


@pytest.fixture
def echoes() -> Iterator[list[UdpEcho]]:
    made: list[UdpEcho] = []
    yield made
    for server in made:
        server.close()


@pytest.fixture
def make_proxy(hooks: Hooks) -> Iterator[ProxyFactory]:
    made: list[UdpProxy] = []

    def make(target: Any, ip: str = "127.0.0.1", start: bool = True, **config: Any) -> UdpProxy:
        decider = target if callable(target) else (lambda _req: UpstreamPlan(target))
        proxy = UdpProxy([(ip, 0)], decider, ProxyConfig(**config), hooks=hooks, resolver=None)
        if start:
            proxy.start()
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.shutdown(0.0)


def client(ip: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(family_of(ip), socket.SOCK_DGRAM)
    sock.bind((ip, 0))
    sock.settimeout(WAIT)
    return sock


def echo_server(echoes: list[UdpEcho], ip: str = "127.0.0.1", prefix: bytes = b"re:") -> UdpEcho:
    server = UdpEcho(ip, prefix)
    echoes.append(server)
    return server


@pytest.mark.parametrize("ip", ["127.0.0.1", IPV6])
def test_udp_echo_through_proxy(make_proxy: ProxyFactory, echoes: list[UdpEcho], hooks: Hooks, ip: str) -> None:
    server = echo_server(echoes, ip)
    proxy = make_proxy(server.address, ip=ip)
    with client(ip) as c:
        c.sendto(b"hello", proxy.addresses[0])
        data, sender = c.recvfrom(100)
        assert data == b"re:hello"
        assert sender[:2] == proxy.addresses[0]  # without NAT the answer comes from the proxy itself
        (session,) = hooks.opened
        assert server.got[0][1][:2] == session.local  # the server saw the session's upstream socket
        assert session.client == c.getsockname()[:2]
        assert (session.packets_up, session.bytes_up) == (1, 5)
        assert wait_until(lambda: session.packets_down == 1 and session.bytes_down == 8)


def test_two_clients_get_their_own_answers(make_proxy: ProxyFactory, echoes: list[UdpEcho], hooks: Hooks) -> None:
    server = echo_server(echoes)
    proxy = make_proxy(server.address)
    with client() as a, client() as b:
        for i in range(3):
            a.sendto(b"a%d" % i, proxy.addresses[0])
            b.sendto(b"b%d" % i, proxy.addresses[0])
        assert [a.recv(100) for _ in range(3)] == [b"re:a0", b"re:a1", b"re:a2"]
        assert [b.recv(100) for _ in range(3)] == [b"re:b0", b"re:b1", b"re:b2"]
    assert proxy.table.metrics()["created"] == 2
    assert len({s.local for s in hooks.opened}) == 2  # one upstream socket per session


def test_burst_of_first_packets_makes_one_session(
    make_proxy: ProxyFactory, echoes: list[UdpEcho], hooks: Hooks
) -> None:
    server = echo_server(echoes)
    proxy = make_proxy(server.address, start=False)  # bound, not yet reading: the burst queues up
    with client() as c:
        burst = [b"packet-%02d" % i for i in range(40)]
        for datagram in burst:
            c.sendto(datagram, proxy.addresses[0])
        proxy.start()
        assert server.wait_for(len(burst))
        assert [data for data, _ in server.got] == burst  # all of them, in order
        assert len({sender for _, sender in server.got}) == 1  # from one upstream socket
        assert sorted(c.recv(100) for _ in burst) == sorted(b"re:" + d for d in burst)
    assert proxy.table.metrics()["created"] == 1
    assert len(hooks.opened) == 1


def test_idle_session_is_evicted_and_a_new_one_follows(
    make_proxy: ProxyFactory, echoes: list[UdpEcho], hooks: Hooks
) -> None:
    server = echo_server(echoes)
    proxy = make_proxy(server.address, udp_idle_timeout=0.3)
    with client() as c:
        c.sendto(b"one", proxy.addresses[0])
        assert c.recv(100) == b"re:one"
        (first,) = hooks.wait_closed()
        assert first.close_reason == "idle"
        assert proxy.table.active == 0
        c.sendto(b"two", proxy.addresses[0])
        assert c.recv(100) == b"re:two"
    assert proxy.table.metrics()["created"] == 2
    assert hooks.opened[1].local != first.local  # a fresh upstream socket


def test_udp_session_limit_refuses_and_counts(make_proxy: ProxyFactory, echoes: list[UdpEcho], hooks: Hooks) -> None:
    server = echo_server(echoes)
    proxy = make_proxy(server.address, max_sessions=2)
    with client() as a, client() as b, client() as c:
        for sock in (a, b):
            sock.sendto(b"in", proxy.addresses[0])
            assert sock.recv(100) == b"re:in"
        for _ in range(3):
            c.sendto(b"over", proxy.addresses[0])
        a.sendto(b"still", proxy.addresses[0])  # handled after c's datagrams: they were refused first
        assert a.recv(100) == b"re:still"
    assert [data for data, _ in server.got].count(b"over") == 0
    assert proxy.table.metrics() == {"active": 2, "created": 2, "closed": 0, "refused": 1}
    assert hooks.reasons() == ["refused: session limit 2 reached"]


def test_udp_decider_refusal_and_failure_keep_serving(
    make_proxy: ProxyFactory, echoes: list[UdpEcho], hooks: Hooks
) -> None:
    server = echo_server(echoes)
    refused_port: list[int] = []

    def decide(req: SessionRequest) -> UpstreamPlan | Refusal:
        if not refused_port:
            refused_port.append(req.client[1])
            return Refusal("no")
        if req.client[1] == refused_port[0]:
            raise AssertionError("a refused flow must not be asked again at once")
        if len(refused_port) == 1:
            refused_port.append(0)
            raise RuntimeError("boom")
        return UpstreamPlan(server.address)

    proxy = make_proxy(decide)
    with client() as refused, client() as failing, client() as fine:
        refused.sendto(b"x", proxy.addresses[0])
        refused.sendto(b"x", proxy.addresses[0])
        failing.sendto(b"y", proxy.addresses[0])
        fine.sendto(b"z", proxy.addresses[0])
        assert fine.recv(100) == b"re:z"
    assert hooks.reasons() == ["refused: no", "refused: decider failed: RuntimeError"]
    assert [data for data, _ in server.got] == [b"z"]


def test_udp_drain_keeps_live_sessions_and_refuses_new_flows(echoes: list[UdpEcho], hooks: Hooks) -> None:
    server = echo_server(echoes)
    proxy = UdpProxy([("127.0.0.1", 0)], lambda _r: UpstreamPlan(server.address), hooks=hooks, resolver=None)
    proxy.start()
    done = threading.Event()
    with client() as live, client() as late:
        live.sendto(b"hi", proxy.addresses[0])
        assert live.recv(100) == b"re:hi"
        threading.Thread(target=lambda: (proxy.shutdown(0.5), done.set()), daemon=True).start()
        assert wait_until(lambda: proxy.draining)
        live.sendto(b"still", proxy.addresses[0])  # answers still come back while draining
        assert live.recv(100) == b"re:still"
        late.sendto(b"new", proxy.addresses[0])
        assert done.wait(WAIT)
    assert hooks.reasons() == ["shutdown"]
    assert b"new" not in [data for data, _ in server.got]
    assert proxy.table.active == 0 and proxy.stopped.is_set()


def test_a_session_whose_app_socket_had_closed_carries_no_later_socket(hooks: Hooks, echoes: list[UdpEcho]) -> None:
    """The app sent and closed before the proxy read its datagram (a loaded proxy): that datagram is its own
    and goes out; a socket found on the same addresses later reused the port, so its datagram is dropped."""
    server = echo_server(echoes)
    owner = {"cookie": 0}  # no socket: the app is gone
    plan = lambda _req: UpstreamPlan(server.address)  # noqa: E731
    check = lambda _client, _dst: owner["cookie"]  # noqa: E731
    proxy = UdpProxy([("127.0.0.1", 0)], plan, ProxyConfig(), hooks=hooks, resolver=None, socket_check=check)
    proxy.start()
    try:
        with client() as c:
            c.sendto(b"last words", proxy.addresses[0])
            assert c.recvfrom(100)[0] == b"re:last words"
            owner["cookie"] = 12  # another app's socket on the same port, sending down the same entry
            c.sendto(b"reused", proxy.addresses[0])
            assert wait_until(lambda: proxy.counters().get("dropped_other_socket") == 1)
        assert [data for data, _addr in server.got] == [b"last words"]
    finally:
        proxy.shutdown(0.0)


def test_a_session_only_carries_the_socket_its_flow_was_decided_for(hooks: Hooks, echoes: list[UdpEcho]) -> None:
    """Another socket's datagrams on the same addresses (a reused port) are dropped and the session closed; a
    socket check that cannot answer drops too: "cannot tell" never sends anything out of the split path."""
    server = echo_server(echoes)
    owner = {"cookie": 11}

    def check(_client: Any, _dst: Any) -> int:
        if owner["cookie"] < 0:
            raise OSError(110, "sock_diag did not answer in time")
        return owner["cookie"]

    plan = lambda _req: UpstreamPlan(server.address)  # noqa: E731
    proxy = UdpProxy([("127.0.0.1", 0)], plan, ProxyConfig(), hooks=hooks, resolver=None, socket_check=check)
    proxy.start()
    try:
        with client() as c:
            c.sendto(b"one", proxy.addresses[0])
            assert c.recvfrom(100)[0] == b"re:one"
            owner["cookie"] = 12  # another socket now sends from the same address
            c.sendto(b"two", proxy.addresses[0])
            assert wait_until(lambda: proxy.counters().get("dropped_other_socket") == 1)
            assert wait_until(lambda: bool(hooks.closed))  # the proxy's thread closes it right after counting
            assert "client socket replaced" in hooks.closed[0].close_reason
        owner["cookie"] = -1  # the check fails for another client's new flow: dropped as well
        with client() as c2:
            c2.sendto(b"three", proxy.addresses[0])
            assert wait_until(lambda: proxy.counters().get("dropped_unverified") == 1)
        assert [data for data, _addr in server.got] == [b"one"]  # nothing else ever reached the server
    finally:
        proxy.shutdown(0.0)


def test_a_flow_is_carried_only_for_the_socket_the_interceptor_decided_it_for(
    hooks: Hooks, echoes: list[UdpEcho]
) -> None:
    """The interceptor names the socket a split flow was decided for (the redirect table). The socket found
    when the first datagram arrives is not enough: the decided app may have given up and closed before a
    loaded proxy read its datagram, and another app (to stay in the VPN) may already hold the port and send
    down the same entry. Only the named socket's datagrams go out, or the named socket's last words when no
    socket is left; a socket the interceptor gives the flow to later is carried; nothing named, nothing out."""
    server = echo_server(echoes)
    found = {"cookie": 12}  # the socket on the app's port as the proxy reads the datagram
    named: dict[str, int | None] = {"cookie": 11}  # what the interceptor published
    plan = lambda _req: UpstreamPlan(server.address)  # noqa: E731
    proxy = UdpProxy([("127.0.0.1", 0)], plan, ProxyConfig(), hooks=hooks, resolver=None,
                     socket_check=lambda _c, _d: found["cookie"], owners=lambda _c, _d: named["cookie"])  # fmt: skip
    proxy.start()
    try:
        with client() as c:  # 11 closed, 12 (another app) holds the port: dropped, session closed
            c.sendto(b"vpn app", proxy.addresses[0])
            assert wait_until(lambda: proxy.counters().get("dropped_other_socket") == 1)
            assert wait_until(lambda: bool(hooks.closed)) and "replaced" in hooks.closed[0].close_reason
        with client() as c:  # the named socket itself, then gone (its last datagram), then another one
            found["cookie"] = 11
            c.sendto(b"one", proxy.addresses[0])
            assert c.recvfrom(100)[0] == b"re:one"
            found["cookie"] = 0
            c.sendto(b"last", proxy.addresses[0])
            assert c.recvfrom(100)[0] == b"re:last"
            found["cookie"], named["cookie"] = 13, 13  # the interceptor gave the flow to 13 (same verdict)
            c.sendto(b"taken over", proxy.addresses[0])
            assert c.recvfrom(100)[0] == b"re:taken over"
            found["cookie"] = 14  # not given to 14
            c.sendto(b"other", proxy.addresses[0])
            assert wait_until(lambda: proxy.counters().get("dropped_other_socket") == 2)
        named["cookie"] = None  # nothing published for a new flow: whose it is cannot be known
        with client() as c:
            c.sendto(b"unknown", proxy.addresses[0])
            assert wait_until(lambda: proxy.counters().get("dropped_unknown_owner") == 1)
        named["cookie"], found["cookie"] = 0, 15  # any socket will do (the process did not decide)
        with client() as c:
            c.sendto(b"any", proxy.addresses[0])
            assert c.recvfrom(100)[0] == b"re:any"
        assert [data for data, _addr in server.got] == [b"one", b"last", b"taken over", b"any"]
    finally:
        proxy.shutdown(0.0)


class PreexistingFlows:
    """A conntrack resolver whose flows all carried replies already (begun under an earlier proxy instance)."""

    def __init__(self, dst: tuple[str, int]) -> None:
        self.dst = dst
        self.forgotten: list[tuple[Any, Any]] = []

    def __call__(self, client: Any, _listen: Any) -> tuple[Any, Any, int, bool]:
        return client, self.dst, 1719, True

    def forget(self, client: Any, dst: Any) -> bool:
        self.forgotten.append((client, dst))
        return True

    def close(self) -> None:
        pass


def test_a_flow_older_than_its_session_is_dropped_and_decided_afresh(hooks: Hooks, echoes: list[UdpEcho]) -> None:
    """After a restart the proxy cannot know which socket an old flow was decided for (another app may have
    reused the port since): its datagram never leaves, and the entry goes so the next one is decided again."""
    server = echo_server(echoes)
    flows = PreexistingFlows(server.address)
    plan = lambda _req: UpstreamPlan(server.address)  # noqa: E731
    proxy = UdpProxy([("127.0.0.1", 0)], plan, ProxyConfig(), hooks=hooks, resolver=flows, socket_check=lambda c, d: 11)
    proxy.start()
    try:
        with client() as c:
            c.sendto(b"old flow", proxy.addresses[0])
            assert wait_until(lambda: proxy.counters().get("dropped_unknown_owner") == 1)
            assert flows.forgotten and flows.forgotten[0][1] == server.address
        assert server.got == [] and not hooks.opened
    finally:
        proxy.shutdown(0.0)
