"""An update index: what a preset set is (name, version, published time, locally generated) and which files it is
made of (each with its size and sha256). Parsing only: bytes in, an `Index` or one `BadIndex` line out.

The version and the published time may be missing in a parsed index: the upgrade rules (check.py) refuse such an
index and say which one is missing, the way Portmaster does, rather than the parser hiding it as "corrupt".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import total_ordering
from typing import Any

#: What a file an index names may be called: one plain name, never a path (no "..", no "/").
FILE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\.json$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# semver.org's grammar (2.0.0), without build metadata (it has no precedence, so it cannot order indexes).
_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?$"
)
#: The largest index (bytes) and preset file splittun reads: presets are small, a huge download is an error.
MAX_INDEX_BYTES = 1 << 20
MAX_FILE_BYTES = 4 << 20


class BadIndex(ValueError):
    """An index that cannot be used. `str()` is one line naming the field and the problem."""


@total_ordering
@dataclass(frozen=True, slots=True)
class Version:
    """A semantic version (semver.org 2.0.0 precedence; build metadata is not accepted)."""

    major: int
    minor: int
    patch: int
    pre: tuple[int | str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Version:
        found = _SEMVER.match(text)
        if found is None:
            raise ValueError(f"{text!r} is not a semantic version like 1.2.3")
        pre = tuple(int(p) if p.isdigit() else p for p in found.group(4).split(".")) if found.group(4) else ()
        return cls(int(found.group(1)), int(found.group(2)), int(found.group(3)), pre)

    def _key(self) -> tuple[Any, ...]:
        # A pre-release sorts before its release; numeric identifiers before alphanumeric ones.
        pre = tuple((0, p, "") if isinstance(p, int) else (1, 0, p) for p in self.pre)
        return (self.major, self.minor, self.patch, 0 if self.pre else 1, pre)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() < other._key()

    def __str__(self) -> str:
        core = f"{self.major}.{self.minor}.{self.patch}"
        return core + ("-" + ".".join(map(str, self.pre)) if self.pre else "")


ZERO = Version(0, 0, 0)


@dataclass(frozen=True, slots=True)
class IndexFile:
    """One file of an index: its name (next to the index), size in bytes and sha256 (hex)."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Index:
    name: str
    version: Version | None  # None: missing (refused by the upgrade rules)
    published: datetime | None  # aware, UTC; None: missing
    local: bool = False  # generated on this machine rather than downloaded
    files: tuple[IndexFile, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        """`splittun-presets 1.2.0 (published 2026-11-30 10:00 UTC)`."""
        when = self.published.strftime("%Y-%m-%d %H:%M UTC") if self.published else "no publish date"
        return f"{self.name} {self.version or '(no version)'} ({'generated locally, ' if self.local else ''}{when})"

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name}
        if self.version is not None:
            data["version"] = str(self.version)
        if self.published is not None:
            data["published"] = format_time(self.published)
        data["local"] = self.local
        data["files"] = [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in self.files]
        return data

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_json(), indent=2) + "\n").encode()


def format_time(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    """RFC 3339 / ISO 8601 with a zone ("Z" or an offset) → an aware UTC datetime."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a time like 2026-11-30T10:00:00Z") from None
    if when.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone (end it with Z for UTC)")
    return when.astimezone(UTC)


def parse_index(raw: bytes) -> Index:
    """Bytes of an index file → `Index`; BadIndex naming the field when they are not a usable index."""
    if len(raw) > MAX_INDEX_BYTES:
        raise BadIndex(f"index: larger than {MAX_INDEX_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise BadIndex(f"index: not valid JSON{where}") from None
    if not isinstance(data, dict):
        raise BadIndex("index: expected a JSON object")
    unknown = set(data) - {"name", "version", "published", "local", "files"}
    if unknown:
        raise BadIndex(f"index.{sorted(unknown)[0]}: unknown field")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise BadIndex("index.name: missing or not a string")
    version = None
    if data.get("version") not in (None, ""):
        try:
            version = Version.parse(str(data["version"]))
        except ValueError as exc:
            raise BadIndex(f"index.version: {exc}") from None
    published = None
    if data.get("published") not in (None, ""):
        try:
            published = parse_time(str(data["published"]))
        except ValueError as exc:
            raise BadIndex(f"index.published: {exc}") from None
    local = data.get("local", False)
    if not isinstance(local, bool):
        raise BadIndex("index.local: expected true or false")
    files = data.get("files")
    if not isinstance(files, list):
        raise BadIndex("index.files: missing or not a list")
    entries = tuple(_file(i, item) for i, item in enumerate(files))
    names = [f.name for f in entries]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise BadIndex(f"index.files: {duplicate!r} is listed twice")
    return Index(name, version, published, local, entries)


def _file(i: int, item: Any) -> IndexFile:
    where = f"index.files[{i}]"
    if not isinstance(item, dict) or set(item) != {"name", "size", "sha256"}:
        raise BadIndex(f"{where}: expected exactly name, size and sha256")
    name, size, sha = item["name"], item["size"], item["sha256"]
    if not isinstance(name, str) or not FILE_NAME.match(name):
        raise BadIndex(f"{where}.name: {name!r} is not a plain file name like zoom.json")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_FILE_BYTES:
        raise BadIndex(f"{where}.size: expected a byte count up to {MAX_FILE_BYTES}")
    if not isinstance(sha, str) or not _SHA256.match(sha):
        raise BadIndex(f"{where}.sha256: expected 64 lowercase hex digits")
    return IndexFile(name, size, sha)
