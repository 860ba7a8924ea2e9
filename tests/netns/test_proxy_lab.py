"""Split connections in the lab: DNAT'd from the host namespace, out through the ISP while the VPN owns
the default route, in both routing styles; and the proxy actors end to end on the bus.

The interceptor is not here yet, so these tests install its nat OUTPUT DNAT rules by hand inside the lab's
host namespace (iptables-legacy). Like the interceptor's (which match the app's mark 1719), they never match
the proxies' own upstream sockets (mark 1720). The split policy routing is not the proxies' either (the
interceptor keeps it under supervisord): each fixture applies the shared `SplitRouting` itself. The inet
servers answer with the source address they saw: 192.0.2.10 = ISP path (split), 198.51.100.2 = VPN path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq

from core.egress import plan_routes, split_routes
from core.proxy import SplitDecider, TcpProxy, UdpProxy, static_egress
from kernel.routing import SplitRouting
from messages import Mark, NetenvChanged, PolicySnapshot, ProxySessionClose, ProxySessionOpen
from messages.events import GatewayRecord, InterfaceRecord
from runtime import paths
from runtime.transport import Publisher, Subscriber, request
from splittun.lab import Lab
from splittun.lab import topology as T
from tests.support.lab import Leaks, own_lab
from tests.support.proxy import WAIT, Hooks, InNetns, wait_until

ISP = {4: T.HOST_V4, 6: T.HOST_V6}
VPN = {4: T.VPNSRV_V4, 6: T.VPNSRV_V6}
SPLIT = {4: T.SERVER_V4[0], 6: T.SERVER_V6[0]}  # .80: split (TCP and UDP)
OTHER = {4: T.SERVER_V4[1], 6: T.SERVER_V6[1]}  # .81: split for UDP only (multi-peer); TCP stays in the VPN
TUNNEL = {4: T.TUN_HOST_V4, 6: T.TUN_HOST_V6}
PROXY = {4: "127.0.0.17", 6: "[::1]"}
PORT = 719


def egress() -> Any:
    return static_egress(T.HOST_IF, source4=T.HOST_V4, gateway4=T.ISP_LAN_V4,
                         source6=T.HOST_V6, gateway6=T.ISP_LAN_V6)  # fmt: skip


def dnat(lab: Lab, add: bool) -> None:
    """The interceptor's job, by hand: send the split destinations to the proxies (never their upstreams)."""
    for family, tool in ((4, "iptables-legacy"), (6, "ip6tables-legacy")):
        if not add:
            lab.exec("host", [tool, "-w", "-t", "nat", "-F", "OUTPUT"], check=True)
            continue
        flows = [("tcp", SPLIT[family], T.WHOAMI_TCP_PORT)]
        flows += [("udp", dst, T.WHOAMI_UDP_PORT) for dst in (SPLIT[family], OTHER[family])]
        for proto, dst, port in flows:
            lab.exec("host", [tool, "-w", "-t", "nat", "-A", "OUTPUT", "-p", proto, "-d", dst, "--dport", str(port),
                              "-m", "mark", "!", "--mark", str(int(Mark.SPLIT_EGRESS)),
                              "-j", "DNAT", "--to-destination", f"{PROXY[family]}:{PORT}"], check=True)  # fmt: skip


@pytest.fixture(scope="module")
def px_lab() -> Iterator[Lab]:
    yield from own_lab("px")


@dataclass
class Split:
    lab: Lab
    style: str
    inside: InNetns
    hooks: Hooks
    tcp: TcpProxy
    udp: UdpProxy


@pytest.fixture(scope="class", params=["replaced", "wgquick"])
def split(request: pytest.FixtureRequest, px_lab: Lab) -> Iterator[Split]:
    """The library proxies (in-process, living in the host namespace) with policy routing and DNAT."""
    dnat(px_lab, add=False)
    px_lab.set_style(request.param)  # probes the VPN path: only with no DNAT in place
    inside = InNetns(px_lab.ns_host)
    routing = SplitRouting(netns=px_lab.ns_host)
    hooks = Hooks()
    listen = [("127.0.0.17", PORT), ("::1", PORT)]
    proxies: list[Any] = []
    try:
        routing.apply(plan_routes(egress().all()))
        for cls in (TcpProxy, UdpProxy):
            proxy = inside.call(lambda cls=cls: cls(listen, SplitDecider(egress()), hooks=hooks))
            proxies.append(proxy)
            inside.call(proxy.start)
        dnat(px_lab, add=True)
        yield Split(px_lab, request.param, inside, hooks, proxies[0], proxies[1])
    finally:
        dnat(px_lab, add=False)
        for proxy in proxies:
            proxy.shutdown(0.0)
        routing.remove()
        inside.close()


