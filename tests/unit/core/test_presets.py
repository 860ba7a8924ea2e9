"""Presets: the built-in set is valid and cites its sources; a preset rule expands in place at compile time."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.policy import CompiledPolicy, RuleError, validate
from core.presets import (
    BUILTIN_DIR,
    INDEX_NAME,
    BadPreset,
    Preset,
    PresetEntry,
    expand,
    parse_preset,
    preset_store,
    presets_of,
)
from messages import PolicyRule, PolicySnapshot
from messages.flows import FiveTuple, IpProtocol


def test_builtin_set_is_a_verified_version_whose_entries_cite_sources(tmp_path: Path) -> None:
    current = preset_store(tmp_path).current()  # verifies every file against the index (run pack after edits)
    assert current.label == "builtin" and current.index.name == INDEX_NAME and current.directory == BUILTIN_DIR
    presets = presets_of(current)
    assert {"zoom", "steam", "netflix", "local-network"} <= set(presets)
    for preset in presets.values():
        assert preset.sources and all(s.startswith("https://") for s in preset.sources)
        assert all(entry.source for entry in preset.entries)


PRESETS = {
    "video": Preset("video", "Video", "", (PresetEntry(dest=".video.example", source="a"),
                                           PresetEntry(proto="udp", port_lo=8801, port_hi=8810, source="b"))),
}  # fmt: skip


def test_expand_in_place_with_the_rules_action_and_interface() -> None:
    rules = [
        PolicyRule(id="r1", action="keep", dest="203.0.113.9"),
        PolicyRule(id="r2", action="split", preset="video", interface="eth1"),
        PolicyRule(id="r3", action="split", preset="gone"),
        PolicyRule(id="r4", action="split", app_name="curl"),
    ]
    out = expand(rules, PRESETS)
    assert [r.id for r in out] == ["r1", "r2:video#1", "r2:video#2", "r4"]
    assert (out[1].dest, out[1].interface, out[1].preset, out[1].source) == (
        ".video.example",
        "eth1",
        "",
        "preset video: a",
    )
    assert (out[2].proto, out[2].port_lo, out[2].port_hi) == ("udp", 8801, 8810)


def test_an_unexpanded_preset_rule_matches_nothing() -> None:
    policy = CompiledPolicy(
        PolicySnapshot(version=1, ts=0, enabled=True, rules=[PolicyRule(id="r1", action="split", preset="video")])
    )
    assert not policy.match(FiveTuple(IpProtocol.TCP, "192.0.2.10", 40000, "203.0.113.80", 443)).split


def test_a_preset_rule_brings_its_own_destinations() -> None:
    with pytest.raises(RuleError, match="preset: a preset brings its own destinations"):
        validate(PolicyRule(id="r1", action="split", preset="video", dest="10.0.0.0/8"))
    with pytest.raises(RuleError, match="preset: 'Video!' is not a preset name"):
        validate(PolicyRule(id="r1", action="split", preset="Video!"))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"[", "video.json: not valid JSON"),
        (
            b'{"name": "other", "entries": [{"dest": "a.example", "source": "s"}]}',
            "video.json.name: expected the file's name",
        ),
        (b'{"name": "video", "entries": []}', "video.json.entries: expected a non-empty list"),
        (b'{"name": "video", "entries": [{"dest": "a.example"}]}', "video.json.entries[0].source: every entry says"),
        (b'{"name": "video", "entries": [{"source": "s"}]}', "video.json.entries[0]: an entry needs a destination"),
        (b'{"name": "video", "entries": [{"ports": "99999", "source": "s"}]}', "video.json.entries[0].port:"),
        (
            b'{"name": "video", "entries": [{"dest": "x", "via": "y", "source": "s"}]}',
            "video.json.entries[0].via: unknown",
        ),
    ],
)
def test_bad_preset_file(raw: bytes, message: str) -> None:
    with pytest.raises(BadPreset) as caught:
        parse_preset("video.json", raw)
    assert str(caught.value).startswith(message)
