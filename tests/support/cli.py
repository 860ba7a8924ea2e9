"""Running the `splittun` command as a user would (splittun.lab.instance.run_cli), and what a user's mistake
looks like."""

from __future__ import annotations

import subprocess

from splittun.lab.instance import SPLITTUN, run_cli

__all__ = ["SPLITTUN", "assert_one_line_error", "splittun"]

#: The one way tests run the command (the lab driver's): `splittun(*args, home=…, ns=…)`.
splittun = run_cli


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
