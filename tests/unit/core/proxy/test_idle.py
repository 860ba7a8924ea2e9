"""An idle proxy costs nothing: with no session its data thread sleeps until a client comes (no timer wakes
it), and once the last session ended its deadline sweep stops."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from core.proxy import ProxyConfig, TcpProxy, UpstreamPlan
from tests.support.proxy import WAIT, Hooks, Server, echo, recv_all

QUIET = 2.5  # seconds watched: the old loop woke at least twice in this time (its 1 s sweep and poll cap)


def wakeups(proxy: TcpProxy) -> int:
    """How often the data thread went to sleep and was woken (voluntary context switches)."""
    assert proxy.loop.thread is not None and proxy.loop.thread.native_id is not None
    status = Path(f"/proc/self/task/{proxy.loop.thread.native_id}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("voluntary_ctxt_switches")).split()[1])


def goes_quiet(proxy: TcpProxy, within: float = 15.0) -> bool:
    """Whether a whole QUIET window without a wakeup comes within `within` s. The old loop never had one; a
    loaded machine may delay the thread's first sleep or last sweep, so one noisy window is not a failure."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        before = wakeups(proxy)
        time.sleep(QUIET)
        if wakeups(proxy) == before:
            return True
    return False


def test_an_idle_proxy_does_not_wake_and_its_sweep_stops_with_the_last_session() -> None:
    hooks = Hooks()
    server = Server("127.0.0.1", echo)
    config = ProxyConfig(dial_timeout=2.0)  # a 0.5 s sweep while a session lives
    proxy = TcpProxy([("127.0.0.1", 0)], lambda _req: UpstreamPlan(server.address), config, hooks=hooks)
    proxy.start()
    try:
        assert goes_quiet(proxy)
        with socket.create_connection(proxy.addresses[0], timeout=WAIT) as c:
            c.sendall(b"x")
            assert c.recv(10) == b"x"
            before = wakeups(proxy)
            time.sleep(1.2)
            assert wakeups(proxy) > before  # deadlines are watched while it lives
            c.shutdown(socket.SHUT_WR)
            assert recv_all(c) == b""
        hooks.wait_closed()
        assert goes_quiet(proxy)  # the sweep saw the table empty and stopped
    finally:
        proxy.shutdown(0.0)
        server.close()
