"""The packet path with fakes: verdicts and marks on packets, events, retries, DNS learning, re-evaluation.

The engine reaches everything outside itself through one `Ports` object; here that is one fake, `FakePorts`:
the bus, the loop's timers, the clocks, attribution (one process for every socket; the socket's cookie and
uid), the conntrack table with its destroy events, the name table and the handler slot."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any

import pytest

from actors.interceptor.engine import RETRY_DELAYS, Engine
from core.dns.names import NameTable
from core.verdict_handler import HandlerSlot
from kernel.conntrack import CtCounters, CtEntry
from kernel.sockdiag import DiagSocket
from messages import (
    ConnEnd,
    ConnNew,
    ConnVerdict,
    GatewayRecord,
    InterfaceRecord,
    Mark,
    NetenvChanged,
    PolicyRule,
    PolicySnapshot,
    ProcessInfo,
    SessionCounters,
    Verdict,
    flow_key,
)
from messages.events import HEARTBEAT_TTL
from messages.flows import FiveTuple
from messages.marks import nameserver_path, split_interface_index, split_mark
from runtime.log import EventLog
from tests.support import FIXTURES_DIR

FIXTURES = FIXTURES_DIR / "interceptor"
PACKETS = {k: bytes.fromhex(v) for k, v in json.loads((FIXTURES / "packets.json").read_text()).items() if k[0] != "_"}


class FakePacket:
    def __init__(self, payload: bytes, mark: int = 0, log: list[str] | None = None) -> None:
        self.payload = payload
        self.queued_mark = mark  # what the rules restored from the connmark before queueing it
        self.mark: int | None = None
        self.accepted = 0
        self.dropped = 0
        self.log = log  # where "verdict" is recorded when it is given

    def get_payload(self) -> bytes:
        return self.payload

    def get_mark(self) -> int:
        return self.queued_mark

    def set_mark(self, mark: int) -> None:
        self.mark = mark

    def accept(self) -> None:
        if self.log is not None:
            self.log.append("verdict")
        self.accepted += 1

    def drop(self) -> None:
        self.dropped += 1


CURL = ProcessInfo(pid=4242, ppid=1, uid=1000, name="curl", exe="/usr/bin/curl")
OWN_PID = 999  # the interceptor's own pid, as the fake ports tell it


#: The host as netenv sees it: eth0 (index 2) is the uplink of both families; eth1 (index 5) is another.
NETENV = NetenvChanged(
    seq=1,
    ts=0.0,
    interfaces=[
        InterfaceRecord(name="eth0", index=2, addresses=["192.0.2.10/26", "2001:db8:10::10/64"],
                        ipv4="192.0.2.10", ipv6="2001:db8:10::10"),
        InterfaceRecord(name="eth1", index=5, addresses=["192.0.2.130/26"], ipv4="192.0.2.130"),
    ],
    gateways=[GatewayRecord(gateway="192.0.2.1", interface="eth0", family=4),
              GatewayRecord(gateway="2001:db8:10::1", interface="eth0", family=6),
              GatewayRecord(gateway="192.0.2.129", interface="eth1", family=4)],
    uplink_ipv4="eth0",
    uplink_ipv6="eth0",
)  # fmt: skip


def is_split(mark: int | None) -> bool:
    return mark is not None and split_interface_index(mark) is not None


class FakePorts:
    """The engine's one fake `Ports`, and the test's handle on the engine it drives.

    Records the order of verdicts and attribution calls in `log` ("verdict", "attribute")."""

    def __init__(self, process: ProcessInfo | None = CURL, handler: Any = None) -> None:
        # --- what the engine reads and calls (the Ports protocol) ---
        self.names: NameTable = NameTable(None, slots=256)
        self.handler_slot = HandlerSlot()
        if handler is not None:
            self.handler_slot.set(handler)
        self.own_pid = OWN_PID
        # --- what the fake world holds ---
        self.events: list[Any] = []
        self.timers: list[tuple[float, Any]] = []
        self.log: list[str] = []
        self.process = process  # the process holding every socket
        self.attribute_calls = 0
        self.socket_owner_uid: int | None = None  # what sock_diag says a socket's uid is (None: not found)
        self.our_uid: int | None = None  # the uid our processes run as (None: unknown)
        self.cookie = 1  # the cookie of the socket that sends now (a new socket: another number)
        self.table: dict[FiveTuple, CtEntry] = {}  # the conntrack table (entries whose verdict was saved)
        self.destroyed: list[CtEntry] = []  # destroy events waiting on the events socket
        self.deleted: list[FiveTuple] = []
        self.gets = 0
        self.owners: dict[FiveTuple, tuple[int, int]] = {}  # split UDP flows' published owners: (mark, cookie)
        self.engine = Engine(instance="interceptor", log=EventLog("test"), ports=self)
        self.engine.set_netenv(NETENV)  # eth0 is the uplink: splits have somewhere to go

    def now(self) -> float:
        return 1000.0

    def monotonic(self) -> float:
        return 500.0

    def publish(self, msg: Any) -> None:
        self.events.append(msg)

    def call_later(self, delay: float, callback: Any) -> None:
        self.timers.append((delay, callback))

    def attribute(self, flow: FiveTuple) -> ProcessInfo | None:
        self.log.append("attribute")
        self.attribute_calls += 1
        return self.process

    def socket_uid(self, flow: FiveTuple) -> int | None:
        return self.socket_owner_uid

    def socket_cookie(self, flow: FiveTuple, fresh: bool = False) -> int:
        return self.cookie

    def uid_of(self, pid: int) -> int | None:
        return self.our_uid

    def conntrack_get(self, key: FiveTuple) -> CtEntry | None:
        self.gets += 1
        return self.table.get(key)

    def conntrack_delete(self, key: FiveTuple) -> bool:
        self.deleted.append(key)
        return True

    def drain_conntrack_events(self) -> None:
        events, self.destroyed = self.destroyed, []
        self.engine.on_conntrack_destroyed(events)

    def publish_split_owner(self, flow: FiveTuple, mark: int, cookie: int) -> None:
        self.log.append("owner")
        self.owners[flow] = (mark, cookie)

    # --- driving the engine ---

    def policy(self, version: int, *rules: PolicyRule, enabled: bool = True) -> bool:
        return self.engine.set_policy(PolicySnapshot(version=version, ts=0.0, enabled=enabled, rules=list(rules)))

    def send(self, name_or_bytes: str | bytes, inbound: bool = False, end_batch: bool = True) -> FakePacket:
        data = PACKETS[name_or_bytes] if isinstance(name_or_bytes, str) else name_or_bytes
        pkt = FakePacket(data, log=self.log)
        self.engine.on_packet(inbound, pkt)
        if end_batch:
            self.end_batch()
        return pkt

    def end_batch(self) -> None:
        """What the actor's loop does once the queue is drained: run the callbacks due now (not retries)."""
        due = [cb for delay, cb in self.timers if delay == 0]
        self.timers = [(delay, cb) for delay, cb in self.timers if delay != 0]
        for cb in due:
            cb()

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    def run_timers(self) -> None:
        while self.timers:
            _, cb = self.timers.pop(0)
            cb()

    def confirm(self, name: str, mark: int, ct_id: int = 7) -> FiveTuple:
        """The verdict of the last packet of `name` made it into the table (confirmed, connmark saved)."""
        [key] = [k for k, conn in self.engine.live.items() if conn.outcome.mark == mark and k not in self.table]
        self.table[key] = CtEntry(key, mark, ct_id)
        return key

    def app(self, process: ProcessInfo, cookie: int) -> None:
        """From now on another app's socket sends: its process, a new socket."""
        self.process, self.cookie = process, cookie


