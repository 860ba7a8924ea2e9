"""Schemas, verdicts, marks and flow keys: pure logic, no processes."""

from __future__ import annotations

import msgpack
import pytest

import messages as m
from messages import schema
from messages.control import Reply, Request
from messages.flows import flow_key

SAMPLES: dict[str, m.Message] = {
    "actor.heartbeat": m.Heartbeat(
        name="proxy_tcp", instance="proxy_tcp_01", pid=42, started=1.5, uptime=3.25, ts=4.75, counters={"a": 1}
    ),
    "conn.new": m.ConnNew(
        conn_id="c1",
        ts=1.0,
        ip_version=6,
        protocol=17,
        src_ip="2001:db8:10::10",
        src_port=5353,
        dst_ip="2001:db8:30::80",
        dst_port=53,
        process=m.ProcessInfo(pid=7, ppid=1, uid=1000, name="curl", exe="/usr/bin/curl", cmdline=["curl", "-s"]),
        domain="www.example.com",
    ),
    "conn.verdict": m.ConnVerdict(
        conn_id="c1",
        ts=1.0,
        verdict=m.Verdict.REROUTE_TO_SPLIT_TUN,
        rule="r1",
        split_key="udp [2001:db8:10::10]:5353 [2001:db8:30::80]:53",
        interface="eth0",
    ),
    "conn.end": m.ConnEnd(conn_id="c1", ts=2.0, reason="fin"),
    "proxy.session.open": m.ProxySessionOpen(
        session_id="s1",
        worker="proxy_tcp_00",
        protocol="tcp",
        split_key="tcp 192.0.2.10:40000 203.0.113.80:80",
        ts=1.0,
        client_ip="192.0.2.10",
        client_port=40000,
        orig_dst_ip="203.0.113.80",
        orig_dst_port=80,
        local_ip="192.0.2.10",
        local_port=50000,
        interface="eth0",
        extra={"rule": "r1"},
    ),
    "proxy.session.stats": m.ProxySessionStats(
        session_id="s1", worker="w", split_key="k", ts=3.0, counters=m.SessionCounters(bytes_up=5, bytes_down=7)
    ),
    "proxy.session.close": m.ProxySessionClose(
        session_id="s1",
        worker="w",
        split_key="k",
        ts=3.0,
        counters=m.SessionCounters(bytes_up=5, bytes_down=7, packets_up=1, packets_down=2),
        duration=2.0,
        reason="closed",
    ),
    "netenv.changed": m.NetenvChanged(
        seq=3,
        ts=1.0,
        interfaces=[
            m.InterfaceRecord(
                name="eth0",
                index=2,
                mac="02:00:00:00:00:01",
                kind="physical",
                is_physical=True,
                mtu=1500,
                flags=["UP"],
                addresses=["192.0.2.10/26"],
                ipv4="192.0.2.10",
            )
        ],
        gateways=[m.GatewayRecord(gateway="192.0.2.1", interface="eth0", family=4)],
        uplink_ipv4="eth0",
    ),
    "dns.query": m.DnsQuery(
        ts=1.0,
        flow="udp 192.0.2.66:40000 192.0.2.65:53",
        name="geo.example.net",
        qtype="A",
        path="split",
        upstream="192.0.2.1",
        interface="eth0",
        answers=1,
        addresses=["203.0.113.80"],
        latency_ms=4.2,
    ),
    "ivpn.status": m.IvpnStatus(ts=1.0, daemon=True, state="CONNECTED", connected=True, vpn_type="wireguard"),
    "interceptor.state": m.InterceptionState(ts=1.0, active=True, reason="rules installed"),
    "policy.snapshot": m.PolicySnapshot(
        version=2,
        ts=1.0,
        enabled=True,
        rules=[m.PolicyRule(id="r1", action="split", app_name="curl", dest="203.0.113.0/24", proto="tcp")],
    ),
    "updates.stale": m.UpdatesStale(
        ts=2.0, name="splittun-presets", version="1.0.0", published=1.0, age_days=31.5, max_age_days=30
    ),
    "notify.*": m.Notification(
        topic="notify.ivpn.connected",
        id="n1",
        ts=1.0,
        title="IVPN connected",
        actions=[m.NotificationAction(id="suppress", text="Don't show again")],
    ),
}


def test_every_message_kind_has_a_round_trip_sample() -> None:
    assert sorted(SAMPLES) == m.known_topics()


@pytest.mark.parametrize("topic", sorted(SAMPLES))
def test_round_trip(topic: str) -> None:
    sample = SAMPLES[topic]
    frames = sample.encode()
    assert frames[0] == sample.wire_topic().encode()
    assert m.decode(frames) == sample


def test_wire_format_is_plain_msgpack_with_version() -> None:
    topic, payload = SAMPLES["conn.verdict"].encode()
    data = msgpack.unpackb(payload)
    assert topic == b"conn.verdict"
    assert data["v"] == 1
    assert data["verdict"] == 8 and data["verb"] == "split tunneled"


