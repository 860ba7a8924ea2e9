"""Process attribution in its three layers: sock_diag bytes (kernel/sockdiag.py), /proc reading on fake /proc
trees (kernel/procfs.py), the process cache and attributor (actors/interceptor/attribution.py); and the shared
name table."""

from __future__ import annotations

import os
import signal
import socket
import struct
from pathlib import Path

import pytest

from actors.interceptor.attribution import FD_PROBES, Attributor, FdTable, lowest_free, probe_order, probes_for
from core.dns.names import GRACE, NameTable
from core.policy import AppFacts
from kernel.procfs import Cgroups, ProcReader, cgroup2_mount, parse_stat_start, parse_status, socket_inode
from kernel.sockdiag import (
    INET_DIAG_CGROUP_ID,
    DiagSocket,
    best_udp_match,
    cgroup_id,
    diag_request,
    ip_bytes,
    parse_diag_message,
)
from messages.flows import FiveTuple

# --- fake /proc -------------------------------------------------------------------------------------------


def make_proc(
    root: Path,
    pid: int,
    *,
    name: str,
    exe: str,
    ppid: int,
    uid: int = 1000,
    start: int = 100,
    sockets: tuple = (),
    tgid: int = 0,
    fdsize: int = 64,
) -> None:
    """A fake /proc/<pid>; with `tgid`, a thread of process `tgid` (a hidden entry: not listed by /proc)."""
    d = root / (str(pid) if not tgid else f".task-{pid}")
    (d / "fd").mkdir(parents=True, exist_ok=True)
    (d / "status").write_text(
        f"Name:\t{name}\nState:\tS\nTgid:\t{tgid or pid}\nPid:\t{pid}\nPPid:\t{ppid}\n"
        f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}\nFDSize:\t{fdsize}\n"
    )
    fields = ["S", str(ppid)] + ["0"] * 17 + [str(start)] + ["0"] * 10
    (d / "stat").write_text(f"{pid} ({name}) " + " ".join(fields) + "\n")
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in [exe, "--flag", "x y"]) + b"\0")
    if (d / "exe").is_symlink():
        (d / "exe").unlink()
    (d / "exe").symlink_to(exe)
    for i, inode in enumerate(sockets, start=3):
        (d / "fd" / str(i)).symlink_to(f"socket:[{inode}]")
    (d / "fd" / "0").symlink_to("/dev/null") if not (d / "fd" / "0").exists() else None


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    make_proc(tmp_path, 1, name="systemd", exe="/usr/lib/systemd/systemd", ppid=0, uid=0)
    make_proc(tmp_path, 50, name="firefox", exe="/usr/bin/firefox", ppid=1)
    make_proc(tmp_path, 100, name="Web Content", exe="/usr/lib/firefox/firefox-bin", ppid=50, sockets=(555, 556))
    return tmp_path


class FakeDiag:
    def __init__(self, table: dict[FiveTuple, DiagSocket]) -> None:
        self.table = table

    def lookup(self, flow: FiveTuple) -> DiagSocket | None:
        return self.table.get(flow)


def diag_socket(inode: int, uid: int = 1000, cgroup: int = 0, cookie: int = 0) -> DiagSocket:
    return DiagSocket(socket.AF_INET, 2, bytes(16), 40000, bytes(16), 443, uid, inode, cookie=cookie, cgroup=cgroup)


def test_status_and_stat_parsing() -> None:
    assert parse_status("Name:\tcurl\nPPid:\t7\nUid:\t1000\t1001\t1000\t1000\n") == ("curl", 7, 1001)
    assert parse_stat_start("9 (a b) c) S 1 " + " ".join(["0"] * 17) + " 4242 0 0") == 4242
    assert socket_inode("socket:[12345]") == 12345
    assert socket_inode("pipe:[12345]") == 0


def test_socket_owner_process_and_its_parents(proc: Path) -> None:
    key = FiveTuple(6, "192.0.2.66", 40000, "203.0.113.80", 443)
    attr = Attributor(FakeDiag({key: diag_socket(556)}), ProcReader(proc))  # type: ignore[arg-type]
    info = attr.attribute(key)
    assert info is not None
    assert (info.pid, info.ppid, info.uid, info.name, info.exe) == (
        100,
        50,
        1000,
        "Web Content",
        "/usr/lib/firefox/firefox-bin",
    )
    assert info.cmdline == ["/usr/lib/firefox/firefox-bin", "--flag", "x y"]
    assert info.ancestors == ["/usr/bin/firefox", "/usr/lib/systemd/systemd"]
    assert info.ancestor_names == ["firefox", "systemd"]
    app = AppFacts.from_process(info)  # what app rules see of it
    assert app.ancestors == (("/usr/bin/firefox", "firefox"), ("/usr/lib/systemd/systemd", "systemd"))


