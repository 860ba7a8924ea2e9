"""The proxies with the real kernel NAT, in a private network namespace (root).

One namespace holds everything: an app's socket, the DNAT rules (as the interceptor will install them:
here by hand with iptables-legacy), the proxy, and "peers" on addresses of the namespace's loopback.
The proxy's upstream sockets carry the split-egress mark, which the DNAT rule skips, so the upstream
really reaches the peer instead of looping back to the proxy.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from core.proxy import (
    Binding,
    ProxyConfig,
    Refusal,
    SessionRequest,
    TcpProxy,
    UdpProxy,
    UpstreamPlan,
)
from kernel.routing import SplitRoute, SplitRouting
from messages import Mark
from tests.support.proxy import WAIT, Hooks, InNetns, Server, UdpEcho, echo, recv_all, wait_until

PEERS = {4: ["203.0.113.80", "203.0.113.81", "203.0.113.82"], 6: ["2001:db8:30::80", "2001:db8:30::81"]}
PROXY = {4: "127.0.0.17", 6: "::1"}
APP = {4: "192.0.2.10", 6: "2001:db8:10::10"}  # one source address, as with a real uplink or tunnel
PORT = 7190


def run(ns: str, *argv: str) -> str:
    done = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


@pytest.fixture
def nat_ns(netns: str) -> str:
    """The namespace with peer addresses and DNAT of their traffic (except marked upstreams) to the proxy."""
    for family, addrs in PEERS.items():
        for addr in [*addrs, APP[family]]:
            run(netns, "ip", f"-{family}", "addr", "add", addr, "dev", "lo")
    for family, tool in ((4, "iptables-legacy"), (6, "ip6tables-legacy")):
        proxy = PROXY[family] if family == 4 else f"[{PROXY[family]}]"
        for proto in ("tcp", "udp"):
            for addr in PEERS[family]:
                run(netns, tool, "-w", "-t", "nat", "-A", "OUTPUT", "-p", proto, "-d", addr,
                    "-m", "mark", "!", "--mark", str(int(Mark.SPLIT_EGRESS)),
                    "-j", "DNAT", "--to-destination", f"{proxy}:{PORT}")  # fmt: skip
    return netns


@pytest.fixture
def inside(nat_ns: str) -> Iterator[InNetns]:
    ns = InNetns(nat_ns)
    yield ns
    ns.close()


def to_original(req: SessionRequest) -> UpstreamPlan | Refusal:
    if req.orig_dst is None:
        return Refusal("no original destination")
    return UpstreamPlan(req.orig_dst, Binding(mark=Mark.SPLIT_EGRESS), extra={"why": "test"})


@pytest.fixture
def cleanup() -> Iterator[list[Any]]:
    things: list[Any] = []
    yield things
    for thing in reversed(things):
        if isinstance(thing, (TcpProxy, UdpProxy)):
            thing.shutdown(0.0)
        else:
            thing.close()


@pytest.mark.parametrize("family", [4, 6])
def test_udp_one_socket_many_peers_each_answer_from_its_peer(
    inside: InNetns, cleanup: list[Any], hooks: Hooks, family: int
) -> None:
    """Portmaster's proxy breaks here: one app socket, several peers. Each reply must come back from
    the peer it answers, to the app's own port, and each peer must hear only its own datagrams."""
    fam = socket.AF_INET6 if family == 6 else socket.AF_INET
    peers = PEERS[family][:2]
    servers = [inside.call(lambda a=a: UdpEcho(a, f"{a} says ".encode(), 5300)) for a in peers]
    cleanup.extend(servers)
    proxy = inside.call(lambda: UdpProxy([(PROXY[family], PORT)], to_original, hooks=hooks))
    cleanup.append(proxy)
    inside.call(proxy.start)  # its data thread must be born inside the namespace
    app = inside.call(socket.socket, fam, socket.SOCK_DGRAM)
    cleanup.append(app)
    app.settimeout(WAIT)
    app.bind((APP[family], 0))
    for round_ in range(3):
        for peer in peers:
            app.sendto(f"{round_} to {peer}".encode(), (peer, 5300))
    answers = [app.recvfrom(200) for _ in range(6)]
    for data, sender in answers:
        peer = sender[0]
        assert data.startswith(f"{peer} says ".encode()) and data.endswith(f"to {peer}".encode())
        assert sender[1] == 5300
    for peer, server in zip(peers, servers, strict=True):
        assert sorted(d for d, _ in server.got) == [f"{r} to {peer}".encode() for r in range(3)]
    assert proxy.table.metrics()["created"] == 2
    app_port = app.getsockname()[1]
    assert sorted(s.split_key for s in hooks.opened) == sorted(
        f"udp {_ep(_app_ip(s), app_port)} {_ep(peer, 5300)}" for s, peer in zip(hooks.opened, peers, strict=True)
    )
    seen_ports = {s.client[1] for s in hooks.opened}
    assert len(seen_ports) == 2 and app_port in seen_ports  # the kernel remapped the second flow's port
    assert {s.orig_client[1] for s in hooks.opened} == {app_port}


