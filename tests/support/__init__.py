"""What the unit and namespace tests share: the lab fixtures and leak check (lab.py), one splittun in a lab driven
through its CLI (e2e.py), the interceptor's and proxies' test helpers, fake netlink kernels, the CLI runner."""

from pathlib import Path

#: The repository: where `python -m actors.…` finds the code.
REPO = Path(__file__).resolve().parents[2]

#: Data files and helper programs the tests run (inside the lab, usually).
FIXTURES_DIR = Path(__file__).resolve().parents[1] / "fixtures"
