"""The per-packet rules do what they did before they were made shorter (issue 17): every packet state
gives the same verdict, mark and connmark under the rules as they were (fixture) and as render() writes
them now, run through a small interpreter of the iptables syntax our chains use."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, replace

import pytest

from actors.interceptor import firewall as fw
from messages.marks import Mark, nameserver_mark, split_mark
from tests.support import FIXTURES_DIR

BEFORE = json.loads((FIXTURES_DIR / "interceptor" / "rules_before_issue17.json").read_text())
FOREIGN = 0x1234_0042  # another program's mark / connmark


@dataclass(frozen=True)
class Pkt:
    mark: int
    connmark: int
    proto: str
    syn: bool
    new: bool
    dns_reply: bool  # conntrack: reply direction of a flow to port 53
    to_lo: bool


def _value(spec: str) -> tuple[int, int]:
    value, _, mask = spec.partition("/")
    return int(value, 0), int(mask, 0) if mask else 0xFFFFFFFF


def _matches(args: list[str], p: Pkt) -> bool:
    i = 0
    while i < len(args):
        neg = args[i] == "!"
        if neg:
            i += 1
        a = args[i]
        if a == "-m":
            i += 2
            continue
        if a == "--mark":
            value, mask = _value(args[i + 1])
            field = p.connmark if "connmark" in args[max(0, i - 3) : i] else p.mark
            hit, i = (field & mask) == value, i + 2
        elif a == "-o":
            hit, i = p.to_lo and args[i + 1] == "lo", i + 2
        elif a == "-p":
            hit, i = p.proto == args[i + 1], i + 2
        elif a == "--tcp-flags":
            hit, i = p.proto == "tcp" and p.syn, i + 3
        elif a == "--ctstate":
            hit, i = p.new, i + 2
        elif a == "--ctdir":
            hit, i = p.dns_reply, i + 4  # always with --ctorigdstport 53 in our rules
        elif a == "--comment":
            hit, i = True, i + 2
        else:
            raise AssertionError(f"the interpreter does not know {a!r} in {args}")
        if hit == neg:
            return False
    return True


def run(rules: list[str], chain: str, p: Pkt, tested: list[int] | None = None) -> tuple[str, int, int]:
    """(verdict, mark, connmark) after `chain`, entered by a jump from a built-in chain; "continue" = back in it.
    `tested` gets one entry per rule the packet was tested against."""
    chains: dict[str, list[list[str]]] = {}
    for rule in rules:
        parts = rule.split()
        chains.setdefault(parts[1], []).append(parts[2:])
    stack: list[tuple[str, int]] = []  # where a -j returns to
    name, pos = chain, 0
    while True:
        if pos >= len(chains.get(name, [])):
            if not stack:
                return "continue", p.mark, p.connmark
            name, pos = stack.pop()
            continue
        args = chains[name][pos]
        pos += 1
        if tested is not None:
            tested.append(pos)
        cut = args.index("-j") if "-j" in args else args.index("-g")
        if not _matches(args[:cut], p):
            continue
        kind, target, opts = args[cut], args[cut + 1], args[cut + 2 :]
        if target == "RETURN":
            if not stack:
                return "continue", p.mark, p.connmark
            name, pos = stack.pop()
        elif target in ("ACCEPT", "DROP", "REJECT", "NFQUEUE"):
            return f"{target} {' '.join(opts)}", p.mark, p.connmark
        elif target == "MARK":
            p = replace(p, mark=_value(opts[1])[0])
        elif target == "CONNMARK":
            p = replace(p, mark=p.connmark) if opts[0] == "--restore-mark" else replace(p, connmark=p.mark)
        else:
            if kind == "-j":
                stack.append((name, pos))
            name, pos = target, 0


OURS = [int(m) for m in fw.RESTORED_MARKS] + [split_mark(3), nameserver_mark(True, 2)]
MARKS = [0, *OURS, int(Mark.SPLIT_EGRESS), int(Mark.ACCEPT), int(Mark.BLOCK), int(Mark.DROP), FOREIGN]
CONNMARKS = [0, *OURS, int(Mark.SPLIT_EGRESS), FOREIGN, split_mark(3) | 0x0F00]  # + ours-looking but not ours
PACKETS = [
    Pkt(*combo)
    for combo in itertools.product(
        MARKS, CONNMARKS, ("tcp", "udp", "icmp"), (False, True), (False, True), (False, True), (False, True)
    )
    if combo[2] == "tcp" or not combo[3]
]


@pytest.mark.parametrize("setup", sorted(BEFORE))
@pytest.mark.parametrize(("table", "chain"), [("mangle", fw.INGEST_OUT), ("mangle", fw.INGEST_IN),
                                              ("mangle", fw.EGRESS_REPLIES), ("filter", fw.FILTER)])  # fmt: skip
def test_every_packet_gets_the_same_verdict_mark_and_connmark_as_before(setup: str, table: str, chain: str) -> None:
    family, data_path = setup.split()
    before, now = BEFORE[setup][table], fw.render(int(family), 1, data_path=data_path)[table]
    different = [
        (p, run(before, chain, p), run(now, chain, p)) for p in PACKETS if run(before, chain, p) != run(now, chain, p)
    ]
    assert different == []
    assert len(PACKETS) > 1000


def test_the_interpreter_sees_a_difference_when_there_is_one() -> None:
    """The comparison above can fail: a split connection's packet is no longer accepted for good here."""
    now = fw.render(4, 1, data_path="kernel")["filter"]
    broken = [r.replace("-j ACCEPT", "-j RETURN") if "1719/" in r else r for r in now]
    p = Pkt(split_mark(3), split_mark(3), "tcp", False, False, False, False)
    assert run(now, fw.FILTER, p)[0] == "ACCEPT " and run(broken, fw.FILTER, p)[0] == "continue"


