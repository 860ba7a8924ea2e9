"""Benchmarks. Each `bench/<area>_bench.py` has `main(argv) -> int` and prints a table.

`python -m bench` (or `make bench`) runs every area; `python -m bench netenv proxy` runs some;
`python -m bench proxy --only bulk` passes options to one area.
Results, with date and machine, are recorded in bench/RESULTS.md. Goals are met here, never as timed
assertions in tests: this machine is shared and noisy, so comparisons are side by side in one run.
"""
