"""Running the `splittun` command as a user would: inside a namespace, with a home, output captured."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SPLITTUN = [sys.executable, "-m", "splittun.cli"]


def splittun(
    *args: str, home: Path | None = None, ns: str | None = None, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the splittun CLI (inside `ns` when given) and capture its output."""
    full_env = dict(os.environ)
    full_env.pop("SPLITTUN_RUN_DIR", None)
    if home is not None:
        full_env["SPLITTUN_HOME"] = str(home)
    full_env.update(env or {})
    argv = [*(["ip", "netns", "exec", ns] if ns else []), *SPLITTUN, *args]
    return subprocess.run(argv, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def assert_one_line_error(
    result: subprocess.CompletedProcess[str], code: int | None = None, contains: str = ""
) -> None:
    """A user's mistake: a non-zero exit and exactly one `splittun: …` line, never a traceback."""
    assert result.returncode != 0
    if code is not None:
        assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert lines[0].startswith("splittun: ")
    assert contains in lines[0], lines[0]