def test_unknown_socket_gives_none_then_a_started_process_is_found(proc: Path) -> None:
    key = FiveTuple(17, "192.0.2.66", 5353, "203.0.113.80", 53)
    diag = FakeDiag({key: diag_socket(777)})
    attr = Attributor(diag, ProcReader(proc))  # type: ignore[arg-type]
    assert attr.attribute(key) is None  # socket seen, process not (yet): the engine retries
    make_proc(proc, 200, name="dig", exe="/usr/bin/dig", ppid=50, sockets=(777,))
    process = attr.attribute(key)
    assert process is not None and process.exe == "/usr/bin/dig"
    assert attr.attribute(FiveTuple(17, "192.0.2.66", 1, "203.0.113.80", 53)) is None  # no socket at all


def scanned(reader: ProcReader) -> list[int]:
    """Record which processes' fds the reader scans, in order."""
    read: list[int] = []
    original = reader.fds
    reader.fds = lambda pid: read.append(pid) or original(pid)  # type: ignore[method-assign]
    return read


def test_socket_scan_starts_at_the_newest_process_and_stops_at_the_owner(proc: Path) -> None:
    for pid in range(200, 260):
        make_proc(proc, pid, name=f"p{pid}", exe="/usr/bin/sleep", ppid=1, sockets=(10_000 + pid,))
    reader = ProcReader(proc)
    read = scanned(reader)
    attr = Attributor(None, reader)
    assert attr.pid_of_inode(10_257) == 257
    assert read == [259, 258, 257]
    assert attr.pid_of_inode(10_258) == 258 and len(read) == 3  # read on the way: cached
    assert attr.pid_of_inode(555) == 100  # an older process: found further down
    assert attr.pid_of_inode(999_999) is None


def test_newest_first_survives_pid_numbers_wrapping_around(proc: Path) -> None:
    """After pid_max the kernel starts again at small numbers: the newest process is not the biggest."""
    for pid in (30_000, 31_000, 120, 130):
        make_proc(proc, pid, name=f"p{pid}", exe="/usr/bin/sleep", ppid=1, sockets=(pid,))
    (proc / "loadavg").write_text("0.10 0.20 0.30 1/200 125\n")  # 125 was handed out last
    reader = ProcReader(proc)
    assert reader.pids() == [120, 100, 50, 1, 31_000, 30_000, 130]
    read = scanned(reader)
    assert Attributor(None, reader).pid_of_inode(120) == 120 and read == [120]  # probed: /proc not listed


def test_a_new_thread_of_an_old_process_is_not_taken_for_the_owner(proc: Path) -> None:
    """/proc/<tid>/fd of a thread shows its process's fds: probing by number must not report the thread."""
    make_proc(proc, 124, name="Socket Thread", exe="/usr/lib/firefox/firefox-bin", ppid=50, sockets=(555, 556),
              tgid=100)  # fmt: skip
    (proc / ".task-124").rename(proc / "124")  # reachable by number, like a real thread id
    (proc / "loadavg").write_text("0.10 0.20 0.30 1/200 124\n")
    reader = ProcReader(proc)
    listing = reader.pids
    reader.pids = lambda last=None: [p for p in listing(last) if p != 124]  # type: ignore[method-assign]
    read = scanned(reader)  # (/proc does not list thread ids)
    assert Attributor(None, reader).pid_of_inode(556) == 100
    assert 124 not in read


def test_one_pass_finds_several_sockets_and_stops_when_all_are_found(proc: Path) -> None:
    for pid in range(200, 210):
        make_proc(proc, pid, name=f"p{pid}", exe="/usr/bin/sleep", ppid=1, sockets=(10_000 + pid,))
    reader = ProcReader(proc)
    read = scanned(reader)
    attr = Attributor(None, reader)
    assert attr.owners_of([10_207, 10_209, 555, 4]) == {10_207: 207, 10_209: 209, 555: 100}
    assert read.count(209) == read.count(100) == 1 and len(read) == len(set(read))  # one pass, nobody twice


def test_a_known_owner_is_asked_first_and_read_to_the_end(proc: Path) -> None:
    make_proc(proc, 300, name="wrk", exe="/usr/bin/wrk", ppid=1, sockets=(3001, 3002, 3003))
    reader = ProcReader(proc)
    attr = Attributor(None, reader)
    assert attr.pid_of_inode(3002) == 300
    for fd, inode in ((9, 3009), (10, 3010)):  # two new connections; the first one's packet is queued first
        (proc / "300" / "fd" / str(fd)).symlink_to(f"socket:[{inode}]")
    read = scanned(reader)
    assert attr.pid_of_inode(3009) == 300 and read == [300]  # the recent owner first: /proc is not listed
    assert attr.pid_of_inode(3010) == 300 and read == [300]  # read on the way: nothing to scan