SPLIT_80 = PolicyRule(id="srv", action="split", dest="203.0.113.80", interface="eth0")
SPLIT_CURL = PolicyRule(id="curl", action="split", app_name="curl")
SPLIT_DOMAIN = PolicyRule(id="dom", action="split", dest=".example.com")


def test_split_connection_gets_mark_1719_and_events_with_the_proxy_key() -> None:
    h = FakePorts()
    h.policy(1, SPLIT_80)
    pkt = h.send("tcp4_syn")
    assert (pkt.mark, pkt.accepted) == (split_mark(2), 1)  # eth0's index: the rule names it
    [new] = h.of(ConnNew)  # one event: the connection with its verdict
    verdict = new
    assert new.process == CURL and not h.of(ConnVerdict)
    assert (new.src_ip, new.dst_ip, new.dst_port, new.protocol) == ("192.0.2.66", "203.0.113.80", 80, 6)
    assert (verdict.verdict, verdict.verb, verdict.rule, verdict.interface) == (8, "split tunneled", "srv", "eth0")
    assert verdict.split_key == flow_key(6, "192.0.2.66", new.src_port, "203.0.113.80", 80)


def test_unsplit_connection_is_accepted_permanently_without_split_key() -> None:
    h = FakePorts()
    pkt = h.send("tcp6_syn")  # policy disabled until a snapshot arrives
    assert pkt.mark == Mark.ACCEPT_ALWAYS
    [verdict] = h.of(ConnNew)
    assert (verdict.verdict, verdict.split_key, verdict.interface) == (Verdict.ACCEPT, "", "")


def test_a_second_queued_packet_of_the_same_flow_gets_the_same_verdict_and_no_new_events() -> None:
    h = FakePorts()
    h.policy(1, SPLIT_80)
    first = h.send("udp4")
    h.confirm("udp4", first.mark or 0)  # its entry carries the verdict: the second datagram belongs to it
    second = h.send("udp4")
    assert first.mark == second.mark == split_mark(2)  # the rule splits every port of .80
    assert len(h.of(ConnNew)) == 1


def test_mid_stream_tcp_after_a_flush_stays_in_the_vpn() -> None:
    h = FakePorts()
    h.policy(1, SPLIT_80)
    pkt = h.send("tcp4_data")
    assert pkt.mark == Mark.ACCEPT_ALWAYS
    assert "mid-stream" in h.of(ConnNew)[0].reason


def test_malformed_packet_is_accepted_unsplit_for_this_packet_only_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = FakePorts()
    h.policy(1, PolicyRule(id="all", action="split"))
    with caplog.at_level(logging.WARNING):
        packets = [h.send(PACKETS["tcp4_syn"][:30]) for _ in range(5)]
    assert all(p.mark == Mark.ACCEPT and p.accepted == 1 for p in packets)
    assert len([r for r in caplog.records if "packet.malformed" in r.getMessage()]) == 1
    assert h.engine.counters["malformed"] == 5 and h.of(ConnNew) == []


def test_a_fragment_is_never_split() -> None:
    h = FakePorts()
    h.policy(1, PolicyRule(id="all", action="split"))
    data = bytearray(PACKETS["udp4"])
    struct.pack_into("!H", data, 6, 185)
    pkt = h.send(bytes(data))
    assert (pkt.mark, pkt.accepted) == (Mark.ACCEPT, 1) and h.of(ConnNew) == []


def test_any_failure_on_the_path_still_gives_a_verdict_without_a_split_mark() -> None:
    h = FakePorts()
    h.policy(1, PolicyRule(id="all", action="split"))

    def broken(flow: FiveTuple) -> ProcessInfo:
        raise RuntimeError("netlink exploded")

    h.attribute = broken  # type: ignore[method-assign]
    pkt = h.send("tcp4_syn")
    assert (pkt.mark, pkt.accepted) == (Mark.ACCEPT_ALWAYS, 1)  # never split, and kept so: no split later
    assert h.engine.counters["attribution_errors"] == 1
    verdict = h.of(ConnNew)[0]  # not silent: the connection and why it stayed in the VPN are published
    assert verdict.verdict == Verdict.ACCEPT and "finding the process failed (RuntimeError" in verdict.reason
    h.names = None  # type: ignore[assignment]  # anything else failing: accepted unmarked, counted
    pkt = h.send(from_port("tcp4_syn", 40001))
    assert (pkt.mark, pkt.accepted) == (0, 1)
    assert h.engine.counters["errors"] == 1


