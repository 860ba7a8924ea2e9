"""Asking an upstream DNS server, with the socket leaving the way the route says (dnspython does the wire).

The socket is made like the proxies' upstream sockets (core/proxy/upstream.py): on the split path it carries
the egress mark, is bound to the split interface and its address, so it leaves through that interface
whatever the VPN did to the routing; on the VPN path it carries the accept-final mark, so the interceptor
never queues it and the VPN's routing takes it. A truncated UDP answer is asked again over TCP; a
`tls://` server is asked over TLS (port 853), its certificate checked against the system's CAs.
"""

from __future__ import annotations

import socket
import ssl

import dns.flags
import dns.message
import dns.query

from core.dns.route import DOT_PORT, Server
from core.proxy.decider import Binding
from core.proxy.upstream import open_upstream

PORT = 53


def ask(query: dns.message.Message, server: str, binding: Binding, timeout: float) -> tuple[dns.message.Message, str]:
    """The server's answer and the transport that got it ("udp", "tcp" after truncation, "tls" for a
    tls:// server). Raises dns.exception.Timeout, OSError (ssl.SSLError: a certificate that does not check
    out) or another dns.exception.DNSException when it does not answer."""
    spec = Server.parse(server)
    if spec.tls:
        return ask_tls(query, spec, binding, timeout), "tls"
    sock = open_upstream(socket.SOCK_DGRAM, (server, PORT), binding)
    try:
        answer = dns.query.udp(query, server, timeout=timeout, port=PORT, sock=sock, ignore_unexpected=True)
    finally:
        sock.close()
    if not answer.flags & dns.flags.TC:
        return answer, "udp"
    return ask_tcp(query, server, binding, timeout), "tcp"


def _connected(server: str, port: int, binding: Binding, timeout: float) -> socket.socket:
    sock = open_upstream(socket.SOCK_STREAM, (server, port), binding)
    try:
        sock.settimeout(timeout)
        sock.connect((server, port))
    except BaseException:
        sock.close()
        raise
    return sock


def ask_tls(query: dns.message.Message, server: Server, binding: Binding, timeout: float) -> dns.message.Message:
    """DNS over TLS (RFC 7858): the certificate must be valid for the server's name (or its address)."""
    context = ssl.create_default_context()
    with context.wrap_socket(_connected(server.address, DOT_PORT, binding, timeout),
                             server_hostname=server.name or server.address) as sock:  # fmt: skip
        sock.setblocking(False)
        return dns.query.tls(query, server.address, timeout=timeout, port=DOT_PORT, sock=sock)


def ask_tcp(query: dns.message.Message, server: str, binding: Binding, timeout: float) -> dns.message.Message:
    with _connected(server, PORT, binding, timeout) as sock:
        sock.setblocking(False)
        return dns.query.tcp(query, server, timeout=timeout, port=PORT, sock=sock)
