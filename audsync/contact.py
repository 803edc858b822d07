"""Query columns -> Gleap contact fields: the column map, decided without I/O.

One place decides what a result column means (README's column table,
docs/gleap-contract.md): which columns are recognised (``user_id``,
``email``, ``first_name`` ...), how a column's name is spelled when it is a
custom attribute, which columns a query may not return, and how one row's
values become the contact fields of its user's Identify call.

Name rule: a recognised column matches case-insensitively (``EMAIL``,
``Email``, ``email``); any other column is a custom attribute that keeps its
name as written (``"testType"`` stays ``testType``), except that an all
upper-case name (``TESTTYPE``, how Snowflake and Oracle report unquoted
identifiers) is taken as case-insensitive and lowered, the way SQLAlchemy's
dialects normalise names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from audsync.defaults import GLEAP_CONTACT_FIELDS
from audsync.errors import ColumnProblem, UnstorableValue
from audsync.values import attribute, checked_text, timestamp

INVALID_MARK = "__invalid__"
"""Contact key carrying why a user's row holds a value Gleap cannot store."""

USER_ID = "user_id"
TRAIT_VALUE = "value"

# Query column -> Gleap contact field, for the plain string fields.
STRING_FIELDS = {
    "email": "email",
    "phone": "phone",
    "company_name": "companyName",
    "company_id": "companyId",
    "lang": "lang",
    "language": "lang",
    "plan": "plan",
}
NAME_PARTS = ("first_name", "last_name")
CONTACT_COLUMNS = frozenset(
    {
        "name",
        "user_value",
        "signed_up_at",
        "last_seen_at",
        "last_page_view",
        *STRING_FIELDS,
        *NAME_PARTS,
    }
)
"""Columns mapped to a Gleap contact field (matched case-insensitively)."""

RECOGNISED_COLUMNS = frozenset({USER_ID, TRAIT_VALUE, *CONTACT_COLUMNS})
"""Every column name with a meaning of its own; the rest are custom attributes."""

# Gleap's own fields that are not also a column name: a column spelled like one
# (``createdAt``, ``companyname``) would be sent as Gleap's field unconverted, or
# look like it in Gleap's UI. The recognised column is the way to fill it.
_GLEAP_FIELD_HINTS = {
    "userid": "user_id",
    "companyname": "company_name",
    "companyid": "company_id",
    "createdat": "signed_up_at",
    "lastactivity": "last_seen_at",
    "lastpageview": "last_page_view",
}
assert {f.lower() for f in GLEAP_CONTACT_FIELDS} <= {
    *_GLEAP_FIELD_HINTS,
    *RECOGNISED_COLUMNS,
}, "every Gleap field is either a column or has a hint"


def column_name(raw: str) -> str:
    """How a result column is named from here on: recognised and all upper-case
    names lowered, any other name exactly as the query wrote it."""
    lowered = raw.lower()
    if lowered in RECOGNISED_COLUMNS or raw.isupper():
        return lowered
    return raw


@dataclass(frozen=True)
class ColumnMap:
    """Where one query's columns go, decided once per query (not once per row)."""

    user_id_at: int
    value_at: int  # -1 for an audience
    contact_at: tuple[tuple[int, str], ...]  # (position, column name) of contact columns


def map_columns(
    columns: Sequence[str],
    kind: str,
    key: str,
    keys: Mapping[str, str] | None = None,
) -> ColumnMap:
    """The column map of a query of ``kind`` ("audience"/"trait") for ``key``.

    ``keys`` maps every audience and trait key to its kind. Raises ColumnProblem
    when the query has no ``user_id`` (or no ``value`` for a trait), returns
    ``value`` from an audience, names a column like Gleap's own field, like an
    audience's or trait's key (it would overwrite what that key's ledger says
    Gleap holds), or returns two columns that are one name under the rule above.
    """
    names = [column_name(c) for c in columns]
    returned = ", ".join(columns)
    if USER_ID not in names:
        raise ColumnProblem(f"the query returns no user_id column (it returns: {returned})")
    if kind == "trait" and TRAIT_VALUE not in names:
        raise ColumnProblem(f"a trait query must return a value column (it returns: {returned})")
    seen: dict[str, str] = {}
    every = {name.lower() for name in names}
    for raw, name in zip(columns, names, strict=True):
        folded = name.lower()
        # SQLite renames a repeated name in a subquery's result to NAME:1
        # (audsync reads every query as a subquery): still the same attribute.
        base, colon, digits = folded.rpartition(":")
        if colon and digits.isdigit() and base in every:
            folded = base
        if folded in seen:
            raise ColumnProblem(
                f"columns {seen[folded]!r} and {raw!r} are the same attribute"
                " (names differing only in case); rename one"
            )
        seen[folded] = raw
    for raw, name in zip(columns, names, strict=True):
        problem = column_problem(raw, name, kind, key, keys or {})
        if problem:
            raise ColumnProblem(problem)
    user_id_at = names.index(USER_ID)
    value_at = names.index(TRAIT_VALUE) if kind == "trait" else -1
    contact_at = tuple((i, name) for i, name in enumerate(names) if i not in (user_id_at, value_at))
    return ColumnMap(user_id_at, value_at, contact_at)


