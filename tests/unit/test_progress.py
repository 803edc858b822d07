"""Progress of `audsync sync`: the pure decisions and the plain lines they make."""

from __future__ import annotations

import pytest

from audsync.progress import (
    LineProgress,
    PhaseState,
    choose_display,
    eta_seconds,
    observed_rate,
)


@pytest.mark.parametrize(
    ("choice", "terminal", "display"),
    [
        ("auto", True, "bars"),
        ("auto", False, "lines"),
        ("bars", False, "bars"),
        ("lines", True, "lines"),
        ("off", True, "off"),
    ],
)
def test_choose_display(choice: str, terminal: bool, display: str) -> None:
    assert choose_display(choice, terminal) == display


def test_choose_display_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="auto, bars, lines, off"):
        choose_display("fancy", True)


@pytest.mark.parametrize(
    ("completed", "elapsed", "done", "rate"),
    [
        (0, 10.0, False, None),  # nothing done yet
        (50, 1.0, False, None),  # too early to trust
        (50, 1.0, True, 50.0),  # a finished phase has its rate however short
        (50, 10.0, False, 5.0),
        (10, 0.0, True, None),
    ],
)
def test_observed_rate(completed: int, elapsed: float, done: bool, rate: float | None) -> None:
    assert observed_rate(completed, elapsed, done=done) == rate


@pytest.mark.parametrize(
    ("remaining", "rate", "budget", "eta"),
    [
        (None, 10.0, 16.0, None),  # unknown total
        (0, None, 16.0, 0.0),
        (160, None, 16.0, 10.0),  # no observed rate yet: the budget's pace
        (160, 32.0, 16.0, 10.0),  # faster than the budget allows: the budget wins
        (160, 8.0, 16.0, 20.0),  # slower than the budget (Gleap is slow): observed wins
        (100, 10.0, None, 10.0),  # rows of a query: no budget
        (100, None, None, None),
    ],
)
def test_eta_seconds(
    remaining: int | None, rate: float | None, budget: float | None, eta: float | None
) -> None:
    assert eta_seconds(remaining, rate, budget) == eta


def test_phase_line() -> None:
    state = PhaseState("delivering", "users", total=1000, completed=250, started=0.0, budget=16.0)
    assert state.line(10.0) == "delivering: 250/1,000 users (25%), 25.0/s, about 47s left"
    query = PhaseState("querying vip", "rows", total=None, completed=5000, started=0.0)
    assert query.line(1.0) == "querying vip: 5,000 rows"
    plans = PhaseState("planning", "audiences", total=4, completed=1, started=0.0, timed=False)
    assert plans.line(30.0) == "planning: 1/4 audiences (25%)"  # no rate, no ETA


def test_line_progress_writes_every_interval_even_while_stalled_and_at_the_end() -> None:
    now = [0.0]
    lines: list[str] = []
    progress = LineProgress(lines.append, interval=5.0, clock=lambda: now[0], ticker=False)
    progress.start("delivering", "delivering", total=100, unit="users", budget=10.0)
    now[0] = 3.0
    progress.update("delivering", 30)
    progress.tick()
    assert lines == []  # not yet five seconds
    now[0] = 5.0
    progress.tick()
    assert lines == ["delivering: 30/100 users (30%), 6.0/s, about 12s left"]
    now[0] = 10.0  # nothing moved: a stall still gets its line
    progress.tick()
    assert lines[-1] == "delivering: 30/100 users (30%), 3.0/s, about 23s left"
    now[0] = 12.0
    progress.update("delivering", 100)
    progress.finish("delivering")
    assert lines[-1] == "delivering: 100/100 users (100%), 8.3/s"
    progress.update("delivering", 120)  # after the end: ignored
    now[0] = 30.0
    progress.tick()
    assert len(lines) == 3
    progress.close()
