"""Starting, asking and stopping the supervisord that runs one splittun instance.

supervisord comes from the `supervisor` package in our own virtualenv; it is started with the packaged
`supervisord.conf` and an environment that pins every path to one `Home`. We talk to it over XML-RPC on
its unix socket. Leftovers of a crash (stale pid file, sockets, orphaned actors) are cleaned up before
`up` and by `down`; orphaned actors are found by the `SUPERVISOR_SERVER_URL` supervisord gave them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import SupervisorTransport

from kernel import netns
from runtime.paths import Home

CONF_FILE = Path(__file__).with_name("supervisord.conf")
PROGRAMS = ("bus", "controller", "netenv", "ivpn", "api", "proxy_tcp", "proxy_udp", "resolver", "interceptor")


class SupervisorError(RuntimeError):
    """supervisord could not be started, reached or stopped; the message says why."""


@dataclass(frozen=True)
class ProcessState:
    instance: str  # supervisord process name: bus, proxy_tcp_00…
    state: str  # RUNNING, STARTING, BACKOFF, FATAL, EXITED…
    pid: int
    uptime: float  # seconds since start, 0 when not running
    description: str  # supervisord's own words ("Exited too quickly…")


class Supervisor:
    def __init__(self, home: Home) -> None:
        self.home = home

    # --- state ------------------------------------------------------------------------------------

    def pid(self) -> int | None:
        """supervisord's pid when it is running for this home, else None (stale files are ignored)."""
        try:
            pid = int(self.home.supervisord_pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _is_our_supervisord(pid, self.home) else None

    def rpc(self, timeout: float = 5.0) -> Any:
        transport = SupervisorTransport(None, None, f"unix://{self.home.supervisord_socket}")
        transport.timeout = timeout  # type: ignore[attr-defined]
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def processes(self) -> list[ProcessState]:
        try:
            infos = self.rpc().supervisor.getAllProcessInfo()
        except (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError) as exc:
            raise SupervisorError(f"cannot reach supervisord at {self.home.supervisord_socket}: {exc}") from None
        out = []
        for info in infos:
            running = info["statename"] in ("RUNNING", "STARTING", "STOPPING")
            out.append(
                ProcessState(
                    instance=info["name"],
                    state=info["statename"],
                    pid=info["pid"] if running else 0,
                    uptime=max(0.0, info["now"] - info["start"]) if running and info["start"] else 0.0,
                    description=info.get("description", ""),
                )
            )
        return out

    # --- start ------------------------------------------------------------------------------------

    def start(
        self,
        tcp_workers: int = 1,
        udp_workers: int = 1,
        extra_env: dict[str, str] | None = None,
        interceptor_workers: int = 1,
        api_port: int = 817,
    ) -> int:
        """Start supervisord (it daemonizes) and wait until its socket answers; returns its pid."""
        self.clean_stale()
        env = self.home.child_env()
        env.update(
            SPLITTUN_PYTHON=sys.executable,
            SPLITTUN_TCP_WORKERS=str(tcp_workers),
            SPLITTUN_UDP_WORKERS=str(udp_workers),
            SPLITTUN_INTERCEPTOR_WORKERS=str(interceptor_workers),
            SPLITTUN_INTERCEPTOR_EXTRA=str(interceptor_workers - 1),
            SPLITTUN_API_PORT=str(api_port),
            PYTHONUNBUFFERED="1",
        )
        env.update(extra_env or {})
        argv = [sys.executable, "-m", "supervisor.supervisord", "-c", str(CONF_FILE)]
        proc = subprocess.run(argv, env=env, cwd=self.home.root, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            lines = (proc.stderr + proc.stdout).strip().splitlines()
            errors = [line for line in lines if line.startswith("Error:")] or lines or [f"exit {proc.returncode}"]
            raise SupervisorError(f"supervisord did not start: {errors[0][:300]}")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pid = self.pid()
            if pid is not None:
                with contextlib.suppress(OSError, xmlrpc.client.Error):
                    if self.rpc(timeout=1).supervisor.getState()["statename"] == "RUNNING":
                        return pid
            time.sleep(0.05)
        raise SupervisorError(f"supervisord did not come up within 10 s (see {self.home.supervisord_log})")

    # --- stop -------------------------------------------------------------------------------------

    def shutdown(self, timeout: float = 20.0) -> bool:
        """Stop supervisord and everything it runs. Returns False when nothing was running."""
        pid = self.pid()
        if pid is None:
            self.clean_stale()
            return False
        with contextlib.suppress(OSError, xmlrpc.client.Error):
            self.rpc().supervisor.shutdown()
        if not _wait_gone(pid, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 2)
        self.clean_stale()
        return True

    def clean_stale(self) -> None:
        """Remove what a crashed instance left: orphaned actors, pid file, sockets."""
        if self.pid() is not None:
            return
        for pid in self.orphans():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in self.orphans():
            if not _wait_gone(pid, 2):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.home.supervisord_pidfile.unlink(missing_ok=True)
        if self.home.run_dir.is_dir():
            for sock in self.home.run_dir.glob("*.sock"):
                sock.unlink(missing_ok=True)

    def orphans(self) -> list[int]:
        """Processes supervisord started for this home that are still alive."""
        marker = f"SUPERVISOR_SERVER_URL=unix://{self.home.supervisord_socket}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if marker in environ.split(b"\0") and not _is_zombie(int(entry.name)):
                found.append(int(entry.name))
        return found

    # --- the interceptor's rules and routing, wherever this instance runs -------------------------

    def open_netns(self) -> int | None:
        """An fd of the namespace holding this instance's interceptor rules or split routing, None when it
        has neither.

        The interceptor leaves markers (with its namespace's identity) while its rules may be installed
        and while its split routing may be. Live supervisord: its namespace. Otherwise the recorded one:
        ours when it is the same, else a named one (/run/netns). Holding the fd keeps the namespace alive
        until the cleanup ran.
        """
        recorded = ""
        for marker in (self.home.rules_marker, self.home.routing_marker):
            with contextlib.suppress(OSError):
                recorded = recorded or marker.read_text().strip()
        if not recorded:
            return None
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(OSError):
                return os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        candidates = ["/proc/self/ns/net"]
        with contextlib.suppress(OSError):
            candidates += [str(p) for p in sorted(Path("/run/netns").iterdir())]
        for path in candidates:
            with contextlib.suppress(OSError):
                if netns.netns_id(path) == recorded:
                    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        return None  # the namespace is gone, and its rules with it

    def cleanup_interceptor(self, netns_fd: int | None) -> dict[str, Any] | None:
        """After supervisord stopped: remove the split routing, and the rules and marks a killed interceptor
        left behind. Returns {"tables", "conntrack", "names_file", "routing"} or None (nothing to do).

        Worker 0 removes its rules itself on a clean stop (and their marker with them), never the routing:
        with every proxy stopped now, this removes it, after a clean stop or a crash alike — unless another
        instance took over the queues here meanwhile: then the routing is that one's. Without a marker (a
        passive instance never wrote one) or a known namespace there is nothing to do. The work is the
        interceptor's own entry point (`python -m actors.interceptor --cleanup`), run in that namespace.
        """
        try:
            rules, routing = self.home.rules_marker.exists(), self.home.routing_marker.exists()
            if netns_fd is None or not (rules or routing):
                return None
            argv = [sys.executable, "-m", "actors.interceptor", "--cleanup"]
            argv += [] if rules else ["--skip-rules"]
            argv += ["--routing-unless-intercepting"] if routing else ["--skip-routing"]
            done = netns.run_in(netns_fd, argv)
            if done.returncode != 0:
                why = (done.stderr or done.stdout).strip().splitlines()
                raise SupervisorError(f"interceptor cleanup failed: {why[-1] if why else f'exit {done.returncode}'}")
            try:
                return dict(json.loads(done.stdout.strip().splitlines()[-1]))
            except (ValueError, IndexError):
                raise SupervisorError(f"interceptor cleanup said something unreadable: {done.stdout!r}") from None
        finally:
            if netns_fd is not None:
                os.close(netns_fd)
            self.home.rules_marker.unlink(missing_ok=True)
            self.home.routing_marker.unlink(missing_ok=True)


def _is_our_supervisord(pid: int, home: Home) -> bool:
    """The pid file may be stale and its pid reused: check it is supervisord, for this home."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"supervisord" in cmdline and f"SPLITTUN_RUN_DIR={home.run_dir}".encode() in environ


def _is_zombie(pid: int) -> bool:
    """Dead but not yet reaped (in containers pid 1 may reap late): gone for our purposes."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True  # vanished while we looked


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _is_zombie(pid):
            return True
        time.sleep(0.05)
    return False