def column_problem(raw: str, name: str, kind: str, key: str, keys: Mapping[str, str]) -> str | None:
    """Why the column ``raw`` (named ``name``) cannot be in a ``kind`` query of ``key``."""
    folded = name.lower()
    if folded == INVALID_MARK:
        return f"column {raw!r} has a name audsync reserves; rename it"
    if folded == TRAIT_VALUE and kind != "trait":
        return (
            f"column {raw!r} is not Gleap's value field: Gleap's value comes from a"
            " user_value column (a number); rename it"
        )
    hint = _GLEAP_FIELD_HINTS.get(folded)
    if hint:
        return f"column {raw!r} is spelled like Gleap's own contact field; use {hint!r} to set it"
    if folded in RECOGNISED_COLUMNS:
        return None
    for other, other_kind in keys.items():
        if other.lower() == folded:
            whose = (
                f"this {kind}'s own key" if other == key else f"the key of {other_kind} {other!r}"
            )
            return (
                f"column {raw!r} has {whose}: it would overwrite that attribute in Gleap;"
                " rename the column"
            )
    return None


def build_contact(row: Mapping[str, Any], skip: Sequence[str] = ()) -> dict[str, Any]:
    """Gleap contact fields and custom attributes from one row's columns (docs/gleap-contract.md).

    ``row`` is keyed by :func:`column_name`. ``skip`` names columns that are not
    contact data (``value`` of a trait). A value Gleap cannot store is not
    raised: it is reported under INVALID_MARK, naming the column, so the one
    change fails with a reason and everything else goes on.
    """
    contact: dict[str, Any] = {}
    problems: list[str] = []

    def put(field_name: str, column: str, convert: Any) -> None:
        try:
            converted = convert(row[column])
        except (UnstorableValue, ValueError, TypeError) as exc:
            problems.append(f"column {column!r}: {exc}")
            return
        if converted is not None and converted != "":
            contact[field_name] = converted

    for column, field_name in STRING_FIELDS.items():
        if column in row and field_name not in contact:
            put(field_name, column, as_text)
    if "name" in row and row["name"] not in (None, ""):
        put("name", "name", as_text)
    else:
        try:
            parts = [as_text(row.get(p)) for p in NAME_PARTS]
        except (UnstorableValue, ValueError, TypeError) as exc:
            problems.append(f"columns first_name/last_name: {exc}")
            parts = []
        joined = " ".join(p.strip() for p in parts if p and p.strip())
        if joined:
            contact["name"] = joined
    if "user_value" in row:
        put("value", "user_value", as_number)
    if "signed_up_at" in row:
        put("createdAt", "signed_up_at", timestamp)
    if "last_seen_at" in row:
        put("lastActivity", "last_seen_at", timestamp)
    if "last_page_view" in row:
        try:
            page = as_text(row["last_page_view"])
        except (UnstorableValue, ValueError, TypeError) as exc:
            problems.append(f"column 'last_page_view': {exc}")
            page = None
        if page:
            view: dict[str, Any] = {"page": page}
            if contact.get("lastActivity"):
                view["date"] = contact["lastActivity"]
            contact["lastPageView"] = view
    for column, value in row.items():
        if column in RECOGNISED_COLUMNS or column in skip:
            continue
        try:
            contact[column] = attribute(value)
        except UnstorableValue as exc:
            problems.append(f"column {column!r}: {exc}")
    if problems:
        contact[INVALID_MARK] = "; ".join(problems)
    return contact


def as_text(value: Any) -> str | None:
    """A contact field's text: strings as they are, numbers and the like as their text."""
    if value is None:
        return None
    if isinstance(value, str):
        return checked_text(value)
    converted = attribute(value)
    return None if converted is None else str(converted)


def as_number(value: Any) -> int | float | None:
    """Gleap's numeric ``value``: a number, or text that is one; anything else is unsendable."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise UnstorableValue(f"{value!r} is not a number (Gleap's value)") from None
        if not number == number or number in (float("inf"), float("-inf")):
            raise UnstorableValue(f"{value!r} is not a finite number (Gleap's value)")
        return int(number) if number.is_integer() else number
    converted = attribute(value)
    if isinstance(converted, bool) or not isinstance(converted, int | float):
        raise UnstorableValue(f"{value!r} is not a number (Gleap's value)")
    return converted
