"""The lab's VPN data plane: a TUN <-> UDP forwarder, one process on each end.

Real VPN clients (wireguard-go, OpenVPN) read IP packets from a TUN device and send them, wrapped,
as UDP datagrams to the server, which writes them into its own TUN device and routes/NATs them on.
This does the same without encryption: one IP packet = one UDP datagram, no header. That keeps the
properties splittun cares about (a point-to-point NOARP interface, a UDP transport flow that must not
itself be tunnelled, an exit address that differs from the ISP address) with very little code.

    python -m splittun.lab.tunnel client --dev wgivpn --peer 198.51.100.2:51820 [--mark 51820]
    python -m splittun.lab.tunnel server --dev tunsrv --listen 0.0.0.0:51820

The client sends an empty keepalive datagram at start and every ``--keepalive`` seconds, so the server
learns (and, like WireGuard, re-learns after roaming) the client's address before any traffic flows.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import os
import select
import signal
import socket
import struct
import sys
import time
from typing import NoReturn

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
SO_MARK = getattr(socket, "SO_MARK", 36)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)

#: Bigger than any packet the TUN can hand us (MTU is 1420; allow jumbo experiments).
READ_SIZE = 65535
#: Packets moved per readiness event and direction before re-polling (keeps both directions fair).
BATCH = 256
SOCK_BUF = 4 * 1024 * 1024


def open_tun(name: str) -> int:
    """Attach to (or create) TUN device ``name`` without packet-info header; returns a non-blocking fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        ifr = struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError:
        os.close(fd)
        raise
    return fd


def parse_hostport(text: str) -> tuple[str, int]:
    """Parse ``host:port`` or ``[v6]:port``."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def make_socket(bind: tuple[str, int], mark: int) -> socket.socket:
    """UDP transport socket with large buffers and an optional SO_MARK (wg-quick's fwmark)."""
    family = socket.AF_INET6 if ":" in bind[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCK_BUF)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, SOCK_BUF)
    if mark:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
    sock.bind(bind)
    sock.setblocking(False)
    return sock


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} tunnel[{os.getpid()}]: {msg}", flush=True)


def run(mode: str, dev: str, sock: socket.socket, peer: tuple[str, int] | None, keepalive: float) -> None:
    """Forward until killed. ``peer`` is fixed for the client and learned for the server."""
    tun = open_tun(dev)
    stats = {"tun_rx": 0, "udp_tx": 0, "udp_rx": 0, "tun_tx": 0, "dropped": 0}
    log(f"{mode} dev={dev} local={sock.getsockname()} peer={peer}")

    def on_term(signum: int, _frame: object) -> NoReturn:
        log(f"signal {signum}, stats {stats}")
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    poller = select.poll()
    poller.register(tun, select.POLLIN)
    poller.register(sock.fileno(), select.POLLIN)
    sock_fd = sock.fileno()
    next_keepalive = 0.0

    while True:
        timeout_ms = None
        if mode == "client" and peer is not None:
            now = time.monotonic()
            if now >= next_keepalive:
                with contextlib.suppress(OSError):  # network not ready yet: the next keepalive retries
                    sock.sendto(b"", peer)
                next_keepalive = now + keepalive
            timeout_ms = max(0, int((next_keepalive - now) * 1000))
        try:
            events = poller.poll(timeout_ms)
        except InterruptedError:
            continue
        for fd, ev in events:
            if ev & (select.POLLERR | select.POLLNVAL) and fd == tun:
                raise SystemExit(f"TUN device {dev} failed (poll event {ev:#x})")
            if fd == tun:
                # TUN -> UDP: drain a batch of packets.
                for _ in range(BATCH):
                    try:
                        pkt = os.read(tun, READ_SIZE)
                    except BlockingIOError:
                        break
                    stats["tun_rx"] += 1
                    if peer is None:
                        stats["dropped"] += 1  # server has no client yet
                        continue
                    try:
                        sock.sendto(pkt, peer)
                        stats["udp_tx"] += 1
                    except OSError:
                        stats["dropped"] += 1  # full buffer or unreachable: a lossy network
            elif fd == sock_fd:
                # UDP -> TUN.
                for _ in range(BATCH):
                    try:
                        data, src = sock.recvfrom(READ_SIZE)
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                            continue
                        raise
                    if mode == "server":
                        src = src[:2]
                        if src != peer:
                            log(f"client address is now {src[0]}:{src[1]}")
                            peer = src
                    elif src[:2] != peer:
                        stats["dropped"] += 1  # not from our server
                        continue
                    stats["udp_rx"] += 1
                    if not data:
                        continue  # keepalive
                    try:
                        os.write(tun, data)
                        stats["tun_tx"] += 1
                    except OSError:
                        stats["dropped"] += 1  # malformed packet or device down


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m splittun.lab.tunnel", description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=("client", "server"))
    ap.add_argument("--dev", required=True, help="TUN device to attach to (created if missing)")
    ap.add_argument("--peer", help="client: server address host:port")
    ap.add_argument("--listen", default="0.0.0.0:0", help="local address host:port")
    ap.add_argument("--mark", type=lambda s: int(s, 0), default=0, help="SO_MARK for the UDP socket")
    ap.add_argument("--keepalive", type=float, default=10.0, help="client keepalive interval, seconds")
    ap.add_argument("--lab", default="", help="lab name (only to make the process identifiable)")
    args = ap.parse_args(argv)
    if args.mode == "client" and not args.peer:
        ap.error("client needs --peer")
    peer = parse_hostport(args.peer) if args.peer else None
    sock = make_socket(parse_hostport(args.listen), args.mark)
    with contextlib.suppress(KeyboardInterrupt):
        run(args.mode, args.dev, sock, peer, args.keepalive)
    sys.exit(0)


if __name__ == "__main__":
    main()
