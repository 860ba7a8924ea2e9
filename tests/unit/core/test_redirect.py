"""The redirect table the divert interceptor writes and the proxies read: one file, two mappings."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from core.redirect import Redirect, RedirectTable
from messages.flows import FiveTuple, IpProtocol
from messages.marks import split_mark


def test_what_the_interceptor_publishes_the_proxy_reads_from_its_own_mapping(tmp_path: Path) -> None:
    writer = RedirectTable(tmp_path / "redirects", slots=64)
    reader = RedirectTable(tmp_path / "redirects", slots=64, create=False)
    flow = FiveTuple(IpProtocol.UDP, "2001:db8::1", 5000, "2001:db8:30::80", 53)
    writer.put(Redirect(flow, 20001, split_mark(2)), time.time() + 30)
    found = reader.lookup(IpProtocol.UDP, "2001:db8::1", 20001)
    assert found == Redirect(flow, 20001, split_mark(2))
    assert reader.lookup(IpProtocol.TCP, "2001:db8::1", 20001) is None  # another protocol
    assert reader.lookup(IpProtocol.UDP, "2001:db8::1", 5000) is None  # the app's own port is not what was seen
    writer.remove(found)
    assert reader.lookup(IpProtocol.UDP, "2001:db8::1", 20001) is None
    writer.close()
    reader.close()


def test_entries_expire_and_a_full_window_refuses_instead_of_overwriting_live_flows() -> None:
    table = RedirectTable(None, slots=8)  # one probe window covers the whole table
    now = time.time()
    flows = [Redirect(FiveTuple(IpProtocol.TCP, "192.0.2.10", 40000 + i, "203.0.113.80", 80), 40000 + i, 1719)
             for i in range(9)]  # fmt: skip
    assert all(table.put(r, now + 60) for r in flows[:8])
    assert not table.put(flows[8], now + 60) and table.full == 1
    assert table.lookup(IpProtocol.TCP, "192.0.2.10", 40000, now=now + 61) is None  # expired
    table.remove(flows[0])
    assert table.put(flows[8], now + 60)


def test_a_reader_refuses_a_file_that_is_not_a_redirect_table(tmp_path: Path) -> None:
    (tmp_path / "junk").write_bytes(b"x" * 100)
    with pytest.raises(OSError):
        RedirectTable(tmp_path / "junk", slots=64, create=False)


def test_the_udp_proxy_reads_the_socket_a_split_flow_was_decided_for_also_from_a_new_table(tmp_path: Path) -> None:
    """NFQUEUE: the interceptor names each split UDP flow's socket; the proxy's `SplitOwners` reads it, and
    follows the file when a restarted interceptor made it anew."""
    from core.proxy.origdst import SplitOwners

    path = tmp_path / "redirects"
    flow = FiveTuple(IpProtocol.UDP, "192.0.2.66", 41000, "203.0.113.80", 5300)
    owners = SplitOwners(path)
    assert owners(("192.0.2.66", 41000), ("203.0.113.80", 5300)) == 0  # no interceptor publishes: any socket
    writer = RedirectTable(path)
    writer.put(Redirect(flow, flow.src_port, split_mark(2), cookie=0x1_0000_0007), time.time() + 30)
    assert owners(("192.0.2.66", 41000), ("203.0.113.80", 5300)) == 0x1_0000_0007  # 64-bit cookies survive
    assert owners(("192.0.2.66", 41001), ("203.0.113.80", 5300)) is None  # nothing named: not ours to carry
    writer.close()
    path.unlink()  # the interceptor's cleanup, then a new interceptor's table
    writer = RedirectTable(path)
    writer.put(Redirect(flow, flow.src_port, split_mark(2), cookie=9), time.time() + 30)
    assert owners(("192.0.2.66", 41000), ("203.0.113.80", 5300)) == 9
    owners.close()
    writer.close()