def test_a_new_process_is_found_before_older_recent_owners_are_read(proc: Path) -> None:
    """Long-lived apps that made a connection once (a VPN client, a chat app) are not read for every
    connection of a new process: only the most recent owner comes before the newest processes."""
    make_proc(proc, 300, name="chat", exe="/usr/bin/chat", ppid=1, sockets=(3000, 3001))
    make_proc(proc, 310, name="mail", exe="/usr/bin/mail", ppid=1, sockets=(3100, 3101))
    (proc / "loadavg").write_text("0.10 0.20 0.30 1/200 310\n")
    reader = ProcReader(proc)
    attr = Attributor(None, reader)
    assert attr.pid_of_inode(3000) == 300 and attr.pid_of_inode(3100) == 310  # recent owners, 310 the last
    make_proc(proc, 320, name="curl", exe="/usr/bin/curl", ppid=1, sockets=(3200,))  # started just now
    (proc / "loadavg").write_text("0.10 0.20 0.30 1/201 320\n")
    read = scanned(reader)
    assert attr.pid_of_inode(3200) == 320
    assert read == [310, 320]  # the chat app was not read


def test_a_recent_owner_that_exited_is_forgotten(proc: Path) -> None:
    make_proc(proc, 400, name="curl", exe="/usr/bin/curl", ppid=50, sockets=(4000,))
    reader = ProcReader(proc)
    attr = Attributor(None, reader)
    assert attr.pid_of_inode(4000) == 400
    for entry in sorted((proc / "400").rglob("*"), reverse=True):
        entry.unlink() if entry.is_symlink() or entry.is_file() else entry.rmdir()
    (proc / "400").rmdir()
    assert attr.pid_of_inode(556) == 100
    read = scanned(reader)
    assert attr.pid_of_inode(12345) is None and 400 not in read


def test_a_new_child_of_a_known_parent_reads_itself_and_checks_the_parent_only(proc: Path) -> None:
    attr = Attributor(None, ProcReader(proc))
    attr.processes.describe(100)  # Web Content, child of firefox, grandchild of systemd: all described
    make_proc(proc, 101, name="curl", exe="/usr/bin/curl", ppid=100, sockets=())
    asked: list[int] = []
    reader = attr.reader
    read, identity = reader._read, reader.identity
    reader._read = lambda pid, name, size=4096: asked.append(pid) or read(pid, name, size)  # type: ignore[method-assign]
    reader.identity = lambda pid: asked.append(pid) or identity(pid)  # type: ignore[method-assign]
    process = attr.processes.describe(101)
    assert process is not None
    assert process.ancestors == ["/usr/lib/firefox/firefox-bin", "/usr/bin/firefox", "/usr/lib/systemd/systemd"]
    assert [pid for pid in asked if pid != 101] == [100]  # the parent's identity, nothing further up


def test_process_cache_notices_exec_and_pid_reuse(proc: Path) -> None:
    attr = Attributor(None, ProcReader(proc))
    first = attr.processes.describe(100)
    assert attr.processes.describe(100) is first and attr.processes.hits == 1
    make_proc(proc, 100, name="curl", exe="/usr/bin/curl", ppid=50, sockets=())  # exec: same pid, new image
    assert attr.processes.describe(100).exe == "/usr/bin/curl"
    make_proc(proc, 100, name="curl", exe="/usr/bin/curl", ppid=1, start=999)  # reused pid: new start time
    assert attr.processes.describe(100).ppid == 1
    assert attr.processes.describe(4242) is None


def test_deleted_executable_keeps_its_path(tmp_path: Path) -> None:
    make_proc(tmp_path, 5, name="app", exe="/opt/app (deleted)", ppid=0)
    assert ProcReader(tmp_path).exe(5) == "/opt/app"


def remove_tree(path: Path) -> None:
    for entry in sorted(path.rglob("*"), reverse=True):
        entry.unlink() if entry.is_symlink() or entry.is_file() else entry.rmdir()
    path.rmdir()


def test_a_process_vanishing_at_any_step_is_not_there_never_an_error(proc: Path) -> None:
    """Processes exit while they are read: a gone process, fd directory, fd link or stat file answers
    "not there" (None, [], "") at every step of the /proc reader and of the process cache."""
    make_proc(proc, 300, name="gone", exe="/usr/bin/gone", ppid=1, sockets=(3000,))
    reader = ProcReader(proc, keep_open=0)  # (a kept-open stat file: test_a_kept_open_stat_file_does_not_outlive…)
    assert reader.identity(300) is not None
    remove_tree(proc / "300")
    assert list(reader.sockets(300)) == [] and reader.socket_inodes(300) == []
    assert (reader.tgid(300), reader.status(300), reader.exe(300), reader.cmdline(300)) == (None, None, "", [])
    assert reader.identity(300) is None and not reader.running(300)
    make_proc(proc, 301, name="half", exe="/usr/bin/half", ppid=1, sockets=(3010,))
    (proc / "301" / "fd" / "9").write_text("not a link")  # readlink fails, as for an fd closed after the listing
    assert list(reader.sockets(301)) == [("3", 3010)]
    (proc / "301" / "status").unlink()  # gone between reading its stat file and its status file
    attr = Attributor(None, reader)
    assert attr.processes.describe(301) is None