def test_attribution_is_retried_when_the_policy_needs_the_app() -> None:
    h = FakePorts(process=None)
    h.policy(1, SPLIT_CURL)
    pkt = h.send("tcp4_syn")
    assert pkt.accepted == 0 and [d for d, _ in h.timers] == [RETRY_DELAYS[0]]
    h.send("tcp4_syn")  # a retransmission while waiting joins the pending flow
    h.process = CURL
    h.run_timers()
    assert is_split(pkt.mark) and pkt.accepted == 1
    assert len(h.of(ConnNew)) == 1 and h.of(ConnNew)[0].process == CURL


def test_attribution_gives_up_after_the_retries_and_decides_without_the_app() -> None:
    h = FakePorts(process=None)
    h.policy(1, SPLIT_CURL)
    pkt = h.send("tcp4_syn")
    h.run_timers()
    assert h.attribute_calls == len(RETRY_DELAYS) + 1
    assert (pkt.mark, pkt.accepted) == (Mark.ACCEPT_ALWAYS, 1)
    assert h.of(ConnNew)[0].process is None


def test_no_waiting_when_the_policy_has_no_app_rules() -> None:
    h = FakePorts(process=None)
    h.policy(1, SPLIT_80)
    assert is_split(h.send("tcp4_syn").mark) and h.timers == []


def test_pending_packets_are_decided_on_stop() -> None:
    h = FakePorts(process=None)
    h.policy(1, SPLIT_CURL)
    pkt = h.send("tcp4_syn")
    h.engine.flush_pending()
    assert pkt.accepted == 1 and pkt.mark == Mark.ACCEPT_ALWAYS


def dns_answer_packet(name: str, address: bytes) -> bytes:
    """IPv4/UDP packet from a resolver carrying one A answer for `name`."""
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    dns = struct.pack("!HHHHHH", 1, 0x8180, 1, 1, 0, 0) + q + struct.pack("!HH", 1, 1)
    dns += b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 300, 4) + address
    udp = struct.pack("!HHHH", 53, 40000, 8 + len(dns), 0) + dns
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, bytes([203, 0, 113, 2]), bytes([192, 0, 2, 66])
    )
    return ip + udp


def test_first_connection_after_a_lookup_matches_the_domain_rule() -> None:
    h = FakePorts()
    h.policy(1, SPLIT_DOMAIN)
    answer = h.send(dns_answer_packet("www.example.com", bytes([203, 0, 113, 80])), inbound=True)
    assert answer.accepted == 1 and answer.mark is None  # DNS answers pass unchanged
    pkt = h.send("tcp4_syn")
    assert is_split(pkt.mark)
    assert h.of(ConnNew)[0].domain == "www.example.com"
    assert h.of(ConnNew)[0].rule == "dom"


def test_unreadable_dns_answer_is_accepted() -> None:
    h = FakePorts()
    broken = dns_answer_packet("www.example.com", bytes(4))[:-6]
    pkt = h.send(broken, inbound=True)
    assert pkt.accepted == 1 and h.engine.counters["dns_answers"] == 0


def test_own_actor_pid_from_heartbeat_is_accept_final() -> None:
    h = FakePorts()
    h.policy(1, PolicyRule(id="all", action="split"))
    h.engine.heard_actor("controller", CURL.pid)
    assert h.send("tcp4_syn").mark == Mark.ACCEPT_FINAL


def test_older_policy_is_ignored() -> None:
    h = FakePorts()
    assert h.policy(5, SPLIT_80)
    assert not h.policy(4)
    assert h.engine.policy.version == 5


def test_policy_change_requeues_udp_flows_and_leaves_split_tcp_alone() -> None:
    h = FakePorts()
    h.policy(1, SPLIT_80)
    tcp = h.send("tcp4_syn")
    udp = h.send("udp4")
    assert tcp.mark == udp.mark and is_split(tcp.mark)
    h.events.clear()
    h.policy(2)  # split nothing any more
    [end] = h.of(ConnEnd)
    assert h.deleted == [FiveTuple(17, "192.0.2.66", udp_sport(), "203.0.113.80", 5300)]
    assert "re-evaluated" in end.reason and "split tunneled -> accepted" in end.reason
    # The UDP flow's next packet is queued again and decided by the new policy, under a new conn_id.
    again = h.send("udp4")
    assert again.mark == Mark.ACCEPT_ALWAYS and h.of(ConnNew)[0].conn_id != end.conn_id
    assert len(h.engine.live) == 2  # the split TCP connection is still tracked: it keeps its proxy


def udp_sport() -> int:
    return struct.unpack_from("!H", PACKETS["udp4"], 20)[0]


def test_reevaluation_applies_the_external_handler_too() -> None:
    calls: list[Any] = []

    def handler(view: Any) -> Verdict | None:
        calls.append(view)
        return Verdict.BLOCK if len(calls) > 1 else None

    h = FakePorts(handler=handler)
    h.policy(1)
    assert h.send("tcp4_syn").mark == Mark.ACCEPT_ALWAYS
    h.policy(2)
    assert len(calls) == 2  # the same filtering function ran again for the live connection
    assert len(h.deleted) == 1 and h.of(ConnEnd)[0].reason.endswith("accepted -> blocked")


def test_conntrack_destroy_ends_our_connections_only() -> None:
    h = FakePorts()
    h.send("tcp4_syn")
    conn_id = h.of(ConnNew)[0].conn_id
    sport = struct.unpack_from("!H", PACKETS["tcp4_syn"], 20)[0]
    h.engine.on_conntrack_destroyed(
        [
            CtEntry(FiveTuple(6, "192.0.2.66", 1, "203.0.113.9", 80)),
            CtEntry(FiveTuple(6, "192.0.2.66", sport, "203.0.113.80", 80)),
        ]
    )
    [end] = h.of(ConnEnd)
    assert (end.conn_id, end.reason) == (conn_id, "closed")
    assert not h.engine.live


