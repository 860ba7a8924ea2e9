"""Every path splittun uses, derived from one directory, and where the ZeroMQ endpoints live.

With `SPLITTUN_HOME=/x`: config `/x/config.json`, state `/x/state.db`, sockets and supervisord's pid and
socket in `/x/run` (mode 0700: only root talks to the actors), logs in `/x/log`. Several instances run side by
side, one per home (e.g. one per lab namespace). Without it: /var/lib/splittun, /run/splittun and
/var/log/splittun. `SPLITTUN_RUN_DIR` still overrides the socket directory (tests with deep temporary paths
use it). The endpoints are `ipc://` sockets in that directory: the bus's two sides and one per actor instance.

It lives in the process runtime because every process needs it to find the bus and its own endpoint; the CLI
and the lab use the same module.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_RUN_DIR = Path("/run/splittun")
#: sun_path is 108 bytes including the NUL; libzmq refuses longer ipc paths with a vague error.
MAX_IPC_PATH = 107


class EndpointError(ValueError):
    """The runtime directory cannot hold our sockets (path too long, not a directory…)."""


def run_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("SPLITTUN_RUN_DIR"):
        return Path(env["SPLITTUN_RUN_DIR"])
    if env.get("SPLITTUN_HOME"):
        return Path(env["SPLITTUN_HOME"]) / "run"
    return DEFAULT_RUN_DIR


def ipc_path(run: Path, name: str) -> Path:
    path = run / f"{name}.sock"
    if len(str(path)) > MAX_IPC_PATH:
        raise EndpointError(
            f"runtime dir {run} is too long for ipc sockets ({len(str(path))} > {MAX_IPC_PATH} bytes): "
            "choose a shorter SPLITTUN_HOME or SPLITTUN_RUN_DIR"
        )
    return path


def endpoint(run: Path, name: str) -> str:
    return f"ipc://{ipc_path(run, name)}"


def bus_in(run: Path) -> str:
    """Publishers connect here (the bus's XSUB)."""
    return endpoint(run, "bus-in")


def bus_out(run: Path) -> str:
    """Subscribers connect here (the bus's XPUB)."""
    return endpoint(run, "bus-out")


def actor_endpoint(run: Path, instance: str) -> str:
    """Each actor instance answers requests here (a ROUTER)."""
    return endpoint(run, f"{instance}.ctl")


def control(run: Path) -> str:
    """The controller's endpoint, which the CLI uses."""
    return actor_endpoint(run, "controller")


def rules_marker(run: Path) -> Path:
    """Present while the interceptor's rules may be installed; holds its network namespace's identity, so
    `splittun down` cleans up there (also after a crash) and a passive second instance never does."""
    return run / "interceptor.rules"


def routing_marker(run: Path) -> Path:
    """The same for the split routing: written before its first change, removed only with the routing."""
    return run / "interceptor.routing"


def api_token(run: Path, level: str) -> Path:
    """The local API's bearer token for `level` (read, admin): 0600, written by `splittun up` (core/access.py)."""
    return run / f"api-{level}.token"


def endpoint_file(address: str) -> Path | None:
    return Path(address[len("ipc://") :]) if address.startswith("ipc://") else None


# --- one instance's directories and files ----------------------------------------------------------

DEFAULT_HOME = Path("/var/lib/splittun")
DEFAULT_LOG_DIR = Path("/var/log/splittun")


class HomeError(ValueError):
    """SPLITTUN_HOME (or a directory under it) cannot be used; the message says why."""


@dataclass(frozen=True)
class Home:
    root: Path
    run_dir: Path
    log_dir: Path

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Home:
        env = os.environ if env is None else env
        raw = env.get("SPLITTUN_HOME", "")
        if raw:
            if not os.path.isabs(raw):
                raise HomeError(f"SPLITTUN_HOME must be an absolute path, got {raw!r}")
            root = Path(raw)
            log_dir = root / "log"
        else:
            root, log_dir = DEFAULT_HOME, DEFAULT_LOG_DIR
        return cls(root=root, run_dir=run_dir(env), log_dir=log_dir)

    @property
    def config_file(self) -> Path:
        return self.root / "config.json"

    @property
    def state_db(self) -> Path:
        return self.root / "state.db"

    @property
    def supervisord_pidfile(self) -> Path:
        return self.run_dir / "supervisord.pid"

    @property
    def supervisord_socket(self) -> Path:
        return self.run_dir / "supervisord.sock"

    @property
    def supervisord_log(self) -> Path:
        return self.log_dir / "supervisord.log"

    def program_log(self, instance: str) -> Path:
        return self.log_dir / f"{instance}.log"

    @property
    def rules_marker(self) -> Path:
        return rules_marker(self.run_dir)

    @property
    def routing_marker(self) -> Path:
        return routing_marker(self.run_dir)

    def check(self) -> None:
        """Refuse a home that cannot work, before anything is started."""
        for path in (self.root, self.run_dir, self.log_dir):
            if path.exists() and not path.is_dir():
                raise HomeError(f"{path} exists and is not a directory (check SPLITTUN_HOME)")
        try:
            ipc_path(self.run_dir, "controller.ctl")
        except EndpointError as exc:
            raise HomeError(str(exc)) from None
        if len(str(self.supervisord_socket)) > MAX_IPC_PATH:
            raise HomeError(f"{self.supervisord_socket} is too long for a unix socket: shorten SPLITTUN_HOME")

    def prepare(self) -> None:
        """Create the directories (runtime dir 0700: only root talks to the actors)."""
        self.check()
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.log_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
            self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.run_dir, 0o700)
            probe = self.root / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise HomeError(f"cannot use {self.root} as SPLITTUN_HOME: {exc.strerror or exc}") from None

    def child_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment that pins every child process to this home."""
        env = dict(os.environ if base is None else base)
        env.update(
            SPLITTUN_HOME=str(self.root),
            SPLITTUN_RUN_DIR=str(self.run_dir),
            SPLITTUN_LOG_DIR=str(self.log_dir),
        )
        return env
