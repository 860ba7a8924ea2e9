"""Helpers for the update tests: preset versions to publish, a test certificate, an https server on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from core.presets import INDEX_NAME
from core.updates.store import pack
from tests.support import FIXTURES_DIR

HTTPS_SERVER = FIXTURES_DIR / "https_server.py"


def publish(
    directory: Path,
    version: str,
    presets: dict[str, Sequence[dict[str, str]]],
    published: datetime | None = None,
    name: str = INDEX_NAME,
    local: bool = False,
) -> Path:
    """A preset version in `directory` (made empty first): one file per preset, then its index."""
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.json"):
        old.unlink()
    for preset, entries in presets.items():
        data = {"name": preset, "title": preset, "entries": [{"source": "test", **e} for e in entries]}
        (directory / f"{preset}.json").write_text(json.dumps(data))
    when = published or datetime.now(UTC) - timedelta(hours=1)
    pack(directory, name, version, when, local)
    return directory


def snapshot(root: Path) -> dict[str, Any]:
    """Every file and directory under `root` with its bytes (and symlinks' targets): what "nothing written" means."""
    found: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                found[rel] = ("dir",)
            else:
                found[rel] = ("file", path.read_bytes())
    return found


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost (openssl), made at test time."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=splittun update test",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@contextlib.contextmanager
def https_server(
    directory: Path, cert: Path, key: Path, cut: str = "", prefix: Sequence[str] = (), redirect: str = ""
) -> Iterator[str]:
    """https://127.0.0.1:PORT serving `directory` until the block ends; `prefix` runs it elsewhere (e.g.
    `ip netns exec NS`), always on that namespace's loopback."""
    argv = [*prefix, sys.executable, str(HTTPS_SERVER), str(directory), str(cert), str(key)]
    options = [*(["--cut", cut] if cut else []), *(["--redirect", redirect] if redirect else [])]
    proc = subprocess.Popen([*argv, *options], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = proc.stdout.readline().strip()
        assert port.isdigit(), f"https server did not start (exit {proc.poll()})"
        yield f"https://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()
