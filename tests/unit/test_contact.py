"""The column map (audsync.contact) as a table of cases: names, refusals, one row's fields."""

from __future__ import annotations

import pytest

from audsync.contact import INVALID_MARK, build_contact, column_name, map_columns
from audsync.errors import ColumnProblem

KEYS = {"vip": "audience", "lifetime_value": "trait", "churn_risk": "audience"}


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ("email", "email"),
        ("EMAIL", "email"),
        ("Email", "email"),
        ("User_Id", "user_id"),
        ("testType", "testType"),
        ("TESTTYPE", "testtype"),
        ("TIER_2", "tier_2"),
        ("tier", "tier"),
        ("Tier", "Tier"),
        ("_1", "_1"),
    ],
)
def test_column_name(raw: str, name: str) -> None:
    assert column_name(raw) == name


@pytest.mark.parametrize(
    ("columns", "kind", "key", "problem"),
    [
        (["user_id", "tier"], "audience", "vip", None),
        (["USER_ID", "VALUE"], "trait", "lifetime_value", None),
        (["id"], "audience", "vip", "the query returns no user_id column (it returns: id)"),
        (["user_id"], "trait", "lifetime_value", "a trait query must return a value column"),
        (["user_id", "value"], "audience", "vip", "column 'value' is not Gleap's value field"),
        (["user_id", "Value"], "audience", "vip", "column 'Value' is not Gleap's value field"),
        (
            ["user_id", "lifetime_value"],
            "audience",
            "churn_risk",
            "column 'lifetime_value' has the key of trait 'lifetime_value'",
        ),
        (
            ["user_id", "value", "VIP"],
            "trait",
            "lifetime_value",
            "column 'VIP' has the key of audience 'vip'",
        ),
        (["user_id", "vip"], "audience", "vip", "column 'vip' has this audience's own key"),
        (["user_id", "createdAt"], "audience", "vip", "use 'signed_up_at' to set it"),
        (["user_id", "companyName"], "audience", "vip", "use 'company_name' to set it"),
        (["user_id", "tier", "Tier"], "audience", "vip", "columns 'tier' and 'Tier' are the same"),
        (["user_id", "email", "EMAIL"], "audience", "vip", "columns 'email' and 'EMAIL'"),
        (["user_id", "__invalid__"], "audience", "vip", "a name audsync reserves"),
        # SQLite's subquery renames a repeated name to NAME:1 (review break).
        (["user_id", "Email", "EMAIL:1"], "audience", "vip", "columns 'Email' and 'EMAIL:1'"),
        (["user_id", "user_id:1"], "audience", "vip", "columns 'user_id' and 'user_id:1'"),
        (["user_id", "tier", "Tier:2"], "audience", "vip", "columns 'tier' and 'Tier:2'"),
        (["user_id", "ratio:1"], "audience", "vip", None),  # no base column: a name
    ],
)
def test_map_columns_refuses(
    columns: list[str], kind: str, key: str, problem: str | None
) -> None:
    if problem is None:
        assert map_columns(columns, kind, key, KEYS).user_id_at == 0
        return
    with pytest.raises(ColumnProblem) as caught:
        map_columns(columns, kind, key, KEYS)
    assert problem in str(caught.value)


def test_map_columns_places() -> None:
    mapped = map_columns(["Email", "VALUE", "user_id", "testType"], "trait", "lifetime_value")
    assert (mapped.user_id_at, mapped.value_at) == (2, 1)
    assert mapped.contact_at == ((0, "email"), (3, "testType"))


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"user_value": "gold"}, "column 'user_value': 'gold' is not a number"),
        ({"user_value": True}, "column 'user_value': True is not a number"),
        ({"user_value": "nan"}, "column 'user_value': 'nan' is not a finite number"),
        ({"signed_up_at": "yesterday"}, "column 'signed_up_at': 'yesterday' is not a timestamp"),
        ({"last_seen_at": [1]}, "column 'last_seen_at': a list is not a timestamp"),
        ({"first_name": ["a"]}, "columns first_name/last_name: a list cannot be stored"),
        ({"last_page_view": {"a": 1}}, "column 'last_page_view': a dict cannot be stored"),
        ({"meta": ["a"]}, "column 'meta': a list cannot be stored"),
    ],
)
def test_build_contact_reports_unsendable_columns(row: dict[str, object], problem: str) -> None:
    assert problem in build_contact(row)[INVALID_MARK]
