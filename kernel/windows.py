"""Windows OS calls the divert backend needs, each behind one small interface (ctypes; imports and is tested on
Linux, only the `windows_*` factories need Windows).

- **Which process owns a connection** (the WinDivert NETWORK layer carries no process id):
  `GetExtendedTcpTable(TCP_TABLE_OWNER_PID_ALL)` / `GetExtendedUdpTable(UDP_TABLE_OWNER_PID)`, IPv4 and IPv6,
  give each socket's addresses and owning pid; `parse_*_table` read their buffers, `owner_pid` finds a 5-tuple's
  row (UDP: by local address or the wildcard, and port).
- **A process's executable**: `OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION)` + `QueryFullProcessImageNameW`.
- `WindowsAttributor`: a 5-tuple → `ProcessInfo` from the two, what `kernel.sockdiag` + `kernel.procfs` do on
  Linux (on Linux the divert backend keeps using sock_diag).
- **The IVPN daemon's port file**: `<installDir>\\etc\\port.txt`, installDir the default value of
  `HKLM\\SOFTWARE\\IVPN Client`.

Each OS call is a plain callable the tests replace with a fake that answers as Windows does (the table calls
answer ERROR_INSUFFICIENT_BUFFER with the size needed first, so they are called twice).
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PureWindowsPath

from messages import ProcessInfo
from messages.flows import FiveTuple, IpProtocol, ipv6_text

AF_INET, AF_INET6 = 2, 23  # Windows values
TCP_TABLE_OWNER_PID_ALL = 5
UDP_TABLE_OWNER_PID = 1
NO_ERROR = 0
ERROR_INSUFFICIENT_BUFFER = 122
PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
MAX_PATH_CHARS = 32768

_DWORD = struct.Struct("<I")
# MIB_TCPROW_OWNER_PID: state, local addr, local port, remote addr, remote port, pid
_TCP4_ROW = struct.Struct("<I4s2s2x4s2s2xI")
# MIB_TCP6ROW_OWNER_PID: local addr, local scope, local port, remote addr, remote scope, remote port, state, pid
_TCP6_ROW = struct.Struct("<16sI2s2x16sI2s2xII")
_UDP4_ROW = struct.Struct("<4s2s2xI")  # MIB_UDPROW_OWNER_PID: local addr, local port, pid
_UDP6_ROW = struct.Struct("<16sI2s2xI")  # MIB_UDP6ROW_OWNER_PID: local addr, local scope, local port, pid


@dataclass(frozen=True, slots=True)
class SocketRow:
    """One row of an owner-pid table: a socket's local (and for TCP remote) address and its process."""

    protocol: int
    local: tuple[str, int]
    remote: tuple[str, int]  # ("", 0) for UDP
    pid: int
    state: int = 0  # TCP: MIB_TCP_STATE (5 = established); UDP: 0


def _port(raw: bytes) -> int:
    """The tables keep a port in network byte order in the low 16 bits of a DWORD."""
    return int.from_bytes(raw, "big")


def _ip4(raw: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET, raw)


def _rows(buf: bytes, row: struct.Struct) -> list[tuple]:  # type: ignore[type-arg]
    if len(buf) < 4:
        raise ValueError(f"owner table too short ({len(buf)} bytes)")
    count = _DWORD.unpack_from(buf)[0]
    if 4 + count * row.size > len(buf):
        raise ValueError(f"owner table says {count} rows, holds {(len(buf) - 4) // row.size}")
    return [row.unpack_from(buf, 4 + i * row.size) for i in range(count)]


def parse_tcp_table(buf: bytes, family: int) -> list[SocketRow]:
    """A GetExtendedTcpTable(TCP_TABLE_OWNER_PID_ALL) buffer (`family` 4 or 6)."""
    if family == 4:
        return [SocketRow(IpProtocol.TCP, (_ip4(la), _port(lp)), (_ip4(ra), _port(rp)), pid, state)
                for state, la, lp, ra, rp, pid in _rows(buf, _TCP4_ROW)]  # fmt: skip
    return [SocketRow(IpProtocol.TCP, (ipv6_text(la), _port(lp)), (ipv6_text(ra), _port(rp)), pid, state)
            for la, _ls, lp, ra, _rs, rp, state, pid in _rows(buf, _TCP6_ROW)]  # fmt: skip


def parse_udp_table(buf: bytes, family: int) -> list[SocketRow]:
    """A GetExtendedUdpTable(UDP_TABLE_OWNER_PID) buffer (`family` 4 or 6)."""
    if family == 4:
        return [SocketRow(IpProtocol.UDP, (_ip4(la), _port(lp)), ("", 0), pid) for la, lp, pid in _rows(buf, _UDP4_ROW)]
    return [SocketRow(IpProtocol.UDP, (ipv6_text(la), _port(lp)), ("", 0), pid)
            for la, _ls, lp, pid in _rows(buf, _UDP6_ROW)]  # fmt: skip


_WILDCARDS = {"0.0.0.0", "::"}


def owner_pid(flow: FiveTuple, rows: list[SocketRow]) -> int | None:
    """The pid owning the app's side of `flow` (its source is the local end); None when no row matches.
    TCP: the exact local and remote ends. UDP has no remote in the table: the local port, on the flow's source
    address or the wildcard (an unconnected socket bound to any address)."""
    if flow.protocol == IpProtocol.TCP:
        for row in rows:
            if row.local == flow.src and row.remote == flow.dst:
                return row.pid
        return None
    wildcard = None
    for row in rows:
        if row.local[1] != flow.src_port:
            continue
        if row.local[0] == flow.src_ip:
            return row.pid
        if row.local[0] in _WILDCARDS:
            wildcard = row.pid
    return wildcard


