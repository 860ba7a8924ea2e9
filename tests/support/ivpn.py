"""The project's fake IVPN daemon (tests/fixtures/ivpn/fake_daemon.py) as a process inside a lab namespace, driven
line by line on its stdin the way IVPN's UI drives the real daemon: connect, disconnect, kill switch, restart."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from splittun.lab import Lab
from tests.support import REPO


class FakeDaemonError(RuntimeError):
    """The fake daemon did not answer a command (it died, or hangs); the message has what it printed."""


class FakeDaemon:
    """`python -m tests.fixtures.ivpn.fake_daemon PORTFILE` in `ns` of `lab`; `port` is where it listens now."""

    def __init__(self, lab: Lab, port_file: Path, *args: str, ns: str = "host") -> None:
        self.port_file = port_file
        argv = [sys.executable, "-m", "tests.fixtures.ivpn.fake_daemon", str(port_file), *args]
        self.proc = lab.popen(ns, argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        first = self._line()
        if not first.startswith("listening "):
            self.stop()
            raise FakeDaemonError(f"fake IVPN daemon did not start: {first!r}")
        self.port = int(first.split()[1])

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def command(self, line: str) -> None:
        """One stdin command (`connect`, `disconnect`, `killswitch on`, `restart`, `state RECONNECTING`); returns
        once the daemon has told every client."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise FakeDaemonError(f"fake IVPN daemon gone ({exc})") from None
        answer = self._line()
        verb = line.split()[0]
        if not answer.startswith(f"ok {verb}"):
            raise FakeDaemonError(f"fake IVPN daemon answered {answer!r} to {line!r}")
        self.port = int(answer.split()[2])

    def stop(self) -> None:
        """The daemon exits as the real one does (ServiceExitingResp, port file deleted)."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