def test_a_decided_split_connections_packets_are_tested_against_fewer_rules() -> None:
    """What the change is for: every packet of a split connection (kernel path) walks these chains."""
    before, now = BEFORE["4 kernel"], fw.render(4, 1, data_path="kernel")
    out = Pkt(0, split_mark(3), "tcp", False, False, False, False)  # leaving: mark from the connmark
    back = Pkt(split_mark(3), split_mark(3), "tcp", False, False, False, False)  # reply: restored in PREROUTING
    counts = {}
    for name, rules in (("before", before), ("now", now)):
        tested: list[int] = []
        marked = Pkt(*run(rules["mangle"], fw.INGEST_OUT, out, tested)[1:], "tcp", False, False, False, False)
        run(rules["filter"], fw.FILTER, marked, tested)
        run(rules["mangle"], fw.INGEST_IN, back, tested)
        run(rules["filter"], fw.FILTER, back, tested)
        counts[name] = len(tested)
    assert counts == {"before": 48, "now": 12}


def _saved(rules: list[str], table: str) -> fw.SavedTable:
    """A table as -save lists it with these rules of ours installed under the built-in chains' jumps."""
    chains = sorted({r.split()[1] for r in rules})
    jumps = [f"-A {builtin} -j {chain}" for t, builtin, chain in fw.JUMPS if t == table]
    lines = [f"*{table}", ":OUTPUT ACCEPT [0:0]", *(f":{c} - [0:0]" for c in chains), *jumps, *rules, "COMMIT"]
    return fw.parse_save("\n".join(lines) + "\n", table)


@pytest.mark.parametrize("table", ["mangle", "filter"])
def test_removal_and_reinstall_recognise_the_old_and_the_new_rules(table: str) -> None:
    """`down` (also after a crash) removes whichever rule set is installed, and an upgrade in place leaves
    only the new chains: our chains are found by their prefix, not by a list of names."""
    old, new = BEFORE["4 kernel"][table], fw.render(4, 1, data_path="kernel")[table]
    for rules in (old, new):
        saved = _saved(rules, table)
        lines = fw.plan_remove(saved)
        assert {line.split()[1] for line in lines if line.startswith("-X ")} == set(fw._our_chains(saved))
        assert [line for line in lines if line.startswith("-D ")] == [
            "-D " + r[3:] for r in saved.rules if r.split()[1] in ("OUTPUT", "INPUT", "PREROUTING")
        ]
    upgrade = fw.plan_install(_saved(old, table), 4, 1, data_path="kernel")
    assert [line for line in upgrade if line.startswith("-X ")] == []  # the old chains are all still used
    # An older splittun (the same prefix-based plan_install) flushes and deletes the chains it does not
    # write: the two new ones.
    assert set(fw._our_chains(_saved(new, table))) - {r.split()[1] for r in old} == (
        {fw.RESTORE_IN, fw.RESTORE_OUT} if table == "mangle" else set()
    )
