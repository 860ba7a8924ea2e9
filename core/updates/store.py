"""The versions of an update-able file set on disk, and the atomic switch between them.

```
<root>/state.json             {"current": LABEL, "previous": LABEL}: the one pointer, replaced atomically
<root>/versions/LABEL/        index.json and the files it names, verified (LABEL = VERSION-<sha256 of index>)
<home>/.presets-staging-XXXX  a download in progress (next to <root>, on the same file system)
```

"builtin" is the label of the set shipped with the program (read from the package, never copied). Nothing is in
`<root>` until the first update is installed; until then the built-in set is in force.

An update goes in two steps, so the download never happens in a process that must stay responsive:
`stage(source)` fetches the index, refuses it early by the upgrade rules (check.py), downloads every file it names
into a fresh staging directory and verifies size, sha256 and content (the caller's `check_file`); any failure
removes the staging directory and raises `UpdateError` with one line. `install(staging)` verifies the staged files
again, applies the rules against the version in force *now*, renames the directory into `versions/` and replaces
`state.json`: a reader sees the old version or the new one, never a mix, and the previous version is kept for
`rollback()`. Versions nobody points at are removed afterwards. A refusal leaves `<root>` byte for byte as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .check import Accepted, Refused, check_upgrade
from .index import MAX_FILE_BYTES, MAX_INDEX_BYTES, BadIndex, Index, IndexFile, Version, parse_index
from .source import INDEX_FILE, Source, UpdateError

STATE_FILE = "state.json"
VERSIONS_DIR = "versions"
BUILTIN = "builtin"
STAGING_PREFIX = ".presets-staging-"
STAGING_NAME = re.compile(rf"^{re.escape(STAGING_PREFIX)}[A-Za-z0-9_]+$")
#: A staging directory older than this is a leftover of a process that died; the next stage removes it.
STALE_STAGING_SECONDS = 3600


class RuleRefusal(UpdateError):
    """The upgrade rules refused the candidate (`refused.line()` is the message)."""

    def __init__(self, refused: Refused) -> None:
        super().__init__(refused.line())
        self.refused = refused


@dataclass(frozen=True, slots=True)
class Installed:
    """A version on disk: its label, its index and the directory holding its files."""

    label: str
    index: Index
    directory: Path


@dataclass(frozen=True, slots=True)
class Switched:
    """What an install or rollback did: the version now in force and the one before it."""

    current: Installed
    previous: Installed
    kind: str  # bootstrap | upgrade | downgrade | republish | rollback


class Store:
    """One update-able file set: `root` (e.g. $SPLITTUN_HOME/presets), the built-in version's directory, and
    `check_file(name, data)`, which raises ValueError (one line) for a file whose content cannot be used."""

    def __init__(self, root: Path, builtin: Path, check_file: Callable[[str, bytes], object]) -> None:
        self.root = root
        self.builtin = builtin
        self.check_file = check_file

    # --- reading ---------------------------------------------------------------------------------

    def _state(self) -> dict[str, str]:
        path = self.root / STATE_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {"current": BUILTIN}
        except (OSError, ValueError) as exc:
            raise UpdateError(f"{path}: unreadable ({exc}); remove it to go back to the built-in presets") from None
        if not isinstance(data, dict) or not isinstance(data.get("current"), str):
            raise UpdateError(f"{path}: not a version pointer; remove it to go back to the built-in presets")
        return data

    def _directory(self, label: str) -> Path:
        return self.builtin if label == BUILTIN else self.root / VERSIONS_DIR / label

    def load(self, label: str) -> Installed:
        """A version on disk, verified (every file as its index says)."""
        return self._load(label, self._directory(label))

    def load_staged(self, staging: Path) -> Installed:
        """A staging directory's version, verified like an installed one."""
        return self._load("staged", staging)

    def _load(self, label: str, directory: Path) -> Installed:
        try:
            raw = (directory / INDEX_FILE).read_bytes()
        except OSError as exc:
            raise UpdateError(f"version {label}: no readable index ({exc.strerror or exc})") from None
        try:
            index = parse_index(raw)
        except BadIndex as exc:
            raise UpdateError(f"version {label}: {exc}") from None
        for entry in index.files:
            try:
                data = (directory / entry.name).read_bytes()
            except OSError as exc:
                raise UpdateError(f"version {label}: {entry.name}: {exc.strerror or exc}") from None
            self._verify(f"version {label}", entry.name, data, entry.size, entry.sha256)
        return Installed(label, index, directory)

    def current(self) -> Installed:
        return self.load(self._state()["current"])

    def previous(self) -> Installed | None:
        label = self._state().get("previous")
        return self.load(label) if label else None

    # --- updating --------------------------------------------------------------------------------

    def fetch_index(self, source: Source) -> Index:
        """The index the source offers (nothing is written)."""
        return self._parse_index(source, source.read(INDEX_FILE, MAX_INDEX_BYTES))

    def check(self, source: Source, now: datetime) -> tuple[Installed, Index, Accepted | Refused]:
        """The version in force, the source's index and what the upgrade rules say about it (nothing written)."""
        current = self.current()
        candidate = self.fetch_index(source)
        return current, candidate, check_upgrade(current.index, candidate, now)

    def stage(self, source: Source, now: datetime) -> Path:
        """Download and verify the source's version into a new staging directory (see the module docstring)."""
        self._remove_stale_staging()
        current = self.current()
        raw = source.read(INDEX_FILE, MAX_INDEX_BYTES)
        candidate = self._parse_index(source, raw)
        decision = check_upgrade(current.index, candidate, now)
        if isinstance(decision, Refused):
            raise RuleRefusal(decision)
        files = {}
        for entry in candidate.files:  # everything is fetched and verified before anything is written
            data = source.read(entry.name, MAX_FILE_BYTES)
            self._verify(f"source {source.url}", entry.name, data, entry.size, entry.sha256)
            files[entry.name] = data
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.root.parent))
        try:
            for name, data in {**files, INDEX_FILE: raw}.items():
                _write_synced(staging / name, data)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging

    def install(self, staging: Path, now: datetime) -> Switched:
        """Make a staged version the one in force, or refuse it (the staging directory goes either way)."""
        try:
            if not STAGING_NAME.match(staging.name) or staging.parent != self.root.parent:
                raise UpdateError(f"{staging}: not a staging directory of {self.root}")
            if not staging.is_dir():
                raise UpdateError(f"{staging}: no such staging directory (it was installed or removed already)")
            staged = self.load_staged(staging)
            current = self.current()
            decision = check_upgrade(current.index, staged.index, now)
            if isinstance(decision, Refused):
                raise RuleRefusal(decision)
            raw = (staging / INDEX_FILE).read_bytes()
            label = f"{staged.index.version}-{hashlib.sha256(raw).hexdigest()[:12]}"
            versions = self.root / VERSIONS_DIR
            versions.mkdir(parents=True, exist_ok=True)
            target = versions / label
            if target.is_dir():  # the same index bytes were installed before (e.g. kept as previous)
                shutil.rmtree(staging)
            else:
                os.rename(staging, target)
                _fsync_dir(versions)
            self._switch(label, current.label)
            return Switched(self.load(label), current, decision.kind)
        finally:
            if staging.is_dir() and STAGING_NAME.match(staging.name):
                shutil.rmtree(staging, ignore_errors=True)

    def rollback(self) -> Switched:
        """Back to the previous version (no upgrade rules: the user asked for exactly this one); the version
        rolled back from becomes the previous one, so a second rollback undoes the first."""
        state = self._state()
        if not state.get("previous"):
            raise UpdateError("nothing to roll back to: no update has been installed since the built-in presets")
        current, previous = self.load(state["current"]), self.load(state["previous"])
        self._switch(previous.label, current.label)
        return Switched(previous, current, "rollback")

    # --- helpers ---------------------------------------------------------------------------------

    def _parse_index(self, source: Source, raw: bytes) -> Index:
        try:
            return parse_index(raw)
        except BadIndex as exc:
            raise UpdateError(f"source {source.url}: {exc}") from None

    def _verify(self, where: str, name: str, data: bytes, size: int, sha256: str) -> None:
        if len(data) != size:
            cut = " (cut short?)" if len(data) < size else ""
            raise UpdateError(f"{where}: {name} has {len(data)} bytes, the index says {size}{cut}")
        if hashlib.sha256(data).hexdigest() != sha256:
            raise UpdateError(f"{where}: {name} does not match its sha256 in the index")
        try:
            self.check_file(name, data)
        except ValueError as exc:
            raise UpdateError(f"{where}: {exc}") from None

    def _switch(self, current: str, previous: str) -> None:
        """The one atomic step: replace the pointer, then remove versions nobody points at."""
        self.root.mkdir(parents=True, exist_ok=True)
        state = json.dumps({"current": current, "previous": previous}, indent=2) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=".state-", dir=self.root)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(state)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.root / STATE_FILE)
            _fsync_dir(self.root)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        keep = {current, previous}
        for entry in (self.root / VERSIONS_DIR).iterdir() if (self.root / VERSIONS_DIR).is_dir() else ():
            if entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)

    def _remove_stale_staging(self) -> None:
        for entry in self.root.parent.glob(f"{STAGING_PREFIX}*"):
            with contextlib.suppress(OSError):
                if time.time() - entry.stat().st_mtime > STALE_STAGING_SECONDS:
                    shutil.rmtree(entry)


def pack(directory: Path, name: str, version: str, published: datetime, local: bool = False) -> Index:
    """Write `directory/index.json` naming every other *.json file there (size, sha256): how a preset set is
    published (and how the built-in one and the tests' versions are made)."""
    files = tuple(
        IndexFile(p.name, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(directory.glob("*.json"))
        if p.name != INDEX_FILE
    )
    index = Index(name, Version.parse(version), published.astimezone(UTC), local, files)
    (directory / INDEX_FILE).write_bytes(index.to_bytes())
    return index


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
