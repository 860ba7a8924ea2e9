"""`splittun events` prints the version 1 shapes: a conn.new carrying its verdict (schema version 2) is the
two lines it was before, and a topic filter on conn.verdict still finds new connections' verdicts."""

from __future__ import annotations

import json

import messages as m
from splittun.commands.events import render

DECIDED = m.ConnNew(
    conn_id="c1",
    ts=1.5,
    ip_version=4,
    protocol=6,
    src_ip="192.0.2.10",
    src_port=43210,
    dst_ip="203.0.113.80",
    dst_port=80,
    verdict=m.Verdict.REROUTE_TO_SPLIT_TUN,
    rule="r1",
    split_key="tcp 192.0.2.10:43210 203.0.113.80:80",
)


def test_a_decided_connection_prints_as_conn_new_then_conn_verdict() -> None:
    lines = [json.loads(line) for line in render(DECIDED.encode(), as_json=True, prefixes=[""])]
    assert [line["topic"] for line in lines] == ["conn.new", "conn.verdict"]
    assert "verdict" not in lines[0] and lines[1]["verb"] == "split tunneled" and lines[1]["rule"] == "r1"


def test_a_filter_prints_only_what_it_asks_for() -> None:
    [line] = render(DECIDED.encode(), as_json=False, prefixes=["conn.verdict"])
    assert " conn.verdict " in line and "split_key=" in line
    assert render(DECIDED.encode(), as_json=False, prefixes=["conn.end"]) == []
