"""Windows attribution and the IVPN port file, with buffers laid out as Windows returns them and fakes of the
OS calls that answer as Windows does (ERROR_INSUFFICIENT_BUFFER with the size needed, then the table)."""

from __future__ import annotations

from pathlib import PureWindowsPath

import pytest

from kernel.windows import (
    AF_INET,
    AF_INET6,
    ERROR_INSUFFICIENT_BUFFER,
    NO_ERROR,
    TCP_TABLE_OWNER_PID_ALL,
    UDP_TABLE_OWNER_PID,
    WindowsAttributor,
    ivpn_port_file,
    owner_pid,
    parse_tcp_table,
    parse_udp_table,
    read_table,
)
from messages.flows import FiveTuple, IpProtocol

# GetExtendedTcpTable(AF_INET, TCP_TABLE_OWNER_PID_ALL): dwNumEntries = 2, then MIB_TCPROW_OWNER_PID rows
# {dwState, dwLocalAddr, dwLocalPort, dwRemoteAddr, dwRemotePort, dwOwningPid}: addresses and ports in network
# byte order (ports in the low 16 bits), state and pid little-endian.
TCP4_TABLE = bytes.fromhex(
    "02000000"
    "02000000" "00000000" "01bb0000" "00000000" "00000000" "b4030000"  # LISTEN 0.0.0.0:443, pid 948
    # ESTABLISHED 192.0.2.10:49832 → 203.0.113.80:443, pid 4321
    "05000000" "c000020a" "c2a80000" "cb007150" "01bb0000" "e1100000"
)  # fmt: skip
# GetExtendedTcpTable(AF_INET6, ...): MIB_TCP6ROW_OWNER_PID {ucLocalAddr[16], dwLocalScopeId, dwLocalPort,
# ucRemoteAddr[16], dwRemoteScopeId, dwRemotePort, dwState, dwOwningPid}
TCP6_TABLE = bytes.fromhex(
    "01000000"
    "20010db8000000000000000000000010" "00000000" "d4310000"
    "20010db8003000000000000000000080" "00000000" "00500000" "05000000" "a0140000"
    # [2001:db8::10]:54321 → [2001:db8:30::80]:80, ESTABLISHED, pid 5280
)  # fmt: skip
# GetExtendedUdpTable(AF_INET, UDP_TABLE_OWNER_PID): MIB_UDPROW_OWNER_PID {dwLocalAddr, dwLocalPort, dwOwningPid}
UDP4_TABLE = bytes.fromhex(
    "02000000"
    "00000000" "00350000" "9c040000"  # 0.0.0.0:53, pid 1180
    "00000000" "e4a10000" "2c010000"  # 0.0.0.0:58529, pid 300
)  # fmt: skip
# GetExtendedUdpTable(AF_INET6, ...): MIB_UDP6ROW_OWNER_PID {ucLocalAddr[16], dwLocalScopeId, dwLocalPort, dwOwningPid}
UDP6_TABLE = bytes.fromhex(
    "01000000" "20010db8000000000000000000000010" "00000000" "13880000" "39050000"  # [2001:db8::10]:5000, pid 1337
)  # fmt: skip


def test_tcp_tables_are_read_with_ports_in_network_order_and_pids_little_endian() -> None:
    rows = parse_tcp_table(TCP4_TABLE, 4)
    assert [(r.local, r.remote, r.pid, r.state) for r in rows] == [
        (("0.0.0.0", 443), ("0.0.0.0", 0), 948, 2),
        (("192.0.2.10", 49832), ("203.0.113.80", 443), 4321, 5),
    ]
    (row6,) = parse_tcp_table(TCP6_TABLE, 6)
    assert (row6.local, row6.remote, row6.pid) == (("2001:db8::10", 54321), ("2001:db8:30::80", 80), 5280)


