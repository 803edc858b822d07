"""Progress of a manual sync: live bars in a terminal, a plain line every few seconds in a pipe.

Three phases, each with counts, a rate and an ETA:

* ``querying`` — rows streamed from an audience's query (against the last
  plan's member count, when there was one);
* ``planning`` — audiences and traits planned, of those asked for;
* ``delivering`` — users whose call is done, of those pending. Its ETA never
  promises more than the rate budget allows: early on, or when Gleap is fast,
  the budget is what limits delivery.

The decisions (which display, what rate and ETA) are pure functions; the
displays only draw.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Literal

from rich.console import Console
from rich.progress import (
    BarColumn,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
)
from rich.progress import Progress as RichProgress
from rich.table import Column
from rich.text import Text

from audsync.defaults import DEFAULT_LINE_INTERVAL
from audsync.text_tables import duration

Phase = Literal["querying", "planning", "delivering", "reading"]
Display = Literal["bars", "lines", "off"]

PROGRESS_CHOICES = ("auto", "bars", "lines", "off")


MIN_ELAPSED_FOR_RATE = 2.0
"""Seconds of a phase before its observed rate is trusted over the budget."""


def choose_display(choice: str, is_terminal: bool) -> Display:
    """``auto`` draws bars in a terminal and plain lines anywhere else."""
    if choice == "auto":
        return "bars" if is_terminal else "lines"
    if choice in ("bars", "lines", "off"):
        return choice  # type: ignore[return-value]
    raise ValueError(f"progress must be one of {', '.join(PROGRESS_CHOICES)}, not {choice!r}")


def observed_rate(completed: int, elapsed: float, *, done: bool = False) -> float | None:
    """Units per second, or None while too little has happened to tell.

    A finished phase has its final rate, however short it was.
    """
    if completed <= 0 or elapsed <= 0 or (elapsed < MIN_ELAPSED_FOR_RATE and not done):
        return None
    return completed / elapsed


def eta_seconds(remaining: int | None, rate: float | None, budget: float | None) -> float | None:
    """Seconds left at the slower of the observed rate and the budget (when there is one)."""
    if remaining is None:
        return None
    if remaining <= 0:
        return 0.0
    candidates = [r for r in (rate, budget) if r is not None and r > 0]
    if not candidates:
        return None
    return remaining / min(candidates)


@dataclass
class PhaseState:
    """Where one phase stands."""

    label: str
    unit: str
    total: int | None
    completed: int = 0
    started: float = 0.0
    budget: float | None = None  # units per second the rate budget allows
    timed: bool = True  # False where a rate means nothing (audiences per second)
    ended: float | None = None

    @property
    def done(self) -> bool:
        return self.ended is not None

    def rate(self, now: float) -> float | None:
        if not self.timed:
            return None
        end = now if self.ended is None else self.ended
        return observed_rate(self.completed, end - self.started, done=self.done)

    def eta(self, now: float) -> float | None:
        if self.done:
            return None
        remaining = None if self.total is None else self.total - self.completed
        return eta_seconds(remaining, self.rate(now), self.budget)

    def line(self, now: float) -> str:
        """The phase as one line of text: label, counts, rate, ETA."""
        if self.total is None:
            text = f"{self.label}: {self.completed:,} {self.unit}"
        else:
            share = self.completed / self.total if self.total else 1.0
            text = f"{self.label}: {self.completed:,}/{self.total:,} {self.unit} ({share:.0%})"
        rate = self.rate(now)
        if rate is not None:
            text += f", {rate:,.1f}/s"
        eta = self.eta(now)
        if eta is not None and self.total is not None and self.completed < self.total:
            text += f", about {duration(eta)} left"
        return text


class Progress:
    """Receives progress and draws nothing; the displays below draw it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.phases: dict[Phase, PhaseState] = {}
        self._lock = threading.Lock()

    def start(
        self,
        phase: Phase,
        label: str,
        *,
        total: int | None = None,
        unit: str = "rows",
        budget: float | None = None,
        timed: bool = True,
    ) -> None:
        """Begin (or begin again) ``phase``; ``timed`` off shows no rate or ETA."""
        with self._lock:
            state = PhaseState(label, unit, total, 0, self.clock(), budget, timed=timed)
            self.phases[phase] = state
            self._started(phase, state)

    def update(self, phase: Phase, completed: int, *, total: int | None = None) -> None:
        """``completed`` units of ``phase`` are done (and the total may have changed)."""
        with self._lock:
            state = self.phases.get(phase)
            if state is None or state.done:
                return
            state.completed = completed
            if total is not None:
                state.total = total
            self._updated(phase, state)

    def finish(self, phase: Phase) -> None:
        """``phase`` is over, complete or not."""
        with self._lock:
            state = self.phases.get(phase)
            if state is None or state.done:
                return
            state.ended = self.clock()
            self._finished(phase, state)

    def close(self) -> None:
        """Stop drawing."""

    def _started(self, phase: Phase, state: PhaseState) -> None:
        pass

    def _updated(self, phase: Phase, state: PhaseState) -> None:
        pass

    def _finished(self, phase: Phase, state: PhaseState) -> None:
        pass

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LineProgress(Progress):
    """A plain line per running phase every ``interval`` seconds, and one when it ends.

    Lines keep coming while nothing moves (Gleap asked us to wait), so a log
    shows a stall as a stall. With ``ticker`` off, :meth:`tick` is called by hand.
    """

    def __init__(
        self,
        write: Callable[[str], None],
        interval: float = DEFAULT_LINE_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        *,
        ticker: bool = True,
    ) -> None:
        super().__init__(clock)
        self.write = write
        self.interval = interval
        self._last: dict[Phase, float] = {}
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        if ticker:
            self._thread = threading.Thread(target=self._tick_loop, daemon=True)
            self._thread.start()

    def tick(self) -> None:
        """Write a line for every running phase whose last line is ``interval`` old."""
        with self._lock:
            now = self.clock()
            for phase, state in self.phases.items():
                if not state.done and now - self._last.get(phase, state.started) >= self.interval:
                    self._last[phase] = now
                    self.write(state.line(now))

    def _finished(self, phase: Phase, state: PhaseState) -> None:
        assert state.ended is not None
        self._last[phase] = state.ended
        self.write(state.line(state.ended))

    def _tick_loop(self) -> None:
        while not self._closed.wait(min(self.interval / 5, 1.0)):
            self.tick()

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join()


