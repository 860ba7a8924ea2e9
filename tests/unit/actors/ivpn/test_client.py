"""The daemon client against the project's fake IVPN daemon over loopback: what splittun would notice
(the status it publishes, what it logs) through daemon absence, start, VPN changes, restart and lies."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from actors.ivpn.client import DaemonClient
from core.ivpn.protocol import DnsServer, IvpnSnapshot
from splittun.lab.ivpn import FakeIvpnDaemon, FakeVpn


class Recorder:
    def __init__(self) -> None:
        self.statuses: list[IvpnSnapshot] = []
        self.logs: list[str] = []
        self.changed = threading.Condition()

    def status(self, snap: IvpnSnapshot) -> None:
        with self.changed:
            self.statuses.append(snap)
            self.changed.notify_all()

    def log(self, line: str) -> None:
        with self.changed:
            self.logs.append(line)
            self.changed.notify_all()

    def wait(self, what: Callable[[], bool], timeout: float = 5.0) -> None:
        """Until `what` holds for the statuses so far (none yet: the client's first may still be on its way)."""
        with self.changed:
            ok = self.changed.wait_for(lambda: bool(self.statuses) and what(), timeout)
            assert ok, f"statuses {self.statuses[-3:]}, logs {self.logs}"

    @property
    def last(self) -> IvpnSnapshot:
        return self.statuses[-1]


@pytest.fixture
def port_file(tmp_path: Path) -> str:
    return str(tmp_path / "etc" / "port.txt")


@pytest.fixture
def seen(port_file: str) -> Iterator[tuple[Recorder, DaemonClient]]:
    rec = Recorder()
    client = DaemonClient(
        (str(Path(port_file).parent / "missing.txt"), port_file), rec.status, rec.log, max_backoff=0.2, min_backoff=0.02
    )
    client.start()
    yield rec, client
    client.stop()


def test_no_daemon_is_reported_once_and_logged_once(seen) -> None:
    rec, _client = seen
    rec.wait(lambda: bool(rec.statuses))
    time.sleep(0.5)  # many attempts at the 0.2 s backoff
    assert [s.daemon for s in rec.statuses] == [False]
    assert rec.logs == ["daemon not running"]


def test_daemon_start_vpn_changes_and_dns(seen, port_file: str) -> None:
    rec, client = seen
    vpn = FakeVpn(dns=[("9.9.9.9", 2, "https://dns.quad9.net/dns-query")])
    with FakeIvpnDaemon(port_file, vpn) as daemon:
        client.wake()
        rec.wait(lambda: rec.statuses[-1].daemon and rec.last.state == "DISCONNECTED")
        assert rec.last.dns == (DnsServer("9.9.9.9", "doh", "https://dns.quad9.net/dns-query"),)
        daemon.connect()
        rec.wait(lambda: rec.last.connected)
        assert "CONNECTING" in [s.state for s in rec.statuses]
        assert (rec.last.server_ip, rec.last.server_port, rec.last.vpn_type) == ("198.51.100.7", 2049, "wireguard")
        daemon.kill_switch(True)
        rec.wait(lambda: rec.last.kill_switch.enabled)
        daemon.disconnect()
        rec.wait(lambda: rec.last.state == "DISCONNECTED" and rec.last.server_ip == "")
    rec.wait(lambda: not rec.last.daemon)  # ServiceExitingResp, port file gone


def test_old_dns_shape(seen, port_file: str) -> None:
    rec, client = seen
    with FakeIvpnDaemon(port_file, FakeVpn(dns=[("10.0.254.2", 1, "")], old_dns_shape=True, state="CONNECTED")):
        client.wake()
        rec.wait(lambda: rec.last.connected)
        assert rec.last.dns == (DnsServer("10.0.254.2", "dot"),)


def test_restart_new_port_and_secret_keeps_the_carrier_meanwhile(seen, port_file: str) -> None:
    rec, _client = seen
    with FakeIvpnDaemon(port_file, FakeVpn(state="CONNECTED")) as daemon:
        rec.wait(lambda: rec.last.connected and rec.last.daemon)
        old = (daemon.port, daemon.secret)
        daemon.restart()
        assert (daemon.port, daemon.secret) != old
        rec.wait(lambda: daemon.hellos == 2 and rec.last.daemon)
        during = [s for s in rec.statuses if not s.daemon and s.state != "UNKNOWN"]
        assert during and all(s.server_ip == "198.51.100.7" for s in during)  # never "no carrier" in between
        assert rec.last.connected


@pytest.mark.parametrize(
    ("garbage", "log"),
    [
        (b"{not json\n", "not JSON"),
        (b'{"Command":"ConnectedResp","Idx":0,"VpnType":9}\n', "VpnType"),
        (b"x" * (2 << 20), "longer than"),
    ],
)
def test_garbage_resets_with_one_log_line_and_reconnects(seen, port_file: str, garbage: bytes, log: str) -> None:
    rec, client = seen
    with FakeIvpnDaemon(port_file) as daemon:
        rec.wait(lambda: daemon.hellos == 1 and rec.last.daemon)
        daemon.send_raw(garbage)
        rec.wait(lambda: daemon.hellos == 2 and rec.last.daemon)
        resets = [line for line in rec.logs if "connection reset" in line]
        assert len(resets) == 1 and log in resets[0] and "\n" not in resets[0]
        assert client.counters["resets"] == 1


def test_wrong_secret_is_refused_and_retried_with_the_new_file(seen, port_file: str) -> None:
    rec, _client = seen
    with FakeIvpnDaemon(port_file) as daemon:
        rec.wait(lambda: daemon.hellos == 1)
        daemon.stop(announce=False)
        daemon.start(write_port_file=False)
        daemon.write_port_file(f"{daemon.port}:{daemon.secret ^ 1:x}")  # a lying port file
        rec.wait(lambda: daemon.rejected >= 1 and any("Secret verification error" in line for line in rec.logs))
        assert not rec.last.daemon
        daemon.write_port_file()
        rec.wait(lambda: daemon.hellos == 2 and rec.last.daemon)