class TestSplitInLab:
    """The library proxies in each routing style (torn down before the actors below take port 719)."""

    @pytest.mark.parametrize("family", [4, 6])
    @pytest.mark.parametrize("proto", ["tcp", "udp"])
    def test_split_destination_leaves_through_isp(self, split: Split, leaks: Leaks, proto: str, family: int) -> None:
        port = T.WHOAMI_TCP_PORT if proto == "tcp" else T.WHOAMI_UDP_PORT
        leaks.allow(SPLIT[family], proto, port)
        assert split.lab.whoami(proto=proto, family=family, target=SPLIT[family]) == ISP[family]
        sessions = [s for s in split.hooks.opened if s.protocol == proto and s.orig_dst == (SPLIT[family], port)]
        assert sessions and all(s.interface == T.HOST_IF and s.local[0] == ISP[family] for s in sessions)
        assert sessions[-1].orig_client[0] == TUNNEL[family]  # the app's source: the VPN owns the default route

    @pytest.mark.parametrize("family", [4, 6])
    def test_other_destinations_stay_in_the_vpn(self, split: Split, family: int) -> None:
        assert split.lab.whoami(proto="tcp", family=family, target=OTHER[family]) == VPN[family]

    @pytest.mark.parametrize("family", [4, 6])
    def test_udp_one_socket_two_peers_in_the_lab(self, split: Split, leaks: Leaks, family: int) -> None:
        leaks.allow(SPLIT[family], "udp", T.WHOAMI_UDP_PORT)  # both peers are DNAT'd to the proxy
        leaks.allow(OTHER[family], "udp", T.WHOAMI_UDP_PORT)
        fam = socket.AF_INET6 if family == 6 else socket.AF_INET
        app = split.inside.call(socket.socket, fam, socket.SOCK_DGRAM)
        with app:
            app.settimeout(WAIT)
            for peer in (SPLIT[family], OTHER[family], SPLIT[family]):
                app.sendto(b"who am i", (peer, T.WHOAMI_UDP_PORT))
            answers = sorted(app.recvfrom(100) for _ in range(3))
        peers = sorted([SPLIT[family], OTHER[family], SPLIT[family]])
        assert [sender[:2] for _, sender in answers] == [(p, T.WHOAMI_UDP_PORT) for p in peers]
        assert {data for data, _ in answers} == {f"{ISP[family]}\n".encode()}

    def test_egress_lookup_finds_the_proxied_connection(self, split: Split, leaks: Leaks) -> None:
        leaks.allow(SPLIT[4], "tcp", T.WHOAMI_TCP_PORT)
        app = split.inside.call(socket.create_connection, (SPLIT[4], T.WHOAMI_TCP_PORT), WAIT)
        with app:
            app.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # keep-alive: the session stays up
            assert app.recv(4096).endswith(f"{ISP[4]}\n".encode())
            (found,) = split.tcp.table.by_upstream(SPLIT[4], T.WHOAMI_TCP_PORT)
            assert found.local[0] == ISP[4] and found.client == app.getsockname()[:2]


# --- the actors, end to end --------------------------------------------------------------------------


def lab_netenv() -> NetenvChanged:
    """What netenv reports for the lab host (replaced style: the VPN owns the default route)."""
    return NetenvChanged(
        seq=1,
        ts=time.time(),
        interfaces=[
            InterfaceRecord(
                name=T.HOST_IF,
                index=T.IFINDEX["host:eth0"],
                is_physical=True,
                addresses=[f"{T.HOST_V4}/26", f"{T.HOST_V6}/64"],
                ipv4=T.HOST_V4,
                ipv6=T.HOST_V6,
            ),
            InterfaceRecord(
                name=T.TUN_HOST_IF,
                index=99,
                kind="tunnel",
                flags=["UP", "POINTOPOINT"],
                addresses=[f"{T.TUN_HOST_V4}/32"],
                ipv4=T.TUN_HOST_V4,
                ipv6=T.TUN_HOST_V6,
            ),
        ],
        gateways=[
            GatewayRecord(gateway=T.ISP_LAN_V4, interface=T.HOST_IF, family=4),
            GatewayRecord(gateway=T.ISP_LAN_V6, interface=T.HOST_IF, family=6),
        ],
        uplink_ipv4=T.HOST_IF,
        uplink_ipv6=T.HOST_IF,
    )


