"""Version 2 merges events (fewer messages per connection); version 1 bytes still decode, and the views that
show the bus (server-sent events, `splittun events`) still show the version 1 shapes."""

from __future__ import annotations

import dataclasses

import msgpack

import messages as m
from messages.compat import legacy_shapes, legacy_subscriptions, wanted

# Bytes a version 1 interceptor published (before the merge): its conn.new, then its conn.verdict.
V1_CONN_NEW = bytes.fromhex(
    "8ca7636f6e6e5f6964a26331a27473cb3ff8000000000000aa69705f76657273696f6e04a870726f746f636f6c06a67372635f6970aa"
    "3139322e302e322e3130a87372635f706f7274cda8caa66473745f6970ac3230332e302e3131332e3830a86473745f706f727450a769"
    "6e626f756e64c2a770726f6365737388a370696407a47070696401a3756964cd03e8a46e616d65a46375726ca3657865ad2f7573722f"
    "62696e2f6375726ca7636d646c696e6591a46375726ca9616e636573746f727390ae616e636573746f725f6e616d657390a6646f6d61"
    "696eaf7777772e6578616d706c652e636f6da17601"
)
V1_CONN_VERDICT = bytes.fromhex(
    "8ba7636f6e6e5f6964a26331a27473cb3ff8000000000000a77665726469637408a476657262ae73706c69742074756e6e656c6564a4"
    "72756c65a27231a6726561736f6ea0a973706c69745f6b6579d924746370203139322e302e322e31303a343332313020323033"
    "2e302e3131332e38303a3830a9696e74657266616365a465746830a9646174615f70617468a570726f7879a86c6f63616c5f6970a0a1"
    "7601"
)
PROCESS = m.ProcessInfo(pid=7, ppid=1, uid=1000, name="curl", exe="/usr/bin/curl", cmdline=["curl"])
DECIDED = m.ConnNew(
    conn_id="c1",
    ts=1.5,
    ip_version=4,
    protocol=6,
    src_ip="192.0.2.10",
    src_port=43210,
    dst_ip="203.0.113.80",
    dst_port=80,
    process=PROCESS,
    domain="www.example.com",
    verdict=m.Verdict.REROUTE_TO_SPLIT_TUN,
    rule="r1",
    split_key="tcp 192.0.2.10:43210 203.0.113.80:80",
    interface="eth0",
    data_path="proxy",
)


def test_a_version_1_conn_new_still_decodes_without_a_verdict() -> None:
    new = m.decode([b"conn.new", V1_CONN_NEW])
    assert isinstance(new, m.ConnNew) and new.process == PROCESS and new.dst_port == 80
    assert new.verdict is None and new.verb == "" and new.split_key == ""
    verdict = m.decode([b"conn.verdict", V1_CONN_VERDICT])
    assert isinstance(verdict, m.ConnVerdict) and verdict.verb == "split tunneled"


def test_a_decided_connection_is_one_version_2_conn_new() -> None:
    topic, payload = DECIDED.encode()
    data = msgpack.unpackb(payload)
    assert topic == b"conn.new" and data["v"] == 2
    assert (data["verdict"], data["verb"], data["split_key"]) == (8, "split tunneled", DECIDED.split_key)
    assert m.decode([topic, payload]) == DECIDED


def test_views_split_it_back_into_the_exact_version_1_events() -> None:
    topic, payload = DECIDED.encode()
    shapes = legacy_shapes(topic.decode(), msgpack.unpackb(payload))
    v1_new = {k: v for k, v in msgpack.unpackb(V1_CONN_NEW).items() if k != "v"}
    v1_verdict = {k: v for k, v in msgpack.unpackb(V1_CONN_VERDICT).items() if k != "v"}
    assert shapes == [("conn.new", v1_new), ("conn.verdict", v1_verdict)]
    assert list(shapes[0][1]) == list(v1_new) and list(shapes[1][1]) == list(v1_verdict)  # same key order (JSON)
    assert legacy_shapes("conn.new", msgpack.unpackb(V1_CONN_NEW)) == [("conn.new", v1_new)]
    end = {"conn_id": "c1", "ts": 2.0}
    assert legacy_shapes("conn.end", {**end, "v": 1}) == [("conn.end", end)]


def test_asking_for_a_merged_topic_also_hears_the_topic_that_carries_it() -> None:
    assert legacy_subscriptions(["conn.verdict"]) == ["conn.verdict", "conn.new"]
    assert legacy_subscriptions(["conn."]) == ["conn."]
    assert legacy_subscriptions([""]) == [""]
    assert legacy_subscriptions(["notify.", "policy."]) == ["notify.", "policy."]
    assert wanted("conn.verdict", ["conn.verdict"]) and not wanted("conn.new", ["conn.verdict"])


# A version 1 proxy published a session's open and its close, always two messages.
V1_SESSION_OPEN = bytes.fromhex(
    "de0010aa73657373696f6e5f6964a27331a6776f726b6572ac70726f78795f7463705f3030a870726f746f636f6ca3746370a973706c"
    "69745f6b6579d924746370203139322e302e322e31303a3430303030203230332e302e3131332e38303a3830a27473cb3ff400000000"
    "0000a9636c69656e745f6970aa3139322e302e322e3130ab636c69656e745f706f7274cd9c40ab6f7269675f6473745f6970ac323033"
    "2e302e3131332e3830ad6f7269675f6473745f706f727450a86c6f63616c5f6970aa3139322e302e322e3130aa6c6f63616c5f706f72"
    "74cdc350a9696e74657266616365a465746830a5657874726180a972656d6f74655f6970ac3230332e302e3131332e3830ab72656d6f"
    "74655f706f727450a17601"
)
V1_SESSION_CLOSE = bytes.fromhex(
    "88aa73657373696f6e5f6964a27331a6776f726b6572ac70726f78795f7463705f3030a973706c69745f6b6579d92474637020313932"
    "2e302e322e31303a3430303030203230332e302e3131332e38303a3830a27473cb3ff8000000000000a8636f756e7465727384a86279"
    "7465735f75700baa62797465735f646f776e16aa7061636b6574735f757001ac7061636b6574735f646f776e02a86475726174696f6e"
    "cb3fd0000000000000a6726561736f6ea6636c6f736564a17601"
)


def test_a_short_session_is_one_close_carrying_its_open_and_views_split_it_back() -> None:
    opened = m.decode([b"proxy.session.open", V1_SESSION_OPEN])
    old_close = m.decode([b"proxy.session.close", V1_SESSION_CLOSE])
    assert isinstance(opened, m.ProxySessionOpen) and isinstance(old_close, m.ProxySessionClose)
    assert old_close.opened is None  # version 1 bytes still decode
    close = dataclasses.replace(old_close, opened=opened)
    topic, payload = close.encode()
    assert msgpack.unpackb(payload)["v"] == 2 and m.decode([topic, payload]) == close
    v1_open = {k: v for k, v in msgpack.unpackb(V1_SESSION_OPEN).items() if k != "v"}
    v1_close = {k: v for k, v in msgpack.unpackb(V1_SESSION_CLOSE).items() if k != "v"}
    shapes = legacy_shapes(topic.decode(), msgpack.unpackb(payload))
    assert shapes == [("proxy.session.open", v1_open), ("proxy.session.close", v1_close)]
    assert legacy_subscriptions(["proxy.session.open"]) == ["proxy.session.open", "proxy.session.close"]
