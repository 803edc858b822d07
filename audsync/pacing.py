"""One request budget shared by every sender: ``limit`` calls per ``window`` seconds.

Sends are spaced evenly (window / limit apart) and a rolling log guarantees no
window of ``window`` seconds ever holds more than ``limit`` sends, whatever
the alignment of Gleap's own window. A 429 pauses everyone until its
Retry-After and lowers the rate; quiet time brings it back up (AIMD).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from audsync.defaults import DEFAULT_RATE_MARGIN


def send_interval(limit: int, window: float, margin: float = DEFAULT_RATE_MARGIN) -> float:
    """Seconds between two sends to stay under ``limit`` per ``window`` (0 = unlimited)."""
    if limit <= 0 or window <= 0:
        return 0.0
    return window / (limit * margin)


def budget_seconds(calls: int, limit: int, window: float) -> float:
    """How long ``calls`` take at ``limit`` calls per ``window`` seconds: the one ETA
    that ``status``, ``check``, a dry run and the report all quote (0 = unlimited)."""
    if limit <= 0:
        return 0.0
    return calls * window / limit


class Pacer:
    """Thread-safe pacing under one budget. ``acquire()`` blocks until a send may go."""

    def __init__(
        self,
        limit: int,
        window: float,
        *,
        margin: float = DEFAULT_RATE_MARGIN,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.limit = limit
        self.window = window
        self._base_interval = send_interval(limit, window, margin)
        self._interval = self._base_interval
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next_slot = 0.0
        self._paused_until = 0.0
        self._sent: deque[float] = deque(maxlen=limit if limit > 0 else 1)
        self.throttled = 0

    @property
    def rate_factor(self) -> float:
        """Current rate as a fraction of the configured budget (1.0 = full speed)."""
        if self._interval == 0:
            return 1.0
        return self._base_interval / self._interval

    def acquire(self, stop: Callable[[], bool] | None = None) -> bool:
        """Wait for the next slot; False when ``stop()`` became true while waiting."""
        if self._base_interval == 0:
            return True
        with self._lock:
            now = self._clock()
            slot = max(now, self._next_slot, self._paused_until)
            if len(self._sent) == self.limit:
                # The send `limit` ago must have left the rolling window.
                slot = max(slot, self._sent[0] + self.window)
            self._next_slot = slot + self._interval
            self._sent.append(slot)
        while True:
            delay = slot - self._clock()
            if delay <= 0:
                return True
            if stop is not None and stop():
                return False
            self._sleep(min(delay, 0.25))

    def throttle(self, retry_after: float) -> None:
        """Gleap said 429: everyone waits ``retry_after``; the first 429 of an episode
        also drops the rate by a fifth."""
        with self._lock:
            self.throttled += 1
            now = self._clock()
            # Calls already in flight all meet the same full window: one slow-down
            # per episode, not one per 429, or the rate collapses.
            first_of_episode = now >= self._paused_until
            self._paused_until = max(self._paused_until, now + retry_after)
            if self._interval and first_of_episode:
                self._interval = min(self._interval * 1.25, self._base_interval * 20)

    def succeeded(self) -> None:
        """A 2xx: creep back towards the configured rate."""
        if self._interval > self._base_interval:
            with self._lock:
                self._interval = max(self._base_interval, self._interval * 0.995)