def test_a_cached_owner_that_exited_is_looked_for_again(proc: Path) -> None:
    """The process a socket was cached for exited and another one holds the socket now (an inherited fd)."""
    key = FiveTuple(6, "192.0.2.66", 40000, "203.0.113.80", 443)
    make_proc(proc, 300, name="parent", exe="/usr/bin/parent", ppid=1, sockets=(3000,))
    reader = ProcReader(proc, keep_open=0)  # a kept-open stat file of a fake tree outlives its deletion
    attr = Attributor(FakeDiag({key: diag_socket(3000)}), reader)  # type: ignore[arg-type]
    assert attr.attribute(key).pid == 300  # type: ignore[union-attr]
    remove_tree(proc / "300")
    make_proc(proc, 310, name="child", exe="/usr/bin/child", ppid=1, sockets=(3000,))
    assert attr.attribute(key).pid == 310  # type: ignore[union-attr]


# --- reading single fds of a known process (FdTable) ------------------------------------------------------


def test_fd_table_guesses_the_replaced_fd_then_the_lowest_free_ones() -> None:
    table = FdTable({0: 0, 1: 0, 2: 0, 3: 11, 5: 12, 6: 0})  # 4 was free at the last read
    assert table.candidates(4) == [4, 7, 8, 9]  # no hit yet: the lowest free numbers, on past the top
    table.hit(3)
    table.hit(5)
    assert table.candidates(8) == [5, 4, 7, 8, 9, 3, 10, 11]  # the latest hit, free numbers, older hits
    table.seen(4, 13)  # a socket took 4
    table.seen(6, None)  # a file closed
    table.seen(9, 0)  # something opened far up: 7 and 8 stay free
    assert table.candidates(6) == [5, 6, 7, 8, 10, 3]
    table.closed(3)  # a socket of it at fd 3 was destroyed: read right after the latest hit
    assert table.candidates(3) == [5, 3, 6]
    table.seen(3, 14)
    assert table.candidates(3) == [5, 6, 7]
    assert (table.top, table.free) == (9, [6, 7, 8])


def test_a_table_with_a_huge_fd_number_keeps_only_its_lowest_free_numbers() -> None:
    table = FdTable({0: 0, 1: 0, 5: 7, 1_000_000: 8})  # e.g. a daemon that moved a socket far up
    assert len(table.free) <= 1024 and table.candidates(4) == [2, 3, 4, 6]
    table.seen(2_000_000, 9)
    assert len(table.free) <= 1024
    assert lowest_free([0, 3, 4, 9], 3) == [1, 2, 5] and lowest_free([], 3) == []


def test_a_small_table_gets_few_guesses() -> None:
    assert (probes_for(16), probes_for(100), probes_for(500), probes_for(5000)) == (2, 12, FD_PROBES, FD_PROBES)


def test_probe_order_is_the_last_owner_and_the_owners_of_the_same_uid_and_cgroup() -> None:
    recent = [40, 30, 20, 10]  # newest first
    keys = {40: (0, 1), 30: (1000, 7), 20: (1000, 8), 10: (1000, 7)}
    tables = {40, 30, 20, 10}  # each one's fd table was read and kept
    assert probe_order(recent, keys, {(1000, 7)}, tables) == [30, 10, 40]
    assert probe_order(recent, keys, set(), tables) == [40]
    assert probe_order([], keys, {(1000, 7)}, tables) == []
    assert probe_order(recent, keys, {(1000, 7)}, {10}) == [10]  # nothing to guess from without a table
    keys[30] = keys[10] = (1000, 1)
    assert probe_order(recent, keys, {(1000, 1)}, tables) == [40]  # the root cgroup: the uid alone is no hint


def browser(proc: Path, pid: int = 500, sockets: int = 300) -> Path:
    """A process holding many sockets (fds 3…, inodes from pid * 100), the table of a browser."""
    inodes = tuple(range(pid * 100, pid * 100 + sockets))
    make_proc(proc, pid, name="firefox", exe="/usr/bin/firefox", ppid=1, sockets=inodes)
    return proc / str(pid) / "fd"


def test_a_new_socket_of_a_known_big_process_is_found_by_reading_a_few_fds(proc: Path) -> None:
    fds = browser(proc)
    reader = ProcReader(proc)
    attr = Attributor(None, reader)
    assert attr.pid_of_inode(50_100) == 500  # found by a scan; read to the end the next time (a recent owner)
    (fds / "303").symlink_to("socket:[60000]")
    assert attr.pid_of_inode(60_000) == 500  # the whole table read once: it is kept
    listed = scanned(reader)
    for n, fd in enumerate((304, 305, 1, 306)):  # on past the top, and a low free number
        (fds / str(fd)).symlink_to(f"socket:[{60_001 + n}]")
        assert attr.pid_of_inode(60_001 + n) == 500
    (fds / "305").unlink()  # a socket closed; the next new one gets its number
    (fds / "305").symlink_to("socket:[60010]")
    assert attr.pid_of_inode(60_010) == 500
    assert listed == [] and attr.fd_probe_hits == 5 and attr.fd_probes <= 5 * FD_PROBES  # no table read


