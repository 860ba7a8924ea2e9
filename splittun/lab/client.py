"""The lab's "what is my IP" client, run inside a lab namespace (normally the host).

It asks inet's whoami server which source address it saw and prints it. Socket options make the path
explicit: ``--mark`` sets SO_MARK (to hit a policy-routing rule) and ``--bind-dev`` sets
SO_BINDTODEVICE, which is how splittun's proxy pins its upstream sockets to the physical uplink.
``--ttl`` sets the IP TTL / IPv6 hop limit: the lab's deliberate ISP-path probes use ``PROBE_TTL``,
which is how the leak monitor on the physical link (``splittun.lab.leakmon``) tells them from leaks.

    python -m splittun.lab.client --proto tcp --family 4 [--target 203.0.113.80] [--mark 0x5157]
        [--bind-dev eth0] [--ttl 37] [--timeout 5] [--json] [--expect ADDR --retry-for SECONDS]

Exit status 0 and the answer on stdout, or 1 and ``error: <reason>`` on stderr.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time

from splittun.lab.topology import WHOAMI_TCP_PORT, WHOAMI_UDP_PORT, WHOAMI_V4, WHOAMI_V6

SO_MARK = getattr(socket, "SO_MARK", 36)
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)


class ProbeError(Exception):
    """The probe did not get an answer (timeout, unreachable, bad reply); `errno` when the system said why."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


def make_socket(family: int, proto: str, mark: int, bind_dev: str, timeout: float, ttl: int = 0) -> socket.socket:
    fam = socket.AF_INET6 if family == 6 else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    if ttl and family == 6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, ttl)
    elif ttl:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
    if mark:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
    if bind_dev:
        sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, bind_dev.encode())
    sock.settimeout(timeout)
    return sock


def probe(
    *,
    proto: str = "tcp",
    family: int = 4,
    target: str | None = None,
    port: int | None = None,
    mark: int = 0,
    bind_dev: str = "",
    timeout: float = 5.0,
    as_json: bool = False,
    ttl: int = 0,
    local_port: int = 0,
) -> str:
    """One request; returns the server's answer (address, or JSON text with ``as_json``). ``local_port``: send
    from this port (TCP with SO_REUSEADDR, so a port whose last connection the server closed is free at once)."""
    if target:
        family = 6 if ":" in target else 4  # the address decides; --family only picks the default target
    target = target or (WHOAMI_V6 if family == 6 else WHOAMI_V4)
    port = port or (WHOAMI_TCP_PORT if proto == "tcp" else WHOAMI_UDP_PORT)
    deadline = time.monotonic() + timeout
    try:
        with make_socket(family, proto, mark, bind_dev, timeout, ttl) as sock:
            if local_port:
                if proto == "tcp":
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("::" if family == 6 else "0.0.0.0", local_port))
            if proto == "udp":
                sock.connect((target, port))  # connected: only the server's own reply is accepted
                sock.send(b"json" if as_json else b"whoami")
                data = sock.recv(65535)
                return data.decode().strip()
            sock.connect((target, port))
            path = "/json" if as_json else "/"
            host = f"[{target}]" if ":" in target else target
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            chunks = []
            while True:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
    except TimeoutError as exc:
        raise ProbeError(f"timeout after {timeout:.3g}s ({proto}{family} {target})") from exc
    except OSError as exc:
        raise ProbeError(f"{exc.strerror or exc} ({proto}{family} {target})", exc.errno or 0) from exc
    head, sep, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/1.1 200"):
        raise ProbeError(f"bad HTTP reply: {head[:80]!r}")
    return body.decode().strip()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m splittun.lab.client", description=__doc__.split("\n")[0])
    ap.add_argument("--proto", choices=("tcp", "udp"), default="tcp")
    ap.add_argument("--family", type=int, choices=(4, 6), default=4)
    ap.add_argument("--target")
    ap.add_argument("--port", type=int)
    ap.add_argument("--mark", type=lambda s: int(s, 0), default=0)
    ap.add_argument("--bind-dev", default="")
    ap.add_argument("--ttl", type=int, default=0, help="IP TTL / IPv6 hop limit (0: the system's)")
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--json", action="store_true", help="ask for the JSON answer (seen, port, server)")
    ap.add_argument("--expect", help="with --retry-for: retry until the answer equals this")
    ap.add_argument("--retry-for", type=float, default=0.0, help="keep retrying for this many seconds")
    args = ap.parse_args(argv)
    end = time.monotonic() + args.retry_for
    last = "no attempt"
    while True:
        attempt_start = time.monotonic()
        per_try = args.timeout if not args.retry_for else max(0.05, min(args.timeout, end - attempt_start))
        try:
            answer = probe(
                proto=args.proto,
                family=args.family,
                target=args.target,
                port=args.port,
                mark=args.mark,
                bind_dev=args.bind_dev,
                timeout=per_try,
                as_json=args.json,
                ttl=args.ttl,
            )
            if args.expect is None or answer == args.expect:
                print(answer)
                return
            last = f"answer {answer!r}, expected {args.expect!r}"
        except ProbeError as exc:
            last = str(exc)
        if time.monotonic() >= end:
            break
        time.sleep(max(0.0, 0.1 - (time.monotonic() - attempt_start)))
    print(f"error: {last}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    main()
