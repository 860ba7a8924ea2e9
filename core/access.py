"""Who may use the local API (actors/api): two bearer tokens like Portmaster's API levels, `read` (status,
connections, counts, notifications) and `admin` (anything that changes state).

`splittun up` generates both, fresh, as 0600 files in the run directory (itself 0700: only root reads them);
`splittun api token [--read]` prints one. The api actor reads them when it starts (and makes them if `up` did
not, so it never runs without). A browser never sees a token: `splittun ui` gets a one-time login code instead.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from runtime.paths import api_token

READ = "read"
ADMIN = "admin"
LEVELS = (READ, ADMIN)  # ordered: admin may do what read may


@dataclass(frozen=True)
class Tokens:
    read: str
    admin: str


def generate(run_dir: Path) -> Tokens:
    """New tokens, written atomically with mode 0600."""
    tokens = Tokens(read=secrets.token_urlsafe(32), admin=secrets.token_urlsafe(32))
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for level in LEVELS:
        path = api_token(run_dir, level)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(getattr(tokens, level) + "\n")
        os.replace(tmp, path)
    return tokens


def load(run_dir: Path) -> Tokens:
    """The tokens `up` wrote; OSError when they are missing."""
    read, admin = (api_token(run_dir, level).read_text().strip() for level in LEVELS)
    if not read or not admin:
        raise FileNotFoundError(f"empty API token file in {run_dir}")
    return Tokens(read=read, admin=admin)


def load_or_generate(run_dir: Path) -> Tokens:
    try:
        return load(run_dir)
    except OSError:
        return generate(run_dir)
