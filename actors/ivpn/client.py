"""The IVPN daemon client: one blocking loop on a worker thread that finds the daemon, says Hello and turns
every line into a new snapshot (core/ivpn/protocol.py does the parsing; this file only does the I/O).

- No port file → "daemon not running", looked for again with backoff (0.5 s doubling to `max_backoff`), logged
  once per change, not per attempt. `wake()` (e.g. `splittun ivpn ping`) cuts the wait short.
- Every attempt re-reads the port file: port and secret change on every daemon start.
- A bad line, a refused secret or ServiceExitingResp → one log line, the connection is reset, and the loop
  goes on. A dropped connection keeps the last known carrier (server IP and port) in the snapshot with
  `daemon=False`: the tunnel usually outlives a daemon restart, and its packets must never be split meanwhile.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from dataclasses import replace

from core.ivpn.portfile import PortFileError, read_port_file
from core.ivpn.protocol import (
    NOT_RUNNING,
    DaemonExiting,
    IvpnSnapshot,
    LineSplitter,
    ProtocolError,
    Session,
    hello_request,
)

MIN_BACKOFF = 0.5
MAX_BACKOFF = 10.0
CONNECT_TIMEOUT = 2.0
POLL = 0.5  # how often a blocked read looks at the stop flag


class DaemonClient:
    """Keeps a session with the daemon and reports every changed snapshot through `on_status`."""

    def __init__(
        self,
        port_files: tuple[str, ...],
        on_status: Callable[[IvpnSnapshot], None],
        log: Callable[[str], None],
        max_backoff: float = MAX_BACKOFF,
        min_backoff: float = MIN_BACKOFF,
        host: str = "127.0.0.1",
    ) -> None:
        self.port_files = port_files
        self.on_status = on_status
        self.log = log
        self.max_backoff = max_backoff
        self.min_backoff = min_backoff
        self.host = host
        self.snapshot = NOT_RUNNING
        self.counters = {"connects": 0, "resets": 0, "lines": 0}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._sock: socket.socket | None = None
        self._why_down = ""  # the last reason logged, so the same one is not logged again
        self._thread: threading.Thread | None = None
        self._published = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="ivpn-daemon", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        sock = self._sock
        if sock is not None:
            _shutdown(sock)
        if self._thread is not None:
            self._thread.join(3)

    def wake(self) -> None:
        """Try the daemon now instead of after the backoff."""
        self._wake.set()

    def run(self) -> None:
        backoff = self.min_backoff
        while not self._stop.is_set():
            try:
                up = self._session()
            except Exception as exc:  # a bug must not end the client for good: log it, go on with backoff
                self.log(f"client failed: {exc.__class__.__name__}: {exc}")
                up = False
            # After a session that was up the next attempt comes quickly; without a daemon, ever slower.
            backoff = self.min_backoff if up else min(backoff * 2, self.max_backoff)
            self._wake.wait(backoff)
            self._wake.clear()

    # --- one connection ------------------------------------------------------------------------------

    def _session(self) -> bool:
        """One attempt: read the port file, connect, Hello, read lines until the connection ends.
        Returns True when the daemon answered Hello."""
        try:
            port_file = read_port_file(self.port_files)
        except (PortFileError, OSError) as exc:
            self._down(f"daemon not running ({exc})")
            return False
        if port_file is None:
            self._down("daemon not running")
            return False
        try:
            sock = socket.create_connection((self.host, port_file.port), timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            self._down(f"daemon not running (port {port_file.port}: {exc.strerror or exc})")
            return False
        self._sock = sock
        session, splitter, greeted = Session(port_file.port), LineSplitter(), False
        try:
            sock.settimeout(POLL)
            sock.sendall(hello_request(port_file.secret))
            while not self._stop.is_set():
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    self._down("daemon closed the connection")
                    break
                for line in splitter.feed(data):
                    self.counters["lines"] += 1
                    snapshot = session.feed(line)
                    if not greeted:
                        greeted = True
                        self.counters["connects"] += 1
                        self._why_down = ""
                        self.log(f"connected to the IVPN daemon {snapshot.daemon_version} on port {port_file.port}")
                    self._publish(snapshot)
        except DaemonExiting:
            self._down("daemon is exiting")
        except ProtocolError as exc:
            self.counters["resets"] += 1
            self._down(f"connection reset: {exc}", force=True)
        except OSError as exc:
            self._down(f"daemon connection lost: {exc.strerror or exc}")
        finally:
            self._sock = None
            _shutdown(sock)
            sock.close()
        return greeted

    def _down(self, why: str, force: bool = False) -> None:
        """Not (or no longer) talking to the daemon: keep the carrier, say daemon=False, log once per reason."""
        if force or why != self._why_down:
            self.log(why)
            self._why_down = why
        self._publish(replace(self.snapshot, daemon=False, daemon_port=0))

    def _publish(self, snapshot: IvpnSnapshot) -> None:
        """Report a changed snapshot (and the very first one, so "daemon not running" is known at once)."""
        if snapshot == self.snapshot and self._published:
            return
        self._published = True
        self.snapshot = snapshot
        self.on_status(snapshot)


def _shutdown(sock: socket.socket) -> None:
    """Wake a blocked recv (stop) or end the connection; errors mean it is gone already."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
