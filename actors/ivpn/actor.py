"""The ivpn process: keeps a session with the local IVPN daemon (client.py) and publishes `ivpn.status` on
every change, and again every `--republish` seconds for late subscribers. `splittun ivpn` asks it (Ivpn.STATUS).

What IVPN's status means for packets is decided in the interceptor, from `ivpn.status`: the external
verdict handler (core/ivpn/interop.py: IVPN's processes, carrier and daemon port are accept-final) and a
jump check on every state change (IVPN's kill-switch chains). Still to come (issue 13): DNS delegation, the
location gate, bypass routes, the wg-quick exemption and the "connected" notice.
"""

from __future__ import annotations

import argparse
import os
import time

from core.ivpn.portfile import port_file_paths, windows_install_dir
from core.ivpn.protocol import NOT_RUNNING, IvpnSnapshot
from core.ivpn.status import to_status
from messages.control import Ivpn, NoArgs
from messages.events import IvpnStatus
from runtime.actor import Actor, answers

from .client import DaemonClient

REPUBLISH = 10.0
#: Where to look for the daemon instead of IVPN's own locations (the lab's fake daemon; passed on by supervisord).
PORT_FILE_ENV = "SPLITTUN_IVPN_PORT_FILE"


class IvpnActor(Actor):
    """IVPN client interop."""

    name = "ivpn"
    control = Ivpn

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--port-file",
            action="append",
            default=[p for p in os.environ.get(PORT_FILE_ENV, "").split(os.pathsep) if p],
            help=f"the daemon's port file (repeatable; default: {PORT_FILE_ENV}, a {os.pathsep!r}-separated list, "
            "else this platform's IVPN locations)",
        )
        parser.add_argument(
            "--republish", type=float, default=REPUBLISH, help="repeat the last status every N s (0 = never)"
        )

    def start(self) -> None:
        paths = tuple(getattr(self.rt.args, "port_file", []) or ())
        if not paths:
            install_dir = windows_install_dir() if os.name == "nt" else None
            paths = port_file_paths(env=os.environ, install_dir=install_dir)
        self.status = to_status(NOT_RUNNING, time.time())
        self.publishes = 0
        self.client = DaemonClient(paths, self._on_snapshot, lambda line: self.log.info("ivpn.daemon", status=line))
        self.client.start()
        republish = float(getattr(self.rt.args, "republish", REPUBLISH))
        if republish > 0:
            self.rt.loop.call_every(republish, self._publish)

    def stop(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.stop()

    def _on_snapshot(self, snap: IvpnSnapshot) -> None:
        """Called on the client's thread for every changed snapshot: the status is replaced whole."""
        self.status = to_status(snap, time.time())
        self._publish()

    def _publish(self) -> None:
        self.publishes += 1
        self.rt.publish(self.status)  # thread-safe

    @answers(Ivpn.STATUS)
    def answer_status(self, args: NoArgs) -> IvpnStatus:
        return self.status

    @answers(Ivpn.CONNECT)
    def answer_connect(self, args: NoArgs) -> IvpnStatus:
        """Cut the backoff short; the answer is the status now (the client needs a moment to connect)."""
        self.client.wake()
        return self.status

    def counters(self) -> dict[str, int]:
        return {"publishes": self.publishes, **self.client.counters}