@pytest.fixture
def actors(px_lab: Lab) -> Iterator[tuple[Lab, Path]]:
    """bus + proxy_tcp_00 + proxy_udp_00 as processes in the lab host, with the split routing for the lab's
    network (as the interceptor would keep it); always stopped and cleaned."""
    dnat(px_lab, add=False)
    px_lab.set_style("replaced")
    routing = SplitRouting(netns=px_lab.ns_host)
    routing.apply(split_routes(lab_netenv(), PolicySnapshot(version=1, ts=time.time(), enabled=True)) or [])
    run_dir = Path(tempfile.mkdtemp(prefix="pxrun-", dir="/tmp"))
    env = {**os.environ, "SPLITTUN_RUN_DIR": str(run_dir)}
    procs: list[subprocess.Popen[bytes]] = []
    logs = contextlib.ExitStack()

    def start(*argv: str) -> None:
        log = logs.enter_context(open(run_dir / f"{argv[0].split('.')[-1]}.log", "ab"))  # noqa: SIM115
        procs.append(px_lab.popen("host", [sys.executable, "-m", *argv], env=env, stdout=log, stderr=log))

    try:
        start("runtime.bus")
        assert wait_until(lambda: (run_dir / "bus-in.sock").exists())
        start("actors.proxy_tcp", "--instance", "proxy_tcp_00")
        start("actors.proxy_udp", "--instance", "proxy_udp_00")
        assert wait_until(lambda: all((run_dir / f"proxy_{p}_00.ctl.sock").exists() for p in ("tcp", "udp")))
        dnat(px_lab, add=True)
        yield px_lab, run_dir
    finally:
        dnat(px_lab, add=False)
        for proc in procs[::-1]:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        logs.close()
        removed = routing.remove()
        shutil.rmtree(run_dir, ignore_errors=True)
        assert len(removed) == 4, f"a proxy's stop took away (some of) the split routing: removed now {removed}"


def ask(run_dir: Path, worker: str, op: str, **args: Any) -> Any:
    return request(paths.actor_endpoint(run_dir, worker), op, args, timeout=WAIT, who=worker)


def test_actors_split_and_report_on_the_bus(actors: tuple[Lab, Path], leaks: Leaks) -> None:
    lab, run_dir = actors
    leaks.allow(SPLIT[4], "tcp", T.WHOAMI_TCP_PORT)
    leaks.allow(SPLIT[6], "udp", T.WHOAMI_UDP_PORT)
    ctx = zmq.Context()
    pub = Publisher(ctx, paths.bus_in(run_dir))
    sub = Subscriber(ctx, paths.bus_out(run_dir), ["proxy.session."])
    try:
        # Until netenv speaks, a worker has no egress and refuses; publish (again) until both have one.
        def ready() -> bool:
            pub.publish(PolicySnapshot(version=1, ts=time.time(), enabled=True, interface=""))
            pub.publish(lab_netenv())
            return all(
                ask(run_dir, w, "status")["egress"]["ipv4"].startswith(f"{T.HOST_IF} src {T.HOST_V4}")
                for w in ("proxy_tcp_00", "proxy_udp_00")
            )

        assert wait_until(ready)
        assert lab.whoami(proto="tcp", target=SPLIT[4]) == ISP[4]
        assert lab.whoami(proto="udp", family=6, target=SPLIT[6]) == ISP[6]
        events: dict[str, list[Any]] = {}

        def collect() -> bool:
            while (msg := sub.recv(timeout=0.05)) is not None:
                events.setdefault(msg.wire_topic(), []).append(msg)
                if isinstance(msg, ProxySessionClose) and msg.opened is not None:  # a short session: one message
                    events.setdefault("proxy.session.open", []).append(msg.opened)
            return bool(events.get("proxy.session.close")) and len(events.get("proxy.session.open", [])) >= 2

        assert wait_until(collect)
        opened = {m.protocol: m for m in events["proxy.session.open"] if isinstance(m, ProxySessionOpen)}
        tcp, udp = opened["tcp"], opened["udp"]
        assert (tcp.client_ip, tcp.orig_dst_ip, tcp.orig_dst_port) == (T.TUN_HOST_V4, SPLIT[4], T.WHOAMI_TCP_PORT)
        assert tcp.split_key == f"tcp {T.TUN_HOST_V4}:{tcp.client_port} {SPLIT[4]}:{T.WHOAMI_TCP_PORT}"
        assert (tcp.local_ip, tcp.interface, tcp.worker) == (ISP[4], T.HOST_IF, "proxy_tcp_00")
        assert (tcp.remote_ip, tcp.remote_port) == (SPLIT[4], T.WHOAMI_TCP_PORT)
        assert (udp.local_ip, udp.orig_dst_ip) == (ISP[6], SPLIT[6])
        closed = [m for m in events["proxy.session.close"] if isinstance(m, ProxySessionClose)]
        (tcp_close,) = [m for m in closed if m.session_id == tcp.session_id]
        assert tcp_close.reason == "closed" and tcp_close.counters.bytes_up > 0 and tcp_close.counters.bytes_down > 0
        # egress lookup over request/reply while a connection is up
        app = InNetns(lab.ns_host)
        try:
            sock = app.call(socket.create_connection, (SPLIT[4], T.WHOAMI_TCP_PORT), WAIT)
            with sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert sock.recv(4096).endswith(f"{ISP[4]}\n".encode())
                (found,) = ask(run_dir, "proxy_tcp_00", "egress", ip=SPLIT[4], port=T.WHOAMI_TCP_PORT)
                assert found["local"][0] == ISP[4] and found["client"] == list(sock.getsockname()[:2])
                assert ask(run_dir, "proxy_tcp_00", "egress", ip=SPLIT[4], port=1) == []
        finally:
            app.close()
    finally:
        sub.close()
        pub.close()
        ctx.term()