# --- the verdict does not wait for the process when the process cannot change it -------------------------


def test_without_app_rules_the_verdict_comes_first_and_conn_new_still_carries_the_process() -> None:
    h = FakePorts()
    h.policy(1, SPLIT_80)
    pkt = h.send("tcp6_syn", end_batch=False)  # not split by this policy
    assert (pkt.mark, pkt.accepted) == (Mark.ACCEPT_ALWAYS, 1)
    assert h.log == ["verdict", "attribute"]  # released before anyone looked for its process
    assert h.events == []  # events come at the end of the batch of packets
    h.end_batch()
    [new] = h.of(ConnNew)
    assert new.process == CURL and new.verdict == Verdict.ACCEPT
    assert [type(e) for e in h.events] == [ConnNew]  # one event per decided connection
    assert h.engine.counters["attributed_after_verdict"] == 1


def test_with_app_rules_the_verdict_waits_for_the_process() -> None:
    h = FakePorts()
    h.policy(1, SPLIT_CURL)
    pkt = h.send("tcp4_syn")
    assert h.log == ["attribute", "verdict"] and is_split(pkt.mark)


def test_a_split_waits_for_the_process_so_our_own_connections_are_never_split() -> None:
    h = FakePorts()
    h.policy(1, SPLIT_80)
    h.engine.heard_actor("netenv", CURL.pid)
    pkt = h.send("tcp4_syn")
    assert h.log == ["attribute", "verdict"] and pkt.mark == Mark.ACCEPT_FINAL
    h.engine.heard_actor("netenv", 1)  # not ours any more
    h.log.clear()
    assert is_split(h.send("udp4").mark) and h.log == ["attribute", "owner", "verdict"]


def test_the_events_of_a_batch_of_packets_are_published_at_its_end() -> None:
    h = FakePorts()
    h.policy(1)  # split nothing
    packets = [h.send(name, end_batch=False) for name in ("tcp4_syn", "tcp6_syn", "udp4", "udp6")]
    assert all(p.accepted == 1 for p in packets) and h.log == ["verdict", "attribute"] * 4
    assert h.events == [] and [d for d, _ in h.timers] == [0]  # one flush scheduled for the batch
    h.end_batch()
    assert [type(e) for e in h.events] == [ConnNew] * 4
    assert all(e.process == CURL for e in h.of(ConnNew))


def test_conn_end_never_comes_before_conn_new() -> None:
    h = FakePorts()
    h.send("tcp4_syn", end_batch=False)
    sport = struct.unpack_from("!H", PACKETS["tcp4_syn"], 20)[0]
    h.engine.on_conntrack_destroyed([CtEntry(FiveTuple(6, "192.0.2.66", sport, "203.0.113.80", 80))])
    assert [type(e) for e in h.events] == [ConnNew, ConnEnd]
    assert h.of(ConnNew)[0].process == CURL
    h.end_batch()  # the scheduled flush finds nothing left to do
    assert len(h.events) == 2


def test_a_failed_attribution_after_the_verdict_still_publishes_the_connection() -> None:
    h = FakePorts()

    def broken(flow: FiveTuple) -> ProcessInfo | None:
        raise OSError("netlink gone")

    h.attribute = broken  # type: ignore[method-assign]
    pkt = h.send("tcp4_syn")
    assert (pkt.mark, pkt.accepted) == (Mark.ACCEPT_ALWAYS, 1)
    assert h.of(ConnNew)[0].process is None and h.of(ConnNew)[0].verdict is not None
    assert h.engine.counters["errors"] == 1


def test_a_connection_found_to_be_ours_after_its_verdict_counts_as_ours() -> None:
    h = FakePorts()
    h.engine.heard_actor("controller", CURL.pid)
    h.send("tcp4_syn")  # policy disabled: kept in the VPN without asking for the process first
    [conn] = h.engine.live.values()
    assert conn.own and conn.process == CURL


def test_a_handler_sees_the_process_unless_it_says_it_does_not_need_one() -> None:
    seen: list[Any] = []

    def handler(view: Any) -> None:
        seen.append(view.process)

    h = FakePorts(handler=handler)
    h.send("tcp4_syn")
    assert h.log == ["attribute", "verdict"] and seen == [CURL]

    def quick(view: Any) -> None:
        seen.append(view.process)

    quick.needs_process = False  # type: ignore[attr-defined]
    h = FakePorts(handler=quick)
    h.send("tcp4_syn")
    assert h.log == ["verdict", "attribute"] and seen[-1] is None


def from_port(name: str, sport: int) -> bytes:
    """The fixture packet from another source port: another connection to the same destination."""
    data = bytearray(PACKETS[name])
    struct.pack_into("!H", data, 20, sport)
    return bytes(data)


def test_remembered_destination_verdicts_follow_learned_names_and_new_policies() -> None:
    h = FakePorts()
    h.policy(1, SPLIT_DOMAIN, PolicyRule(id="keep-81", action="keep", dest="203.0.113.81"))
    assert h.send(from_port("tcp4_syn", 40001)).mark == Mark.ACCEPT_ALWAYS  # no name known yet
    h.send(dns_answer_packet("www.example.com", bytes([203, 0, 113, 80])), inbound=True)
    assert is_split(h.send(from_port("tcp4_syn", 40002)).mark)  # now it has one
    assert is_split(h.send(from_port("tcp4_syn", 40003)).mark)
    h.policy(2, PolicyRule(id="keep-all", action="keep"))
    pkt = h.send(from_port("tcp4_syn", 40004))
    assert pkt.mark == Mark.ACCEPT_ALWAYS and h.of(ConnNew)[-1].rule == "keep-all"


