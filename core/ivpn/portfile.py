"""Finding the IVPN daemon: its port file holds `<decimal port>:<secret as lowercase hex>`.

The daemon deletes the file when it exits, so "no file" means "no daemon". Port and secret change on every
daemon start: read the file again before every connection attempt. Where the file lives depends on the
platform; `port_file_paths` is the one place that knows.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

LINUX_PORT_FILES = ("/etc/opt/ivpn/mutable/port.txt", "/opt/ivpn/mutable/port.txt")  # current, before 2023
SNAP_PORT_FILE = "opt/ivpn/mutable/port.txt"  # under $SNAP_COMMON
MACOS_PORT_FILE = "/Library/Application Support/IVPN/port.txt"
WINDOWS_DEFAULT_INSTALL_DIR = r"C:\Program Files\IVPN Client"
WINDOWS_REGISTRY_KEY = r"SOFTWARE\IVPN Client"
MAX_PORT_FILE_BYTES = 64


class PortFileError(ValueError):
    """The port file exists but does not say `<port>:<hex secret>`."""


@dataclass(frozen=True, slots=True)
class PortFile:
    """Where the daemon listens (127.0.0.1:port) and the secret its Hello must carry."""

    port: int
    secret: int
    path: str = ""


def parse_port_file(data: bytes, path: str = "") -> PortFile:
    """`b"51234:1f2e"` → PortFile(51234, 0x1f2e). Whitespace around is tolerated; anything else is an error."""
    if len(data) > MAX_PORT_FILE_BYTES:
        raise PortFileError(f"port file {path or '?'}: {len(data)} bytes, expected '<port>:<hex secret>'")
    text = data.decode("ascii", errors="replace").strip()
    port_text, sep, secret_text = text.partition(":")
    try:
        if not sep or not port_text.isdigit():
            raise ValueError
        port = int(port_text)
        secret = int(secret_text, 16)
    except ValueError:
        raise PortFileError(f"port file {path or '?'}: {text[:40]!r} is not '<port>:<hex secret>'") from None
    if not 0 < port < 65536:
        raise PortFileError(f"port file {path or '?'}: port {port} out of range")
    if not 0 <= secret < 2**64:
        raise PortFileError(f"port file {path or '?'}: secret is not a 64-bit number")
    return PortFile(port, secret, path)


def port_file_paths(
    platform: str | None = None, env: Mapping[str, str] | None = None, install_dir: str | None = None
) -> tuple[str, ...]:
    """The port file locations to try, most likely first. `install_dir` is the Windows installation directory
    (from the registry; `windows_install_dir()`); pass it to keep this function free of I/O."""
    platform = platform or sys.platform
    if platform.startswith("win"):
        return (str(Path(install_dir or WINDOWS_DEFAULT_INSTALL_DIR, "etc", "port.txt")),)
    if platform == "darwin":
        return (MACOS_PORT_FILE,)
    paths = []
    snap_common = (env or {}).get("SNAP_COMMON", "")
    if snap_common:
        paths.append(str(Path(snap_common, SNAP_PORT_FILE)))
    paths.extend(LINUX_PORT_FILES)
    return tuple(paths)


def windows_install_dir() -> str:
    """IVPN's installation directory: the default value of HKLM\\SOFTWARE\\IVPN Client, else the installer default."""
    try:
        import winreg  # type: ignore[import-not-found]

        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, WINDOWS_REGISTRY_KEY) as key:
            value, _ = winreg.QueryValueEx(key, "")
            return str(value) or WINDOWS_DEFAULT_INSTALL_DIR
    except (ImportError, OSError):
        return WINDOWS_DEFAULT_INSTALL_DIR


def read_port_file(paths: tuple[str, ...]) -> PortFile | None:
    """The first port file that exists, parsed; None when there is none (no daemon). Raises PortFileError."""
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_PORT_FILE_BYTES + 1)
        except (FileNotFoundError, NotADirectoryError):
            continue
        return parse_port_file(data, path)
    return None