def test_udp_stale_mapping_is_rechecked_before_use(inside: InNetns, cleanup: list[Any], hooks: Hooks) -> None:
    """A conntrack entry deleted under a live session frees the seen port for another peer; the proxy must
    notice before it forwards that peer's datagrams to the old one."""
    first, second, third = PEERS[4]
    servers = {a: inside.call(lambda a=a: UdpEcho(a, f"{a} says ".encode(), 5300)) for a in PEERS[4]}
    cleanup.extend(servers.values())
    proxy = inside.call(
        lambda: UdpProxy([(PROXY[4], PORT)], to_original, ProxyConfig(udp_revalidate=0.05), hooks=hooks)
    )
    cleanup.append(proxy)
    inside.call(proxy.start)  # its data thread must be born inside the namespace
    app = inside.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    cleanup.append(app)
    app.settimeout(WAIT)
    app.bind((APP[4], 0))
    for peer in (first, second):
        app.sendto(b"hello", (peer, 5300))
        assert app.recvfrom(200)[1][0] == peer
    run(inside.name, "conntrack", "-D", "-p", "udp", "--orig-dst", first)
    assert wait_until(lambda: all(c.check for c in proxy.conns.values()))
    app.sendto(b"hello", (third, 5300))  # takes the freed port as the proxy sees it
    data, sender = app.recvfrom(200)
    assert sender == (third, 5300) and data == f"{third} says hello".encode()
    assert [d for d, _ in servers[first].got] == [b"hello"]
    assert "flow replaced: conntrack mapping changed" in hooks.reasons()


@pytest.mark.parametrize("family", [4, 6])
def test_tcp_original_destination_from_the_kernel(
    inside: InNetns, cleanup: list[Any], hooks: Hooks, family: int
) -> None:
    fam = socket.AF_INET6 if family == 6 else socket.AF_INET
    peers = PEERS[family][:2]
    servers = []
    for peer in peers:
        sock = inside.call(socket.socket, fam, socket.SOCK_STREAM)
        servers.append(Server(peer, lambda c, p=peer: (c.sendall(f"{p}\n".encode()), echo(c)), sock=_bindable(sock)))
    cleanup.extend(servers)
    proxy = inside.call(lambda: TcpProxy([(PROXY[family], PORT)], to_original, hooks=hooks))
    cleanup.append(proxy)
    inside.call(proxy.start)  # its data thread must be born inside the namespace
    for peer, server in zip(peers, servers, strict=True):
        app = inside.call(socket.socket, fam, socket.SOCK_STREAM)
        with app:
            app.settimeout(WAIT)
            app.connect((peer, server.address[1]))  # DNAT'd to the proxy
            app.sendall(b"data")
            app.shutdown(socket.SHUT_WR)
            assert recv_all(app) == f"{peer}\ndata".encode()
    closed = hooks.wait_closed(2)
    assert [s.orig_dst for s in closed] == [(p, s.address[1]) for p, s in zip(peers, servers, strict=True)]
    assert all(s.extra == {"why": "test"} and s.split_key.startswith("tcp ") for s in closed)


