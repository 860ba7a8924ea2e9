"""Helpers for the proxy tests (loaded as a plugin: `pytest_plugins = ["test_proxy_support"]`).

- `Server`: a small threaded TCP server whose per-connection behaviour is a function.
- `UdpEcho`: a UDP server that answers every datagram with a prefix, recording what it got.
- `Hooks`: SessionHooks that record opens/closes/stats and let a test wait for them.
- `InNetns`: a thread living in a network namespace; sockets and proxies created through it live there.
- `blackhole`: a TCP address whose accept queue is full, so connecting to it never completes.
No test lives here.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from core.proxy import Session, SessionHooks

WAIT = 10.0  # generous upper bound for anything a test waits on; tests never assert on speed
CLONE_NEWNET = 0x40000000


def family_of(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


class Server:
    """TCP server on `ip`, one thread per connection running `handler(conn)`."""

    def __init__(self, ip: str, handler: Callable[[socket.socket], None], sock: socket.socket | None = None) -> None:
        self.sock = sock or socket.socket(family_of(ip), socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((ip, 0))
        self.sock.listen(128)
        self.address = self.sock.getsockname()[:2]
        self.handler = handler
        self.accepted = 0
        self.errors: list[BaseException] = []
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.conns.append(conn)
            conn.settimeout(WAIT)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.close()


def echo(conn: socket.socket) -> None:
    """Echo until EOF, then pass the FIN on."""
    while data := conn.recv(1 << 16):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def recv_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while data := sock.recv(1 << 20):
        out += data
    return bytes(out)


class UdpEcho:
    """Answers each datagram with `prefix + datagram`; `got` keeps what arrived, with the sender."""

    def __init__(self, ip: str, prefix: bytes = b"", port: int = 0) -> None:
        self.sock = socket.socket(family_of(ip), socket.SOCK_DGRAM)
        self.sock.bind((ip, port))
        self.address = self.sock.getsockname()[:2]
        self.prefix = prefix
        self.got: list[tuple[bytes, Any]] = []
        self.arrived = threading.Condition()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(65536)
            except OSError:
                return
            with self.arrived:
                self.got.append((data, addr))
                self.arrived.notify_all()
            with contextlib.suppress(OSError):
                self.sock.sendto(self.prefix + data, addr)

    def wait_for(self, count: int) -> bool:
        with self.arrived:
            return self.arrived.wait_for(lambda: len(self.got) >= count, WAIT)

    def close(self) -> None:
        self.sock.close()


class Hooks(SessionHooks):
    def __init__(self) -> None:
        self.opened: list[Session] = []
        self.closed: list[Session] = []
        self.stats: list[tuple[str, int, int]] = []
        self.cond = threading.Condition()

    def on_open(self, session: Session) -> None:
        with self.cond:
            self.opened.append(session)
            self.cond.notify_all()

    def on_stats(self, session: Session) -> None:
        with self.cond:
            self.stats.append((session.id, session.bytes_up, session.bytes_down))
            self.cond.notify_all()

    def on_close(self, session: Session) -> None:
        with self.cond:
            self.closed.append(session)
            self.cond.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def wait_closed(self, count: int = 1) -> list[Session]:
        assert self.wait(lambda: len(self.closed) >= count), f"expected {count} closed session(s): {self.closed}"
        return self.closed

    def reasons(self) -> list[str]:
        with self.cond:
            return [s.close_reason for s in self.closed]


class InNetns:
    """A thread that entered network namespace `name`; `call(fn, ...)` runs fn on it.

    Sockets keep the namespace they were created in, and threads started from this thread inherit it, so
    a proxy started here serves (and dials) inside the namespace while the test drives it from outside.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.Queue[tuple[Callable[[], Any], queue.Queue[Any]] | None] = queue.Queue()
        ready: queue.Queue[BaseException | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True, name=f"netns-{name}")
        self.thread.start()
        err = ready.get(timeout=WAIT)
        if err is not None:
            raise err

    def _run(self, ready: queue.Queue[BaseException | None]) -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {self.name}: {os.strerror(err)}")
            finally:
                os.close(fd)
        except BaseException as exc:
            ready.put(exc)
            return
        ready.put(None)
        while (job := self._jobs.get()) is not None:
            fn, out = job
            try:
                out.put((True, fn()))
            except BaseException as exc:
                out.put((False, exc))

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        out: queue.Queue[Any] = queue.Queue()
        self._jobs.put((lambda: fn(*args, **kwargs), out))
        ok, value = out.get(timeout=60)
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self._jobs.put(None)
        self.thread.join(WAIT)


@pytest.fixture
def blackhole() -> Iterator[tuple[str, int]]:
    """127.0.0.1:port where a SYN is never answered: backlog 0 and one connection already queued."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    filler = socket.create_connection(srv.getsockname())
    yield srv.getsockname()
    filler.close()
    srv.close()


@pytest.fixture
def hooks() -> Hooks:
    return Hooks()


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Poll `predicate` (for states no hook announces); True as soon as it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def expect_reset(address: Any) -> None:
    """Connect and expect the proxy's RST (at connect time or at the first read: loopback is fast)."""
    with pytest.raises(ConnectionResetError), socket.create_connection(address, timeout=WAIT) as sock:
        sock.settimeout(WAIT)
        recv_all(sock)


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


IPV6 = pytest.param("::1", marks=pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback"))
