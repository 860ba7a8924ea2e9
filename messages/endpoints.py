"""Where the ZeroMQ endpoints live: `ipc://` sockets in the runtime directory.

The runtime directory is `SPLITTUN_RUN_DIR` when set, else `$SPLITTUN_HOME/run` when SPLITTUN_HOME is
set (so instances side by side never share sockets), else `/run/splittun`. It is mode 0700: only root
talks to the actors.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
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


def endpoint_file(address: str) -> Path | None:
    return Path(address[len("ipc://") :]) if address.startswith("ipc://") else None