def test_with_an_external_handler_every_connection_is_decided_afresh() -> None:
    calls: list[Any] = []

    def handler(view: Any) -> Verdict | None:
        calls.append(view)
        return Verdict.BLOCK if len(calls) == 2 else None

    handler.needs_process = False  # type: ignore[attr-defined]
    h = FakePorts(handler=handler)
    assert h.send(from_port("tcp4_syn", 40001)).mark == Mark.ACCEPT_ALWAYS
    assert h.send(from_port("tcp4_syn", 40002)).mark == Mark.BLOCK_ALWAYS
    assert len(calls) == 2


def with_uids(h: FakePorts, socket_uid: int, ours: int = 0) -> FakePorts:
    """sock_diag says the socket belongs to `socket_uid`; our processes run as `ours`."""
    h.socket_owner_uid = socket_uid
    h.our_uid = ours
    return h


def test_a_split_of_a_users_app_does_not_wait_for_its_process() -> None:
    h = with_uids(FakePorts(), socket_uid=1000)
    h.policy(1, SPLIT_80)
    pkt = h.send("tcp4_syn")
    assert is_split(pkt.mark) and h.log == ["verdict", "attribute"]
    assert h.of(ConnNew)[0].process == CURL


def test_a_split_of_a_socket_of_our_uid_still_checks_the_process_first() -> None:
    h = with_uids(FakePorts(), socket_uid=0)
    h.policy(1, SPLIT_80)
    h.engine.heard_actor("controller", CURL.pid)
    pkt = h.send("tcp4_syn")
    assert pkt.mark == Mark.ACCEPT_FINAL and h.log == ["attribute", "verdict"]


def test_a_rules_own_interface_travels_in_the_split_mark() -> None:
    h = FakePorts()
    h.policy(1, PolicyRule(id="wifi", action="split", dest="203.0.113.80", interface="eth1"))
    pkt = h.send("tcp4_syn")
    assert pkt.mark == split_mark(5)  # eth1's index: the proxy reads it back from the conntrack mark
    assert h.of(ConnNew)[0].interface == "eth1"


def test_a_split_without_an_egress_for_its_ip_version_stays_in_the_vpn() -> None:
    h = FakePorts()
    h.policy(1, PolicyRule(id="wifi", action="split", interface="eth1"))  # eth1 has no IPv6
    pkt = h.send("tcp6_syn")
    assert pkt.mark == Mark.ACCEPT_ALWAYS
    verdict = h.of(ConnNew)[0]
    assert verdict.verdict == Verdict.ACCEPT and "kept in the VPN" in verdict.reason and verdict.rule == "wifi"


def test_a_network_change_that_moves_the_egress_re_evaluates_live_udp_flows() -> None:
    h = FakePorts()
    h.policy(1, PolicyRule(id="all", action="split"))
    assert is_split(h.send("udp4").mark)
    assert not h.engine.set_netenv(NETENV)  # the same network: nothing to do
    gone = NetenvChanged(seq=2, ts=0.0, interfaces=NETENV.interfaces, gateways=[])  # no uplink any more
    assert h.engine.set_netenv(gone)
    assert len(h.deleted) == 1  # the UDP flow is queued again: its next datagram goes through the VPN


# --- a verdict belongs to one connection, never to a tuple ------------------------------------------------

PYTHON = ProcessInfo(pid=5151, ppid=1, uid=1000, name="python3", exe="/usr/bin/python3")
SPLIT_CURL_80 = PolicyRule(id="curl80", action="split", app_name="curl", dest="203.0.113.80")


@pytest.mark.parametrize("name", ["tcp4_syn", "tcp6_syn"])
def test_a_new_tcp_connection_on_a_reused_port_is_decided_for_its_own_app(name: str) -> None:
    h = FakePorts()
    h.policy(1, SPLIT_CURL_80, PolicyRule(id="curl80v6", action="split", app_name="curl", dest="2001:db8:30::80"))
    assert is_split(h.send(name).mark)  # curl: split
    key = h.confirm(name, h.of(ConnNew)[0].split_key and split_mark(0))
    # curl's connection closed (the server first: conntrack keeps the entry in TIME_WAIT), and python's
    # connect() got the same local port. Conntrack killed the old entry for the new SYN: a fresh one, unmarked.
    del h.table[key]
    h.app(PYTHON, cookie=2)
    pkt = h.send(name)
    assert pkt.mark == Mark.ACCEPT_ALWAYS  # python stays in the VPN: it never inherits curl's split
    new, end = h.of(ConnNew), h.of(ConnEnd)
    assert len(new) == 2 and new[1].process == PYTHON  # its own conn.new
    assert [e.conn_id for e in end] == [new[0].conn_id] and "reuses" in end[0].reason
    assert h.engine.counters["tuple_reused"] == 1
    # And the other way round: python's port reused by curl is split.
    h.table[key] = CtEntry(key, Mark.ACCEPT_ALWAYS, 8)
    del h.table[key]
    h.app(CURL, cookie=3)
    assert is_split(h.send(name).mark)
    assert [c.process for c in h.of(ConnNew)] == [CURL, PYTHON, CURL]


@pytest.mark.parametrize("name", ["udp4", "udp6"])
def test_a_udp_packet_queued_before_the_verdict_was_saved_gets_that_verdict(name: str) -> None:
    h = FakePorts()
    h.policy(1, PolicyRule(id="all", action="split"))
    first = h.send(name)
    h.confirm(name, first.mark or 0)
    h.app(PYTHON, cookie=2)  # would be decided otherwise: it is not asked, the packet belongs to curl's flow
    second = h.send(name)
    assert second.mark == first.mark and len(h.of(ConnNew)) == 1 and h.gets == 1


