from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest

from audsync.source import INVALID_MARK, build_contact


@pytest.mark.parametrize(
    ("row", "contact"),
    [
        ({"email": "a@b.c"}, {"email": "a@b.c"}),
        ({"name": "Bob Stone", "first_name": "X"}, {"name": "Bob Stone"}),
        ({"first_name": "Bob", "last_name": "Stone"}, {"name": "Bob Stone"}),
        ({"first_name": "Bob", "last_name": None}, {"name": "Bob"}),
        ({"first_name": "Bob "}, {"name": "Bob"}),
        ({"first_name": None, "last_name": "Stone"}, {"name": "Stone"}),
        ({"first_name": None, "last_name": None}, {}),
        ({"first_name": "", "last_name": ""}, {}),
        ({"phone": "+49 1"}, {"phone": "+49 1"}),
        ({"company_name": "Acme", "company_id": 7}, {"companyName": "Acme", "companyId": "7"}),
        ({"lang": "de"}, {"lang": "de"}),
        ({"language": "fr"}, {"lang": "fr"}),
        ({"plan": "pro"}, {"plan": "pro"}),
        ({"user_value": Decimal("12.50")}, {"value": 12.5}),
        ({"user_value": "3"}, {"value": 3}),
        (
            {"signed_up_at": dt.datetime(2026, 1, 2, 3, 4, 5)},
            {"createdAt": "2026-01-02T03:04:05.000Z"},
        ),
        (
            {"last_seen_at": "2026-01-02T05:00:00+02:00"},
            {"lastActivity": "2026-01-02T03:00:00.000Z"},
        ),
        (
            {"last_page_view": "https://x.io/a", "last_seen_at": dt.datetime(2026, 1, 2)},
            {
                "lastActivity": "2026-01-02T00:00:00.000Z",
                "lastPageView": {"page": "https://x.io/a", "date": "2026-01-02T00:00:00.000Z"},
            },
        ),
        ({"last_page_view": "https://x.io/a"}, {"lastPageView": {"page": "https://x.io/a"}}),
        (
            {"tier": "gold", "score": 4.0, "active": True, "note": None},
            {"tier": "gold", "score": 4, "active": True, "note": None},
        ),
        ({"email": None}, {}),
    ],
)
def test_build_contact(row: dict[str, Any], contact: dict[str, Any]) -> None:
    assert build_contact(row) == contact


def test_unstorable_columns_are_reported_not_raised() -> None:
    contact = build_contact({"email": "a@b.c", "tags": ["x"], "meta": {"a": 1}})
    assert contact["email"] == "a@b.c"
    assert "column 'tags'" in contact[INVALID_MARK] and "column 'meta'" in contact[INVALID_MARK]


def test_trait_value_column_is_not_contact_data() -> None:
    assert build_contact({"value": 3, "email": "a@b.c"}, skip=("value",)) == {"email": "a@b.c"}
