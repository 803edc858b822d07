from __future__ import annotations

import pytest

from audsync.keys import derive_key, duplicate_keys, key_problem


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("Order Completed Last 30 Days", "order_completed_last_30_days"),
        ("High-Value Customers", "high_value_customers"),
        ("CamelCaseName", "camel_case_name"),
        ("  Spaces   Around  ", "spaces_around"),
        ("Revenue ($) in 180 days", "revenue_in_180_days"),
        ("Café Lovers", "cafe_lovers"),
        ("already_snake", "already_snake"),
        ("VIP", "vip"),
    ],
)
def test_derive_key(name: str, key: str) -> None:
    assert derive_key(name) == key


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("vip_buyers", None),
        ("order_completed_last_30days", None),
        ("a1", None),
        ("", "is empty"),
        ("Has-Caps", "must match"),
        ("with space", "must match"),
        ("email", "collides with the Gleap contact field"),
        ("name", "collides"),
        ("plan", "collides"),
        ("value", "collides"),
        ("lang", "collides"),
        ("phone", "collides"),
        ("userId", "must match"),
        ("userid", "collides"),
        ("companyname", "collides"),
        ("lastpageview", "collides"),
    ],
)
def test_key_problem(key: str, problem: str | None) -> None:
    found = key_problem(key)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


@pytest.mark.parametrize(
    ("keys", "dupes"),
    [
        (["a", "b", "c"], []),
        (["a", "b", "a"], ["a"]),
        (["a", "a", "a", "b", "b"], ["a", "b"]),
        ([], []),
    ],
)
def test_duplicate_keys(keys: list[str], dupes: list[str]) -> None:
    assert duplicate_keys(keys) == dupes