@pytest.mark.parametrize("name", ["udp4", "udp6"])
def test_a_udp_flow_whose_entry_is_gone_starts_a_new_connection(name: str) -> None:
    h = FakePorts()
    h.policy(1, SPLIT_CURL, PolicyRule(id="py", action="keep", app_name="python3"))
    assert is_split(h.send(name).mark)
    h.app(PYTHON, cookie=2)  # the entry timed out (no destroy event read yet): a new socket on the port
    pkt = h.send(name)
    assert pkt.mark == Mark.ACCEPT_ALWAYS and len(h.of(ConnNew)) == 2 and len(h.of(ConnEnd)) == 1


def test_the_old_entrys_destroy_event_read_first_ends_the_old_connection() -> None:
    h = FakePorts()
    h.policy(1, SPLIT_CURL)
    h.send("udp4")
    key = h.confirm("udp4", h.of(ConnNew)[0].split_key and split_mark(0), ct_id=7)
    h.destroyed.append(h.table.pop(key))  # gone, and its event waits on the socket
    h.app(PYTHON, cookie=2)
    assert h.send("udp4").mark == Mark.ACCEPT_ALWAYS
    assert [e.reason for e in h.of(ConnEnd)] == ["closed"]
    assert h.gets == 1  # no check of the table was needed; only the new entry's id was learned afterwards


def test_a_late_destroy_event_of_the_old_entry_does_not_end_the_new_connection() -> None:
    h = FakePorts()
    h.policy(1, SPLIT_CURL)
    h.send("udp4")
    key = h.confirm("udp4", split_mark(0), ct_id=7)
    old = h.table.pop(key)
    h.app(PYTHON, cookie=2)
    h.send("udp4", end_batch=False)  # a new connection; its entry (id 8) is there once its verdict is in
    h.table[key] = CtEntry(key, Mark.ACCEPT_ALWAYS, 8)
    h.end_batch()
    assert h.engine.live[key].ct_id == 8
    h.engine.on_conntrack_destroyed([old])  # the old entry's event, delayed: not the live connection's
    assert key in h.engine.live and h.engine.counters["stale_destroys"] == 1
    h.engine.on_conntrack_destroyed([CtEntry(key, Mark.ACCEPT_ALWAYS, 8)])
    assert key not in h.engine.live


def syn_on_decided_entry(h: FakePorts, mark: int) -> FakePacket:
    """A SYN whose entry already carries our verdict: the rules restored the mark, then queued it."""
    pkt = FakePacket(PACKETS["tcp4_syn"], mark=mark)
    h.engine.on_packet(False, pkt)
    h.end_batch()
    return pkt


def test_a_retransmitted_syn_of_a_decided_connection_keeps_its_verdict() -> None:
    h = FakePorts()
    h.policy(1, SPLIT_CURL)
    mark = h.send("tcp4_syn").mark or 0
    pkt = syn_on_decided_entry(h, mark)  # the same socket sends it again
    assert (pkt.mark, pkt.accepted, pkt.dropped) == (mark, 1, 0)
    assert len(h.of(ConnNew)) == 1 and h.engine.counters["syn_retransmits"] == 1


def test_a_new_connection_reopening_an_old_entry_is_dropped_until_it_has_its_own() -> None:
    h = FakePorts()
    h.policy(1, SPLIT_CURL)
    mark = h.send("tcp4_syn").mark or 0
    # The server reset curl's connection: conntrack keeps the entry in CLOSE state, and a SYN from python's
    # new socket on the same port would reopen it — with curl's mark and its DNAT to the proxy.
    h.app(PYTHON, cookie=2)
    pkt = syn_on_decided_entry(h, mark)
    assert (pkt.accepted, pkt.dropped) == (0, 1)
    assert h.deleted == [FiveTuple(6, "192.0.2.66", 34666, "203.0.113.80", 80)]
    assert "reopened" in h.of(ConnEnd)[0].reason and not h.engine.live
    # Its retransmitted SYN has a fresh entry: queued unmarked and decided for python.
    assert h.send("tcp4_syn").mark == Mark.ACCEPT_ALWAYS
    assert h.of(ConnNew)[-1].process == PYTHON


def test_a_syn_on_an_entry_decided_before_this_interceptor_started_is_decided_afresh() -> None:
    h = FakePorts()
    h.policy(1, SPLIT_CURL)
    pkt = syn_on_decided_entry(h, split_mark(0))  # no live connection: whose verdict that is, nobody knows
    assert (pkt.accepted, pkt.dropped) == (0, 1) and len(h.deleted) == 1


@pytest.mark.parametrize("name", ["udp4", "udp6"])
def test_a_closed_udp_socket_takes_its_flows_entries_with_it(name: str) -> None:
    h = FakePorts()
    h.policy(1, PolicyRule(id="all", action="split"))
    h.send(name)
    [(key, conn)] = h.engine.live.items()
    other = DiagSocket(2, 7, bytes(16), key.src_port, bytes(16), 0, 1000, 99, cookie=5)  # same port, another socket
    h.engine.on_sockets_destroyed([other])
    assert key in h.engine.live and not h.deleted
    mine = DiagSocket(2, 7, bytes(16), key.src_port, bytes(16), 0, 1000, 98, cookie=conn.socket_cookie)
    h.engine.on_sockets_destroyed([mine])
    assert h.deleted == [key] and not h.engine.live and not h.engine.live._udp_ports
    assert h.of(ConnEnd)[0].reason == "closed: its socket was closed"


# --- split UDP flows name their socket for the proxy (another app may reuse the port before the entry goes) ---


@pytest.mark.parametrize("name", ["udp4", "udp6"])
def test_a_split_udp_flow_names_its_socket_for_the_proxy_before_its_verdict(name: str) -> None:
    h = FakePorts()
    h.policy(1, SPLIT_CURL)
    pkt = h.send(name)
    assert is_split(pkt.mark) and h.log == ["attribute", "owner", "verdict"]
    [(flow, (mark, cookie))] = h.owners.items()
    assert (mark, cookie) == (pkt.mark, 1) and flow == next(iter(h.engine.live))
    h.app(PYTHON, cookie=2)  # another app on another port: kept in the VPN, nothing for the proxy
    assert h.send(from_port(name, 40123)).mark == Mark.ACCEPT_ALWAYS and len(h.owners) == 1
    h.app(CURL, cookie=3)
    assert is_split(h.send(from_port("tcp4_syn", 40124)).mark) and len(h.owners) == 1  # TCP: its own socket


