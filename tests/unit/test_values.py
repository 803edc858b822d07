from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import pytest

from audsync.errors import UnstorableValue
from audsync.values import attribute, dumps, normalize_user_id, timestamp


@pytest.mark.parametrize(
    ("raw", "user_id"),
    [
        ("u1", "u1"),
        (42, "42"),
        (42.0, "42"),
        (Decimal("42"), "42"),
        (Decimal("42.000"), "42"),
        (4.5, "4.5"),
        (uuid.UUID(int=1), "00000000-0000-0000-0000-000000000001"),
        (b"bytes-id", "bytes-id"),
        (None, None),
        ("", None),
        ("   ", None),
        (True, None),
        (float("nan"), None),
        (" padded ", " padded "),
    ],
)
def test_normalize_user_id(raw: Any, user_id: str | None) -> None:
    assert normalize_user_id(raw) == user_id


@pytest.mark.parametrize(
    ("raw", "stored"),
    [
        (450, "450"),
        (450.0, "450"),
        (Decimal("450.00"), "450"),
        (Decimal("450.50"), "450.5"),
        (True, "true"),
        ("gold", '"gold"'),
        (None, "null"),
        (dt.datetime(2026, 1, 2, 3, 4, 5), '"2026-01-02T03:04:05.000Z"'),
        (dt.date(2026, 1, 2), '"2026-01-02"'),
    ],
)
def test_attribute_is_canonical(raw: Any, stored: str) -> None:
    assert dumps(attribute(raw)) == stored


@pytest.mark.parametrize("raw", [[1, 2], {"a": 1}, float("inf"), Decimal("NaN"), {1}, object()])
def test_attribute_rejects_what_gleap_cannot_store(raw: Any) -> None:
    with pytest.raises(UnstorableValue):
        attribute(raw)


@pytest.mark.parametrize(
    ("raw", "iso"),
    [
        (dt.datetime(2026, 11, 29, 10, 0), "2026-11-29T10:00:00.000Z"),
        (
            dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=2))),
            "2026-11-29T10:00:00.000Z",
        ),
        ("2026-11-29T12:00:00+02:00", "2026-11-29T10:00:00.000Z"),
        ("2026-11-29 10:00:00", "2026-11-29T10:00:00.000Z"),
        ("2026-11-29T10:00:00Z", "2026-11-29T10:00:00.000Z"),
        # Gleap's form keeps milliseconds: microseconds are cut, never rounded up.
        (dt.datetime(2022, 9, 28, 10, 11, 18, 156789), "2022-09-28T10:11:18.156Z"),
        (dt.datetime(2022, 9, 28, 10, 11, 18, 999999), "2022-09-28T10:11:18.999Z"),
        ("2022-09-28T10:11:18.156Z", "2022-09-28T10:11:18.156Z"),
        ("2022-09-28T12:11:18.1567+02:00", "2022-09-28T10:11:18.156Z"),
        (dt.date(2026, 11, 29), "2026-11-29T00:00:00.000Z"),
        ("2026-11-29", "2026-11-29T00:00:00.000Z"),
        (1_795_946_400, "2026-11-29T10:00:00.000Z"),
        (1_795_946_400.25, "2026-11-29T10:00:00.250Z"),
        (1_795_946_400_000, "2026-11-29T10:00:00.000Z"),
        (Decimal("1795946400"), "2026-11-29T10:00:00.000Z"),
        (None, None),
        ("", None),
    ],
)
def test_timestamp(raw: Any, iso: str | None) -> None:
    assert timestamp(raw) == iso


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("yesterday", "'yesterday' is not a timestamp (ISO 8601 expected"),
        ("2026-13-01", "'2026-13-01' is not a timestamp"),
        ("29/11/2026", "'29/11/2026' is not a timestamp"),
        (True, "a bool is not a timestamp"),
        (float("nan"), "nan is not a timestamp"),
        (10**20, "is not a timestamp (out of range)"),
        ([1], "a list is not a timestamp"),
    ],
)
def test_timestamp_refuses_what_is_not_a_point_in_time(raw: Any, reason: str) -> None:
    with pytest.raises(UnstorableValue) as caught:
        timestamp(raw)
    assert reason in str(caught.value)