def test_notification_topic_is_the_full_category() -> None:
    topic, payload = SAMPLES["notify.*"].encode()
    assert topic == b"notify.ivpn.connected"
    assert msgpack.unpackb(payload)["topic"] == "notify.ivpn.connected"  # also readable inside a reply


# --- verdicts and marks -------------------------------------------------------------------------------

VERDICT_TABLE = [
    (0, "UNDECIDED", "<Undecided>", "undecided"),
    (1, "UNDETERMINABLE", "<Undeterminable>", "undeterminable"),
    (2, "ACCEPT", "Accept", "accepted"),
    (3, "BLOCK", "Block", "blocked"),
    (4, "DROP", "Drop", "dropped"),
    (5, "REROUTE_TO_NAMESERVER", "RerouteToNameserver", "redirected to nameserver"),
    (6, "REROUTE_TO_TUNNEL", "RerouteToTunnel", "tunneled"),
    (7, "FAILED", "Failed", "failed"),
    (8, "REROUTE_TO_SPLIT_TUN", "RerouteToSplitTun", "split tunneled"),
]


@pytest.mark.parametrize(("value", "name", "string", "verb"), VERDICT_TABLE)
def test_verdicts_match_portmaster(value: int, name: str, string: str, verb: str) -> None:
    verdict = m.Verdict(value)
    assert verdict.name == name
    assert verdict.string() == m.verdict_string(value) == string
    assert verdict.verb() == m.verdict_verb(value) == verb


@pytest.mark.parametrize("value", [9, 11, 255, -1])
def test_invalid_verdicts(value: int) -> None:
    assert m.verdict_string(value) == "<INVALID VERDICT>"
    assert m.verdict_verb(value) == "invalid"
    with pytest.raises(ValueError):
        m.Verdict(value)


def test_verdicts_are_ordered_and_complete() -> None:
    assert [v.value for v in m.Verdict] == list(range(9))
    assert m.Verdict.ACCEPT < m.Verdict.REROUTE_TO_SPLIT_TUN


def test_parse_verdict_accepts_numbers_names_and_verbs() -> None:
    from messages.verdict import parse_verdict

    assert parse_verdict("8") is m.Verdict.REROUTE_TO_SPLIT_TUN
    assert parse_verdict("split") is m.Verdict.REROUTE_TO_SPLIT_TUN
    assert parse_verdict("Accept") is m.Verdict.ACCEPT
    assert parse_verdict("blocked") is m.Verdict.BLOCK
    with pytest.raises(ValueError):
        parse_verdict("sideways")


def test_marks_match_portmaster() -> None:
    assert {k: int(v) for k, v in m.Mark.__members__.items()} == {
        "ACCEPT": 1700,
        "BLOCK": 1701,
        "DROP": 1702,
        "ACCEPT_FINAL": 1709,
        "ACCEPT_ALWAYS": 1710,
        "BLOCK_ALWAYS": 1711,
        "DROP_ALWAYS": 1712,
        "REROUTE_TO_TUNNEL": 1717,
        "REROUTE_TO_SPLIT_TUN": 1719,
        "REROUTE_TO_NAMESERVER": 1799,
        "SPLIT_EGRESS": 1720,
    }
    assert [int(q) for q in m.Queue] == [17040, 17140, 17060, 17160]


# --- validation ---------------------------------------------------------------------------------------


def _payload(**fields: object) -> bytes:
    return msgpack.packb({"v": 1, **fields})


GOOD_BEAT = {"name": "n", "instance": "i", "pid": 1, "started": 0.0, "uptime": 1.0, "ts": 2.0}


def test_unknown_fields_and_newer_versions_are_tolerated() -> None:
    payload = msgpack.packb({**GOOD_BEAT, "v": 7, "added_later": {"x": 1}})
    beat = m.decode([b"actor.heartbeat", payload])
    assert isinstance(beat, m.Heartbeat) and beat.pid == 1 and beat.counters == {}