def test_a_destination_rule_splits_udp_for_the_socket_found_or_any_when_none_was() -> None:
    h = FakePorts()
    h.policy(1, SPLIT_80)
    assert is_split(h.send("udp4").mark)  # the process is looked up (ours are never split): its socket
    h.process = None  # nothing found: the rule does not ask for an app, so any socket is the flow's
    assert is_split(h.send(from_port("udp4", 40123)).mark)
    assert sorted(cookie for _mark, cookie in h.owners.values()) == [0, 1]


def test_a_socket_taking_a_closed_sockets_split_flow_over_is_named_for_the_proxy() -> None:
    h = FakePorts()
    h.policy(1, SPLIT_CURL)
    h.send("udp4")
    [(key, conn)] = h.engine.live.items()
    h.app(CURL, cookie=2)  # curl again, a new socket on the same port: same verdict, so it keeps the entry
    closed = DiagSocket(2, 7, bytes(16), key.src_port, bytes(16), 0, 1000, 98, cookie=conn.socket_cookie)
    h.engine.on_sockets_destroyed([closed])
    assert not h.deleted and h.owners[key] == (conn.outcome.mark, 2)
    h.app(PYTHON, cookie=3)  # python takes the port next: another verdict, the entry goes, no owner changes
    closed = DiagSocket(2, 7, bytes(16), key.src_port, bytes(16), 0, 1000, 97, cookie=2)
    h.engine.on_sockets_destroyed([closed])
    assert h.deleted == [key] and h.owners[key] == (conn.outcome.mark, 2)


def test_remembered_destination_verdicts_are_not_used_when_the_app_decides() -> None:
    h = FakePorts()
    h.policy(1, SPLIT_CURL_80)
    assert is_split(h.send(from_port("tcp4_syn", 40001)).mark)
    h.app(PYTHON, cookie=2)
    assert h.send(from_port("tcp4_syn", 40002)).mark == Mark.ACCEPT_ALWAYS  # same destination, its own verdict
    assert not h.engine._decisions


def test_the_actors_ports_offer_everything_the_protocol_names(tmp_path: Path) -> None:
    """The actor's real `Ports` (built from its parts, no sockets opened here) has every member the engine uses."""
    from actors.interceptor.attribution import Attributor
    from actors.interceptor.ports import ActorPorts, Ports
    from kernel.procfs import ProcReader

    class Conntrack:
        def get(self, key: FiveTuple) -> CtEntry | None:
            return None

        def delete(self, key: FiveTuple) -> bool:
            return False

    ports = ActorPorts(
        names=NameTable(None, slots=16),
        attributor=Attributor(None, ProcReader(tmp_path)),
        conntrack=Conntrack(),  # type: ignore[arg-type]
        publish=lambda msg: None,
        call_later=lambda delay, callback: None,
        drain_conntrack_events=lambda: None,
    )
    members = {name for name in vars(Ports) if not name.startswith("_")} | set(Ports.__annotations__)
    assert members >= {"now", "attribute", "conntrack_get", "handler_slot", "own_pid"}
    assert [name for name in sorted(members) if not hasattr(ports, name)] == []
    flow = FiveTuple(6, "192.0.2.66", 40000, "203.0.113.80", 80)
    assert (ports.attribute(flow), ports.socket_uid(flow), ports.socket_cookie(flow, fresh=True)) == (None, None, 0)
    Engine(instance="interceptor", log=EventLog("test"), ports=ports)  # the engine takes it as it is


# --- the kernel data path: verdicts say where split TCP leaves; a closed one ends with conntrack's counts ----


def test_kernel_path_verdict_names_the_egress_and_its_close_carries_conntracks_counts() -> None:
    h = FakePorts()
    h.policy(1, SPLIT_80)
    h.engine.set_data_path("kernel")
    assert is_split(h.send("tcp4_syn").mark)
    [v] = h.of(ConnNew)
    assert (v.data_path, v.interface, v.local_ip) == ("kernel", "eth0", "192.0.2.10")
    key = h.confirm("tcp4_syn", split_mark(2), ct_id=7)
    h.table[key] = CtEntry(key, split_mark(2), 7, counters=CtCounters(6, 396, 5, 5316))
    h.engine.on_conntrack_updated([CtEntry(key, split_mark(2), 7, tcp_state=3)])  # ESTABLISHED: still open
    assert not h.of(ConnEnd)
    h.engine.on_conntrack_updated([CtEntry(key, split_mark(2), 8, tcp_state=7)])  # another entry's TIME_WAIT
    assert not h.of(ConnEnd)
    h.engine.on_conntrack_updated([CtEntry(key, split_mark(2), 7, tcp_state=7)])  # TIME_WAIT: closed
    [end] = h.of(ConnEnd)
    assert end.counters == SessionCounters(bytes_up=396, bytes_down=5316, packets_up=6, packets_down=5)
    assert not h.engine.live


def test_split_udp_and_the_proxy_path_say_proxy() -> None:
    h = FakePorts()
    h.policy(1, SPLIT_80)
    assert is_split(h.send("tcp4_syn").mark)
    h.engine.set_data_path("kernel")
    assert h.engine.data_path(FiveTuple(17, "192.0.2.66", 5000, "203.0.113.80", 53)) == "proxy"
    [v] = h.of(ConnNew)
    assert (v.data_path, v.interface, v.local_ip) == ("proxy", "eth0", "")  # decided before the switch


# --- DNS follows the resolver's readiness ---------------------------------------------------------------


