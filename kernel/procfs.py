"""/proc: the processes of this machine, read with as few syscalls as possible.

The second of attribution's three layers (`kernel/sockdiag.py` finds a connection's socket; this finds the
process holding a socket and reads what describes a process; `actors/interceptor/attribution.py` caches
both and answers with a `ProcessInfo`). Processes come and go while they are read: every read here
tolerates a process, its fd directory, an fd link or a stat file vanishing at any step, and answers
"not there" (None, [], "") instead of raising. Everything takes the proc root as a parameter, so tests run
on fake /proc trees.
"""

from __future__ import annotations

import bisect
import contextlib
import operator
import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

KEEP_OPEN = 64  # /proc/<pid>/stat files kept open for cheap identity checks


def parse_status(text: str) -> tuple[str, int, int]:
    """(Name, PPid, effective Uid) from /proc/<pid>/status."""
    name, ppid, uid = "", -1, -1
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "Name":
            name = value.strip()
        elif key == "PPid":
            ppid = int(value.split()[0])
        elif key == "Uid":
            fields = value.split()
            uid = int(fields[1] if len(fields) > 1 else fields[0])
    return name, ppid, uid


def parse_stat_start(text: str) -> int:
    """Field 22 (starttime) of /proc/<pid>/stat; the comm field may contain spaces and parentheses."""
    rest = text.rpartition(")")[2].split()
    return int(rest[19]) if len(rest) > 19 else 0


def socket_inode(link: str) -> int:
    """`socket:[12345]` → 12345, anything else → 0."""
    if link.startswith("socket:[") and link.endswith("]"):
        with contextlib.suppress(ValueError):
            return int(link[8:-1])
    return 0


def cgroup2_mount(mountinfo: str) -> str | None:
    """Where the cgroup v2 hierarchy is mounted, from /proc/self/mountinfo; None when it is not (a network
    namespace entered with `ip netns exec` has its own /sys, without the cgroup mounts)."""
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " in line and len(fields) > 4:
            fstype = line.partition(" - ")[2].split()[:1]
            if fstype == ["cgroup2"]:
                return fields[4].replace("\\040", " ")
    return None


class Cgroups:
    """cgroup v2 id → the processes in it. sock_diag gives a socket's cgroup id (the inode number of the
    cgroup's directory), /sys/fs/cgroup/…/cgroup.procs lists its processes: a desktop session runs each app
    in its own scope, so a new socket's process is among a handful. The id → directory map comes from one
    walk of the hierarchy, walked again (at most every `rewalk` seconds) for an id it does not know."""

    def __init__(self, root: str | Path | None, rewalk: float = 1.0) -> None:
        self.root = str(root) if root is not None else None
        self.rewalk = rewalk
        self._paths: dict[int, str] = {}
        self._walked = -rewalk - 1.0

    def __bool__(self) -> bool:
        """False without a cgroup v2 mount: nothing to narrow by."""
        return self.root is not None

    @classmethod
    def found(cls, proc_root: str = "/proc") -> Cgroups:
        try:
            with open(f"{proc_root}/self/mountinfo") as f:
                return cls(cgroup2_mount(f.read()))
        except OSError:
            return cls(None)

    def _walk(self) -> None:
        assert self.root is not None
        paths: dict[int, str] = {}
        stack = [self.root]
        while stack:
            top = stack.pop()
            with contextlib.suppress(OSError):
                paths[os.stat(top).st_ino] = top
                with os.scandir(top) as entries:
                    stack.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))
        self._paths = paths

    def pids(self, cgroup: int, now: float) -> list[int] | None:
        """The processes of cgroup `cgroup`, None when that cannot be told (no cgroup v2, an unknown id)."""
        if self.root is None or not cgroup:
            return None
        path = self._paths.get(cgroup)
        if path is None and now - self._walked > self.rewalk:
            self._walked = now
            self._walk()
            path = self._paths.get(cgroup)
        if path is None or path == self.root:  # the root cgroup holds whatever was not put anywhere: no narrowing
            return None
        try:
            with open(f"{path}/cgroup.procs", "rb") as f:
                return [int(line) for line in f.read().split()]
        except (OSError, ValueError):
            self._paths.pop(cgroup, None)  # removed (an app's scope ends with it): walk again next time
            return None


