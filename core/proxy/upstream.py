"""The upstream socket: where split traffic actually leaves the machine.

Three things together make the chosen interface real, whatever the VPN did to the routing:
- SO_MARK = the split-egress mark: the firewall accepts it as final, and the policy routing rule
  (kernel/routing.py, kept by the interceptor) sends it to the split table, which has a default route via
  that interface's gateway;
- SO_BINDTODEVICE: among the split table's routes, the kernel picks the one through this device;
- the interface's own source address, so replies come back to this interface.
SO_BINDTODEVICE alone (Portmaster's approach) only works when some table already routes through the
device; otherwise the kernel falls back on an on-link guess that fails on real networks.
"""

from __future__ import annotations

import socket

from .decider import Address, Binding

SO_MARK = getattr(socket, "SO_MARK", 36)
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)


def family_of(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def open_upstream(kind: socket.SocketKind, remote: Address, binding: Binding) -> socket.socket:
    """A non-blocking socket for `remote` with the binding applied (not yet connected)."""
    sock = socket.socket(family_of(remote[0]), kind)
    try:
        sock.setblocking(False)
        if binding.mark:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, binding.mark)
        if binding.interface:
            sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, binding.interface.encode())
        if binding.source_ip:
            # bind() reserves the port now. Not IP_BIND_ADDRESS_NO_PORT: a port chosen at connect time is
            # shared by 4-tuple, and a device-bound socket is invisible to an unbound socket's 4-tuple
            # check, so an app on the same address could connect from our port and conntrack would merge
            # the two flows. connect() never picks a port somebody bound explicitly.
            sock.bind((binding.source_ip, 0))
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock
