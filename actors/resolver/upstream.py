"""Asking an upstream DNS server, with the socket leaving the way the route says (dnspython does the wire).

The socket is made like the proxies' upstream sockets (core/proxy/upstream.py): on the split path it carries
the egress mark, is bound to the split interface and its address, so it leaves through that interface
whatever the VPN did to the routing; on the VPN path it carries the accept-final mark, so the interceptor
never queues it and the VPN's routing takes it. A truncated UDP answer is asked again over TCP.
"""

from __future__ import annotations

import socket

import dns.flags
import dns.message
import dns.query

from core.proxy.decider import Binding
from core.proxy.upstream import open_upstream

PORT = 53


def ask(query: dns.message.Message, server: str, binding: Binding, timeout: float) -> tuple[dns.message.Message, str]:
    """The server's answer and the transport that got it ("udp", or "tcp" after truncation). Raises
    dns.exception.Timeout, OSError or another dns.exception.DNSException when it does not answer."""
    sock = open_upstream(socket.SOCK_DGRAM, (server, PORT), binding)
    try:
        answer = dns.query.udp(query, server, timeout=timeout, port=PORT, sock=sock, ignore_unexpected=True)
    finally:
        sock.close()
    if not answer.flags & dns.flags.TC:
        return answer, "udp"
    return ask_tcp(query, server, binding, timeout), "tcp"


def ask_tcp(query: dns.message.Message, server: str, binding: Binding, timeout: float) -> dns.message.Message:
    sock = open_upstream(socket.SOCK_STREAM, (server, PORT), binding)
    try:
        sock.settimeout(timeout)
        sock.connect((server, PORT))
        sock.setblocking(False)
        return dns.query.tcp(query, server, timeout=timeout, port=PORT, sock=sock)
    finally:
        sock.close()