class ProcReader:
    """Reads processes from a /proc tree (the real one, or a fake one in tests).

    Every read costs syscalls, which are what attribution spends its time on: files are read with plain
    os calls, the stat files of the processes asked about most recently stay open (a later check is
    one pread; once the process is gone the kernel answers ESRCH, even if its pid was reused), and a
    status file read to tell a process from a thread is not read again to describe the process.
    """

    def __init__(self, root: str | Path = "/proc", keep_open: int = KEEP_OPEN) -> None:
        self.root = str(root)
        self.keep_open = keep_open
        self._stat_fds: OrderedDict[int, int] = OrderedDict()
        self._status: tuple[int, bytes] = (0, b"")  # the status file tgid() just read, for status() to reuse
        self._loadavg_fd = -1

    def close(self) -> None:
        for fd in [*self._stat_fds.values(), self._loadavg_fd]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._stat_fds.clear()
        self._loadavg_fd = -1

    def pids(self, last: int | None = None) -> list[int]:
        """Every pid, newest first as far as numbers tell: descending from the last pid handed out (read
        here unless given), then the rest (after pid numbers wrapped around at pid_max, the newest
        processes have small numbers)."""
        try:
            numbers = sorted((int(e) for e in os.listdir(self.root) if e.isdigit()), reverse=True)
        except OSError:
            return []
        last = self.last_pid() if last is None else last
        if last is None:
            return numbers
        split = bisect.bisect_left(numbers, -last, key=operator.neg)  # first index with a number <= last
        return numbers[split:] + numbers[:split]

    def last_pid(self) -> int | None:
        """The pid the kernel handed out last (the last field of /proc/loadavg), None when unknown."""
        try:
            if self._loadavg_fd < 0:
                self._loadavg_fd = os.open(f"{self.root}/loadavg", os.O_RDONLY | os.O_CLOEXEC)
            return int(os.pread(self._loadavg_fd, 256, 0).split()[-1])
        except (OSError, ValueError, IndexError):
            return None

    def sockets(self, pid: int) -> Iterator[tuple[str, int]]:
        """(fd, socket inode) for each socket process `pid` holds, read lazily: a caller that found what
        it wanted stops early and pays for no more readlinks."""
        with contextlib.closing(self.fds(pid)) as fds:
            for fd, inode in fds:
                if inode:
                    yield str(fd), inode

    def fds(self, pid: int) -> Iterator[tuple[int, int]]:
        """(fd, socket inode or 0 for anything else) for each open fd of process `pid`, read lazily.
        Listing the table costs ~1 µs per fd and each readlink 2-4 µs (this VM): `fd_inode` reads one."""
        try:
            dirfd = os.open(f"{self.root}/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            try:
                names = os.listdir(dirfd)
            except OSError:  # the process exited between opening its fd table and listing it
                return
            own = os.path.realpath(f"{self.root}/{pid}/fd") if pid == os.getpid() else None
            for name in names:
                try:
                    link = os.readlink(name, dir_fd=dirfd)
                except OSError:
                    continue
                if link == own:  # this very listing, when a process reads itself: not one of its fds
                    continue
                with contextlib.suppress(ValueError):
                    yield int(name), socket_inode(link)
        finally:
            os.close(dirfd)

    def fd_inode(self, pid: int, fd: int) -> int | None:
        """What fd `fd` of process `pid` is now: a socket's inode, 0 for anything else, None when that fd is
        not open (or the process is gone). One readlink: the whole table is not listed."""
        try:
            return socket_inode(os.readlink(f"{self.root}/{pid}/fd/{fd}"))
        except OSError:
            return None

    def socket_inodes(self, pid: int) -> list[int]:
        """Inodes of the sockets process `pid` holds open ([] when it is gone or unreadable)."""
        return [inode for _fd, inode in self.sockets(pid)]

    def _read(self, pid: int, name: str, size: int = 4096) -> bytes:
        """One /proc/<pid>/<name> file, read with plain syscalls (a third of what open() costs)."""
        fd = os.open(f"{self.root}/{pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks = [os.read(fd, size)]
            while len(chunks[-1]) == size:  # long command lines
                chunks.append(os.read(fd, size))
        finally:
            os.close(fd)
        return b"".join(chunks)

    def tgid(self, pid: int) -> int | None:
        """The process a task id belongs to (itself for a process), None when there is no such task.
        The status file read stays for the next `status(pid)` (describing the process just found)."""
        try:
            text = self._read(pid, "status")
        except OSError:
            return None
        self._status = (pid, text)
        start = text.find(b"\nTgid:")
        if start < 0:
            return None
        try:
            return int(text[start + 6 : text.index(b"\n", start + 1)])
        except ValueError:
            return None

    def fd_size(self, pid: int) -> int | None:
        """The size of process `pid`'s fd table (FDSize in its status: a power of two at least as big as its
        highest fd), None when it is gone: which table is cheaper to read, without listing any."""
        try:
            text = self._read(pid, "status")
        except OSError:
            return None
        start = text.find(b"\nFDSize:")
        if start < 0:
            return None
        try:
            return int(text[start + 8 : text.index(b"\n", start + 1)])
        except ValueError:
            return None

    def exe(self, pid: int) -> str:
        try:
            target = os.readlink(f"{self.root}/{pid}/exe")
        except OSError:
            return ""
        return target.removesuffix(" (deleted)")

    def status(self, pid: int) -> tuple[str, int, int] | None:
        """(Name, PPid, effective Uid) of process `pid`, None when it is gone."""
        cached_pid, text = self._status
        self._status = (0, b"")
        try:
            if cached_pid != pid:
                text = self._read(pid, "status")
            return parse_status(text.decode(errors="replace"))
        except (OSError, ValueError, IndexError):
            return None

    def _stat_text(self, pid: int, reopen: bool = True) -> bytes | None:
        fd = self._stat_fds.get(pid)
        if fd is not None:
            try:
                text = os.pread(fd, 4096, 0)
            except OSError:  # the process is gone (its pid may belong to another one now): open afresh
                text = b""
            if text:
                self._stat_fds.move_to_end(pid)
                return text
            del self._stat_fds[pid]
            os.close(fd)
            if not reopen:
                return None
        try:
            fd = os.open(f"{self.root}/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            text = os.pread(fd, 4096, 0)
        except OSError:
            os.close(fd)
            return None
        if self.keep_open <= 0:
            os.close(fd)
            return text
        self._stat_fds[pid] = fd
        if len(self._stat_fds) > self.keep_open:
            os.close(self._stat_fds.popitem(last=False)[1])
        return text

    def identity(self, pid: int) -> tuple[int, str] | None:
        """(start time, comm) from /proc/<pid>/stat alone: one read tells whether a cached description
        still holds (a reused pid has another start time, an exec another comm)."""
        raw = self._stat_text(pid)
        if raw is None:
            return None
        text = raw.decode(errors="replace")
        head = text.rpartition(")")[0]
        try:
            return parse_stat_start(text), head.partition("(")[2]
        except (ValueError, IndexError):
            return None

    def running(self, pid: int) -> bool:
        """The process last seen under this pid is alive: not gone (nor replaced by a new one with the same
        pid), not a zombie. One pread when its stat file is kept open."""
        raw = self._stat_text(pid, reopen=False)
        if raw is None:
            return False
        state = raw[raw.rfind(b")") + 2 : raw.rfind(b")") + 3]
        return state not in (b"Z", b"X", b"x")

    def cmdline(self, pid: int) -> list[str]:
        try:
            raw = self._read(pid, "cmdline")
        except OSError:
            return []
        return [part.decode(errors="replace") for part in raw.split(b"\0") if part]