def test_a_reused_fd_number_never_gives_a_wrong_process(proc: Path) -> None:
    """A known fd number now holds another socket: the guess reads it, sees another inode and keeps looking;
    the socket is found in the process that really holds it."""
    fds = browser(proc, sockets=20)
    make_proc(proc, 600, name="curl", exe="/usr/bin/curl", ppid=1, sockets=(90_000,))
    (proc / "loadavg").write_text("0.10 0.20 0.30 1/200 600\n")
    attr = Attributor(None, ProcReader(proc))
    assert attr.pid_of_inode(50_001) == 500 and attr.pid_of_inode(50_002) == 500  # 500: a known owner
    (fds / "4").unlink()
    (fds / "4").symlink_to("socket:[90001]")  # fd 4 of the browser: another socket than curl's
    assert attr.pid_of_inode(90_000) == 600
    assert attr.pid_of_inode(12_345) is None  # no one holds it: not found, never a guess


def test_the_owner_of_the_same_uid_and_cgroup_is_read_first(proc: Path) -> None:
    """Two known big processes of one uid in their own cgroups; the last connection was the web app's: a new
    socket of the chat app (its cgroup) is found by reading single fds of the chat app, no table read."""
    fds = {700: browser(proc, 700, 40), 710: browser(proc, 710, 40)}
    table: dict[FiveTuple, DiagSocket] = {}
    reader = ProcReader(proc)
    attr = Attributor(FakeDiag(table), reader)  # type: ignore[arg-type]

    def connect(pid: int, fd: int, inode: int) -> int | None:
        (fds[pid] / str(fd)).symlink_to(f"socket:[{inode}]")
        flow = FiveTuple(6, "192.0.2.66", inode % 65536, "203.0.113.80", 443)
        table[flow] = diag_socket(inode, 1000, cgroup=pid // 10)
        found = attr.attribute(flow)
        return found.pid if found is not None else None

    for fd in (43, 44):  # each app's first new sockets: found by reading their tables, which are kept
        assert connect(700, fd, 80_000 + fd) == 700 and connect(710, fd, 81_000 + fd) == 710
    listed = scanned(reader)
    assert connect(700, 45, 80_045) == 700 and listed == []


class FakeCloses:
    """The destroyed-socket notices (kernel.sockdiag.SocketEvents(tcp=True)): what the test queued."""

    def __init__(self) -> None:
        self.queued: list[DiagSocket] = []

        self.closed = False

    def read(self, limit: int = 256) -> list[DiagSocket]:
        out, self.queued = self.queued, []
        return out

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("notices", [True, False])
def test_the_fd_of_a_destroyed_socket_is_read_first(proc: Path, notices: bool) -> None:
    """A browser closed an old connection and opened a new one: the kernel gave the new socket the old one's
    fd, in the middle of the table. The old socket's destroy notice (its cookie) says which fd was freed."""
    fds = browser(proc, 500, 300)
    table: dict[FiveTuple, DiagSocket] = {}
    closes = FakeCloses()
    reader = ProcReader(proc)
    attr = Attributor(FakeDiag(table), reader, closes=lambda: closes)  # type: ignore[arg-type,return-value]

    def attribute(inode: int, cookie: int) -> int | None:
        flow = FiveTuple(6, "192.0.2.66", inode % 65536, "203.0.113.80", 443)
        table[flow] = diag_socket(inode, cookie=cookie)
        found = attr.attribute(flow)
        return found.pid if found is not None else None

    assert attribute(50_000, cookie=9000) == 500  # the browser's first connection: found by a scan
    (fds / "303").symlink_to("socket:[60000]")
    assert attribute(60_000, cookie=9200) == 500  # its table is read once and kept
    assert attribute(50_097, cookie=9100) == 500  # fd 100: another connection (read with the table)
    (fds / "100").unlink()  # the old connection is closed ...
    (fds / "100").symlink_to("socket:[60100]")  # ... and a new socket gets its fd
    if notices:
        closes.queued = [diag_socket(0, cookie=9100)]  # destroyed: no inode any more, the cookie stays
    listed = scanned(reader)
    assert attribute(60_100, cookie=9300) == 500
    assert (listed == []) is notices  # without the notice: the whole table is read again


def test_a_socket_from_when_the_table_was_small_is_guessed_once_it_is_big(proc: Path) -> None:
    fds = browser(proc, 500, 10)
    table: dict[FiveTuple, DiagSocket] = {}
    closes = FakeCloses()
    reader = ProcReader(proc)
    attr = Attributor(FakeDiag(table), reader, closes=lambda: closes)  # type: ignore[arg-type,return-value]

    def attribute(inode: int, cookie: int) -> int | None:
        flow = FiveTuple(6, "192.0.2.66", inode % 65536, "203.0.113.80", 443)
        table[flow] = diag_socket(inode, cookie=cookie)
        found = attr.attribute(flow)
        return found.pid if found is not None else None

    assert attribute(50_000, cookie=1) == 500
    (fds / "13").symlink_to("socket:[60000]")
    assert attribute(60_000, cookie=2) == 500  # the small table is read and kept
    assert attribute(50_005, cookie=3) == 500  # an early connection, at fd 8
    for fd in range(14, 400):  # the browser grows
        (fds / str(fd)).symlink_to(f"socket:[{70_000 + fd}]")
    assert attribute(70_399, cookie=4) == 500  # read whole again: a big table now
    (fds / "8").unlink()
    (fds / "8").symlink_to("socket:[60008]")  # the early connection closed; a new socket took its fd
    closes.queued = [diag_socket(0, cookie=3)]
    listed = scanned(reader)
    assert attribute(60_008, cookie=5) == 500 and listed == []


def test_destroy_notices_are_listened_to_only_while_a_kept_table_is_big(proc: Path) -> None:
    """Every TCP socket closed in the namespace costs the kernel a notice: not without a big process."""
    fds = browser(proc, 500, 10)
    opened: list[FakeCloses] = []
    attr = Attributor(None, ProcReader(proc), closes=lambda: opened.append(FakeCloses()) or opened[-1])  # type: ignore[arg-type,return-value,func-returns-value]
    assert attr.pid_of_inode(50_000) == 500
    (fds / "13").symlink_to("socket:[60000]")
    assert attr.pid_of_inode(60_000) == 500 and attr.closes is None  # a small table is kept: no notices
    for fd in range(14, 400):
        (fds / str(fd)).symlink_to(f"socket:[{70_000 + fd}]")
    (fds / "600").symlink_to("socket:[80000]")
    assert attr.pid_of_inode(80_000) == 500 and attr.closes is opened[0]  # big now: listened to
    remove_tree(proc / "500")
    assert attr.pid_of_inode(99_999) is None  # the browser exited and is forgotten
    assert attr.closes is None and opened[0].closed and len(opened) == 1


def test_a_big_table_is_read_after_the_newest_processes_and_the_smaller_tables(proc: Path) -> None:
    fds = browser(proc, 500, 300)
    make_proc(proc, 300, name="chat", exe="/usr/bin/chat", ppid=1, sockets=(3000, 3001))
    reader = ProcReader(proc)
    attr = Attributor(None, reader)
    assert attr.pid_of_inode(3000) == 300 and attr.pid_of_inode(50_001) == 500
    (fds / "400").symlink_to("socket:[60000]")  # far from where the browser's new sockets are guessed
    assert attr.pid_of_inode(60_000) == 500  # its table is read once and kept
    (proc / "300" / "fd" / "10").symlink_to("socket:[3010]")
    listed = scanned(reader)
    assert attr.pid_of_inode(3010) == 300 and listed == [300]  # the browser's single fds only, then chat
    make_proc(proc, 605, name="curl", exe="/usr/bin/curl", ppid=1, sockets=(6050,))
    (proc / "loadavg").write_text("0.10 0.20 0.30 1/200 605\n")
    assert attr.pid_of_inode(6050) == 605 and 500 not in listed


def test_the_cgroup_v2_mount_and_its_ids(tmp_path: Path) -> None:
    mountinfo = (
        "25 1 0:23 / /sys rw,nosuid - sysfs sysfs rw\n"
        "35 25 0:30 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n"
    )
    assert cgroup2_mount(mountinfo) == "/sys/fs/cgroup/unified"
    assert cgroup2_mount("25 1 0:23 / /sys rw - sysfs sysfs rw\n") is None  # ip netns exec: a fresh /sys
    scope = tmp_path / "user.slice" / "app-firefox.scope"
    scope.mkdir(parents=True)
    (scope / "cgroup.procs").write_text("500\n501\n")
    (tmp_path / "cgroup.procs").write_text("1\n2\n500\n")
    cgroups = Cgroups(tmp_path)
    assert cgroups.pids(scope.stat().st_ino, now=0.0) == [500, 501]  # the id is the directory's inode number
    assert cgroups.pids(tmp_path.stat().st_ino, now=0.0) is None  # the root: everything, no narrowing
    assert cgroups.pids(0, now=0.0) is None and Cgroups(None).pids(5, now=0.0) is None
    late = tmp_path / "user.slice" / "app-chat.scope"
    late.mkdir()
    (late / "cgroup.procs").write_text("300\n")
    assert cgroups.pids(late.stat().st_ino, now=0.5) is None  # not walked again within a second
    assert cgroups.pids(late.stat().st_ino, now=2.0) == [300]
    remove_tree(scope)
    assert cgroups.pids(scope.stat().st_ino if scope.exists() else 1, now=2.1) is None


def test_a_new_socket_is_looked_for_in_its_cgroup_smallest_table_first(proc: Path, tmp_path: Path) -> None:
    """Neither the last owner nor the newest processes: the socket's cgroup (an app's scope) names the few
    processes that may hold it, read by the size of their fd tables, without listing /proc."""
    scope = tmp_path / "cgroup" / "app-firefox.scope"
    scope.mkdir(parents=True)
    (scope / "cgroup.procs").write_text("250\n100\n")
    make_proc(
        proc, 250, name="Socket Process", exe="/usr/lib/firefox/firefox-bin", ppid=50, sockets=(2500,), fdsize=256
    )
    make_proc(proc, 300, name="chat", exe="/usr/bin/chat", ppid=1, sockets=(3000,))
    (proc / "loadavg").write_text("0.10 0.20 0.30 1/200 900\n")
    key = FiveTuple(6, "192.0.2.66", 40000, "203.0.113.80", 443)
    chat = FiveTuple(6, "192.0.2.66", 40001, "203.0.113.80", 443)
    table = {key: diag_socket(2500, cgroup=scope.stat().st_ino), chat: diag_socket(3000)}
    reader = ProcReader(proc)
    attr = Attributor(FakeDiag(table), reader, cgroups=Cgroups(tmp_path / "cgroup"))  # type: ignore[arg-type]
    assert attr.attribute(chat).pid == 300  # type: ignore[union-attr]
    listed = scanned(reader)
    assert attr.attribute(key).pid == 250  # type: ignore[union-attr]
    assert listed == [100, 250] and attr.cgroup_reads == 1  # the scope, smallest table first; not chat
    assert attr.listings == 1  # only the first lookup listed /proc


def test_a_process_reading_its_own_fd_table_does_not_count_the_listing() -> None:
    reader = ProcReader()
    with socket.socket() as mine:
        table = dict(reader.fds(os.getpid()))
        assert table[mine.fileno()] == os.fstat(mine.fileno()).st_ino
        probe = os.open("/dev/null", os.O_RDONLY)  # the lowest free number: where the listing's fd was
        os.close(probe)
        assert probe not in table


# --- sock_diag bytes --------------------------------------------------------------------------------------


def test_diag_request_layout() -> None:
    family, src = ip_bytes("192.0.2.66")
    _, dst = ip_bytes("203.0.113.80")
    req = diag_request(family, 6, src, 40000, dst, 443)
    assert len(req) == 56
    assert req[:4] == bytes([socket.AF_INET, 6, 0, 0])
    assert struct.unpack_from("!HH", req, 8) == (40000, 443)
    assert req[12:16] == bytes([192, 0, 2, 66]) and req[28:32] == bytes([203, 0, 113, 80])
    assert struct.unpack_from("=II", req, 48) == (0xFFFFFFFF, 0xFFFFFFFF)


def test_diag_message_parsing() -> None:
    src, dst = socket.inet_pton(socket.AF_INET6, "fd00:5717::2"), socket.inet_pton(socket.AF_INET6, "2001:db8:30::80")
    msg = bytes([socket.AF_INET6, 2, 0, 0]) + struct.pack("!HH16s16s", 4321, 80, src, dst)
    msg += struct.pack("=III", 0, 1, 2) + struct.pack("=IIIII", 0, 0, 0, 1000, 98765)
    parsed = parse_diag_message(msg)
    assert parsed is not None
    assert (parsed.family, parsed.sport, parsed.dport, parsed.uid, parsed.inode) == (
        socket.AF_INET6,
        4321,
        80,
        1000,
        98765,
    )
    assert parse_diag_message(msg[:40]) is None
    assert parsed.cgroup == 0  # an old kernel (< 5.7) sends no cgroup id


def test_the_cgroup_id_is_found_among_the_attributes() -> None:
    msg = bytes([socket.AF_INET, 1, 0, 0]) + struct.pack("!HH16s16s", 4321, 80, bytes(16), bytes(16))
    msg += struct.pack("=III", 0, 1, 0) + struct.pack("=IIIII", 0, 0, 0, 1000, 98765)
    shutdown = struct.pack("=HHB3x", 5, 8, 0)  # INET_DIAG_SHUTDOWN: 5 bytes, padded to 8
    cgroup = struct.pack("=HHQ", 12, INET_DIAG_CGROUP_ID, 0x1_0000_2345)
    parsed = parse_diag_message(msg + shutdown + cgroup)
    assert parsed is not None and (parsed.inode, parsed.cgroup) == (98765, 0x1_0000_2345)
    assert cgroup_id(shutdown + cgroup[:6], 0) == 0  # cut short: not there
    assert cgroup_id(struct.pack("=HH", 0, 1) + cgroup, 0) == 0  # a broken attribute ends the walk


def test_udp_fallback_prefers_the_connected_socket_and_understands_dual_stack() -> None:
    _, me = ip_bytes("192.0.2.66")
    _, peer = ip_bytes("203.0.113.80")
    mapped = bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 66])
    wildcard = DiagSocket(socket.AF_INET, 7, bytes(16), 5000, bytes(16), 0, 0, 1)
    connected = DiagSocket(socket.AF_INET, 1, me, 5000, peer, 53, 0, 2)
    dual = DiagSocket(socket.AF_INET6, 7, mapped, 6000, bytes(16), 0, 0, 3)
    other = DiagSocket(socket.AF_INET, 1, me, 5000, peer, 54, 0, 4)
    assert best_udp_match([wildcard, other, connected], socket.AF_INET, me, 5000, peer, 53).inode == 2
    assert best_udp_match([wildcard, other], socket.AF_INET, me, 5000, peer, 53).inode == 1
    assert best_udp_match([dual], socket.AF_INET, me, 6000, peer, 53).inode == 3
    assert best_udp_match([other], socket.AF_INET, me, 5000, peer, 53) is None


