"""Small programs the proxy benchmark runs inside lab namespaces: `python -m bench.proxy_tools CMD`.

- `hold-server IP PORT`: accept TCP connections and keep them open, idle (memory per session).
- `tcp-holders IP PORT N`: open N connections, say "ready", hold them until stdin closes.
- `udp-flows IP PORT N`: prepare N UDP sockets, say "ready", on a line from stdin send one datagram from
  each (N new flows in one burst), say "sent", then wait for stdin to close.
- `drain ENDPOINT`: subscribe to proxy.session.* on the bus and count events until stdin closes (what the
  controller does in production), printing the count.
"""

from __future__ import annotations

import resource
import select
import socket
import sys

import zmq


def _fds(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, n + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def hold_server(ip: str, port: int) -> None:
    _fds(1 << 16)
    srv = socket.socket(_family(ip), socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((ip, port))
    srv.listen(4096)
    held = []
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        held.append(conn)


def tcp_holders(ip: str, port: int, n: int) -> None:
    _fds(n)
    held = []
    for _ in range(n):
        s = socket.create_connection((ip, port), timeout=10)
        s.sendall(b"x")  # make the proxy dial and pipe: a real, if idle, session
        held.append(s)
    print("ready", flush=True)
    sys.stdin.read()


def udp_flows(ip: str, port: int, n: int) -> None:
    _fds(n)
    socks = []
    for _ in range(n):
        s = socket.socket(_family(ip), socket.SOCK_DGRAM)
        s.setblocking(False)
        s.bind(("", 0))
        socks.append(s)
    print("ready", flush=True)
    sys.stdin.readline()
    payload = b"x" * 64
    for s in socks:
        try:
            s.sendto(payload, (ip, port))
        except BlockingIOError:
            select.select([], [s], [], 1.0)
            s.sendto(payload, (ip, port))
    print("sent", flush=True)
    sys.stdin.read()


def drain(endpoint: str) -> None:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"proxy.session.")
    sub.setsockopt(zmq.RCVHWM, 1_000_000)
    sub.connect(endpoint)
    poller = zmq.Poller()
    poller.register(sub, zmq.POLLIN)
    poller.register(sys.stdin.fileno(), zmq.POLLIN)
    count = 0
    print("ready", flush=True)
    while True:
        ready = dict(poller.poll())
        if sub in ready:
            while True:
                try:
                    count += len(sub.recv_multipart(zmq.NOBLOCK)) - 1  # events: a message may carry several
                except zmq.Again:
                    break
        if sys.stdin.fileno() in ready and not sys.stdin.buffer.read1(4096):
            break
    print(count, flush=True)


def main(argv: list[str]) -> int:
    cmd, *args = argv
    if cmd == "hold-server":
        hold_server(args[0], int(args[1]))
    elif cmd == "tcp-holders":
        tcp_holders(args[0], int(args[1]), int(args[2]))
    elif cmd == "udp-flows":
        udp_flows(args[0], int(args[1]), int(args[2]))
    elif cmd == "drain":
        drain(args[0])
    else:
        print(f"unknown command {cmd!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
