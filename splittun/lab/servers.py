"""The lab internet's test servers: "what is my IP" over TCP (HTTP) and UDP, IPv4 and IPv6.

They answer with the source address they saw, which is the check a user would make to see whether
traffic went through the VPN (VPN server's exit address) or was split (the host's ISP address).

- TCP ``WHOAMI_TCP_PORT`` (HTTP/1.1, keep-alive, ``Connection: close`` honoured):
  ``GET /`` -> ``<seen address>\\n``; ``GET /json`` -> ``{"seen", "port", "server"}``;
  ``GET /bytes/<n>`` -> n bytes (for throughput checks).
- UDP ``WHOAMI_UDP_PORT``: each datagram is answered with ``<seen address>\\n``; a datagram that is
  exactly ``json`` gets the JSON form. Replies leave from the address the datagram was sent to
  (IP_PKTINFO), because inet has several addresses and a client's connected socket would drop a
  reply from another one.

Sockets are bound to the wildcard address, one per family (IPv6 sockets are v6-only, so IPv4
clients are never shown as ``::ffff:`` mapped addresses). More services (a DNS responder, later) are
added by registering another ``start_*`` coroutine in ``SERVICES``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import socket
import struct
import time
from collections.abc import Awaitable, Callable

from splittun.lab.topology import WHOAMI_TCP_PORT, WHOAMI_UDP_PORT

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
MAX_HEADER = 16 * 1024
MAX_BYTES = 1 << 32
IDLE_TIMEOUT = 120.0
CHUNK = bytes(256 * 1024)


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} servers[{os.getpid()}]: {msg}", flush=True)


def plain(addr: str) -> str:
    """Strip an IPv6 zone and unmap ``::ffff:a.b.c.d`` so answers are the address a human expects."""
    addr = addr.split("%", 1)[0]
    ip = ipaddress.ip_address(addr)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ip)


def whoami_json(seen: str, port: int, server: str) -> bytes:
    return json.dumps({"seen": seen, "port": port, "server": server}).encode()


# ---------------------------------------------------------------------------------------------- TCP


def http_response(status: str, body: bytes, ctype: str, keep: bool, head: bool) -> bytes:
    hdr = (
        f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
        f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n"
    ).encode()
    return hdr if head else hdr + body


async def handle_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Serve requests on one connection until the client closes or asks to."""
    peer = writer.get_extra_info("peername")
    local = writer.get_extra_info("sockname")
    seen, port, server = plain(peer[0]), int(peer[1]), plain(local[0])
    try:
        while True:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
                return
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split()
            if len(parts) != 3:
                writer.write(http_response("400 Bad Request", b"bad request\n", "text/plain", False, False))
                await writer.drain()
                return
            method, target, version = parts
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            conn = headers.get("connection", "").lower()
            keep = conn != "close" if version == "HTTP/1.1" else conn == "keep-alive"
            length = int(headers.get("content-length", "0") or 0)
            if length:
                await reader.readexactly(length)  # discard request bodies
            is_head = method == "HEAD"
            path = target.split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                out = http_response("405 Method Not Allowed", b"GET only\n", "text/plain", keep, is_head)
            elif path == "/":
                out = http_response("200 OK", f"{seen}\n".encode(), "text/plain", keep, is_head)
            elif path == "/json":
                out = http_response("200 OK", whoami_json(seen, port, server), "application/json", keep, is_head)
            elif path.startswith("/bytes/") and path[7:].isdigit() and int(path[7:]) <= MAX_BYTES:
                await send_bytes(writer, int(path[7:]), keep, is_head)
                if not keep:
                    return
                continue
            else:
                out = http_response("404 Not Found", b"not found\n", "text/plain", keep, is_head)
            writer.write(out)
            await writer.drain()
            if not keep:
                return
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        return
    finally:
        writer.close()


async def send_bytes(writer: asyncio.StreamWriter, n: int, keep: bool, head: bool) -> None:
    """Stream ``n`` zero bytes without building them in memory."""
    writer.write(
        (
            f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\n"
            f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n"
        ).encode()
    )
    if not head:
        while n > 0:
            chunk = CHUNK if n >= len(CHUNK) else CHUNK[:n]
            writer.write(chunk)
            n -= len(chunk)
            await writer.drain()
    await writer.drain()


_KEEP: list[object] = []  # listening servers/sockets stay referenced for the process lifetime


async def start_tcp(port: int) -> None:
    server = await asyncio.start_server(handle_http, host=["0.0.0.0", "::"], port=port, backlog=4096, limit=MAX_HEADER)
    _KEEP.append(server)
    log(f"whoami HTTP on tcp/{port} (IPv4 and IPv6)")


# ---------------------------------------------------------------------------------------------- UDP


def udp_answer(data: bytes, seen: str, port: int, server: str) -> bytes:
    if data.strip() == b"json":
        return whoami_json(seen, port, server)
    return f"{seen}\n".encode()


def udp_serve(sock: socket.socket) -> None:
    """Answer every pending datagram, from the address it was sent to (wildcard socket, PKTINFO)."""
    v6 = sock.family == socket.AF_INET6
    for _ in range(256):
        try:
            data, anc, _flags, src = sock.recvmsg(65535, 256)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            continue
        local = ""
        reply_anc = []
        for level, kind, cdata in anc:
            if not v6 and level == socket.IPPROTO_IP and kind == IP_PKTINFO:
                _ifindex, _spec, dst = struct.unpack("i4s4s", cdata[:12])
                local = socket.inet_ntop(socket.AF_INET, dst)
                reply_anc = [(socket.IPPROTO_IP, IP_PKTINFO, struct.pack("i4s4s", 0, dst, bytes(4)))]
            elif v6 and level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO:
                dst6 = cdata[:16]
                local = socket.inet_ntop(socket.AF_INET6, dst6)
                reply_anc = [(socket.IPPROTO_IPV6, IPV6_PKTINFO, struct.pack("16si", dst6, 0))]
        answer = udp_answer(data, plain(src[0]), int(src[1]), plain(local) if local else "")
        with contextlib.suppress(OSError):
            sock.sendmsg([answer], reply_anc, 0, src)


async def start_udp(port: int) -> None:
    loop = asyncio.get_running_loop()
    s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s4.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s6.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
    for sock, addr in ((s4, ("0.0.0.0", port)), (s6, ("::", port))):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        sock.bind(addr)
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), udp_serve, sock)
        _KEEP.append(sock)
    log(f"whoami UDP on udp/{port} (IPv4 and IPv6)")


# ------------------------------------------------------------------------------------------- main

SERVICES: dict[str, Callable[[argparse.Namespace], Awaitable[None]]] = {
    "tcp": lambda a: start_tcp(a.tcp_port),
    "udp": lambda a: start_udp(a.udp_port),
}


async def serve(args: argparse.Namespace) -> None:
    for name in args.services.split(","):
        await SERVICES[name](args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log("ready")
    await stop.wait()
    log("stopping")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m splittun.lab.servers", description=__doc__.split("\n")[0])
    ap.add_argument("--tcp-port", type=int, default=WHOAMI_TCP_PORT)
    ap.add_argument("--udp-port", type=int, default=WHOAMI_UDP_PORT)
    ap.add_argument("--services", default="tcp,udp", help=f"comma list of {sorted(SERVICES)}")
    ap.add_argument("--lab", default="", help="lab name (only to make the process identifiable)")
    asyncio.run(serve(ap.parse_args(argv)))


if __name__ == "__main__":
    main()