def test_udp_tables_and_owner_lookup_fall_back_to_a_wildcard_socket() -> None:
    rows = parse_udp_table(UDP4_TABLE, 4)
    assert [(r.local, r.pid) for r in rows] == [(("0.0.0.0", 53), 1180), (("0.0.0.0", 58529), 300)]
    assert owner_pid(FiveTuple(IpProtocol.UDP, "10.8.0.2", 58529, "203.0.113.80", 53), rows) == 300
    assert owner_pid(FiveTuple(IpProtocol.UDP, "10.8.0.2", 1, "203.0.113.80", 53), rows) is None
    (row6,) = parse_udp_table(UDP6_TABLE, 6)
    assert (row6.local, row6.pid) == (("2001:db8::10", 5000), 1337)


def test_a_truncated_table_is_refused() -> None:
    with pytest.raises(ValueError, match="2 rows"):
        parse_tcp_table(TCP4_TABLE[:40], 4)


class FakeTableCall:
    """GetExtendedTcpTable/GetExtendedUdpTable as Windows answers: too small a buffer → 122 and the size."""

    def __init__(self, tables: dict[tuple[int, int], bytes]) -> None:
        self.tables = tables
        self.calls: list[int] = []

    def __call__(self, buf: bytearray | None, size: int, family: int, table_class: int) -> tuple[int, int]:
        data = self.tables[(family, table_class)]
        self.calls.append(size)
        if buf is None or size < len(data):
            return ERROR_INSUFFICIENT_BUFFER, len(data)
        buf[: len(data)] = data
        return NO_ERROR, len(data)


def test_the_table_call_is_made_twice_first_for_the_size() -> None:
    call = FakeTableCall({(AF_INET, TCP_TABLE_OWNER_PID_ALL): TCP4_TABLE})
    assert read_table(call, 4, TCP_TABLE_OWNER_PID_ALL) == TCP4_TABLE
    assert call.calls == [0, len(TCP4_TABLE)]


def test_a_connection_is_attributed_to_its_process_image() -> None:
    tables = FakeTableCall({
        (AF_INET, TCP_TABLE_OWNER_PID_ALL): TCP4_TABLE,
        (AF_INET6, TCP_TABLE_OWNER_PID_ALL): TCP6_TABLE,
        (AF_INET, UDP_TABLE_OWNER_PID): UDP4_TABLE,
    })  # fmt: skip
    images = {4321: r"C:\Program Files\Mozilla Firefox\firefox.exe", 5280: r"C:\Windows\System32\curl.exe"}
    attributor = WindowsAttributor(tables, tables, lambda pid: images.get(pid, ""))
    firefox = attributor.attribute(FiveTuple(IpProtocol.TCP, "192.0.2.10", 49832, "203.0.113.80", 443))
    assert firefox is not None and (firefox.pid, firefox.name, firefox.exe) == (4321, "firefox.exe", images[4321])
    curl = attributor.attribute(FiveTuple(IpProtocol.TCP, "2001:db8::10", 54321, "2001:db8:30::80", 80))
    assert curl is not None and curl.name == "curl.exe"
    protected = attributor.attribute(FiveTuple(IpProtocol.UDP, "10.8.0.2", 58529, "203.0.113.80", 53))
    assert protected is not None and (protected.pid, protected.exe, protected.name) == (300, "", "")
    assert attributor.attribute(FiveTuple(IpProtocol.TCP, "192.0.2.10", 1, "203.0.113.80", 443)) is None
    assert attributor.socket_uid(FiveTuple(IpProtocol.TCP, "192.0.2.10", 1, "203.0.113.80", 443)) is None


def test_the_ivpn_port_file_is_under_the_install_dir_from_the_registry() -> None:
    custom = ivpn_port_file(lambda key: r"D:\Apps\IVPN" if key == r"SOFTWARE\IVPN Client" else None)
    assert custom == PureWindowsPath(r"D:\Apps\IVPN\etc\port.txt")
    assert ivpn_port_file(lambda key: None) == PureWindowsPath(r"C:\Program Files\IVPN Client\etc\port.txt")
