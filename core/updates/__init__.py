"""Updates of the preset set: a versioned index, Portmaster's upgrade and downgrade guards, a verified download
into a staging directory and an atomic switch that keeps the previous version (README.md in this package).

- `index`: parse an index (name, semantic version, published time, locally generated, files with size and sha256).
- `check`: `check_upgrade(current, candidate, now) -> Accepted | Refused(rule, reason)`, `staleness`; pure.
- `source`: a directory or an https URL to read an index and its files from (`open_source`).
- `store`: the versions on disk: `stage` (download + verify), `install` (rules again + atomic switch), `rollback`.
"""

from .check import Accepted, Decision, Refused, check_upgrade, staleness
from .index import BadIndex, Index, IndexFile, Version, parse_index

__all__ = [
    "Accepted",
    "BadIndex",
    "Decision",
    "Index",
    "IndexFile",
    "Refused",
    "Version",
    "check_upgrade",
    "parse_index",
    "staleness",
]
