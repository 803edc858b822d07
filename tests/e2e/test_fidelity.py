"""Issue 13 items 1-6: attribute names, values, dates and keys as Gleap receives them.

Every case is asserted on the request the sandbox received: method, path, query
string, headers and the exact JSON body.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from audsync.sandbox import Sandbox
from tests.helpers import TOKEN, query, run_cli, write_config


def identify_bodies(gleap: Sandbox) -> dict[str, list[dict[str, Any]]]:
    """Every Identify request's body by user id, after checking the request itself."""
    bodies: dict[str, list[dict[str, Any]]] = {}
    for call in gleap.calls("/admin/identify"):
        assert call["method"] == "POST" and call["path"] == "/admin/identify", call
        assert call["query"] == "preventLastActivityUpdate=true", call
        assert call["headers"]["api-token"] == TOKEN, call
        assert call["headers"]["content-type"] == "application/json", call
        assert call["status"] == 200, call
        bodies.setdefault(call["body"]["userId"], []).append(call["body"])
    return bodies


def setup(
    tmp_path: Path,
    gleap: Sandbox,
    monkeypatch: pytest.MonkeyPatch,
    body: str,
    source_url: str | None = None,
) -> tuple[Path, str]:
    """A config over an empty SQLite source (queries select literals): (path, state URL)."""
    monkeypatch.setenv("AUDSYNC_GLEAP_API_TOKEN", TOKEN)
    source = tmp_path / "source.db"
    sqlite3.connect(source).close()
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    path = write_config(
        tmp_path,
        base_url=gleap.url,
        source_url=source_url or f"sqlite:///{source}",
        state_url=state_url,
        body=body,
    )
    return path, state_url


