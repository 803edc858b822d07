from __future__ import annotations

import pytest

from audsync.errors import NoLatinForm
from audsync.keys import (
    choose_key,
    derive_key,
    duplicate_keys,
    foreign_letters,
    key_problem,
    legacy_key,
)


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
        # Latin letters are spelled out, never dropped (issue 13).
        ("Straße Kunden", "strasse_kunden"),
        ("Œuvre fans", "oeuvre_fans"),
        ("Ørsted customers", "orsted_customers"),
        ("Łódź users", "lodz_users"),
        ("Æsir fans", "aesir_fans"),
        ("Þórr", "thorr"),
        ("GROSSE Straße", "grosse_strasse"),
        ("VIP 🎉 buyers", "vip_buyers"),  # not a letter: a separator, as before
    ],
)
def test_derive_key(name: str, key: str) -> None:
    assert derive_key(name) == key


@pytest.mark.parametrize(
    ("name", "foreign"),
    [("日本 Users", "日本"), ("Москва", "Москва"), ("Straße", ""), ("Café", ""), ("🎉 x", "")],
)
def test_foreign_letters(name: str, foreign: str) -> None:
    assert foreign_letters(name) == foreign


@pytest.mark.parametrize(
    ("name", "stored", "key", "noted"),
    [
        ("Order Completed", set(), "order_completed", False),  # the rules agree
        ("Straße Kunden", set(), "strasse_kunden", False),  # new: the new rule
        ("Straße Kunden", {"strae_kunden"}, "strae_kunden", True),  # in a ledger: kept
        ("Straße Kunden", {"strasse_kunden"}, "strasse_kunden", False),
        # Both stored: the new key's rows are another definition's (review break).
        ("Straße Kunden", {"strae_kunden", "strasse_kunden"}, "strae_kunden", True),
        ("日本 Users", {"users"}, "users", True),
    ],
)
def test_choose_key(name: str, stored: set[str], key: str, noted: bool) -> None:
    chosen, note = choose_key(name, stored)
    assert chosen == key and (note is not None) == noted
    if note:
        assert repr(key) in note and f'set key = "{key}"' in note


def test_choose_key_refuses_letters_with_no_latin_form() -> None:
    with pytest.raises(NoLatinForm, match="'日本 Users' has letters with no Latin form"):
        choose_key("日本 Users", {"japan"})
    assert legacy_key("日本 Users") == "users"  # what the earlier rule silently made


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