class _LiveColumn(ProgressColumn):
    """Rate or ETA worked out at each refresh, so both keep moving during a stall."""

    def __init__(
        self,
        what: Literal["rate", "eta"],
        clock: Callable[[], float],
        table_column: Column | None = None,
    ) -> None:
        super().__init__(table_column=table_column)
        self.what = what
        self.clock = clock

    def render(self, task: Task) -> Text:
        state: PhaseState | None = task.fields.get("state")
        if state is None:
            return Text("")
        now = self.clock()
        if self.what == "rate":
            rate = state.rate(now)
            return Text(
                f"{rate:,.1f}/s" if rate is not None else "",
                style="progress.data.speed",
                no_wrap=True,
            )
        eta = state.eta(now)
        return Text(
            f"ETA {duration(eta)}" if eta is not None else "",
            style="progress.remaining",
            no_wrap=True,
        )


class _CountsColumn(ProgressColumn):
    """``1,234/5,000 users``: whole, with thousands separators, never cut or wrapped."""

    def render(self, task: Task) -> Text:
        state: PhaseState | None = task.fields.get("state")
        if state is None:
            return Text("")
        if state.total is None:
            text = f"{state.completed:,} {state.unit}"
        else:
            text = f"{state.completed:,}/{state.total:,} {state.unit}"
        return Text(text, style="progress.download", no_wrap=True, overflow="ignore")


class _SyncConsole(Console):
    def on_broken_pipe(self) -> None:
        # rich exits the program here; a sync must go on without its reader.
        self.quiet = True


class BarProgress(Progress):
    """Live bars drawn by rich; log lines printed meanwhile appear above them."""

    def __init__(self, stream: IO[str], clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock)
        # Numbers are never cut: when the terminal is narrow (80 columns and a
        # million members) the label gives way first (ending in "…"), then the bar.
        self._bars = RichProgress(
            TextColumn(
                "{task.description}",
                table_column=Column(no_wrap=True, overflow="ellipsis", ratio=2, min_width=8),
            ),
            BarColumn(bar_width=None, table_column=Column(ratio=1, min_width=3)),
            _CountsColumn(table_column=Column(no_wrap=True)),
            _LiveColumn("rate", clock, table_column=Column(no_wrap=True)),
            _LiveColumn("eta", clock, table_column=Column(no_wrap=True)),
            console=_SyncConsole(file=stream),
            expand=True,
        )
        self._tasks: dict[Phase, TaskID] = {}
        self._bars.start()

    def _started(self, phase: Phase, state: PhaseState) -> None:
        # A phase started again (the next audience's query) gets a bar of its
        # own; the finished one stays on screen with its counts.
        self._tasks[phase] = self._bars.add_task(
            state.label, total=state.total, unit=state.unit, state=state
        )

    def _updated(self, phase: Phase, state: PhaseState) -> None:
        self._bars.update(self._tasks[phase], total=state.total, completed=state.completed)

    def _finished(self, phase: Phase, state: PhaseState) -> None:
        total = state.completed if state.total is None else state.total
        self._bars.update(self._tasks[phase], total=total, completed=state.completed)
        self._bars.stop_task(self._tasks[phase])

    def close(self) -> None:
        self._bars.stop()


def make_progress(choice: str, stream: IO[str]) -> Progress:
    """The display ``choice`` calls for on ``stream`` (bars only on a terminal with auto)."""
    display = choose_display(choice, stream.isatty())
    if display == "bars":
        return BarProgress(stream)
    if display == "lines":
        return LineProgress(_quiet_on_broken_pipe(stream))
    return Progress()


def _quiet_on_broken_pipe(stream: IO[str]) -> Callable[[str], None]:
    """Print lines until the reader goes away (``| head``); then stay quiet, for the
    sync must go on whether or not anyone still reads its progress."""
    gone = False

    def write(line: str) -> None:
        nonlocal gone
        if gone:
            return
        try:
            print(line, file=stream, flush=True)
        except (BrokenPipeError, ValueError):  # ValueError: the stream was closed
            gone = True

    return write