def test_routing_installs_and_removes_idempotently(netns: str) -> None:
    run(netns, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
    run(netns, "ip", "link", "set", "eth0", "up")
    run(netns, "ip", "link", "set", "eth1", "up")
    run(netns, "ip", "addr", "add", "192.0.2.10/26", "dev", "eth0")
    run(netns, "ip", "-6", "addr", "add", "2001:db8:10::10/64", "dev", "eth0", "nodad")
    routing = SplitRouting(netns=netns)
    routes = [SplitRoute(4, "eth0", "192.0.2.1"), SplitRoute(6, "eth0", "2001:db8:10::1")]
    assert routing.apply(routes)  # first time: changes
    assert routing.apply(routes) == []  # second time: nothing to do
    assert "1720:\tfrom all fwmark 0x6b8 lookup 1720" in run(netns, "ip", "-4", "rule")
    assert "1720:\tfrom all fwmark 0x6b8 lookup 1720" in run(netns, "ip", "-6", "rule")
    assert "default via 192.0.2.1 dev eth0" in run(netns, "ip", "-4", "route", "show", "table", "1720")
    assert "default via 2001:db8:10::1 dev eth0" in run(netns, "ip", "-6", "route", "show", "table", "1720")
    changes = routing.apply([SplitRoute(4, "eth0", "192.0.2.2")])  # the gateway moved; IPv6 gone
    assert any("192.0.2.2" in c for c in changes)
    assert run(netns, "ip", "-4", "route", "show", "table", "1720").split()[:3] == ["default", "via", "192.0.2.2"]
    assert run(netns, "ip", "-6", "route", "show", "table", "1720").strip() == ""
    assert routing.remove() and routing.remove() == []
    assert "1720" not in run(netns, "ip", "-4", "rule") + run(netns, "ip", "-6", "rule")


def _bindable(sock: socket.socket) -> socket.socket:
    return sock


def _ep(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _app_ip(session: Any) -> str:
    return session.orig_client[0]


PORT_CLASH_SCRIPT = """
import socket, sys
from core.proxy.decider import Binding
from core.proxy.upstream import open_upstream
from messages import Mark
up = open_upstream(socket.SOCK_STREAM, ("192.0.2.1", 80), Binding("eth0", "192.0.2.10", int(Mark.SPLIT_EGRESS)))
up.setblocking(True)
up.connect(("192.0.2.1", 80))
app = socket.socket()  # an app on the split interface's address (VPN down): no device, no bind
try:
    app.connect(("192.0.2.1", 80))
except OSError as exc:
    print("app refused:", exc.strerror)
    sys.exit(0)
print("app got", app.getsockname()[1], "upstream has", up.getsockname()[1])
sys.exit(1 if app.getsockname() == up.getsockname() else 0)
"""


def test_an_app_never_gets_the_port_an_upstream_holds(host_ns: str) -> None:
    """Device-bound sockets are invisible to an unbound socket's 4-tuple check; a port the upstream bound
    itself is not (connect() skips explicitly bound ports). One ephemeral port makes a clash certain."""
    gateway = f"{host_ns}-gw"
    server = subprocess.Popen(["ip", "netns", "exec", gateway, sys.executable, "-c",
                               "import socket,time; s=socket.socket(); s.bind(('192.0.2.1', 80)); s.listen(8);"
                               " time.sleep(30)"])  # fmt: skip
    try:
        run(host_ns, "sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40000")
        for _ in range(50):
            probe = subprocess.run(["ip", "netns", "exec", gateway, "ss", "-Htln", "sport = :80"],
                                   capture_output=True, text=True)  # fmt: skip
            if probe.stdout.strip():
                break
            time.sleep(0.1)
        done = subprocess.run(["ip", "netns", "exec", host_ns, sys.executable, "-c", PORT_CLASH_SCRIPT],
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        server.kill()
        server.wait()
