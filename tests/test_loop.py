"""The loop building blocks both event loops (actors' and the proxies' data loop) share."""

from __future__ import annotations

import select
import time

from messages.log import LineBudget
from messages.loop import Timers, Wakeup


def test_timers_fire_in_order_keep_their_cadence_and_never_replay_a_backlog() -> None:
    timers = Timers()
    fired: list[str] = []
    timers.call_later(0.0, lambda: fired.append("once"))
    tick = timers.call_every(0.05, lambda: fired.append("tick"), first=0.0)
    cancelled = timers.call_later(0.0, lambda: fired.append("never"))
    cancelled.cancel()
    assert timers.run_due(lambda cb: cb()) is not None
    assert fired == ["once", "tick"]
    time.sleep(0.2)  # four intervals late: the repeating timer fires once, not four times
    timers.run_due(lambda cb: cb())
    assert fired == ["once", "tick", "tick"]
    tick.cancel()
    time.sleep(0.06)  # a cancelled timer leaves the heap when it comes due, without firing
    assert timers.run_due(lambda cb: cb()) is None
    assert fired == ["once", "tick", "tick"]


def test_wakeup_runs_queued_callbacks_and_makes_its_fd_readable() -> None:
    wakeup = Wakeup()
    try:
        ran: list[int] = []
        assert not select.select([wakeup], [], [], 0)[0]
        wakeup.call_soon(lambda: ran.append(1))
        assert select.select([wakeup], [], [], 0)[0] and wakeup.pending
        wakeup.drain()
        assert not select.select([wakeup], [], [], 0)[0]
        wakeup.run_soon(lambda cb: cb())
        assert ran == [1] and not wakeup.pending
    finally:
        wakeup.close()


def test_line_budget_allows_a_few_lines_a_second() -> None:
    budget = LineBudget(3)
    assert [budget.allow() for _ in range(5)] == [True, True, True, False, False]
