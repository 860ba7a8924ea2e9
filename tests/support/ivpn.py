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


# --- IVPN's kill switch, as its Linux firewall leaves it ---------------------------------------------------

KILL_SWITCH_CHAINS = {"OUTPUT": "IVPN-OUT", "INPUT": "IVPN-IN"}


def kill_switch_rules(family: int, server: str, port: int, tunnel: str) -> dict[str, list[str]]:
    """IVPN-style kill-switch chains (reference: ivpn-daemon-protocol.md): loopback, the tunnel and the carrier
    allowed, everything else dropped; per chain, the rule arguments in order."""
    out = [["-o", "lo", "-j", "ACCEPT"], ["-o", tunnel, "-j", "ACCEPT"]]
    into = [["-i", "lo", "-j", "ACCEPT"], ["-i", tunnel, "-j", "ACCEPT"]]
    if family == 4:
        out.append(["-d", server, "-p", "udp", "--dport", str(port), "-j", "ACCEPT"])
        into.append(["-s", server, "-p", "udp", "--sport", str(port), "-j", "ACCEPT"])
    out.append(["-j", "DROP"])
    into.append(["-j", "DROP"])
    return {"IVPN-OUT": [" ".join(r) for r in out], "IVPN-IN": [" ".join(r) for r in into]}


def kill_switch_on(lab: Lab, server: str, port: int, tunnel: str) -> None:
    """What IVPN does when its kill switch goes on: its chains, jumped to from position 1 of OUTPUT and INPUT
    (above whatever is there, splittun's jumps included)."""
    for family, tool in ((4, "iptables-legacy"), (6, "ip6tables-legacy")):
        for chain, rules in kill_switch_rules(family, server, port, tunnel).items():
            lab.exec("host", [tool, "-w", "-N", chain], check=True)
            for rule in rules:
                lab.exec("host", [tool, "-w", "-A", chain, *rule.split()], check=True)
        for builtin, chain in KILL_SWITCH_CHAINS.items():
            lab.exec("host", [tool, "-w", "-I", builtin, "1", "-j", chain], check=True)


def kill_switch_off(lab: Lab) -> None:
    """IVPN's kill switch off: its jumps and chains gone (safe to repeat)."""
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        for builtin, chain in KILL_SWITCH_CHAINS.items():
            while lab.exec("host", [tool, "-w", "-D", builtin, "-j", chain]).returncode == 0:
                pass
            lab.exec("host", [tool, "-w", "-F", chain])
            lab.exec("host", [tool, "-w", "-X", chain])
