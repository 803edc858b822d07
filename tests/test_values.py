from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import pytest

from audsync.values import UnstorableValue, attribute, dumps, normalize_user_id, timestamp


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
        (dt.datetime(2026, 1, 2, 3, 4, 5), '"2026-01-02T03:04:05Z"'),
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
        (dt.datetime(2026, 11, 29, 10, 0), "2026-11-29T10:00:00Z"),
        (
            dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=2))),
            "2026-11-29T10:00:00Z",
        ),
        ("2026-11-29T12:00:00+02:00", "2026-11-29T10:00:00Z"),
        ("2026-11-29 10:00:00", "2026-11-29T10:00:00Z"),
        ("2026-11-29T10:00:00Z", "2026-11-29T10:00:00Z"),
        (dt.date(2026, 11, 29), "2026-11-29"),
        (1_795_946_400, "2026-11-29T10:00:00Z"),
        (1_795_946_400_000, "2026-11-29T10:00:00Z"),
        (None, None),
        ("", None),
        ("not a date", "not a date"),
    ],
)
def test_timestamp(raw: Any, iso: str | None) -> None:
    assert timestamp(raw) == iso
