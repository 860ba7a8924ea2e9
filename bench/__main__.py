"""Run benchmark areas: `python -m bench [AREA ...]` (default: all), or one area with its own options:
`python -m bench proxy --seconds 3 --only bulk` (`python -m bench proxy --help` lists them). After the areas
it prints the data-path goal table with this run's numbers (bench/goals.py)."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

from bench import goals


def areas() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name[: -len("_bench")] for m in pkgutil.iter_modules([str(here)]) if m.name.endswith("_bench"))


def main(argv: list[str]) -> int:
    first_option = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    wanted, options = argv[:first_option] or areas(), argv[first_option:]
    if options and len(wanted) != 1:
        print("options go to one area: python -m bench AREA [OPTIONS]", file=sys.stderr)
        return 2
    unknown = sorted(set(wanted) - set(areas()))
    if unknown:
        print(f"unknown benchmark area(s): {', '.join(unknown)}; available: {', '.join(areas())}", file=sys.stderr)
        return 2
    status = 0
    for area in wanted:
        print(f"== {area} ==", flush=True)
        module = importlib.import_module(f"bench.{area}_bench")
        status |= module.main(options)
    if goals.recorded():
        print("== goals (this run) ==")
        print(goals.table())
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
