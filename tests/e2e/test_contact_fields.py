"""Every row of docs/gleap-contract.md's column -> field map, through a real sync
and the sandbox."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from audsync.cli import main
from audsync.sandbox import Sandbox
from tests.helpers import TOKEN, query, write_config

COLUMNS = [
    "user_id",
    "name",
    "first_name",
    "last_name",
    "email",
    "phone",
    "company_name",
    "company_id",
    "lang",
    "language",
    "plan",
    "user_value",
    "signed_up_at",
    "last_seen_at",
    "last_page_view",
    "tier",
]

# user id -> (column values, the contact Gleap must hold)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "name": ({"name": "Bob Stone", "first_name": "Ignored"}, {"name": "Bob Stone"}),
    "first-last": ({"first_name": "Ada", "last_name": "Lovelace"}, {"name": "Ada Lovelace"}),
    "first-only": ({"first_name": "Ada"}, {"name": "Ada"}),
    "last-only": ({"last_name": "Lovelace"}, {"name": "Lovelace"}),
    "no-name": ({}, {}),
    "email": ({"email": "a@b.io"}, {"email": "a@b.io"}),
    "phone": ({"phone": "+49 30 1234"}, {"phone": "+49 30 1234"}),
    "company": (
        {"company_name": "Acme", "company_id": "c-9"},
        {"companyName": "Acme", "companyId": "c-9"},
    ),
    "numeric-company-id": ({"company_id": 42}, {"companyId": "42"}),
    "lang": ({"lang": "de"}, {"lang": "de"}),
    "language": ({"language": "fr"}, {"lang": "fr"}),
    "plan": ({"plan": "pro"}, {"plan": "pro"}),
    "user-value": ({"user_value": 12.5}, {"value": 12.5}),
    "signed-up-string-naive": (
        {"signed_up_at": "2026-01-02 03:04:05"},
        {"createdAt": "2026-01-02T03:04:05.000Z"},
    ),
    "signed-up-string-offset": (
        {"signed_up_at": "2026-01-02T05:04:05+02:00"},
        {"createdAt": "2026-01-02T03:04:05.000Z"},
    ),
    "last-seen": (
        {"last_seen_at": "2026-11-28T22:00:00Z"},
        {"lastActivity": "2026-11-28T22:00:00.000Z"},
    ),
    "page-with-seen": (
        {"last_page_view": "https://x.io/p", "last_seen_at": "2026-11-28 22:00:00"},
        {
            "lastActivity": "2026-11-28T22:00:00.000Z",
            "lastPageView": {"page": "https://x.io/p", "date": "2026-11-28T22:00:00.000Z"},
        },
    ),
    "page-alone": (
        {"last_page_view": "https://x.io/q"},
        {"lastPageView": {"page": "https://x.io/q"}},
    ),
    "custom": ({"tier": "gold"}, {"tier": "gold"}),
}


def literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)


def audience_sql() -> str:
    selects = []
    for user_id, (values, _) in CASES.items():
        row = {"user_id": user_id, **values}
        selects.append("SELECT " + ", ".join(f"{literal(row.get(c))} AS {c}" for c in COLUMNS))
    return "\nUNION ALL\n".join(selects)


def test_every_contact_column_reaches_gleap(
    tmp_path: Path,
    gleap: Sandbox,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("AUDSYNC_GLEAP_API_TOKEN", TOKEN)
    source = tmp_path / "empty.db"
    source.touch()  # a SQLite source must exist: audsync never creates one
    body = f'[[audiences]]\nname = "All"\nsql = """\n{audience_sql()}\n"""\n'
    path = write_config(
        tmp_path,
        base_url=gleap.url,
        source_url=f"sqlite:///{source}",
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
        body=body,
    )
    assert main(["-c", str(path), "sync"]) == 0, capsys.readouterr()
    for user_id, (_, expected) in CASES.items():
        contact = gleap.contact(user_id)
        assert contact is not None, user_id
        # `tier` is a custom column of every row: null (sent as null) where not set.
        assert contact == {"userId": user_id, "all": True, "tier": None, **expected}
        for text_field in ("name", "email", "phone", "companyName", "companyId", "lang", "plan"):
            value = contact.get(text_field)
            assert value is None or ("undefined" not in value and value == value.strip())


def test_datetimes_and_an_unstorable_column_from_postgres(
    pg_url: str,
    tmp_path: Path,
    gleap: Sandbox,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    engine = create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE people (id INT, seen TIMESTAMP, signed TIMESTAMPTZ, page TEXT,"
                " prefs JSONB)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO people VALUES"
                " (1, '2026-11-28 22:00:00', '2026-01-02 05:04:05+02', 'https://x.io/a', NULL),"
                " (2, NULL, NULL, 'https://x.io/b', NULL),"
                " (3, NULL, NULL, NULL, '{\"a\": 1}')"
            )
        )
    engine.dispose()
    monkeypatch.setenv("AUDSYNC_GLEAP_API_TOKEN", TOKEN)
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    body = (
        '[[audiences]]\nname = "All"\nsql = "SELECT id AS user_id, seen AS last_seen_at,'
        ' signed AS signed_up_at, page AS last_page_view, prefs FROM people"\n'
    )
    path = write_config(
        tmp_path, base_url=gleap.url, source_url=pg_url, state_url=state_url, body=body
    )
    assert main(["-c", str(path), "sync"]) == 0, capsys.readouterr()
    assert gleap.contact("1") == {
        "userId": "1",
        "all": True,
        "prefs": None,
        "lastActivity": "2026-11-28T22:00:00.000Z",  # naive: taken as UTC
        "createdAt": "2026-01-02T03:04:05.000Z",  # aware: converted to UTC
        "lastPageView": {"page": "https://x.io/a", "date": "2026-11-28T22:00:00.000Z"},
    }
    assert gleap.contact("2") == {
        "userId": "2",
        "all": True,
        "prefs": None,
        "lastPageView": {"page": "https://x.io/b"},
    }
    # A JSON object cannot be a Gleap attribute: that user fails clearly, nobody else.
    assert gleap.contact("3") is None
    (failure,) = query(state_url, "SELECT * FROM delivery_failures")
    assert failure["user_id"] == "3" and "column 'prefs'" in failure["reason"]
    assert "dict cannot be stored" in failure["reason"]
