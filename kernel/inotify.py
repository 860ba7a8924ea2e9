"""Told when a file in a directory changes, instead of polling its stat every fraction of a second.

The controller watches the config file's directory (editors and `config.save` replace the file by
rename, so watching the file itself would lose the watch at the first save). The fd turns readable on a
change; the loop calls back, the owner drains it and looks at the file. Linux only: `FileWatch.open`
returns None where inotify is missing, and the caller falls back to polling.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from pathlib import Path

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
CHANGES = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE

_EVENT = struct.Struct("iIII")  # wd, mask, cookie, name length (the name follows, NUL-padded)


def parse_names(buf: bytes) -> list[str]:
    """The file names in a read of inotify events (events on the directory itself have none)."""
    names = []
    offset = 0
    while offset + _EVENT.size <= len(buf):
        _wd, _mask, _cookie, length = _EVENT.unpack_from(buf, offset)
        start = offset + _EVENT.size
        name = buf[start : start + length].split(b"\0", 1)[0]
        if name:
            names.append(os.fsdecode(name))
        offset = start + length
    return names


class FileWatch:
    """A watch on one directory for changes to files with given names."""

    def __init__(self, fd: int, names: frozenset[str]) -> None:
        self.fd = fd
        self.names = names

    @classmethod
    def open(cls, *files: Path) -> FileWatch | None:
        """Watch these files (all in one directory); None when inotify is not available here."""
        directory = files[0].parent
        libc_name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(libc_name, use_errno=True)
            init, add = libc.inotify_init1, libc.inotify_add_watch
        except (OSError, AttributeError):
            return None
        fd = init(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            return None
        if add(fd, os.fsencode(directory), CHANGES) < 0:
            os.close(fd)
            return None
        return cls(fd, frozenset(f.name for f in files))

    def fileno(self) -> int:
        return self.fd

    def changed(self) -> bool:
        """Drain the pending events: did any concern a watched file?"""
        hit = False
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return hit
            if not buf:
                return hit
            hit = hit or any(name in self.names for name in parse_names(buf))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
