"""Run benchmark areas: `python -m bench [AREA ...]` (default: all)."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def areas() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name[: -len("_bench")] for m in pkgutil.iter_modules([str(here)]) if m.name.endswith("_bench"))


def main(argv: list[str]) -> int:
    wanted = argv or areas()
    unknown = sorted(set(wanted) - set(areas()))
    if unknown:
        print(f"unknown benchmark area(s): {', '.join(unknown)}; available: {', '.join(areas())}", file=sys.stderr)
        return 2
    status = 0
    for area in wanted:
        print(f"== {area} ==", flush=True)
        module = importlib.import_module(f"bench.{area}_bench")
        status |= module.main([])
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