# --- the OS calls -----------------------------------------------------------------------------------------

#: (buffer or None, its size, address family (Windows value), table class) → (error code, size needed)
TableCall = Callable[[bytearray | None, int, int, int], tuple[int, int]]
#: pid → the process's executable path ("" when it cannot be read: gone, protected)
ImageCall = Callable[[int], str]
#: registry key path under HKLM → its default value (None when the key or value is missing)
RegistryCall = Callable[[str], "str | None"]


def read_table(call: TableCall, family: int, table_class: int) -> bytes:
    """Call an owner table function the Windows way: ask for the size, then fill (again if it grew meanwhile)."""
    size = 0
    buf: bytearray | None = None
    for _attempt in range(4):
        err, needed = call(buf, size, AF_INET if family == 4 else AF_INET6, table_class)
        if err == NO_ERROR and buf is not None:
            return bytes(buf[:size])
        if err != ERROR_INSUFFICIENT_BUFFER and not (err == NO_ERROR and buf is None):
            raise OSError(err, f"owner table call failed with error {err}")
        size = max(needed, 4)
        buf = bytearray(size)
    raise OSError(ERROR_INSUFFICIENT_BUFFER, "owner table kept growing")


class WindowsAttributor:
    """A 5-tuple → its process, from the owner tables and the process image (what attribution.Attributor does
    over sock_diag and /proc on Linux). The engine's other attribution ports have no Windows meaning: no uids
    (`socket_uid` None), no socket cookies (0)."""

    def __init__(self, tcp_table: TableCall, udp_table: TableCall, image: ImageCall) -> None:
        self.tcp_table, self.udp_table, self.image = tcp_table, udp_table, image

    def owner(self, flow: FiveTuple) -> int | None:
        family = flow.ip_version
        if flow.protocol == IpProtocol.TCP:
            rows = parse_tcp_table(read_table(self.tcp_table, family, TCP_TABLE_OWNER_PID_ALL), family)
        elif flow.protocol == IpProtocol.UDP:
            rows = parse_udp_table(read_table(self.udp_table, family, UDP_TABLE_OWNER_PID), family)
        else:
            return None
        return owner_pid(flow, rows)

    def attribute(self, flow: FiveTuple) -> ProcessInfo | None:
        pid = self.owner(flow)
        if pid is None:
            return None
        exe = self.image(pid)
        name = PureWindowsPath(exe).name if exe else ""
        return ProcessInfo(pid=pid, name=name, exe=exe)

    def socket_uid(self, flow: FiveTuple) -> int | None:
        return None

    def socket_cookie(self, flow: FiveTuple, fresh: bool = False) -> int:
        return 0

    def uid_of(self, pid: int) -> int | None:
        return None


# --- IVPN ---------------------------------------------------------------------------------------------------

IVPN_REGISTRY_KEY = r"SOFTWARE\IVPN Client"
IVPN_DEFAULT_INSTALL_DIR = r"C:\Program Files\IVPN Client"


def ivpn_port_file(registry: RegistryCall) -> PureWindowsPath:
    """Where the IVPN daemon writes its port file on Windows: `<installDir>\\etc\\port.txt`, installDir from the
    registry (the installer's default when the key is missing)."""
    install_dir = (registry(IVPN_REGISTRY_KEY) or "").strip() or IVPN_DEFAULT_INSTALL_DIR
    return PureWindowsPath(install_dir) / "etc" / "port.txt"


# --- the real calls (Windows only) --------------------------------------------------------------------------


def windows_table_call(function_name: str) -> TableCall:  # pragma: no cover - needs Windows
    """GetExtendedTcpTable / GetExtendedUdpTable from iphlpapi.dll."""
    function = getattr(ctypes.windll.iphlpapi, function_name)  # type: ignore[attr-defined]

    def call(buf: bytearray | None, size: int, family: int, table_class: int) -> tuple[int, int]:
        needed = ctypes.c_ulong(size)
        pointer = (ctypes.c_char * size).from_buffer(buf) if buf is not None and size else None
        err = function(pointer, ctypes.byref(needed), False, family, table_class, 0)
        return int(err), int(needed.value)

    return call


def windows_image_call() -> ImageCall:  # pragma: no cover - needs Windows
    """OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION) + QueryFullProcessImageNameW."""
    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]

    def image(pid: int) -> str:
        handle = kernel32.OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, False, pid)
        if not handle:
            return ""
        try:
            buf = ctypes.create_unicode_buffer(MAX_PATH_CHARS)
            size = ctypes.c_ulong(MAX_PATH_CHARS)
            if not kernel32.QueryFullProcessImageNameW(handle, 0, buf, ctypes.byref(size)):
                return ""
            return buf.value
        finally:
            kernel32.CloseHandle(handle)

    return image


def windows_registry_call() -> RegistryCall:  # pragma: no cover - needs Windows
    import winreg  # type: ignore[import-not-found]

    def default_value(key: str) -> str | None:
        try:
            with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, key) as handle:
                value, _kind = winreg.QueryValueEx(handle, "")
        except OSError:
            return None
        return str(value)

    return default_value


def windows_attributor() -> WindowsAttributor:  # pragma: no cover - needs Windows
    return WindowsAttributor(
        windows_table_call("GetExtendedTcpTable"), windows_table_call("GetExtendedUdpTable"), windows_image_call()
    )