# --- the shared name table --------------------------------------------------------------------------------


def test_names_are_shared_through_the_file(tmp_path: Path) -> None:
    path = tmp_path / "names"
    writer, reader = NameTable(path, slots=64), NameTable(path, slots=64)
    writer.learn("203.0.113.80", "www.example.com", 30, now=1000.0)
    writer.learn("2001:db8:30::80", "www.example.com", 30, now=1000.0)
    assert reader.lookup("203.0.113.80", now=1001.0) == "www.example.com"
    assert reader.lookup("::ffff:203.0.113.80", now=1001.0) == "www.example.com"
    assert reader.lookup("2001:db8:30:0::80", now=1001.0) == "www.example.com"
    assert reader.lookup("203.0.113.81", now=1001.0) == ""
    assert reader.lookup("not an address") == ""


def test_names_outlive_short_ttls_by_the_grace_period_then_expire() -> None:
    table = NameTable(None, slots=64)
    table.learn("203.0.113.80", "a.example.com", 5, now=1000.0)
    assert table.lookup("203.0.113.80", now=1000.0 + GRACE - 1) == "a.example.com"
    assert table.lookup("203.0.113.80", now=1000.0 + GRACE + 1) == ""
    table.learn("203.0.113.80", "b.example.com", 86400, now=1000.0)  # the latest answer wins
    assert table.lookup("203.0.113.80", now=1000.0 + GRACE + 1) == "b.example.com"