def udp4_query(dst: str = "192.0.2.65", sport: int = 40053) -> bytes:
    """An IPv4/UDP datagram to port 53 from the host's tunnel address (checksums are not checked)."""
    import socket as s

    payload = b"\x12\x34" + bytes(10)
    udp = struct.pack("!HHHH", sport, 53, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                     s.inet_aton("192.0.2.66"), s.inet_aton(dst))  # fmt: skip
    return ip + udp


def listener_closed(address: bytes) -> DiagSocket:
    return DiagSocket(2, 7, address + bytes(12), 53, bytes(16), 0, 0, 1, cookie=3)


def test_dns_is_rerouted_only_while_the_resolver_is_ready_and_a_killed_one_is_noticed_at_once() -> None:
    h = FakePorts()
    h.policy(1, SPLIT_CURL)
    assert h.send(udp4_query(sport=1)).mark == Mark.ACCEPT_ALWAYS  # no resolver yet: where the app sent it
    h.engine.heard_resolver(True)
    assert h.deleted  # the flow decided without the resolver is re-queued
    rerouted = h.send(udp4_query(sport=2))
    assert nameserver_path(rerouted.mark or 0) == (True, 0)  # curl is split: the resolver asks on the split path
    assert h.engine.counters["dns_rerouted"] == 1
    h.deleted.clear()
    h.engine.on_sockets_destroyed([listener_closed(bytes([127, 0, 0, 1]))])  # someone else's port 53: nothing
    assert h.engine.nameserver
    h.engine.on_sockets_destroyed([listener_closed(bytes([127, 0, 0, 17]))])  # kill -9: its socket is destroyed
    assert not h.engine.nameserver and h.deleted  # the rerouted flow's entry goes: its next query is decided anew
    assert h.send(udp4_query(sport=3)).mark == Mark.ACCEPT_ALWAYS


def test_a_resolver_whose_heartbeats_stop_is_not_followed_any_more() -> None:
    h = FakePorts()
    h.engine.heard_resolver(True, now=10.0)
    h.engine.check_resolver(now=10.0 + HEARTBEAT_TTL - 1)
    assert h.engine.nameserver
    h.engine.check_resolver(now=10.0 + HEARTBEAT_TTL + 1)
    assert not h.engine.nameserver
    h.engine.heard_resolver(False, now=15.0)
    assert not h.engine.nameserver


# --- the IVPN handler on the packet path (core/ivpn/interop.py) -------------------------------------------


class CountingIvpnHandler:
    """The real IVPN handler, counting its calls (its cheapness attributes copied)."""

    def __init__(self) -> None:
        from core.ivpn.interop import LINUX_EXECUTABLES, IvpnVerdictHandler

        self.inner = IvpnVerdictHandler(LINUX_EXECUTABLES)
        self.needs_process = self.inner.needs_process
        self.by_destination = self.inner.by_destination
        self.calls = 0

    def __call__(self, view: Any) -> Any:
        self.calls += 1
        return self.inner(view)


def carrier_status(ip: str = "203.0.113.80", port: int = 5300) -> Any:
    from messages import IvpnStatus

    return IvpnStatus(ts=0.0, daemon=True, state="CONNECTED", connected=True, server_ip=ip, server_port=port)


def swapped(name: str) -> bytes:
    """The IPv4 fixture packet as its peer's answer: addresses and ports swapped."""
    data = bytearray(PACKETS[name])
    data[12:16], data[16:20] = data[16:20], data[12:16]
    data[20:22], data[22:24] = data[22:24], data[20:22]
    return bytes(data)


def test_with_the_ivpn_handler_a_connection_it_has_no_opinion_on_pays_no_process_lookup_and_is_cached() -> None:
    handler = CountingIvpnHandler()
    h = FakePorts(handler=handler)
    h.engine.set_ivpn(carrier_status("198.51.100.2", 51820))
    assert h.send(from_port("tcp4_syn", 40001)).mark == Mark.ACCEPT_ALWAYS
    assert h.log == ["verdict", "attribute"]  # the verdict first, as without a handler
    assert h.send(from_port("tcp4_syn", 40002)).mark == Mark.ACCEPT_ALWAYS
    assert handler.calls == 1  # the second connection to the same destination: remembered


def test_a_split_rule_never_splits_ivpns_processes_their_process_is_looked_up_first() -> None:
    daemon = ProcessInfo(pid=77, uid=0, name="ivpn-service", exe="/usr/bin/ivpn-service")
    h = with_uids(FakePorts(process=daemon, handler=CountingIvpnHandler()), socket_uid=0)  # root, like us
    h.engine.set_ivpn(carrier_status("198.51.100.2", 51820))
    h.policy(1, PolicyRule(id="all", action="split"))
    pkt = h.send("tcp4_syn")
    assert h.log == ["attribute", "verdict"] and pkt.mark == Mark.ACCEPT_FINAL
    h.app(CURL, cookie=2)
    h.socket_owner_uid = 1000  # an app, run by a user: split as the rule says, its process looked up after
    h.log.clear()
    assert is_split(h.send(from_port("tcp4_syn", 40001)).mark) and h.log == ["verdict", "attribute"]


def test_the_carrier_is_accept_final_and_its_inbound_datagrams_are_never_taken_for_late_answers() -> None:
    h = FakePorts(handler=CountingIvpnHandler())
    h.policy(1, PolicyRule(id="all", action="split"))
    first = h.send("udp4")  # before IVPN's status: the app's flow is split (its process is known)
    assert is_split(first.mark)
    h.confirm("udp4", first.mark or 0)
    h.engine.set_ivpn(carrier_status())  # …and it turns out to be the VPN carrier: re-queued
    assert h.deleted and h.engine.counters["reevaluation_resets"] == 1
    answer = h.send(swapped("udp4"), inbound=True)  # the server's next datagram, a NEW inbound flow now
    assert (answer.dropped, answer.accepted, answer.mark) == (0, 1, Mark.ACCEPT_FINAL)
    again = h.send(from_port("udp4", 40001))
    assert again.mark == Mark.ACCEPT_FINAL
