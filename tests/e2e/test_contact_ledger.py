"""Contact fields are kept in step (issue 13 item 7; docs/design.md, "The contact ledger").

What Gleap acknowledged of each user's contact fields is in ``ledger.contact``; a
plan diffs the query's contact columns against it like a trait's value, and a
field that moved goes in the user's one Identify call even when no membership
changed. Every case is checked at the request level: path, query string,
headers and the exact JSON body the sandbox received.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from audsync.config import CONTACTS_KEY, load_config
from audsync.deliver import Change, plan_calls
from audsync.errors import ConfigError
from audsync.forget import forget
from audsync.sandbox import Sandbox
from audsync.state import open_state
from tests.helpers import (
    TOKEN,
    MakeConfig,
    Warehouse,
    assert_counts_add_up,
    query,
    run_cli,
    write_config,
)


class RecordingSandbox(Sandbox):
    """The sandbox, also keeping each admin request's raw path and headers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requests: list[dict[str, Any]] = []

    def handle(
        self, method: str, raw_path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], Any]:
        if raw_path.startswith("/admin/identify"):
            parts = urlsplit(raw_path)
            self.requests.append(
                {
                    "method": method,
                    "path": parts.path,
                    "query": parts.query,
                    "headers": headers,
                    "body": json.loads(body) if body else None,
                }
            )
        return super().handle(method, raw_path, headers, body)

    def identifies(self) -> list[dict[str, Any]]:
        """The Identify requests received since the last call, checked for the
        contract's path, query string and headers; their JSON bodies."""
        taken, self.requests = self.requests, []
        for request in taken:
            assert request["method"] == "POST"
            assert request["path"] == "/admin/identify"
            assert request["query"] == "preventLastActivityUpdate=true"
            assert request["headers"]["api-token"] == TOKEN
            assert request["headers"]["content-type"] == "application/json"
        return [r["body"] for r in taken]


@pytest.fixture
def gleap() -> Iterator[RecordingSandbox]:
    server = RecordingSandbox(TOKEN, seed=1)
    with server:
        yield server


VIP = """
[[audiences]]
name = "VIP Customers"
sql = "SELECT id AS user_id, email, first_name, last_name FROM people WHERE vip = 1"
"""

CONTACTS = """
[contacts]
sql = "SELECT id AS user_id, email, first_name AS name FROM people"
"""


def sync(capsys: pytest.CaptureFixture[str], path: Path, *args: str) -> None:
    code, _out, err = run_cli(capsys, "-c", str(path), "sync", *args)
    assert code == 0, err


def contact_ledger(state_url: str) -> dict[tuple[str, str], Any]:
    rows = query(state_url, "SELECT audience_key, user_id, contact FROM ledger")
    return {
        (r["audience_key"], r["user_id"]): json.loads(r["contact"]) if r["contact"] else None
        for r in rows
    }


