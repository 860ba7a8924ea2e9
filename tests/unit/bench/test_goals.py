"""`make bench` ends with the data-path goal table: every goal in the issue's order, this run's numbers, and
for an area that did not run, the command that measures it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench import goals


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    saved = dict(goals._measured)
    goals._measured.clear()
    yield
    goals._measured.clear()
    goals._measured.update(saved)


def test_the_table_lists_every_goal_with_this_runs_numbers_or_how_to_get_them() -> None:
    assert not goals.recorded()
    goals.record(goals.IDLE_CPU, "0.43 % (10 processes)", True)
    goals.record(goals.PROXY_UDP_SESSIONS, "4,648/s", False)
    lines = goals.table().splitlines()
    assert len(lines) == 2 + len(goals.GOALS) and goals.recorded()
    assert "| idle CPU, all processes | 0.43 % (10 processes) | ≤ 0.5 % of a core | yes |" in lines
    assert "| proxy path: UDP new sessions/s | 4,648/s | ≥ 10,000/s | **no** |" in lines
    assert any("not run (`python -m bench interceptor`)" in line for line in lines)


def test_a_measure_that_is_not_a_goal_is_refused() -> None:
    with pytest.raises(KeyError, match="not a goal measure"):
        goals.record("connections per fortnight", "1", True)
