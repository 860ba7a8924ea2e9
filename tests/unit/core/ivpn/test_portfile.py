"""The port file: `<port>:<hex secret>` parsed from bytes, and where each platform keeps it."""

from __future__ import annotations

import pytest

from core.ivpn.portfile import PortFile, PortFileError, parse_port_file, port_file_paths, read_port_file


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"51234:1f2e", PortFile(51234, 0x1F2E)),
        (b"1:0", PortFile(1, 0)),
        (b"65535:ffffffffffffffff", PortFile(65535, 2**64 - 1)),
        (b"40000:abc\n", PortFile(40000, 0xABC)),  # a trailing newline is tolerated
    ],
)
def test_parse_good(data: bytes, expected: PortFile) -> None:
    assert parse_port_file(data) == expected


@pytest.mark.parametrize(
    "data",
    [b"", b"51234", b":abc", b"51234:", b"51234:xyz", b"0:1", b"70000:1", b"-1:1", b"1:10000000000000000", b"9" * 100],
)
def test_parse_bad_is_one_line_error(data: bytes) -> None:
    with pytest.raises(PortFileError) as exc:
        parse_port_file(data, "/x/port.txt")
    assert "\n" not in str(exc.value)


def test_linux_paths_current_then_pre_2023_with_snap_first() -> None:
    assert port_file_paths("linux", {}) == ("/etc/opt/ivpn/mutable/port.txt", "/opt/ivpn/mutable/port.txt")
    assert port_file_paths("linux", {"SNAP_COMMON": "/var/snap/ivpn/common"})[0] == (
        "/var/snap/ivpn/common/opt/ivpn/mutable/port.txt"
    )


def test_other_platforms() -> None:
    assert port_file_paths("darwin") == ("/Library/Application Support/IVPN/port.txt",)
    (win,) = port_file_paths("win32", install_dir="D:/IVPN")
    assert win.replace("\\", "/") == "D:/IVPN/etc/port.txt"


def test_read_first_existing(tmp_path) -> None:
    missing, present = tmp_path / "a" / "port.txt", tmp_path / "port.txt"
    assert read_port_file((str(missing),)) is None  # no file = no daemon
    present.write_bytes(b"4242:beef")
    assert read_port_file((str(missing), str(present))) == PortFile(4242, 0xBEEF, str(present))
