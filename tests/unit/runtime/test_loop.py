"""The loop building blocks both event loops (actors' and the proxies' data loop) share."""

from __future__ import annotations

import os
import select
import signal
import time

import pytest

from runtime.log import EventLog, LineBudget
from runtime.loop import Loop, Timers, Wakeup, until_slot


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


def test_a_sigterm_before_the_loop_runs_is_not_lost() -> None:
    """supervisord may stop an actor while it is still starting (installing rules, fetching snapshots):
    the signal arrives before `run()`, and the loop must end at once instead of running until SIGKILL."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    loop = Loop(EventLog("test-loop"))
    try:
        loop.install_signal_handlers()
        os.kill(os.getpid(), signal.SIGTERM)
        loop.call_later(2.0, lambda: loop.stop("gave up waiting"))
        loop.run()
        assert loop.stop_reason == "SIGTERM"
    finally:
        loop.close()
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def test_turn_end_runs_after_the_turns_work_before_the_loop_sleeps() -> None:
    """A publisher flushes at the end of a turn: after what the turn's timers and handlers did, before any
    wait (an event never sits out a sleep), and once more when the loop ends."""
    loop = Loop(EventLog("test-loop"))
    seen: list[str] = []
    try:
        loop.at_turn_end(lambda: seen.append("end"))
        loop.call_later(0.0, lambda: seen.append("work"))
        loop.call_later(0.05, lambda: (seen.append("later"), loop.stop("done")))
        loop.run()
    finally:
        loop.close()
    assert seen[:2] == ["work", "end"] and seen[-2:] == ["end", "end"] and "later" in seen
    assert seen.index("later") == len(seen) - 3  # the stopping turn still flushed (then the final one)


def test_until_slot_lands_every_process_on_the_same_wall_clock_instant() -> None:
    assert until_slot(5.0, now=100.0) == 5.0
    assert until_slot(5.0, now=102.0) == 3.0
    assert abs(until_slot(5.0, now=104.8) - 5.2) < 1e-9  # too close to the slot: the one after (no double beat)
    assert abs(until_slot(1.0, now=7.25) - 0.75) < 1e-9
    # two processes asking at different moments meet at the same instant
    assert abs((101.3 + until_slot(5.0, now=101.3)) - (103.9 + until_slot(5.0, now=103.9))) < 1e-9


def test_slot_timers_fire_on_the_wall_clocks_multiples_of_their_period(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes' idle work with the same period fires at the same instant, whenever each one started, and
    stays there after each tick (the next slot is taken from the wall clock again)."""
    wall = [100.03]
    mono = [5000.0]  # both clocks are the test's: a loaded machine's pauses cannot move them
    monkeypatch.setattr(time, "time", lambda: wall[0])
    monkeypatch.setattr(time, "monotonic", lambda: mono[0])
    timers = Timers()
    fired: list[float] = []
    timer = timers.call_every_slot(0.1, lambda: fired.append(wall[0]))
    assert abs((timer.when - mono[0]) - 0.07) < 1e-9  # at wall 100.1
    mono[0] += 0.10
    wall[0] = 100.13  # the slot came, and the wall clock says it is 30 ms late (a step, a slow tick)
    timers.run_due(lambda cb: cb())
    assert fired == [100.13]
    assert abs((timer.when - mono[0]) - 0.07) < 1e-9  # at wall 100.2 again, not 100.23