def test_full_table_replaces_the_oldest_entry_of_the_probe_window() -> None:
    table = NameTable(None, slots=8)  # one probe window covers the whole table
    for i in range(8):
        table.learn(f"203.0.113.{i}", f"n{i}.example.com", 1000 + i, now=0.0)
    table.learn("203.0.113.100", "new.example.com", 5000, now=0.0)
    assert table.lookup("203.0.113.100", now=1.0) == "new.example.com"
    assert table.lookup("203.0.113.0", now=1.0) == ""  # the shortest-lived went
    assert table.lookup("203.0.113.7", now=1.0) == "n7.example.com"


def test_a_garbage_file_is_reinitialised(tmp_path: Path) -> None:
    path = tmp_path / "names"
    path.write_bytes(b"junk" * 100)
    table = NameTable(path, slots=16)
    table.learn("203.0.113.80", "www.example.com", 60)
    assert table.lookup("203.0.113.80") == "www.example.com"


def test_names_learned_in_another_process_are_seen(tmp_path: Path) -> None:
    path = tmp_path / "names"
    reader = NameTable(path, slots=64)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        NameTable(path, slots=64).learn("203.0.113.80", "forked.example.com", 60)
        os._exit(0)
    os.waitpid(pid, 0)
    assert reader.lookup("203.0.113.80") == "forked.example.com"


