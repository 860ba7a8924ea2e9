"""Every upgrade/downgrade rule (core/updates/check.py) and its boundary, one table row each."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from core.updates.check import Accepted, Refused, check_upgrade
from core.updates.index import Index, Version

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)
SEC = timedelta(seconds=1)


def ix(version: str | None, published: timedelta | None, local: bool = False, name: str = "presets") -> Index:
    """An index published `published` before NOW (negative: in the future)."""
    return Index(
        name=name,
        version=None if version is None else Version.parse(version),
        published=None if published is None else NOW - published,
        local=local,
    )


HOUR = 60 * MIN
CASES = [
    # (id, current, candidate, expected: an Accepted kind or the refusing rule)
    ("nothing in force: bootstrap", None, ix("1.0.0", HOUR), "bootstrap"),
    ("0.0.0 always upgrades, even to an older date", ix("0.0.0", MIN), ix("0.1.0", 2 * HOUR), "bootstrap"),
    ("0.0.0 takes another name too", ix("0.0.0", MIN), ix("1.0.0", HOUR, name="other"), "bootstrap"),
    ("0.0.0 in force without a date still bootstraps", ix("0.0.0", None), ix("1.0.0", HOUR), "bootstrap"),
    ("0.0.0 does not take a candidate without version", ix("0.0.0", MIN), ix(None, HOUR), "version"),
    ("candidate without version", ix("1.0.0", 2 * HOUR), ix(None, HOUR), "version"),
    ("candidate without published time", ix("1.0.0", 2 * HOUR), ix("1.1.0", None), "published"),
    ("candidate exactly 15 min in the future", ix("1.0.0", 2 * HOUR), ix("1.1.0", -15 * MIN), "upgrade"),
    ("candidate 15 min 1 s in the future", ix("1.0.0", 2 * HOUR), ix("1.1.0", -15 * MIN - SEC), "future"),
    ("index in force without version", ix(None, 2 * HOUR), ix("1.1.0", HOUR), "version"),
    ("index in force without published time", ix("1.0.0", None), ix("1.1.0", HOUR), "published"),
    ("index in force from the future", ix("1.0.0", -16 * MIN), ix("1.1.0", HOUR), "future"),
    ("another name", ix("1.0.0", 2 * HOUR), ix("1.1.0", HOUR, name="other"), "name"),
    ("upgrade", ix("1.0.0", 2 * HOUR), ix("1.1.0", HOUR), "upgrade"),
    ("newer version, older date", ix("1.0.0", HOUR), ix("1.1.0", 2 * HOUR), "newer-version-older-date"),
    ("newer version, older date, local in force", ix("1.0.0", HOUR, local=True), ix("1.1.0", 2 * HOUR), "upgrade"),
    ("older version, newer date", ix("1.2.0", 2 * HOUR), ix("1.1.0", HOUR), "older-version-newer-date"),
    ("older version, newer date, local in force", ix("1.2.0", 2 * HOUR, True), ix("1.1.0", HOUR), "downgrade"),
    # The seed's fix: a downgrade to an index published earlier is not refused for its date.
    ("downgrade to an older index", ix("1.2.0", HOUR), ix("1.1.0", 2 * HOUR), "downgrade"),
    ("major downgrade", ix("2.0.0", HOUR), ix("1.9.0", 2 * HOUR), "major-downgrade"),
    ("major downgrade, local in force", ix("2.0.0", HOUR, local=True), ix("1.9.0", 30 * MIN), "major-downgrade"),
    ("pre-release of the same major is no major downgrade", ix("2.0.0", HOUR), ix("2.0.0-rc.1", 2 * HOUR), "downgrade"),
    ("downgrade 19 min 59 s after publishing", ix("1.2.0", 20 * MIN - SEC), ix("1.1.0", HOUR), "stale-cdn"),
    ("downgrade exactly 20 min after publishing", ix("1.2.0", 20 * MIN), ix("1.1.0", HOUR), "downgrade"),
    ("stale guard applies to a local index too", ix("1.2.0", 5 * MIN, local=True), ix("1.1.0", MIN), "stale-cdn"),
    ("no stale guard for an upgrade", ix("1.1.0", MIN), ix("1.2.0", 0 * MIN), "upgrade"),
    ("equal dates, newer version: the same index", ix("1.0.0", HOUR), ix("1.1.0", HOUR), "same-date"),
    ("equal dates, equal versions", ix("1.0.0", HOUR), ix("1.0.0", HOUR), "same-date"),
    ("equal versions, local in force", ix("1.0.0", 2 * HOUR, local=True), ix("1.0.0", HOUR), "same-version-local"),
    ("equal versions, local, older date", ix("1.0.0", HOUR, True), ix("1.0.0", 2 * HOUR), "same-version-local"),
    ("equal versions, republished later", ix("1.0.0", 2 * HOUR), ix("1.0.0", HOUR), "republish"),
    ("a local candidate follows the normal path", ix("1.0.0", 2 * HOUR), ix("1.1.0", HOUR, local=True), "upgrade"),
    ("release after its pre-release", ix("1.1.0-rc.2", 2 * HOUR), ix("1.1.0", HOUR), "upgrade"),
]


@pytest.mark.parametrize(("current", "candidate", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rule(current: Index | None, candidate: Index, expected: str) -> None:
    decision = check_upgrade(current, candidate, NOW)
    if isinstance(decision, Refused):
        assert decision.rule == expected, decision.line()
        line = decision.line()
        assert line.startswith(f"refused by rule {expected}: ") and "\n" not in line
    else:
        assert isinstance(decision, Accepted) and decision.kind == expected, decision


def test_every_rule_has_a_row() -> None:
    """The table above is the spec: each rule named in check.py's docstring refuses at least one row."""
    import core.updates.check as check

    rules = {line.split("|")[1].strip() for line in (check.__doc__ or "").splitlines() if line.startswith("| ")}
    rules.discard("rule")
    refused = {c[3] for c in CASES}
    assert rules and rules <= refused, rules - refused


@pytest.mark.parametrize(
    ("low", "high"),
    [("1.0.0", "1.0.1"), ("1.0.9", "1.1.0"), ("1.9.0", "2.0.0"), ("1.0.0-alpha", "1.0.0"),
     ("1.0.0-alpha", "1.0.0-alpha.1"), ("1.0.0-alpha.1", "1.0.0-alpha.beta"), ("1.0.0-beta.2", "1.0.0-beta.11"),
     ("1.0.0-rc.1", "1.0.0"), ("0.0.0", "0.0.1")],
)  # fmt: skip
def test_semver_precedence(low: str, high: str) -> None:
    assert Version.parse(low) < Version.parse(high)
    assert str(Version.parse(high)) == high


@pytest.mark.parametrize("text", ["1.0", "v1.0.0", "01.0.0", "1.0.0+build", "1.0.0-", "", "a.b.c"])
def test_not_a_version(text: str) -> None:
    with pytest.raises(ValueError, match="not a semantic version"):
        Version.parse(text)
