"""How an upstream (or a bypass connection) is pinned to an interface: SO_BINDTODEVICE + mark on Linux,
IP_UNICAST_IF / IPV6_UNICAST_IF + source address on Windows. The Windows binder runs for real here (Linux has
the same options under other numbers); Windows' own numbers and byte orders are checked with a fake socket."""

from __future__ import annotations

import socket
import struct
from typing import Any

import pytest

from core.egress import Egress
from core.proxy.decider import Binding
from core.proxy.upstream import DeviceBinder, UnicastIfBinder, bypass_binding, open_upstream
from messages.marks import Mark

LO = socket.if_nametoindex("lo")


class FakeSocket:
    def __init__(self, family: int) -> None:
        self.family = family
        self.calls: list[tuple[Any, ...]] = []

    def setsockopt(self, *args: Any) -> None:
        self.calls.append(("setsockopt", *args))

    def bind(self, address: Any) -> None:
        self.calls.append(("bind", address))


def test_windows_numbers_and_byte_orders() -> None:
    v4, v6 = FakeSocket(socket.AF_INET), FakeSocket(socket.AF_INET6)
    binder = UnicastIfBinder("win32")
    binder.apply(v4, Binding(source_ip="192.0.2.10", ifindex=7))  # type: ignore[arg-type]
    binder.apply(v6, Binding(source_ip="2001:db8:10::10", ifindex=7))  # type: ignore[arg-type]
    assert v4.calls == [("setsockopt", socket.IPPROTO_IP, 31, b"\0\0\0\x07"), ("bind", ("192.0.2.10", 0))]
    assert v6.calls == [("setsockopt", socket.IPPROTO_IPV6, 31, struct.pack("=I", 7)), ("bind", ("2001:db8:10::10", 0))]


def test_linux_device_binder_marks_and_binds_to_the_device() -> None:
    sock = FakeSocket(socket.AF_INET)
    DeviceBinder().apply(sock, Binding("eth0", "192.0.2.10", int(Mark.SPLIT_EGRESS), 3))  # type: ignore[arg-type]
    assert [c[2] for c in sock.calls[:2]] == [36, 25] and sock.calls[2] == ("bind", ("192.0.2.10", 0))


@pytest.mark.parametrize(("family", "address"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_unicast_if_binding_sends_through_the_interface_and_refuses_one_that_does_not_exist(
    family: int, address: str
) -> None:
    with socket.socket(family, socket.SOCK_DGRAM) as server:
        server.bind((address, 0))
        server.settimeout(2)
        up = open_upstream(socket.SOCK_DGRAM, server.getsockname()[:2], Binding(source_ip=address, ifindex=LO),
                           UnicastIfBinder("linux"))  # fmt: skip
        with up:
            up.setblocking(True)
            up.sendto(b"split", server.getsockname())
            data, peer = server.recvfrom(16)
            assert (data, peer[:2]) == (b"split", up.getsockname()[:2])
        with pytest.raises(OSError):
            open_upstream(socket.SOCK_DGRAM, server.getsockname()[:2], Binding(ifindex=999_999),
                          UnicastIfBinder("linux"))  # fmt: skip


def test_a_bypass_connection_binds_by_policy_routing_on_linux_and_by_interface_on_windows() -> None:
    wifi = Egress(4, "wlan0", "192.0.2.10", "192.0.2.1", ifindex=12)
    assert bypass_binding(wifi, int(Mark.SPLIT_EGRESS), "linux") == Binding("wlan0", "192.0.2.10", 1720, 12)
    assert bypass_binding(wifi, int(Mark.SPLIT_EGRESS), "win32") == Binding(source_ip="192.0.2.10", ifindex=12)
