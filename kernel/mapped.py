"""A fixed-size table in a memory-mapped file that several processes share: the address → name table
(core/dns/names.py) and the divert backend's redirect table (core/redirect.py).

`MappedFile` opens (or creates) the file, checks the caller's header and starts it empty when the layout
differs (another version, garbage), maps it, and offers the file lock writers serialise on. Readers never
lock: the tables use per-slot sequence counters. Without `path` the table lives in anonymous memory (tests,
one process). `fcntl` is missing on Windows: there the lock is a no-op (one writer per table there).
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]


class MappedFile:
    def __init__(self, path: Path | None, header: bytes, size: int, create: bool = True, what: str = "table") -> None:
        """Map `size` bytes starting with `header`; with `create=False` a missing file or another layout is an
        OSError naming `what` instead of a fresh empty file."""
        self.path = path
        self.fd = -1
        if path is None:
            self.map = mmap.mmap(-1, size)
            self.map[: len(header)] = header
            return
        self.fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
        try:
            with self.locked():  # several processes may open it at once
                if os.pread(self.fd, len(header), 0) != header:
                    if not create:
                        raise OSError(f"{path}: not a {what}")
                    os.ftruncate(self.fd, 0)  # another layout (or garbage): start empty
                    os.ftruncate(self.fd, size)
                    os.pwrite(self.fd, header, 0)
                self.map = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The writers' lock (exclusive flock on the file); nothing to lock for an anonymous table."""
        if self.fd < 0 or fcntl is None:
            yield
            return
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def replaced(self) -> bool:
        """Was the file removed or replaced since it was opened (a restarted owner made a new one)?"""
        if self.path is None or self.fd < 0:
            return False
        try:
            return os.stat(self.path).st_ino != os.fstat(self.fd).st_ino
        except OSError:
            return True

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.map.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
