"""Every exception audsync raises survives pickling: a library user's process pool,
multiprocessing or task queue gets the same error, message and fields back."""

from __future__ import annotations

import inspect
import pickle

import pytest

from audsync import errors

EXAMPLES: list[BaseException] = [
    errors.AudsyncError("something went wrong"),
    errors.ConfigError("audsync.toml", "gleap.rate_limit", "must be positive"),
    errors.ConfigError("AUDSYNC_CONFIG", "", "no such file"),
    errors.SourceError("vip", "no such table: people"),
    errors.SourceError("revenue", "no such column: value", kind="trait"),
    errors.StateError("the state DB is locked"),
    errors.StateMoved("the state DB moved"),
    errors.DriverMissing("pip install 'psycopg[binary]'"),
    errors.LeaseHeld("deliver is held by host:1"),
    errors.LeaseLost("deliver was taken over"),
    errors.Interrupted("interrupted"),
    errors.CallAbandoned("a call was in flight"),
    errors.GleapError("Gleap could not be used"),
    errors.GleapAuthError(401),
    errors.GleapUnavailable("HTTP 503 after 5 attempts"),
    errors.GleapRejectingAll("20 users in a row were rejected"),
    errors.UnstorableValue("a list"),
    errors.PayloadError("36 custom keys"),
    errors.ColumnProblem("two columns map to email"),
    errors.NoLatinForm("名前"),
    errors.CannotExpress("user_id of type bytes"),
]


def test_every_exception_class_has_an_example() -> None:
    defined = {
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, BaseException) and cls.__module__ == errors.__name__
    }
    assert {type(e) for e in EXAMPLES} == defined


@pytest.mark.parametrize("error", EXAMPLES, ids=lambda e: type(e).__name__)
def test_pickles_to_the_same_error(error: BaseException) -> None:
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error)
    assert str(again) == str(error)
    assert vars(again) == vars(error)
