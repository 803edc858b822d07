from __future__ import annotations

import bisect

import pytest

from audsync.pacing import Pacer, send_interval


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.mark.parametrize(
    ("limit", "window", "margin", "interval"),
    [(1000, 60, 1.0, 0.06), (1000, 60, 0.995, 0.06 / 0.995), (10, 1, 1.0, 0.1), (0, 60, 1.0, 0.0)],
)
def test_send_interval(limit: int, window: float, margin: float, interval: float) -> None:
    assert send_interval(limit, window, margin) == pytest.approx(interval)


@pytest.mark.parametrize(("limit", "window"), [(1000, 60.0), (10, 1.0), (7, 3.0)])
def test_no_window_ever_holds_more_than_the_limit(limit: int, window: float) -> None:
    clock = FakeClock()
    pacer = Pacer(limit, window, clock=clock, sleep=clock.sleep)
    sends = []
    for _ in range(limit * 3):
        pacer.acquire()
        sends.append(clock.now)
    for i, start in enumerate(sends):
        in_window = bisect.bisect_left(sends, start + window) - i
        assert in_window <= limit
    # ... and it uses the budget: within 1 % of limit per window.
    rate = (len(sends) - 1) / (sends[-1] - sends[0]) * window
    assert rate >= 0.99 * limit


def test_throttle_pauses_and_slows_then_recovers() -> None:
    clock = FakeClock()
    pacer = Pacer(100, 10.0, clock=clock, sleep=clock.sleep)
    pacer.acquire()
    pacer.throttle(5.0)
    pacer.acquire()
    assert clock.now >= 5.0
    assert pacer.rate_factor < 1.0
    assert pacer.throttled == 1
    for _ in range(2000):
        pacer.succeeded()
    assert pacer.rate_factor == pytest.approx(1.0)


def test_acquire_gives_up_when_stopped() -> None:
    clock = FakeClock()
    pacer = Pacer(1, 100.0, clock=clock, sleep=clock.sleep)
    assert pacer.acquire()
    assert pacer.acquire(stop=lambda: True) is False


def test_unlimited_never_waits() -> None:
    clock = FakeClock()
    pacer = Pacer(0, 60.0, clock=clock, sleep=clock.sleep)
    for _ in range(100):
        assert pacer.acquire()
    assert clock.now == 0.0
