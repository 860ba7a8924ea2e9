"""The upstream socket: where split traffic actually leaves the machine.

How a socket is pinned to the chosen interface is the one platform-specific step, behind `Binder`:
- `DeviceBinder` (Linux), three things together, whatever the VPN did to the routing:
  - SO_MARK = the split-egress mark: the firewall accepts it as final, and the policy routing rule
    (kernel/routing.py, kept by the interceptor) sends it to the split table, which has a default route via
    that interface's gateway;
  - SO_BINDTODEVICE: among the split table's routes, the kernel picks the one through this device;
  - the interface's own source address, so replies come back to this interface.
  SO_BINDTODEVICE alone (Portmaster's approach) only works when some table already routes through the
  device; otherwise the kernel falls back on an on-link guess that fails on real networks.
- `UnicastIfBinder` (Windows, which has no policy routing): IP_UNICAST_IF / IPV6_UNICAST_IF (send through this
  interface index) plus the interface's source address. Linux has the same options (other numbers, and IPv6
  takes the index in network byte order there), so it runs in tests here too.
The same binding serves splittun's own connections that must bypass the VPN (`bypass_socket`): on Windows the
IVPN interop binds them to the physical interface's addresses instead of relying on policy routing.
"""

from __future__ import annotations

import socket
import struct
import sys
from typing import Protocol

from core.egress import Egress

from .decider import Address, Binding

SO_MARK = getattr(socket, "SO_MARK", 36)
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
#: Linux: the socket is made non-blocking by socket() itself (Python then skips its own FIONBIO ioctl)
_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)


def family_of(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


#: IP_UNICAST_IF / IPV6_UNICAST_IF per platform: (IPv4 option, IPv6 option, IPv6 index in network byte order?).
#: IPv4 takes the index in network byte order on both; IPv6 in host order on Windows, network order on Linux.
UNICAST_IF = {"win32": (31, 31, False), "linux": (50, 76, True)}


class Binder(Protocol):
    def apply(self, sock: socket.socket, binding: Binding) -> None:
        """Pin `sock` (not yet bound) to the binding's interface and source address."""
        ...


class DeviceBinder:
    """Linux: SO_MARK + SO_BINDTODEVICE + the source address (the split policy routing does the rest)."""

    def apply(self, sock: socket.socket, binding: Binding) -> None:
        if binding.mark:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, binding.mark)
        if binding.interface:
            sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, binding.interface.encode())
        _bind_source(sock, binding)


class UnicastIfBinder:
    """Windows: IP_UNICAST_IF / IPV6_UNICAST_IF by interface index + the source address (no policy routing)."""

    def __init__(self, platform: str = sys.platform) -> None:
        self.v4, self.v6, self.v6_network_order = UNICAST_IF["win32" if platform == "win32" else "linux"]

    def apply(self, sock: socket.socket, binding: Binding) -> None:
        if binding.ifindex:
            if sock.family == socket.AF_INET6:
                order = "!I" if self.v6_network_order else "=I"
                sock.setsockopt(socket.IPPROTO_IPV6, self.v6, struct.pack(order, binding.ifindex))
            else:  # IPv4 wants the index in network byte order
                sock.setsockopt(socket.IPPROTO_IP, self.v4, struct.pack("!I", binding.ifindex))
        _bind_source(sock, binding)


def _bind_source(sock: socket.socket, binding: Binding) -> None:
    if binding.source_ip:
        # bind() reserves the port now. Not IP_BIND_ADDRESS_NO_PORT: a port chosen at connect time is
        # shared by 4-tuple, and a device-bound socket is invisible to an unbound socket's 4-tuple
        # check, so an app on the same address could connect from our port and conntrack would merge
        # the two flows. connect() never picks a port somebody bound explicitly.
        sock.bind((binding.source_ip, 0))


def default_binder() -> Binder:
    return UnicastIfBinder() if sys.platform == "win32" else DeviceBinder()


def open_upstream(
    kind: socket.SocketKind, remote: Address, binding: Binding, binder: Binder | None = None
) -> socket.socket:
    """A non-blocking socket for `remote` with the binding applied (not yet connected)."""
    sock = socket.socket(family_of(remote[0]), kind | _NONBLOCK)
    try:
        if not _NONBLOCK:
            sock.setblocking(False)
        (binder or _DEFAULT_BINDER).apply(sock, binding)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def bypass_binding(egress: Egress, mark: int, platform: str = sys.platform) -> Binding:
    """How one of splittun's own connections that must leave outside the VPN (the IVPN interop's bypass) is
    bound to the physical interface: on Linux like a split upstream (device, source address and the egress mark
    the split policy routing follows); on Windows, which has no policy routing, by the interface's index and
    addresses alone (`UnicastIfBinder`)."""
    if platform == "win32":
        return Binding(source_ip=egress.source, ifindex=egress.ifindex)
    return Binding(egress.interface, egress.source, mark, egress.ifindex)


_DEFAULT_BINDER = default_binder()
