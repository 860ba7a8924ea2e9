"""Presets: named sets of destinations (domains, CIDRs, protocols and ports) a user applies in one command.

A preset is data, one JSON file per preset (`builtin/` holds the set shipped with splittun; updates replace it:
core/updates). Each entry cites where it comes from — the service's published domain, IP or port list. An
applied preset is ONE rule in the config (`PolicyRule.preset = NAME`, with the action and interface the user
chose); `expand` turns it into one rule per entry when the controller compiles the policy, from the presets in
force at that moment, so an update changes what an applied preset matches without touching the user's rules.
Pure: bytes in, presets and rules out.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.policy import PRESET_NAME, RuleError, parse_ports, proto_ports
from core.policy import validate as validate_rule
from core.updates.store import Installed, Store
from messages import PolicyRule

#: Where the preset set shipped with splittun lives (an index and its files, like a downloaded version).
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
#: The name of splittun's preset index; an index with another name is never installed over it.
INDEX_NAME = "splittun-presets"


class BadPreset(ValueError):
    """A preset file that cannot be used; `str()` is one line naming the file, the field and the problem."""


@dataclass(frozen=True, slots=True)
class PresetEntry:
    """One destination of a preset: every condition given must hold; `source` says where it comes from."""

    dest: str = ""  # domain (".example.com" = with subdomains), IP or CIDR; "" = any
    proto: str = ""  # tcp | udp | "" (any)
    port_lo: int = 0
    port_hi: int = 0
    source: str = ""


@dataclass(frozen=True, slots=True)
class Preset:
    name: str
    title: str
    description: str
    entries: tuple[PresetEntry, ...]
    sources: tuple[str, ...] = ()  # the published lists the entries were taken from (URLs as text)

    def describe_entry(self, entry: PresetEntry) -> str:
        ports = f" {proto_ports(entry.proto, entry.port_lo, entry.port_hi)}" if entry.proto or entry.port_lo else ""
        return f"{entry.dest or '*'}{ports}"


def parse_preset(file_name: str, raw: bytes) -> Preset:
    """One preset file (`NAME.json`) → `Preset`; BadPreset naming the field when it cannot be used."""
    where = file_name
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadPreset(f"{where}: not valid JSON") from None
    if not isinstance(data, dict):
        raise BadPreset(f"{where}: expected a JSON object")
    name = data.get("name")
    if not isinstance(name, str) or not PRESET_NAME.match(name) or f"{name}.json" != file_name:
        raise BadPreset(f"{where}.name: expected the file's name without .json (lowercase letters, digits, '-')")
    for key in ("title", "description"):
        if not isinstance(data.get(key, ""), str):
            raise BadPreset(f"{where}.{key}: expected a string")
    sources = data.get("sources", [])
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise BadPreset(f"{where}.sources: expected a list of strings")
    entries = data.get("entries")
    if not isinstance(entries, list) or not entries:
        raise BadPreset(f"{where}.entries: expected a non-empty list")
    return Preset(
        name=name,
        title=data.get("title", "") or name,
        description=data.get("description", ""),
        entries=tuple(_entry(f"{where}.entries[{i}]", item) for i, item in enumerate(entries)),
        sources=tuple(sources),
    )


def _entry(where: str, item: Any) -> PresetEntry:
    if not isinstance(item, dict):
        raise BadPreset(f"{where}: expected an object with dest, proto, ports and source")
    unknown = set(item) - {"dest", "proto", "ports", "source"}
    if unknown:
        raise BadPreset(f"{where}.{sorted(unknown)[0]}: unknown field")
    if not all(isinstance(v, str) for v in item.values()):
        raise BadPreset(f"{where}: every field is a string")
    if not item.get("source"):
        raise BadPreset(f"{where}.source: every entry says where it comes from")
    if not (item.get("dest") or item.get("proto") or item.get("ports")):
        raise BadPreset(f"{where}: an entry needs a destination, protocol or port")
    try:
        lo, hi = parse_ports(item.get("ports", ""))
        rule = validate_rule(PolicyRule(id="entry", action="split", dest=item.get("dest", ""),
                                        proto=item.get("proto", ""), port_lo=lo, port_hi=hi))  # fmt: skip
    except RuleError as exc:
        raise BadPreset(f"{where}.{exc.field}: {exc.problem}") from None
    return PresetEntry(rule.dest, rule.proto, rule.port_lo, rule.port_hi, item["source"])


def load_dir(directory: Path, files: Iterable[str]) -> dict[str, Preset]:
    """The presets of an installed (already verified) version: its `files`, read from `directory`."""
    presets = {}
    for file_name in files:
        preset = parse_preset(file_name, (directory / file_name).read_bytes())
        presets[preset.name] = preset
    return presets


def expand(rules: Iterable[PolicyRule], presets: Mapping[str, Preset]) -> list[PolicyRule]:
    """The policy's rules with each preset rule replaced by one rule per entry of the preset in force (ids
    `r3:zoom#1`, …), in place, with the preset rule's action, app conditions and interface. A preset not in
    force expands to nothing: it matches no connection until an update brings it back."""
    out: list[PolicyRule] = []
    for rule in rules:
        if not rule.preset:
            out.append(rule)
            continue
        preset = presets.get(rule.preset)
        for n, entry in enumerate(preset.entries if preset else (), 1):
            out.append(
                dataclasses.replace(
                    rule,
                    id=f"{rule.id}:{rule.preset}#{n}",
                    preset="",
                    dest=entry.dest,
                    proto=entry.proto,
                    port_lo=entry.port_lo,
                    port_hi=entry.port_hi,
                    source=f"preset {rule.preset}: {entry.source}",
                )
            )
    return out


def preset_store(home: Path) -> Store:
    """The presets' versions in a splittun home ($SPLITTUN_HOME/presets; the built-in set until an update)."""
    return Store(home / "presets", BUILTIN_DIR, parse_preset)


def presets_of(version: Installed) -> dict[str, Preset]:
    """The presets of a verified version, by name."""
    return load_dir(version.directory, (f.name for f in version.index.files))


__all__ = [
    "BUILTIN_DIR",
    "INDEX_NAME",
    "BadPreset",
    "Preset",
    "PresetEntry",
    "expand",
    "load_dir",
    "parse_preset",
    "preset_store",
    "presets_of",
]
