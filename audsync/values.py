"""Normalising values from any SQL engine into what Gleap and the ledger store.

Canonical JSON text is the ledger's currency: the same value read from SQLite,
PostgreSQL or DuckDB must produce the same text, or a resync would see changes
that are not there (``450``, ``450.0`` and ``Decimal('450.00')`` are all ``450``).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import uuid
from decimal import Decimal
from typing import Any

from audsync.defaults import MAX_USER_ID_LENGTH
from audsync.errors import UnstorableValue

JSON_TRUE = "true"
JSON_FALSE = "false"
JSON_NULL = "null"


def dumps(value: Any) -> str:
    """Canonical compact JSON."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def normalize_user_id(raw: Any) -> str | None:
    """The user id as Gleap's string, or None when the row has no usable id.

    Numbers become their plain decimal text (``42``, ``42.0`` and ``Decimal(42)``
    are all ``"42"``), so an id typed as integer in one engine and float in
    another still names one user.
    """
    kind = type(raw)
    if kind is int:  # the common cases first: this runs once per row
        return str(raw)
    if kind is str:
        return raw if raw.strip() else None
    if raw is None or isinstance(raw, bool):
        return None
    if isinstance(raw, str):
        return raw if raw.strip() else None
    if isinstance(raw, int):
        return str(raw)
    if isinstance(raw, float):
        if not math.isfinite(raw):
            return None
        return str(int(raw)) if raw.is_integer() else repr(raw)
    if isinstance(raw, Decimal):
        if not raw.is_finite():
            return None
        return str(int(raw)) if raw == raw.to_integral_value() else str(raw.normalize())
    if isinstance(raw, uuid.UUID):
        return str(raw)
    if isinstance(raw, bytes):
        text = raw.decode("utf-8", errors="replace")
        return text if text.strip() else None
    text = str(raw)
    return text if text.strip() else None


# C0 and C1 control characters (NUL among them) and lone surrogates. PostgreSQL
# refuses NUL in text and cannot encode a lone surrogate; the others would name
# a Gleap contact nobody can type or see.
_UNUSABLE_ID_CHAR = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")

ID_TOO_LONG = f"longer than {MAX_USER_ID_LENGTH} characters"
ID_HAS_NUL = "contains a NUL character"
ID_HAS_CONTROL = "contains a control character"
ID_NOT_UNICODE = "is not valid Unicode (a lone surrogate)"


def user_id_problem(user_id: str) -> str | None:
    """Why a normalised user id cannot be stored or sent, or None when it can.

    One of the ``ID_*`` reasons above, so a run can count its invalid ids by reason.
    """
    if len(user_id) > MAX_USER_ID_LENGTH:
        return ID_TOO_LONG
    found = _UNUSABLE_ID_CHAR.search(user_id)
    if found is None:
        return None
    char = found.group()
    if char == "\x00":
        return ID_HAS_NUL
    return ID_NOT_UNICODE if "\ud800" <= char <= "\udfff" else ID_HAS_CONTROL


def iso_utc(value: dt.datetime | dt.date) -> str:
    """Gleap's date form, ``2022-09-28T10:11:18.156Z``: UTC, milliseconds, a ``Z``.

    Naive datetimes are taken to be UTC already; a date is its midnight UTC.
    Microseconds are cut to milliseconds (never rounded into the next second).
    """
    if not isinstance(value, dt.datetime):
        value = dt.datetime(value.year, value.month, value.day)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    value = value.astimezone(dt.UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def timestamp(value: Any) -> str | None:
    """A column value that should be a point in time, in Gleap's form (:func:`iso_utc`).

    Accepts datetimes, dates, Unix seconds or milliseconds, and ISO 8601 text;
    raises UnstorableValue for anything else (``'yesterday'``), so the user's
    change fails with that reason instead of Gleap storing text as a date.
    """
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime | dt.date):
        return iso_utc(value)
    if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        number = float(value)
        if not math.isfinite(number):
            raise UnstorableValue(f"{value!r} is not a timestamp")
        # Unix seconds, or milliseconds when the number is too large for seconds.
        seconds = number / 1000 if abs(number) > 1e11 else number
        try:
            return iso_utc(dt.datetime.fromtimestamp(seconds, dt.UTC))
        except (OverflowError, OSError, ValueError):
            raise UnstorableValue(f"{value!r} is not a timestamp (out of range)") from None
    if isinstance(value, str):
        text = value.strip()
        try:
            parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise UnstorableValue(
                f"{checked_text(value)[:60]!r} is not a timestamp (ISO 8601 expected,"
                " e.g. 2022-09-28T10:11:18Z)"
            ) from None
        return iso_utc(parsed)
    raise UnstorableValue(f"a {type(value).__name__} is not a timestamp")


def checked_text(value: str) -> str:
    """``value`` when it can be sent as UTF-8; UnstorableValue when it holds bytes
    that were not UTF-8 in the source (decoded as lone surrogates)."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise UnstorableValue("is not valid UTF-8 text") from None
    return value


def attribute(value: Any) -> Any:
    """A value Gleap can store as a custom attribute: string, number, boolean or null.

    Raises UnstorableValue for lists, objects and non-finite numbers.
    """
    if isinstance(value, str):
        return checked_text(value)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UnstorableValue(f"{value!r} is not a finite number")
        return int(value) if value.is_integer() and abs(value) < 2**53 else value
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise UnstorableValue(f"{value} is not a finite number")
        if value == value.to_integral_value():
            return int(value)
        return float(value)
    if isinstance(value, dt.datetime):
        return iso_utc(value)
    if isinstance(value, dt.date):
        return value.isoformat()  # a calendar date: no time of day to invent
    if isinstance(value, dt.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, list | tuple | dict | set):
        raise UnstorableValue(f"a {type(value).__name__} cannot be stored in a Gleap attribute")
    raise UnstorableValue(f"a {type(value).__name__} cannot be stored in a Gleap attribute")