@pytest.mark.parametrize(
    ("frames", "expected"),
    [
        ([b"actor.heartbeat", _payload(**{**GOOD_BEAT, "pid": "one"})], "actor.heartbeat: field 'pid': expected int"),
        ([b"actor.heartbeat", _payload(**{**GOOD_BEAT, "pid": True})], "field 'pid': expected int, got bool"),
        ([b"actor.heartbeat", _payload(name="n")], "actor.heartbeat: field 'instance': missing"),
        ([b"actor.heartbeat", _payload(**GOOD_BEAT)[:-3]], "actor.heartbeat: payload is not valid msgpack"),
        ([b"actor.heartbeat", msgpack.packb([1, 2])], "actor.heartbeat: payload must be a map, got array"),
        ([b"actor.heartbeat", msgpack.packb(GOOD_BEAT)], "field 'v': missing"),
        ([b"actor.heartbeat", msgpack.packb({**GOOD_BEAT, "v": "1"})], "field 'v': schema version must be"),
        ([b"actor.heartbeat", b""], "payload is not valid msgpack"),
        ([b"actor.heartbeat"], "expected 2 frames"),
        ([b"actor.heartbeat", _payload(**GOOD_BEAT), _payload(**GOOD_BEAT)], "expected 2 frames"),
        ([b"no.such.topic", _payload()], "no.such.topic: unknown topic"),
        ([b"\xff\xfe", _payload()], "topic is not UTF-8"),
        ([b"conn.verdict", _payload(conn_id="c", ts=1.0, verdict=9)], "field 'verdict': 9 is not a valid Verdict"),
        (
            [b"netenv.changed", _payload(seq=1, ts=1.0, interfaces=[{"name": "x", "index": "2"}])],
            "netenv.changed: field 'interfaces[0].index': expected int, got str",
        ),
        (
            [b"actor.heartbeat", _payload(**{**GOOD_BEAT, "counters": {"a": "b"}})],
            "field 'counters.a': expected int",
        ),
        ([b"notify.", _payload(id="x", ts=1.0)], "notify.<category>"),
    ],
)
def test_bad_messages_raise_one_clear_error(frames: list[bytes], expected: str) -> None:
    with pytest.raises(m.MessageError) as caught:
        m.decode(frames)
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_request_and_reply_bodies() -> None:
    req = schema.decode_payload(Request, schema.encode_payload(Request(op="actors", args={"x": 1})))
    assert req == Request(op="actors", args={"x": 1})
    with pytest.raises(m.MessageError, match="request: field 'op': expected str"):
        schema.decode_payload(Request, _payload(op=5), "request")
    rep = schema.decode_payload(Reply, schema.encode_payload(Reply(ok=True, result=[1, "a"])))
    assert rep.ok and rep.result == [1, "a"] and rep.error is None


def test_oversized_payload_is_refused_before_parsing() -> None:
    with pytest.raises(m.MessageError, match="exceeds"):
        m.decode([b"actor.heartbeat", b"\x00" * (schema.MAX_PAYLOAD_BYTES + 1)])


# --- flow keys ----------------------------------------------------------------------------------------


def test_flow_key_is_canonical() -> None:
    assert flow_key(6, "192.0.2.10", 40000, "203.0.113.80", 80) == "tcp 192.0.2.10:40000 203.0.113.80:80"
    # The proxy may see an IPv4-mapped client on a dual-stack socket: same key as the interceptor's.
    assert flow_key("TCP", "::ffff:192.0.2.10", 40000, "203.0.113.80", 80) == flow_key(
        6, "192.0.2.10", 40000, "203.0.113.80", 80
    )
    assert (
        flow_key(17, "2001:0db8:10::0010", 5353, "2001:db8:30::80", 53)
        == "udp [2001:db8:10::10]:5353 [2001:db8:30::80]:53"
    )


def test_plain_fields_taken_as_they_are_are_still_checked_exactly() -> None:
    good = SAMPLES["conn.new"].to_wire() | {"v": 1, "process": None}
    assert m.decode([b"conn.new", msgpack.packb(good | {"ts": 2})]).ts == 2.0  # an int is a valid float…
    with pytest.raises(m.MessageError, match="field 'inbound': expected bool, got int"):
        m.decode([b"conn.new", msgpack.packb(good | {"inbound": 1})])  # …but no int is a bool
    with pytest.raises(m.MessageError, match="field 'src_port': expected int, got bool"):
        m.decode([b"conn.new", msgpack.packb(good | {"src_port": True})])
    with pytest.raises(m.MessageError, match=r"field 'process.cmdline\[1\]': expected str, got int"):
        m.decode([b"conn.new", msgpack.packb(good | {"process": {"cmdline": ["curl", 1]}})])


def test_a_bus_message_carries_one_or_more_events_of_one_topic() -> None:
    """Wire version 2: `[topic, payload, payload, …]`; one event is the same bytes as version 1."""
    beats = [m.Heartbeat(name="n", instance=f"n_{i}", pid=i, started=0.0, uptime=1.0, ts=2.0) for i in range(3)]
    single = beats[0].encode()
    assert m.unbatch(single) == [single] and m.decode_all(single) == [beats[0]]
    batch = [single[0], *(b.encode()[1] for b in beats)]
    assert m.unbatch(batch) == [[single[0], b.encode()[1]] for b in beats]
    assert m.decode_all(batch) == beats
    with pytest.raises(m.MessageError, match=r"got 1 frame"):
        m.unbatch([b"actor.heartbeat"])
    with pytest.raises(m.MessageError, match="unbatch"):
        m.decode(batch)  # one event at a time: a batch is split first
    assert m.WIRE_VERSION == 2
