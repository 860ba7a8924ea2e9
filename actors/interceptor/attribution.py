"""Which process owns a connection: a 5-tuple → its `ProcessInfo`.

Attribution has three layers; this is the top one, the interceptor's caches and search order:
1. sock_diag (`kernel/sockdiag.py`) looks the packet's 5-tuple up and returns the socket's inode, uid
   and cookie. TCP is an exact lookup; UDP too (the kernel matches it like an incoming datagram, so
   unconnected sockets are found), with a dump of that port as fallback.
2. The inode is mapped to a pid by reading /proc/<pid>/fd (`kernel/procfs.py` reads /proc): first single
   fds of the processes that owned the last connections (where the kernel most likely put a new socket:
   `FdTable`), then the processes of the socket's cgroup, then whole tables of the last owners (the
   smallest first) and of the newest processes (pid numbers wrap around, so "newest" starts at the last
   pid the kernel handed out), then all. Every socket read on the way is cached, so the next connections
   of a busy app are found without reading /proc at all. The cost does not grow with a known process's
   fd count: a whole table (~3 µs per fd) is read again only when the guesses miss.
3. The pid is described from /proc: executable, command line, uid, parent chain (for "children"
   rules). Cached per (pid, start time, comm): a reused pid or an exec gives a fresh description. The
   parent chain comes from the parent's own cached description, so a new process (curl) costs reads
   of itself and one check of its parent, not of every ancestor.

A socket or process that is not visible yet (a process that was just started, a scan that raced
with it) or gone already (its fd directory, an fd link or its stat file vanishing at any step) gives
None: the caller retries a few times within milliseconds, then decides without it.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Container, Iterable, Sequence

from kernel.procfs import Cgroups, ProcReader
from kernel.sockdiag import DiagSocket, SockDiag, SocketEvents
from messages import ProcessInfo
from messages.flows import FiveTuple

MAX_ANCESTORS = 16
MAX_CACHED_SOCKETS = 65536
RECENT_OWNERS = 16
NEWEST_PROBES = 8  # pids below the last one handed out that are tried before listing /proc
FD_PROBES = 24  # fd numbers of a recent owner read one by one before its whole fd table (~3 µs each)
ROOT_CGROUP = 1  # the cgroup v2 root's id
PROBED_OWNERS = 2  # recent owners of the same uid and cgroup whose single fds are read
CGROUP_PROCESSES = 64  # a cgroup with more processes than this is not read process by process
MAX_COOKIES = 16384  # attributed sockets whose destroy notice is waited for (~100 bytes each)
CLOSES_READ = 1024  # destroyed-socket notices read per lookup that misses the caches, at most
FIRST_FREE = 4  # free fd numbers read before the older hits
FD_HITS = 16  # fd numbers where a process's new sockets were found lately, tried first
FREE_KEPT = 1024  # free fd numbers kept per table, the lowest (a process may hold fd 1,000,000 and little else)


class FdTable:
    """What attribution knows of one recent owner's fd table: every fd as of its last full read, updated by
    the single-fd reads since, and the fds where its new sockets turned up lately.

    Reading a whole table costs ~1 µs per fd to list and 2-4 µs per readlink (5,000 fds: ~25 ms), but
    the kernel gives a new socket the lowest free fd number: the number of a socket the process closed
    and replaced (a hit before), a number that was free at the last read, or the next one above the top.
    So a new socket of a known process is mostly found by reading a handful of fds. A guess is only a
    guess: an fd is taken as the socket's only when its link names the socket's inode right now.
    """

    def __init__(self, fds: dict[int, int]) -> None:
        self.fds = fds  # fd → socket inode, 0 for anything else
        self.top = max(fds, default=-1)  # the highest number seen open
        self.free = lowest_free(fds, FREE_KEPT)  # numbers below the top not open, sorted (the lowest FREE_KEPT)
        self.hits: deque[int] = deque(maxlen=FD_HITS)
        self.freed: deque[int] = deque(maxlen=FD_HITS)  # fds of its sockets destroyed lately, newest first
        self.where = {inode: fd for fd, inode in fds.items() if inode}  # socket inode → its fd

    def candidates(self, limit: int = FD_PROBES) -> list[int]:
        """The fd numbers a new socket most likely has, in order: the latest hit (a socket closed and
        replaced), the fds of its sockets destroyed since (the lowest first: the kernel takes the lowest
        free), the lowest numbers free at the last read (which run on past the top), the older hits, then
        more free numbers."""
        lowest = self.free[:limit]
        lowest += range(self.top + 1, self.top + 1 + limit - len(lowest))
        hits = list(self.hits)
        freed = sorted(self.freed)
        out = list(dict.fromkeys([*hits[:1], *freed, *lowest[:FIRST_FREE], *hits[1:], *lowest[FIRST_FREE:]]))
        return out[:limit]

    def closed(self, fd: int) -> None:
        """A socket this process held at `fd` was destroyed: its number is free, or taken by a new fd."""
        if fd not in self.freed:
            self.freed.appendleft(fd)

    def seen(self, fd: int, inode: int | None) -> None:
        """fd `fd` was read now: `inode` (0: not a socket), None when it was not open."""
        with contextlib.suppress(ValueError):
            self.freed.remove(fd)
        was = self.fds.pop(fd, 0)
        if was:
            self.where.pop(was, None)
        at = bisect.bisect_left(self.free, fd)
        listed = at < len(self.free) and self.free[at] == fd
        if inode is None:
            if fd <= self.top and not listed and len(self.free) < FREE_KEPT:
                self.free.insert(at, fd)
            return
        self.fds[fd] = inode
        if inode:
            self.where[inode] = fd
        if listed:
            del self.free[at]
        if fd > self.top:
            self.free.extend(itertools.islice(range(self.top + 1, fd), max(FREE_KEPT - len(self.free), 0)))
            self.top = fd

    def hit(self, fd: int) -> None:
        with contextlib.suppress(ValueError):
            self.hits.remove(fd)
        self.hits.appendleft(fd)


def lowest_free(fds: Iterable[int], limit: int) -> list[int]:
    """The lowest `limit` numbers below the highest of `fds` that are not in it, in order."""
    free: list[int] = []
    expected = 0
    for fd in sorted(fds):
        free.extend(range(expected, min(fd, expected + limit - len(free))))
        if len(free) >= limit:
            break
        expected = fd + 1
    return free


def probes_for(size: int) -> int:
    """How many single fds to read in a table of `size` fds: a small table is read whole about as fast (and
    is, right after, when the socket is not there), so guessing there is kept to the likeliest few."""
    return min(FD_PROBES, max(2, size // 8))


SMALL_TABLE = 256  # a recent owner's fd table read before the newest processes only up to this size
_NO_TABLE = FdTable({})


def probe_order(
    recent: Sequence[int], keys: dict[int, tuple[int, int]], wanted: set[tuple[int, int]], tables: Container[int]
) -> list[int]:
    """The recent owners (newest first) whose single fds are read for new sockets: the last owner, and
    up to `PROBED_OWNERS` whose last socket had the (uid, cgroup id) of a socket looked for (an app's
    processes share both: a desktop session gives each app its own cgroup; in the root cgroup, as in the
    lab, the uid alone says too little); only those with a kept table."""
    wanted = {key for key in wanted if key[1] > ROOT_CGROUP}  # the root cgroup holds everything: no hint
    same = [pid for pid in recent if keys.get(pid) in wanted and pid in tables][:PROBED_OWNERS]
    return list(dict.fromkeys([*same, *(pid for pid in recent[:1] if pid in tables)]))


class ProcessCache:
    """pid → ProcessInfo, cached per (pid, start time, comm): a hit costs one read of /proc/<pid>/stat.

    A description's parent chain is its parent's cached description plus that parent, so describing a
    new child of a known process reads the child and checks the parent only. The chain is as it was when
    the process was first described (a process re-parented later, after its parent exited, keeps it).
    """

    def __init__(self, reader: ProcReader, max_entries: int = 4096) -> None:
        self.reader = reader
        self.max_entries = max_entries
        self._cache: OrderedDict[int, tuple[tuple[int, str], ProcessInfo]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def describe(self, pid: int, _depth: int = 0) -> ProcessInfo | None:
        ident = self.reader.identity(pid)
        if ident is None:
            return None
        cached = self._cache.get(pid)
        if cached is not None and cached[0] == ident:
            self.hits += 1
            self._cache.move_to_end(pid)
            return cached[1]
        status = self.reader.status(pid)  # the start time is known from the identity: no second stat read
        if status is None:
            return None
        name, ppid, uid = status
        self.misses += 1
        exe = self.reader.exe(pid)
        ancestors: list[str] = []
        ancestor_names: list[str] = []
        if ppid > 0 and ppid != pid and _depth < MAX_ANCESTORS:
            parent = self.describe(ppid, _depth + 1)
            if parent is not None:
                ancestors = [parent.exe or parent.name, *parent.ancestors][:MAX_ANCESTORS]
                ancestor_names = [parent.name, *parent.ancestor_names][:MAX_ANCESTORS]
        info = ProcessInfo(
            pid=pid,
            ppid=ppid,
            uid=uid,
            name=name,
            exe=exe,
            cmdline=self.reader.cmdline(pid),
            ancestors=ancestors,
            ancestor_names=ancestor_names,
        )
        self._cache[pid] = (ident, info)
        if len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return info


class Attributor:
    """5-tuple → ProcessInfo: sock_diag, the cached inode→pid map, the process cache."""

    def __init__(
        self,
        diag: SockDiag | None,
        reader: ProcReader,
        probe_fds: bool = True,
        closes: Callable[[], SocketEvents] | None = None,
        cgroups: Cgroups | None = None,
    ) -> None:
        self.diag = diag
        self.reader = reader
        self.processes = ProcessCache(reader)
        self.probe_fds = probe_fds  # False: read a recent owner's whole fd table (the way before; benchmarks)
        if closes is None and probe_fds and isinstance(diag, SockDiag):
            closes = functools.partial(SocketEvents, tcp=True)
        # Destroyed sockets: which fds of recent owners were freed. Listened to only while a kept table is big
        # (> SMALL_TABLE): every TCP socket closed in the namespace costs the kernel a notice (~3 µs).
        self._open_closes = closes
        self.closes: SocketEvents | None = None
        if cgroups is None and probe_fds and isinstance(diag, SockDiag):
            cgroups = Cgroups.found(reader.root)
        self.cgroups = cgroups  # a socket's cgroup id → the processes that may hold it
        self.cgroup_reads = 0  # lookups that read the processes of the socket's cgroup
        self._cookies: OrderedDict[int, tuple[int, int]] = OrderedDict()  # cookie → (pid, fd) of sockets found
        self._owners: dict[int, int] = {}
        self._recent: OrderedDict[int, None] = OrderedDict()
        self._tables: dict[int, FdTable] = {}  # recent owner → its fd table as last read
        self._keys: dict[int, tuple[int, int]] = {}  # recent owner → (uid, cgroup id) of its last socket found
        self.fd_probes = 0  # single fds read in recent owners' tables
        self.fd_probe_hits = 0  # sockets found that way (without reading a whole table)
        self.scans = 0  # lookups that had to read /proc/<pid>/fd (the socket was not cached)
        self.listings = 0  # of those, lookups that had to list every process
        self.no_socket = 0  # sock_diag did not know the connection (gone already, or not a socket of ours)
        self.no_process = 0  # the socket was known, but no process holds it (closed, or a process exited)
        self._last_socket: tuple[FiveTuple, DiagSocket] | None = None  # what socket_uid() found
        self._last_attributed: tuple[FiveTuple, DiagSocket] | None = None  # the socket attribute() found last

    def pid_of_inode(self, inode: int) -> int | None:
        """The process holding socket `inode` (see `owners_of`)."""
        return self.owners_of([inode]).get(inode)

    def owners_of(
        self,
        inodes: Iterable[int],
        still_open: Callable[[int], bool] | None = None,
        keys: Iterable[tuple[int, int]] = (),
    ) -> dict[int, int]:
        """inode → pid for each socket whose process is found, in one pass over the processes.

        Looked for, in this order, until every socket is found:
        0. by reading single fds (`FdTable`) of the last owner and of the recent owners of sockets with the
           same (uid, cgroup id) as in `keys` (what sock_diag said of the sockets looked for): a new socket
           of a known process, found without reading its whole table; then in the processes of the
           sockets' cgroups (`Cgroups`: when they are few), the smallest fd table first;
        1. in the process that owned the last connection (an app making one connection usually makes
           more: a browser, wrk), when its table is small;
        2. in the few newest processes, probed by number down from the last pid handed out, without
           listing /proc (a new connection's socket mostly belongs to a process started a moment ago:
           curl, a browser's new helper); a number that is a thread, not a process, is skipped;
        3. in the other processes that owned recent connections, the smallest fd table first; one that
           holds no socket any more (exited, a zombie) is forgotten;
        4. in every process, newest first — the expensive step, so sockets that `still_open` says are
           closed by now (a short connection of a process that already exited) are not looked for.
        Every socket read on the way is cached.
        """
        found: dict[int, int] = {}
        wanted: set[int] = set()
        for inode in inodes:
            pid = self._owners.get(inode)
            if pid is not None:  # read in an earlier scan (checked by describing it: see attribute_many)
                found[inode] = self._remember(pid)
            else:
                wanted.add(inode)
        if not wanted:
            return found
        self.scans += 1
        if len(self._owners) > MAX_CACHED_SOCKETS:
            self._owners.clear()
        checked: set[int] = set()
        recent = list(reversed(self._recent))
        if self.probe_fds:
            keys = set(keys)
            for pid in probe_order(recent, self._keys, keys, self._tables):
                self._probe(pid, wanted, found)
                if not wanted:
                    return found
            for cgroup in sorted({cgroup for _uid, cgroup in keys if cgroup} if self.cgroups else ()):
                self._scan_cgroup(cgroup, wanted, found, checked)
                if not wanted:
                    return found
            # the cheapest tables first: a big one (a browser) after the newest processes
            first = [pid for pid in recent[:1] if len(self._tables.get(pid, _NO_TABLE).fds) <= SMALL_TABLE]
            recent.sort(key=lambda pid: len(self._tables.get(pid, _NO_TABLE).fds))
        else:
            first = recent[:1]
        for pid in first:
            self._scan_recent(pid, wanted, found, checked)
            if not wanted:
                return found
        last = self.reader.last_pid()
        if last is not None:
            for pid in range(last, max(last - NEWEST_PROBES, 0), -1):
                if pid not in checked and self.reader.tgid(pid) == pid:  # a process: not gone, not a thread
                    checked.add(pid)
                    self._scan(pid, wanted, found)
                    if not wanted:
                        return found
        for pid in recent:
            if pid not in checked:
                self._scan_recent(pid, wanted, found, checked)
                if not wanted:
                    return found
        if still_open is not None:
            wanted = {inode for inode in wanted if still_open(inode)}
            if not wanted:
                return found
        self.listings += 1
        for pid in self.reader.pids(last):
            if pid not in checked:
                self._scan(pid, wanted, found)
                if not wanted:
                    return found
        return found

    def _probe(self, pid: int, wanted: set[int], found: dict[int, int]) -> None:
        """Read the fds of recent owner `pid` where a new socket most likely is (see `FdTable`)."""
        table = self._tables.get(pid)
        if table is None:
            return
        if not self.reader.running(pid):  # one pread: not 24 readlinks into a process that is gone
            self._forget(pid)
            return
        if len(table.fds) > SMALL_TABLE:  # (a small table is read whole cheaply: its notices are not kept)
            self._read_closes()
        for fd in table.candidates(probes_for(len(table.fds))):
            inode = self.reader.fd_inode(pid, fd)
            self.fd_probes += 1
            table.seen(fd, inode)
            if not inode:
                continue
            self._owners[inode] = pid
            if inode in wanted:
                self.fd_probe_hits += 1
                table.hit(fd)
                wanted.discard(inode)
                found[inode] = self._remember(pid)
                if not wanted:
                    return

    def _scan_cgroup(self, cgroup: int, wanted: set[int], found: dict[int, int], checked: set[int]) -> None:
        """Read the tables of the processes in cgroup `cgroup`, the smallest first (FDSize), when it has few."""
        members = self.cgroups.pids(cgroup, time.monotonic()) if self.cgroups is not None else None
        if not members or len(members) > CGROUP_PROCESSES:
            return
        self.cgroup_reads += 1
        sizes = {pid: self.reader.fd_size(pid) for pid in members if pid not in checked}
        for pid in sorted((pid for pid, size in sizes.items() if size is not None), key=lambda pid: sizes[pid] or 0):
            checked.add(pid)
            if pid in self._recent:
                self._scan_recent(pid, wanted, found, checked)
            else:
                self._scan(pid, wanted, found)
            if not wanted:
                return

    def _scan_recent(self, pid: int, wanted: set[int], found: dict[int, int], checked: set[int]) -> None:
        checked.add(pid)
        if not self.reader.running(pid) or not self._scan(pid, wanted, found, recent=True):
            self._forget(pid)  # exited, a zombie, or no sockets: do not look there first again

    def _scan(self, pid: int, wanted: set[int], found: dict[int, int], recent: bool = False) -> bool:
        """Read `pid`'s sockets until the wanted ones are found (moved from `wanted` to `found`); False
        when it holds none. A recent owner is read to the end: its other new sockets, whose first
        packets are likely queued right behind this one, are cached on the way, and its table is kept
        for reading single fds next time."""
        any_socket = False
        table: dict[int, int] = {}
        hits: list[int] = []
        with contextlib.closing(self.reader.fds(pid)) as scan:
            for fd, inode in scan:
                table[fd] = inode
                if not inode:
                    continue
                any_socket = True
                self._owners[inode] = pid
                if inode in wanted:
                    wanted.discard(inode)
                    hits.append(fd)
                    found[inode] = self._remember(pid)
                    if not wanted and not recent:
                        break
        if recent and any_socket and self.probe_fds and pid in self._recent:
            fds = self._tables[pid] = FdTable(table)
            for fd in hits:
                fds.hit(fd)
            if len(table) > SMALL_TABLE and self.closes is None and self._open_closes is not None:
                with contextlib.suppress(OSError):  # needs CAP_NET_ADMIN; without, a freed fd costs a table read
                    self.closes = self._open_closes()
        return any_socket

    def _read_closes(self) -> None:
        """Mark the fds of the found sockets destroyed since the last call as freed in their owners' tables.
        Read only before guessing in a big table: a lookup for a new process (curl) does not pay for them."""
        if self.closes is None or not self._cookies:
            return
        for gone in self.closes.read(CLOSES_READ):
            owner = self._cookies.pop(gone.cookie, None)
            if owner is not None and (table := self._tables.get(owner[0])) is not None:
                table.closed(owner[1])

    def _remember(self, pid: int) -> int:
        self._recent.pop(pid, None)
        self._recent[pid] = None
        if len(self._recent) > RECENT_OWNERS:
            self._forget(next(iter(self._recent)))
        return pid

    def _forget(self, pid: int) -> None:
        self._recent.pop(pid, None)
        self._keys.pop(pid, None)
        gone = self._tables.pop(pid, None)
        big = gone is not None and len(gone.fds) > SMALL_TABLE
        if big and self.closes is not None and all(len(t.fds) <= SMALL_TABLE for t in self._tables.values()):
            self.closes.close()  # no big table left: stop the kernel's notices
            self.closes = None

    def attribute_many(self, flows: Sequence[FiveTuple]) -> list[ProcessInfo | None]:
        """The processes of several connections (sock_diag each, then one pass over the processes for all)."""
        if self.diag is None:
            return [None] * len(flows)
        diag = self.diag
        last, self._last_socket = self._last_socket, None
        sockets = [last[1] if last is not None and last[0] == flow else diag.lookup(flow) for flow in flows]
        found = sockets[-1] if flows else None
        self._last_attributed = (flows[-1], found) if found is not None else None
        flow_of = {s.inode: flow for s, flow in zip(sockets, flows, strict=True) if s is not None and s.inode}

        def still_open(inode: int) -> bool:
            again = diag.lookup(flow_of[inode])
            return again is not None and again.inode == inode

        keys = {(s.uid, s.cgroup) for s in sockets if s is not None}
        pids = self.owners_of(flow_of, still_open, keys)
        found_processes: list[ProcessInfo | None] = []
        for sock in sockets:
            if sock is None or not sock.inode:
                self.no_socket += 1
                found_processes.append(None)
                continue
            pid = pids.get(sock.inode)
            process = self.processes.describe(pid) if pid is not None else None
            if process is None and pid is not None and self._owners.pop(sock.inode, None) is not None:
                pid = self.owners_of([sock.inode], still_open, keys).get(sock.inode)  # a cached owner is gone: again
                process = self.processes.describe(pid) if pid is not None else None
            if process is None:
                self.no_process += 1
            elif pid in self._recent:
                self._keys[pid] = (sock.uid, sock.cgroup)
                table = self._tables.get(pid)  # (a process's first sockets are closed too when it has grown big)
                fd = table.where.get(sock.inode) if table is not None else None
                if fd is not None and sock.cookie and self._open_closes is not None:
                    self._cookies[sock.cookie] = (pid, fd)
                    if len(self._cookies) > MAX_COOKIES:
                        self._cookies.popitem(last=False)
            found_processes.append(process)
        return found_processes

    def close(self) -> None:
        self.reader.close()
        if self.closes is not None:
            self.closes.close()

    def socket_uid(self, flow: FiveTuple) -> int | None:
        """The uid owning the connection's socket (sock_diag alone: no /proc), None when not found.
        The socket found is kept for attributing the same connection next."""
        if self.diag is None:
            return None
        found = self.diag.lookup(flow)
        self._last_socket = (flow, found) if found is not None else None
        return found.uid if found is not None else None

    def socket_cookie(self, flow: FiveTuple, fresh: bool = False) -> int:
        """The cookie of the connection's socket, 0 when there is none: the kernel's identity of the socket,
        which tells a new socket on a reused port apart from the one a verdict was given for. Without
        `fresh`, the socket the last attribution of this very flow found answers (no syscall)."""
        last = self._last_attributed
        if not fresh and last is not None and last[0] == flow:
            return last[1].cookie
        if self.diag is None:
            return 0
        found = self.diag.lookup(flow)
        return found.cookie if found is not None else 0

    def uid_of(self, pid: int) -> int | None:
        """The effective uid of process `pid`, None when it is gone."""
        status = self.reader.status(pid)
        return status[2] if status is not None else None

    def attribute(self, flow: FiveTuple) -> ProcessInfo | None:
        """The process holding the connection's socket, None when it is not found (see the module)."""
        return self.attribute_many([flow])[0]
