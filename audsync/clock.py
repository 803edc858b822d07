"""Time, in one place so tests can freeze it."""

from __future__ import annotations

import datetime as dt


def utcnow() -> dt.datetime:
    """Naive UTC now: the state DB stores UTC without a zone on every backend."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def unix_seconds(moment: dt.datetime | None) -> float | None:
    """A naive UTC time (as the state DB stores it) as unix seconds."""
    if moment is None:
        return None
    return moment.replace(tzinfo=dt.UTC).timestamp()