def test_a_changed_email_alone_is_one_call_with_only_that_field(
    make_config: MakeConfig,
    gleap: RecordingSandbox,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    warehouse.add(1, vip=True)
    warehouse.add(2, vip=True)
    path, _ = make_config(body=VIP)
    sync(capsys, path)
    assert sorted(gleap.identifies(), key=lambda b: b["userId"]) == [
        {"userId": "1", "vip_customers": True, "email": "p1@example.com", "name": "P1"},
        {"userId": "2", "vip_customers": True, "email": "p2@example.com", "name": "P2"},
    ]

    # Nothing changed: no call at all.
    sync(capsys, path)
    assert gleap.identifies() == []

    warehouse.execute("UPDATE people SET email = 'new@example.com' WHERE id = 1")
    sync(capsys, path)
    assert gleap.identifies() == [{"userId": "1", "email": "new@example.com"}]
    assert (gleap.contact("1") or {})["email"] == "new@example.com"
    assert contact_ledger(state_url)[("vip_customers", "1")] == {
        "email": "new@example.com",
        "name": "P1",
    }
    runs = assert_counts_add_up(state_url)
    assert (runs[-1]["queued"], runs[-1]["delivered"], runs[-1]["entered"]) == (1, 1, 0)

    # Acknowledged: the next sync has nothing to tell.
    sync(capsys, path)
    assert gleap.identifies() == []


def test_a_field_the_query_drops_is_not_sent_and_a_null_custom_column_is(
    make_config: MakeConfig,
    gleap: RecordingSandbox,
    warehouse: Warehouse,
    capsys: pytest.CaptureFixture[str],
) -> None:
    warehouse.add(1, vip=True)
    with_tier = VIP.replace("last_name FROM", "last_name, revenue AS tier FROM")
    warehouse.execute("UPDATE people SET revenue = 5 WHERE id = 1")
    path, _ = make_config(body=with_tier)
    sync(capsys, path)
    assert gleap.identifies() == [
        {"userId": "1", "vip_customers": True, "email": "p1@example.com", "name": "P1", "tier": 5}
    ]
    # An empty email is no field at all: Gleap keeps the one it has.
    warehouse.execute("UPDATE people SET email = NULL WHERE id = 1")
    sync(capsys, path)
    assert gleap.identifies() == []
    # A custom attribute that becomes null is a change Gleap is told.
    warehouse.execute("UPDATE people SET revenue = NULL WHERE id = 1")
    sync(capsys, path)
    assert gleap.identifies() == [{"userId": "1", "tier": None}]
    assert (gleap.contact("1") or {})["email"] == "p1@example.com"


def test_text_gleap_can_hold_but_json_types_might_not_is_compared_exactly(
    make_config: MakeConfig,
    gleap: RecordingSandbox,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A NUL inside a custom attribute (PostgreSQL's jsonb refuses it), a number
    that is text in one run and a number in the next: each is a change, once."""
    warehouse.add(1, vip=True)
    body = VIP.replace("last_name FROM", "last_name, note FROM")
    warehouse.execute("ALTER TABLE people ADD COLUMN note")
    warehouse.execute("UPDATE people SET note = 'a' || char(0) || 'b'")
    path, _ = make_config(body=body)
    sync(capsys, path)
    assert gleap.identifies()[0]["note"] == "a\x00b"
    warehouse.execute("UPDATE people SET note = 'a' || char(0) || 'c'")
    sync(capsys, path)
    assert gleap.identifies() == [{"userId": "1", "note": "a\x00c"}]
    warehouse.execute("UPDATE people SET note = '5'")
    sync(capsys, path)
    assert gleap.identifies() == [{"userId": "1", "note": "5"}]
    warehouse.execute("UPDATE people SET note = 5")
    sync(capsys, path)
    assert gleap.identifies() == [{"userId": "1", "note": 5}]
    sync(capsys, path)
    assert gleap.identifies() == []
    assert_counts_add_up(state_url)


def test_a_membership_change_and_a_contact_change_share_one_call(
    make_config: MakeConfig,
    gleap: RecordingSandbox,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for i in (1, 2, 3):
        warehouse.add(i, vip=True, revenue=10.0)
    path, _ = make_config()  # VIP (contact columns), Buyers, Revenue
    sync(capsys, path)
    gleap.identifies()
    warehouse.execute("UPDATE people SET email = 'x1@example.com', revenue = 11 WHERE id = 1")
    warehouse.execute("UPDATE people SET first_name = 'Q2' WHERE id = 2")
    sync(capsys, path)
    # User 1: the trait's new value and VIP's moved email in one call (the trait
    # query has no contact columns; VIP sends only what moved).
    assert sorted(gleap.identifies(), key=lambda b: b["userId"]) == [
        {"userId": "1", "revenue": 11, "email": "x1@example.com"},
        {"userId": "2", "name": "Q2"},
    ]
    assert_counts_add_up(state_url)


def test_contacts_query_keeps_users_outside_every_audience_in_step(
    make_config: MakeConfig,
    gleap: RecordingSandbox,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    warehouse.add(1, vip=True)
    warehouse.add(2)  # in no audience: only [contacts] knows them
    warehouse.add(3)  # ... with no contact field at all: nothing to tell
    warehouse.execute("UPDATE people SET email = NULL, first_name = NULL WHERE id = 3")
    path, config = make_config(body=VIP + CONTACTS)
    assert config.definitions[-1].key == CONTACTS_KEY
    sync(capsys, path)
    # A first sync: one call per user, the [contacts] fields riding in the
    # membership call; the [contacts] key itself is never sent.
    assert sorted(gleap.identifies(), key=lambda b: b["userId"]) == [
        {"userId": "1", "vip_customers": True, "email": "p1@example.com", "name": "P1"},
        {"userId": "2", "email": "p2@example.com", "name": "P2"},
    ]
    assert contact_ledger(state_url)[(CONTACTS_KEY, "2")] == {
        "email": "p2@example.com",
        "name": "P2",
    }

    warehouse.execute("UPDATE people SET email = 'moved@example.com' WHERE id = 2")
    sync(capsys, path)
    assert gleap.identifies() == [{"userId": "2", "email": "moved@example.com"}]

    # Both queries see user 1's new name: still one call, the field once.
    warehouse.execute("UPDATE people SET first_name = 'Una' WHERE id = 1")
    sync(capsys, path)
    assert gleap.identifies() == [{"userId": "1", "name": "Una"}]

    # Leaving [contacts] tells Gleap nothing (its key is never sent).
    warehouse.execute("DELETE FROM people WHERE id = 2")
    sync(capsys, path)
    assert gleap.identifies() == []
    assert_counts_add_up(state_url)
    code, out, _ = run_cli(capsys, "-c", str(path), "sync", CONTACTS_KEY, "--dry-run")
    assert code == 0 and CONTACTS_KEY in out
    code, out, _ = run_cli(capsys, "-c", str(path), "status", "--json")
    assert code == 0
    assert CONTACTS_KEY in out and '"contacts"' in out
    code, out, _ = run_cli(capsys, "-c", str(path), "history")
    assert code == 0 and CONTACTS_KEY in out
    report = path.parent / "report.html"
    assert run_cli(capsys, "-c", str(path), "report", "--html", str(report))[0] == 0
    assert CONTACTS_KEY in report.read_text(encoding="utf-8")


def test_full_resync_reasserts_contacts_without_the_contacts_key(
    make_config: MakeConfig,
    gleap: RecordingSandbox,
    warehouse: Warehouse,
    capsys: pytest.CaptureFixture[str],
) -> None:
    warehouse.add(2)
    path, _ = make_config(body=VIP + CONTACTS)
    sync(capsys, path)
    gleap.identifies()
    sync(capsys, path, "--full")
    assert gleap.identifies() == [{"userId": "2", "email": "p2@example.com", "name": "P2"}]


def test_a_rejected_contact_change_leaves_the_ledger_and_goes_again(
    make_config: MakeConfig,
    gleap: RecordingSandbox,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for i in range(1, 5):
        warehouse.add(i, vip=True)
    path, _ = make_config(body=VIP)
    sync(capsys, path)
    gleap.identifies()
    warehouse.execute("UPDATE people SET email = 'u' || id || '@new.example' WHERE id IN (1, 2)")
    gleap.reject_users = {"1"}
    sync(capsys, path)
    assert sorted(gleap.identifies(), key=lambda b: b["userId"]) == [
        {"userId": "1", "email": "u1@new.example"},  # rejected
        {"userId": "2", "email": "u2@new.example"},
    ]
    ledger = contact_ledger(state_url)
    assert ledger[("vip_customers", "1")] == {"email": "p1@example.com", "name": "P1"}
    assert ledger[("vip_customers", "2")] == {"email": "u2@new.example", "name": "P2"}
    failures = query(state_url, "SELECT user_id, http_status FROM delivery_failures")
    assert failures == [{"user_id": "1", "http_status": 400}]
    assert_counts_add_up(state_url)

    # Gleap fails the next call outright (503 on every retry): still unmoved, still queued.
    gleap.reject_users = set()
    gleap.fault = lambda method, path, body: (503, {}, {"error": "down"})
    code, _out, _err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 1
    assert contact_ledger(state_url)[("vip_customers", "1")]["email"] == "p1@example.com"
    gleap.identifies()

    gleap.fault = None
    sync(capsys, path)
    assert gleap.identifies() == [{"userId": "1", "email": "u1@new.example"}]
    assert contact_ledger(state_url)[("vip_customers", "1")]["email"] == "u1@new.example"
    assert query(state_url, "SELECT * FROM outbox") == []
    assert_counts_add_up(state_url)


def test_forget_wipes_the_contact_ledger(
    make_config: MakeConfig,
    gleap: RecordingSandbox,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    warehouse.add(1, vip=True)
    warehouse.add(2)
    path, config = make_config(body=VIP + CONTACTS)
    sync(capsys, path)
    assert set(contact_ledger(state_url)) == {
        ("vip_customers", "1"),
        (CONTACTS_KEY, "1"),
        (CONTACTS_KEY, "2"),
    }
    engine = open_state(state_url)
    try:
        report = forget(engine, gleap_client(config), ["1", "2"])
    finally:
        engine.dispose()
    assert report.deleted == ["1", "2"]
    assert query(state_url, "SELECT * FROM ledger") == []
    gleap.identifies()
    warehouse.execute("UPDATE people SET email = 'again@example.com'")
    sync(capsys, path)
    assert gleap.identifies() == []  # forgotten: never sent again, contacts or not


def gleap_client(config: Any) -> Any:
    from audsync.sync import make_client

    return make_client(config)


# -- what one call carries: pure, a table of cases -----------------------------------


def change(key: str, value: str, contact: Any, acked: Any = None, only: bool = False) -> Change:
    return Change(
        key,
        "7",
        value,
        json.dumps(contact) if contact is not None else None,
        run_id=1,
        version=1,
        contact_only=only,
        acked_contact=json.dumps(acked) if acked is not None else None,
    )


CALLS: list[tuple[str, list[Change], list[dict[str, Any]]]] = [
    (
        "contact-only: only the fields that moved, no key",
        [change("vip", "true", {"email": "b", "name": "N"}, {"email": "a", "name": "N"}, True)],
        [{"userId": "7", "email": "b"}],
    ),
    (
        "a value change sends the whole contact",
        [change("vip", "true", {"email": "a", "name": "N"}, {"email": "a", "name": "N"})],
        [{"userId": "7", "vip": True, "email": "a", "name": "N"}],
    ),
    (
        "[contacts] never sends its key",
        [change(CONTACTS_KEY, "true", {"email": "a"})],
        [{"userId": "7", "email": "a"}],
    ),
    (
        "a nested field compares whole",
        [
            change(
                "vip",
                "true",
                {"lastPageView": {"page": "/b"}},
                {"lastPageView": {"page": "/a"}},
                True,
            )
        ],
        [{"userId": "7", "lastPageView": {"page": "/b"}}],
    ),
    (
        "nothing moved any more: no call",
        [change("vip", "true", {"email": "a"}, {"email": "a", "plan": "x"}, True)],
        [],
    ),
    (
        "an exit with a contact-only change of another key: one body",
        [
            change("buyers", "false", None, {"email": "a"}),
            change("vip", "true", {"email": "b"}, {"email": "a"}, True),
        ],
        [{"userId": "7", "buyers": False, "email": "b"}],
    ),
]


@pytest.mark.parametrize(("case", "changes", "bodies"), CALLS, ids=[c[0] for c in CALLS])
def test_what_one_call_carries(case: str, changes: list[Change], bodies: list[Any]) -> None:
    calls = plan_calls("7", changes)
    assert [body for body, _ in calls] == bodies, case
    if calls:  # every change is carried, so every change is acknowledged
        assert sorted(id(c) for _, carried in calls for c in carried) == sorted(map(id, changes))


CONTACT_AFTER_ACK = [
    ({"email": "b"}, {"email": "a", "name": "N"}, {"email": "b", "name": "N"}),
    (None, {"email": "a"}, {"email": "a"}),  # an exit keeps what Gleap holds
    ({"email": "a"}, None, {"email": "a"}),
    (None, None, None),
]


@pytest.mark.parametrize(("sent", "acked", "after"), CONTACT_AFTER_ACK)
def test_the_contact_ledger_after_an_acknowledgement(sent: Any, acked: Any, after: Any) -> None:
    stored = change("vip", "true", sent, acked).contact_after_ack()
    assert (json.loads(stored) if stored else None) == after


# -- config ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            "[contacts]\n",
            "contacts.sql: missing or empty ([contacts] needs a query returning user_id)",
        ),
        (
            '[contacts]\nsql = "  "\n',
            "contacts.sql: missing or empty ([contacts] needs a query returning user_id)",
        ),
        ("[contacts]\nsql = 5\n", "contacts.sql: 5 must be a string"),
        ('[contacts]\nsql = "SELECT 1"\nname = "x"\n', "contacts.name: unknown key"),
        ('contacts = "SELECT 1"\n', "contacts: must be a table ([contacts])"),
    ],
)
def test_contacts_config_errors_are_one_clear_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    section: str,
    message: str,
) -> None:
    monkeypatch.delenv("AUDSYNC_CONTACTS_SQL", raising=False)
    path = tmp_path / "audsync.toml"
    path.write_text(section + VIP, encoding="utf-8")
    code, _out, err = run_cli(capsys, "-c", str(path), "check")
    assert code == 2
    assert err.strip() == f"audsync: error: {path}: {message}"
    with pytest.raises(ConfigError):
        load_config(str(path), env={})


def test_contacts_sql_from_the_environment(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, base_url="http://x", source_url="sqlite://", state_url="sqlite://"
    )
    pasted = "SELECT 1 AS user_id; -- from the console\n"
    config = load_config(str(path), env={"AUDSYNC_CONTACTS_SQL": pasted})
    contacts = [d for d in config.definitions if d.kind == "contacts"]
    assert [(d.key, d.sql) for d in contacts] == [(CONTACTS_KEY, "SELECT 1 AS user_id")]
    assert [d.key for d in load_config(str(path), env={}).definitions] == [
        "vip_customers",
        "buyers",
        "revenue",
    ]


def test_contacts_query_without_user_id_fails_its_plan(
    make_config: MakeConfig,
    warehouse: Warehouse,
    capsys: pytest.CaptureFixture[str],
) -> None:
    warehouse.add(1)
    path, _ = make_config(body=VIP + '[contacts]\nsql = "SELECT email FROM people"\n')
    code, _out, err = run_cli(capsys, "-c", str(path), "check")
    assert code != 0
    assert "@contacts" in err and "user_id" in err, err


def test_an_upgraded_state_db_sends_only_contacts_that_move_from_then_on(
    make_config: MakeConfig,
    gleap: RecordingSandbox,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Migration 0009 starts each ledger row's contact from the last plan's: an
    upgrade is not one call per member re-sending every contact."""
    from alembic import command

    from audsync import migrate

    for i in (1, 2, 3):
        warehouse.add(i, vip=True)
    path, _ = make_config(body=VIP)
    sync(capsys, path)
    sync(capsys, path)  # a first plan writes no snapshot; the second one does
    gleap.identifies()
    engine = open_state(state_url)
    try:
        cfg = migrate._alembic_config()
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0008")  # the state DB as audsync left it before 0009
        assert migrate.current_revision(engine) == "0008"
    finally:
        engine.dispose()
    open_state(state_url).dispose()  # upgrades to the head
    assert contact_ledger(state_url)[("vip_customers", "2")] == {
        "email": "p2@example.com",
        "name": "P2",
    }
    sync(capsys, path)
    assert gleap.identifies() == []
    warehouse.execute("UPDATE people SET email = 'z@example.com' WHERE id = 2")
    sync(capsys, path)
    assert gleap.identifies() == [{"userId": "2", "email": "z@example.com"}]