def test_custom_attribute_names_keep_their_case(
    tmp_path: Path,
    gleap: Sandbox,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, _ = setup(
        tmp_path,
        gleap,
        monkeypatch,
        '[[audiences]]\nname = "Testers"\nsql = """SELECT \'u1\' AS "User_ID",'
        ' \'ab\' AS "testType", \'b\' AS "TIER_NAME", \'x@y.io\' AS "EMAIL",'
        ' \'Ada\' AS "First_Name", 7 AS "User_Value", \'c\' AS "lowercase" """\n',
    )
    code, _, err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 0, err
    assert identify_bodies(gleap) == {
        "u1": [
            {
                "userId": "u1",
                "email": "x@y.io",  # recognised in any case
                "name": "Ada",
                "value": 7,
                "testers": True,
                "testType": "ab",  # a custom attribute keeps its name as written
                "tier_name": "b",  # all upper case: an unquoted identifier, lowered
                "lowercase": "c",
            }
        ]
    }


def test_a_value_column_in_an_audience_is_an_error_and_user_value_must_be_a_number(
    tmp_path: Path,
    gleap: Sandbox,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    body = (
        '[[audiences]]\nname = "Gold"\nsql = "SELECT \'u1\' AS user_id, \'gold\' AS value"\n'
        '[[audiences]]\nname = "VIP"\nsql = """SELECT \'u1\' AS user_id, \'gold\' AS user_value'
        ' UNION ALL SELECT \'u2\', \'12.5\'"""\n'
        '[[traits]]\nname = "Revenue"\nsql = "SELECT \'u1\' AS user_id, 450 AS value"\n'
    )
    path, state_url = setup(tmp_path, gleap, monkeypatch, body)
    code, _, err = run_cli(capsys, "-c", str(path), "check")
    assert code == 1
    assert (
        "audience 'gold': column 'value' is not Gleap's value field: Gleap's value comes"
        " from a user_value column (a number); rename it"
    ) in err
    code, _, err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 1 and "'gold': column 'value' is not Gleap's value field" in err
    # The trait's value is the trait's; u1's user_value is no number, so only
    # its vip change fails; u2's numeric text becomes Gleap's number.
    assert identify_bodies(gleap) == {
        "u1": [{"userId": "u1", "revenue": 450}],
        "u2": [{"userId": "u2", "value": 12.5, "vip": True}],
    }
    (failure,) = query(state_url, "SELECT audience_key, user_id, reason FROM delivery_failures")
    assert failure == {
        "audience_key": "vip",
        "user_id": "u1",
        "reason": "not sendable: 'vip': column 'user_value': 'gold' is not a number"
        " (Gleap's value)",
    }
    runs = query(state_url, "SELECT audience_key, status, error FROM sync_runs ORDER BY id")
    assert [r["status"] for r in runs if r["audience_key"] == "gold"] == ["failed"]


def test_a_column_named_like_another_key_never_overwrites_it(
    tmp_path: Path,
    gleap: Sandbox,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    body = (
        '[[traits]]\nname = "Lifetime Value"\nsql = "SELECT \'u1\' AS user_id, 100 AS value"\n'
        '[[audiences]]\nname = "Churn Risk"\n'
        'sql = "SELECT \'u1\' AS user_id, \'unknown\' AS Lifetime_Value"\n'
        '[[audiences]]\nname = "Active"\nsql = "SELECT \'u1\' AS user_id, \'x\' AS plan"\n'
    )
    path, state_url = setup(tmp_path, gleap, monkeypatch, body)
    code, _, err = run_cli(capsys, "-c", str(path), "check")
    assert code == 1
    assert (
        "audience 'churn_risk': column 'Lifetime_Value' has the key of trait 'lifetime_value':"
        " it would overwrite that attribute in Gleap; rename the column"
    ) in err
    assert "'active'" not in err
    code, _, err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 1 and "column 'Lifetime_Value' has the key of trait" in err
    assert identify_bodies(gleap) == {
        "u1": [{"userId": "u1", "plan": "x", "active": True, "lifetime_value": 100}]
    }
    assert gleap.contact("u1") == {
        "userId": "u1",
        "plan": "x",
        "active": True,
        "lifetime_value": 100,
    }
    assert query(state_url, "SELECT audience_key FROM ledger ORDER BY 1") == [
        {"audience_key": "active"},
        {"audience_key": "lifetime_value"},
    ]


def test_repeated_columns_fail_their_audience_on_a_sqlite_source(
    tmp_path: Path,
    gleap: Sandbox,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Review break: SQLite renames a repeated column of a subquery to NAME:1, and
    `"Email"` beside `EMAIL` (or user_id twice) went out as a custom attribute
    `email:1`. It is the same attribute twice: the audience fails alone."""
    body = (
        '[[audiences]]\nname = "Twice"\n'
        "sql = \"SELECT 'u1' AS user_id, 1 AS \\\"Email\\\", 'z' AS EMAIL\"\n"
        '[[audiences]]\nname = "Again"\n'
        "sql = \"SELECT 'u1' AS user_id, 'u1' AS user_id\"\n"
        '[[audiences]]\nname = "Active"\nsql = "SELECT \'u1\' AS user_id, \'x\' AS plan"\n'
    )
    path, _ = setup(tmp_path, gleap, monkeypatch, body)
    code, _, err = run_cli(capsys, "-c", str(path), "check")
    assert code == 1
    assert "columns 'Email' and 'EMAIL:1' are the same attribute" in err
    assert "columns 'user_id' and 'user_id:1' are the same attribute" in err
    assert "'active'" not in err
    code, _, err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 1
    assert identify_bodies(gleap) == {"u1": [{"userId": "u1", "plan": "x", "active": True}]}


def test_unparseable_timestamps_fail_and_every_date_has_milliseconds(
    tmp_path: Path,
    gleap: Sandbox,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    body = (
        '[[audiences]]\nname = "Signed"\nevents = true\nsql = """\n'
        "SELECT 'u1' AS user_id, 'yesterday' AS signed_up_at, NULL AS last_seen_at\n"
        "UNION ALL SELECT 'u2', '2022-09-28T12:11:18.156789+02:00', '2022-09-28 10:11:18'\n"
        '"""\n'
        '[[traits]]\nname = "Score"\nsql = "SELECT \'u1\' AS user_id, 3 AS value"\n'
    )
    path, state_url = setup(tmp_path, gleap, monkeypatch, body)
    code, _, err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 0, err
    assert identify_bodies(gleap) == {
        "u1": [{"userId": "u1", "score": 3}],
        "u2": [
            {
                "userId": "u2",
                "createdAt": "2022-09-28T10:11:18.156Z",
                "lastActivity": "2022-09-28T10:11:18.000Z",
                "signed": True,
            }
        ],
    }
    (failure,) = query(state_url, "SELECT audience_key, user_id, reason FROM delivery_failures")
    assert failure["audience_key"] == "signed" and failure["user_id"] == "u1"
    assert failure["reason"].startswith(
        "not sendable: 'signed': column 'signed_up_at': 'yesterday' is not a timestamp"
    )
    (track,) = gleap.calls("/admin/track")
    assert track["method"] == "POST" and track["query"] == ""
    assert track["headers"]["api-token"] == TOKEN
    (event,) = track["body"]["events"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event["date"]), event
    assert event == {
        "name": "Audience Entered",
        "userId": "u2",
        "date": event["date"],
        "data": {"audience_key": "signed", "signed": True},
    }


KEY_CASES = {
    "Straße Kunden": "strasse_kunden",
    "Œuvre fans": "oeuvre_fans",
    "Ørsted customers": "orsted_customers",
    "Łódź users": "lodz_users",
    "Æsir fans": "aesir_fans",
}


def test_keys_never_lose_letters(
    tmp_path: Path,
    gleap: Sandbox,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    body = "".join(
        f'[[audiences]]\nname = "{name}"\nsql = "SELECT \'u1\' AS user_id"\n' for name in KEY_CASES
    )
    path, _ = setup(tmp_path, gleap, monkeypatch, body)
    code, _, err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 0, err
    assert identify_bodies(gleap) == {
        "u1": [{"userId": "u1", **dict.fromkeys(sorted(KEY_CASES.values()), True)}]
    }


def test_a_name_with_letters_that_have_no_latin_form_needs_a_key(
    tmp_path: Path,
    gleap: Sandbox,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    body = '[[audiences]]\nname = "日本 Users"\nsql = "SELECT \'u1\' AS user_id"\n'
    path, _ = setup(tmp_path, gleap, monkeypatch, body)
    code, out, err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 2 and out == ""
    assert err == (
        f"audsync: error: {path}: audiences[0].key: '日本 Users' has letters with no Latin"
        " form ('日本'): set key to the attribute name Gleap should use ([a-z0-9_]+)\n"
    )
    assert gleap.calls() == []
    keyed = path.read_text(encoding="utf-8").replace("\nsql", '\nkey = "japan_users"\nsql')
    path.write_text(keyed, encoding="utf-8")
    code, _, err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 0, err
    assert identify_bodies(gleap) == {"u1": [{"userId": "u1", "japan_users": True}]}


@pytest.mark.parametrize(
    ("name", "old_key"),
    [("Straße Kunden", "strae_kunden"), ("日本 Users", "users")],
)
def test_a_key_already_in_the_ledger_never_changes(
    name: str,
    old_key: str,
    tmp_path: Path,
    gleap: Sandbox,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The state DB as the earlier rule left it: the audience synced under old_key.
    source = tmp_path / "shop.db"
    with sqlite3.connect(source) as db:
        db.execute("CREATE TABLE members (id TEXT)")
        db.execute("INSERT INTO members VALUES ('u1')")
    audience = f'[[audiences]]\nname = "{name}"\nsql = "SELECT id AS user_id FROM members"\n'
    path, state_url = setup(
        tmp_path,
        gleap,
        monkeypatch,
        audience.replace("\nsql", f'\nkey = "{old_key}"\nsql'),
        source_url=f"sqlite:///{source}",
    )
    code, _, err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 0, err
    assert query(state_url, "SELECT audience_key, user_id FROM ledger") == [
        {"audience_key": old_key, "user_id": "u1"}
    ]
    gleap.reset_calls()
    # Now the config names the audience only; the rule would derive another key.
    path.write_text(
        path.read_text(encoding="utf-8").replace(f'key = "{old_key}"\n', ""), encoding="utf-8"
    )
    with sqlite3.connect(source) as db:
        db.execute("INSERT INTO members VALUES ('u2')")
    note = (
        f"{name!r} keeps its key {old_key!r}, which Gleap already holds"
        + (" (the name now derives 'strasse_kunden')" if old_key == "strae_kunden" else "")
        + f'; set key = "{old_key}" to say so and silence this'
    )
    code, out, err = run_cli(capsys, "-c", str(path), "check")
    assert code == 0, err
    assert f"config {path}: audiences[0]: {note}\n" in out
    assert f"audience {old_key}: ok (2 rows)" in out
    code, _, err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 0, err
    assert note in err  # logged by every command
    assert identify_bodies(gleap) == {"u2": [{"userId": "u2", old_key: True}]}
    assert query(state_url, "SELECT DISTINCT audience_key FROM ledger") == [
        {"audience_key": old_key}
    ]
    assert query(state_url, "SELECT key FROM audiences") == [{"key": old_key}]
    # Review break: another audience given the new rule's key explicitly puts that
    # key in the ledger too; the kept key must stay kept, not clash with it.
    other = (
        '[[audiences]]\nname = "Other"\nkey = "strasse_kunden"\n'
        "sql = \"SELECT 'u9' AS user_id\"\n"
    )
    path.write_text(path.read_text(encoding="utf-8") + other, encoding="utf-8")
    for command in ("sync", "sync", "check", "status"):
        code, out, err = run_cli(capsys, "-c", str(path), command)
        assert code == 0, (command, out, err)
    rows = query(state_url, "SELECT audience_key, user_id FROM ledger")
    assert sorted((r["audience_key"], r["user_id"]) for r in rows) == sorted(
        [(old_key, "u1"), (old_key, "u2"), ("strasse_kunden", "u9")]
    )


def test_an_unsendable_column_fails_only_its_audience_from_postgres(
    pg_url: str,
    tmp_path: Path,
    gleap: Sandbox,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    engine = create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE people (id TEXT, meta TEXT[], revenue INT)"))
        conn.execute(
            text(
                "INSERT INTO people VALUES ('u1', ARRAY['a','b'], 300), ('u2', NULL, 20),"
                " ('u3', ARRAY['c'], NULL)"
            )
        )
    engine.dispose()
    body = (
        '[[audiences]]\nname = "Tagged Users"\n'
        'sql = "SELECT id AS user_id, meta FROM people WHERE id IN (\'u1\', \'u3\')"\n'
        '[[traits]]\nname = "Total Revenue 180 Days"\n'
        'sql = "SELECT id AS user_id, revenue AS value FROM people"\n'
    )
    path, state_url = setup(tmp_path, gleap, monkeypatch, body, source_url=pg_url)
    code, _, err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 0, err
    # u1's trait still goes in the call; u3 had nothing else to send.
    assert identify_bodies(gleap) == {
        "u1": [{"userId": "u1", "total_revenue_180_days": 300}],
        "u2": [{"userId": "u2", "total_revenue_180_days": 20}],
    }
    failures = query(
        state_url, "SELECT audience_key, user_id, reason FROM delivery_failures ORDER BY user_id"
    )
    assert failures == [
        {
            "audience_key": "tagged_users",
            "user_id": user,
            "reason": "not sendable: 'tagged_users': column 'meta': a list cannot be stored"
            " in a Gleap attribute",
        }
        for user in ("u1", "u3")
    ]
    assert query(state_url, "SELECT audience_key, user_id FROM ledger ORDER BY 1, 2") == [
        {"audience_key": "total_revenue_180_days", "user_id": "u1"},
        {"audience_key": "total_revenue_180_days", "user_id": "u2"},
    ]