def test_a_kept_open_stat_file_does_not_outlive_its_process() -> None:
    """Identity checks read kept-open /proc/<pid>/stat files: once the process is gone the kernel answers
    ESRCH there, so a later process with the same pid is never taken for the old one."""
    reader = ProcReader()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: waits to be killed
        signal.pause()
        os._exit(0)
    try:
        first = reader.identity(pid)
        assert first is not None and reader.identity(pid) == first
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert reader.identity(pid) is None
    reader.close()


def test_the_socket_found_for_its_uid_is_not_looked_up_again_to_attribute_it(proc: Path) -> None:
    key = FiveTuple(6, "192.0.2.66", 40000, "203.0.113.80", 443)
    (proc / "loadavg").write_text("0.10 0.20 0.30 1/200 100\n")  # the owner is the newest process
    diag = FakeDiag({key: diag_socket(556, uid=1000)})
    lookups: list[FiveTuple] = []
    lookup = diag.lookup
    diag.lookup = lambda flow: lookups.append(flow) or lookup(flow)  # type: ignore[method-assign]
    attr = Attributor(diag, ProcReader(proc))  # type: ignore[arg-type]
    assert attr.socket_uid(key) == 1000
    process = attr.attribute(key)
    assert process is not None and process.pid == 100 and lookups == [key]
    assert attr.attribute(key) is not None and len(lookups) == 2  # kept for one use only
    assert attr.uid_of(100) == 1000 and attr.uid_of(4242) is None
