"""May the index in force be replaced by a candidate? Portmaster's upgrade and downgrade guards, with the seed's
fixes (ARCHITECTURE.md "Updates"; the reference: /work/shared/reference/portmaster-facts.md):

| rule | refuses when |
|---|---|
| version | an index has no version |
| published | an index has no published time |
| future | an index is published more than 15 min in the future (exactly 15 min is accepted) |
| name | the names differ |
| newer-version-older-date | the candidate's version is newer but it was published earlier (*) |
| older-version-newer-date | the candidate's version is older but it was published later (*) |
| major-downgrade | the candidate's major version is lower |
| stale-cdn | a downgrade while the index in force was published less than 20 min ago (20 min is accepted) |
| same-date | both were published at the same time: the same index |
| same-version-local | the index in force was generated locally and the versions are equal: the same index |

(*) skipped when the index in force was generated locally: its published time is when it was generated, not when
its contents were. A locally generated index otherwise follows the normal path. An index in force at version 0.0.0
(or none at all) is a bootstrap: any candidate that passes its own checks (version, published, future) is taken.

The fixes against Portmaster's own check: it refused every candidate published before the index in force ("new
index is older (time)"), which blocked legitimate downgrades; the version/date mismatch is now checked both ways,
and not at all for a local index in force. The candidate's own checks come first, so a broken index is named as
broken even when the index in force is 0.0.0. Pure: the caller passes `now`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from .index import ZERO, Index

MAX_FUTURE = timedelta(minutes=15)
STALE_CDN_GUARD = timedelta(minutes=20)


@dataclass(frozen=True, slots=True)
class Accepted:
    kind: str  # bootstrap | upgrade | downgrade | republish (same version, another published time)

    def line(self, current: Index | None, candidate: Index) -> str:
        was = f"{current.version}" if current is not None else "nothing"
        return f"{self.kind}: {was} → {candidate.version}"


@dataclass(frozen=True, slots=True)
class Refused:
    rule: str
    reason: str

    def line(self) -> str:
        """The one line the user sees."""
        return f"refused by rule {self.rule}: {self.reason}"


Decision = Accepted | Refused


def _age(delta: timedelta) -> str:
    minutes = int(delta.total_seconds() // 60)
    return f"{minutes} min" if abs(minutes) < 120 else f"{minutes // 60} h"


def _usable(index: Index, which: str, now: datetime) -> Refused | None:
    if index.version is None:
        return Refused("version", f"{which} {index.name!r} has no version")
    if index.published is None:
        return Refused("published", f"{which} {index.name!r} {index.version} has no published time")
    if index.published > now + MAX_FUTURE:
        ahead = _age(index.published - now)
        return Refused("future", f"{which} {index.version} is published {ahead} in the future (at most 15 min)")
    return None


def check_upgrade(current: Index | None, candidate: Index, now: datetime) -> Decision:
    """Whether `candidate` may replace `current` (None: nothing in force) at `now` (aware)."""
    refused = _usable(candidate, "the new index", now)
    if refused:
        return refused
    if current is None or current.version == ZERO:
        return Accepted("bootstrap")
    refused = _usable(current, "the index in force", now)
    if refused:
        return refused
    assert current.version is not None and current.published is not None  # _usable checked both
    assert candidate.version is not None and candidate.published is not None
    old, new = current.version, candidate.version
    if candidate.name != current.name:
        return Refused("name", f"the new index is {candidate.name!r}, the one in force is {current.name!r}")
    if not current.local:
        if new > old and candidate.published < current.published:
            return Refused(
                "newer-version-older-date",
                f"{new} is newer than {old} in force but was published earlier "
                f"({_when(candidate)} before {_when(current)})",
            )
        if new < old and candidate.published > current.published:
            return Refused(
                "older-version-newer-date",
                f"{new} is older than {old} in force but was published later "
                f"({_when(candidate)} after {_when(current)})",
            )
    if new.major < old.major:
        return Refused("major-downgrade", f"{new} would go back a major version from {old} in force")
    if new < old and now - current.published < STALE_CDN_GUARD:
        return Refused(
            "stale-cdn",
            f"{new} is older than {old} in force, which was published {_age(now - current.published)} ago: "
            "downgrades wait 20 min (a stale mirror may still serve the old index)",
        )
    if candidate.published == current.published:
        return Refused("same-date", f"{new} has the same published time as {old} in force: the same index")
    if current.local and new == old:
        return Refused("same-version-local", f"{new} is the version of the locally generated index in force")
    return Accepted("upgrade" if new > old else "downgrade" if new < old else "republish")


def _when(index: Index) -> str:
    assert index.published is not None
    return index.published.strftime("%Y-%m-%d %H:%M:%S UTC")


def staleness(index: Index, now: datetime, max_age: timedelta) -> timedelta | None:
    """How old the index in force is when it is older than `max_age` (None: fresh enough, or no date)."""
    if index.published is None:
        return None
    age = now - index.published
    return age if age > max_age else None
