"""The shared name table (core/dns/names.py) with CNAME chains, and its file being replaced."""

from __future__ import annotations

from pathlib import Path

from core.dns.answers import DnsAnswer
from core.dns.names import NameTable, chain_text
from core.policy import CompiledPolicy
from messages import PolicyRule, PolicySnapshot
from messages.flows import FiveTuple, IpProtocol


def test_an_answer_through_a_cname_stores_the_whole_chain_and_a_rule_matches_any_name() -> None:
    table = NameTable(None, slots=64)
    answer = DnsAnswer("www.shop.example", (("203.0.113.80", 60),), ("www.shop.example", "edge.cdn.example"))
    assert table.learn_answer(answer, now=0.0) == 1
    domain = table.lookup("203.0.113.80", now=1.0)
    assert domain == "www.shop.example edge.cdn.example"
    flow = FiveTuple(IpProtocol.TCP, "192.0.2.10", 40000, "203.0.113.80", 443)
    for dest in (".cdn.example", "www.shop.example", "*.shop.example"):
        policy = CompiledPolicy(PolicySnapshot(version=1, ts=0, enabled=True,
                                               rules=[PolicyRule(id="r", action="split", dest=dest)]))  # fmt: skip
        assert policy.match(flow, domain).split, dest


def test_a_chain_too_long_for_a_slot_keeps_whole_names() -> None:
    names = [f"{'a' * 60}{i}.example" for i in range(6)]
    text = chain_text(names)
    assert len(text) <= 255 and text.split() == names[: len(text.split())]


def test_a_writer_notices_its_file_was_replaced_and_reopens_it(tmp_path: Path) -> None:
    path = tmp_path / "names"
    table = NameTable(path, slots=64)
    assert not table.replaced()
    path.unlink()
    assert table.replaced()
    table = table.reopen()
    table.learn("203.0.113.80", "geo.example", 60)
    assert NameTable(path, slots=64).lookup("203.0.113.80") == "geo.example"
