"""In-database planning (issue 15 item 3): the same snapshot, outbox and counters
as the streaming path for the same tricky rows, and a fallback where it cannot apply."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url

from audsync.config import Definition, SyncConfig
from audsync.history import start_run
from audsync.plan import plan_definition
from audsync.state import open_state

pytestmark = pytest.mark.usefixtures("pg_url")

TRICKY_SQL = """
CREATE TABLE t_text (
  id TEXT, email TEXT, first_name TEXT, last_name TEXT, name TEXT, plan TEXT,
  lang TEXT, language TEXT, phone TEXT, user_value NUMERIC, signed_up_at TIMESTAMPTZ,
  last_seen_at TIMESTAMP, last_page_view TEXT, "testType" TEXT, score FLOAT8,
  vip BOOLEAN, born DATE, ref UUID, visits INT, "SHOUT" TEXT, amount NUMERIC
);
INSERT INTO t_text VALUES
  ('42', 'a@x.io', ' Ann ', ' Lee', NULL, 'pro', NULL, 'de', '', 1.50,
   '2024-01-02 03:04:05.156999+02', '2024-03-04 05:06:07.5', '/home', 'say "hi"' || chr(10),
   1.5, true, '2024-05-06', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 3, 'LOUD', 12.5),
  ('42', 'dup@x.io', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
   NULL, NULL, NULL, NULL, NULL, NULL, NULL, 1),
  ('42.0', 'b@x.io', NULL, NULL, '', NULL, 'fr', 'de', NULL, 3, NULL, NULL, '/p', 'tab' || chr(9),
   0.1, false, NULL, NULL, -1, NULL, 0.1),
  ('abc', NULL, chr(160), chr(12288) || 'Zoë', '  ', NULL, NULL, NULL, NULL, 0.25, NULL,
   NULL, '', 'ünï', 100000.0, NULL, NULL, NULL, NULL, NULL, NULL),
  ('abc', 'again@x.io', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
   NULL, NULL, NULL, NULL, NULL, NULL, NULL, 7),
  (NULL, 'no-id@x.io', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
   NULL, NULL, NULL, NULL, NULL, NULL, NULL, 1),
  ('', 'empty@x.io', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
   NULL, NULL, NULL, NULL, NULL, NULL, NULL, 1),
  ('  ', 'blank@x.io', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
   NULL, NULL, NULL, NULL, NULL, NULL, NULL, 1),
  (chr(9) || chr(8195), 'blank-unicode@x.io', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
   NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 1),
  ('bad' || chr(1) || 'id', 'ctl@x.io', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
   NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 1),
  ('c1' || chr(133) || 'id', 'c1@x.io', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
   NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 1),
  (repeat('x', 401), 'long@x.io', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
   NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 1),
  (repeat('y', 400), 'max@x.io', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
   NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 1),
  (' padded ', 'pad@x.io', 'Al', NULL, 'Full Name', NULL, NULL, NULL, NULL, -2, NULL, NULL,
   NULL, NULL, -0.0, NULL, NULL, NULL, NULL, NULL, NULL),
  ('forgotten', 'gone@x.io', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
   NULL, NULL, NULL, NULL, NULL, NULL, NULL, 1);
CREATE TABLE t_num (id NUMERIC, f FLOAT8, b BIGINT, v NUMERIC, email TEXT);
INSERT INTO t_num VALUES
  -- equal ids of one text tie in the text order: either row may come first
  (42, 42, 42, 1, 'a@x.io'), (42.0, 42.0, 42, 1, 'dup@x.io'), (42.50, 42.5, 8, 3, NULL),
  ('NaN', 'NaN', NULL, 4, NULL), (7.5, 7.25, 7, NULL, 'null-first@x.io'),
  (-0.0, -0.0, 0, 5, NULL), (1e30, 1e15, 10, 6, NULL), (NULL, NULL, NULL, 7, NULL),
  (100, 'Infinity', 100, 8.000, NULL), (0.001, 0.001, -5, 9.5, NULL),
  -- the first row of a run wins even with no value: 9 then 9.0 is one user, no value
  (9, 9.5, 11, NULL, NULL), (9.0, 9.75, 12, 10, NULL);
"""

DEFINITIONS = [
    Definition(
        "audience", "Text ids", "text_ids",
        "SELECT id AS user_id, email, first_name, last_name, name, plan, lang, language, phone,"
        ' user_value, signed_up_at, last_seen_at, last_page_view, "testType", score, vip, born,'
        ' ref, visits, "SHOUT" FROM t_text',
    ),
    Definition("trait", "Amount", "amount", "SELECT id AS user_id, amount AS value FROM t_text"),
    Definition(
        "trait", "Seen", "seen", "SELECT id AS user_id, last_seen_at AS value FROM t_text"
    ),
    Definition("trait", "Vip", "vip_t", "SELECT id AS user_id, vip AS value FROM t_text"),
    Definition("trait", "Tag", "tag", 'SELECT id AS user_id, "testType" AS value FROM t_text'),
    Definition(
        "audience", "Numeric ids", "num_ids", "SELECT id AS user_id, email, v AS n FROM t_num"
    ),
    Definition("audience", "Float ids", "float_ids", "SELECT f AS user_id, v FROM t_num"),
    Definition("trait", "Int ids", "int_ids", "SELECT b AS user_id, v AS value FROM t_num"),
    Definition(
        "audience", "Epochs", "epochs",
        "SELECT b AS user_id, b * 10000000 AS signed_up_at,"
        " least(abs(b), 39) * 100000000000 + 123 AS last_seen_at,"
        " email AS last_page_view FROM t_num",
    ),
    Definition("trait", "Num trait", "num_trait", "SELECT id AS user_id, v AS value FROM t_num"),
    Definition(
        "contacts", "contacts", "@contacts",
        "SELECT id AS user_id, email, first_name, plan, signed_up_at FROM t_text",
    ),
]


@pytest.fixture
def same_db(pg_url: str) -> Iterator[tuple[Engine, Engine]]:
    """The warehouse case: the user's tables in ``public``, audsync's state in its own
    schema of the same database (selected by the state URL's search_path)."""
    admin = create_engine(pg_url)
    with admin.begin() as conn:
        conn.exec_driver_sql("CREATE SCHEMA audsync")
        conn.exec_driver_sql(TRICKY_SQL)
    admin.dispose()
    url = make_url(pg_url).update_query_dict({"options": "-csearch_path=audsync"})
    state = open_state(url.render_as_string(hide_password=False))
    with state.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO suppressions (user_id, suppressed_at) VALUES ('forgotten', '2024-01-01')"
        )
    source = create_engine(pg_url)
    yield state, source
    state.dispose()
    source.dispose()


def _plan(
    state: Engine, source: Engine, definition: Definition, *, in_database: bool,
    dry_run: bool = False, commit: bool = False,
) -> tuple[dict[str, Any], Any]:
    """One plan; what it wrote (snapshot, outbox) and its counters. Rolled back unless
    ``commit``."""
    run_id = start_run(state, definition.key, "manual", "initial")
    with state.connect() as conn:
        tx = conn.begin()
        result = plan_definition(
            conn, source, definition, run_id=run_id, force=True, dry_run=dry_run,
            settings=SyncConfig(in_database="auto" if in_database else "off"),
        )
        written = {
            table: sorted(
                tuple(r)
                for r in conn.exec_driver_sql(
                    f"SELECT user_id, value, contact FROM {table}"
                    f" WHERE audience_key = '{definition.key}'"
                )
            )
            for table in ("snapshot", "outbox")
        }
        written["outbox_meta"] = sorted(
            tuple(r)
            for r in conn.exec_driver_sql(
                "SELECT DISTINCT version, priority, state, attempts FROM outbox"
                f" WHERE audience_key = '{definition.key}'"
            )
        )
        (tx.commit if commit else tx.rollback)()
    stats = result.stats
    counters = (
        result.members, result.queued, result.entered, result.exited, result.counted_only,
        stats.rows, stats.skipped_ids, stats.duplicate_ids, stats.invalid_ids,
        stats.invalid_reasons(), stats.columns,
    )
    return {"written": written, "counters": counters}, stats


@pytest.mark.parametrize("definition", DEFINITIONS, ids=lambda d: d.key.lstrip("@"))
def test_in_database_plan_writes_exactly_what_streaming_writes(
    same_db: tuple[Engine, Engine], definition: Definition
) -> None:
    """First plan (outbox), dry run (snapshot) and a later plan (snapshot + diff):
    in the database and streamed, the same rows and the same counters."""
    state, source = same_db
    for dry_run in (False, True):
        ours, stats = _plan(state, source, definition, in_database=True, dry_run=dry_run)
        theirs, streamed = _plan(state, source, definition, in_database=False, dry_run=dry_run)
        assert stats.in_database and not streamed.in_database
        assert ours == theirs
    # A later plan loads the snapshot and diffs it against a ledger.
    _plan(state, source, definition, in_database=False, commit=True)
    with state.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO ledger (audience_key, user_id, value, acked_at)"
            " SELECT audience_key, user_id, 'false', queued_at FROM outbox"
        )
    ours, stats = _plan(state, source, definition, in_database=True)
    theirs, streamed = _plan(state, source, definition, in_database=False)
    assert stats.in_database and not streamed.in_database
    assert ours == theirs
    assert ours["written"]["snapshot"], "the later plan loads a snapshot"


def test_tricky_ids_are_normalised_and_counted_like_the_edges_rules_say(
    same_db: tuple[Engine, Engine],
) -> None:
    """Not only equal to streaming: the rules themselves, so both cannot be wrong alike."""
    state, source = same_db
    found, stats = _plan(state, source, DEFINITIONS[0], in_database=True)
    ids = [u for u, _, _ in found["written"]["outbox"]]
    assert sorted(ids) == sorted(["42", "42.0", "abc", " padded ", "y" * 400])
    assert stats.skipped_ids == 4 and stats.invalid_ids == 3 and stats.duplicate_ids == 2
    assert "contains a control character: 2" in (stats.invalid_reasons() or "")
    numeric, _ = _plan(state, source, DEFINITIONS[5], in_database=True)
    assert sorted(u for u, _, _ in numeric["written"]["outbox"]) == sorted(
        ["0", "0.001", "100", "42", "42.5", "7.5", "9", "1" + "0" * 30]
    )


FALLBACKS = [
    # A type only Python renders: a JSON column becomes the change's unsendable reason.
    ("json", "SELECT id AS user_id, to_json(email) AS extra FROM t_text", "has a type"),
    # A value only Python renders: Gleap's value must be a number.
    ("nan", "SELECT f AS user_id, f * 0 + 'NaN'::float8 AS user_value FROM t_num", "value"),
    # The query reads audsync's own table: the plan would see its own half-written rows.
    ("clash", "SELECT user_id FROM audsync.suppressions UNION SELECT id FROM t_text", "audsync's"),
    # A float id beyond where PostgreSQL's and Python's forms agree.
    ("tiny", "SELECT 1e-7::float8 AS user_id", "id only Python"),
]


@pytest.mark.parametrize(("label", "sql", "why"), FALLBACKS, ids=[f[0] for f in FALLBACKS])
def test_falls_back_to_streaming_and_says_so(
    same_db: tuple[Engine, Engine], caplog: pytest.LogCaptureFixture,
    label: str, sql: str, why: str,
) -> None:
    state, source = same_db
    definition = Definition("audience", label, label, sql)
    with caplog.at_level(logging.INFO, logger="audsync.plan"):
        ours, stats = _plan(state, source, definition, in_database=True)
    assert not stats.in_database
    lines = [r.getMessage() for r in caplog.records if "streaming" in r.getMessage()]
    assert len(lines) == 1 and why in lines[0] and label in lines[0]
    theirs, _ = _plan(state, source, definition, in_database=False)
    assert ours == theirs


def test_another_database_streams(
    same_db: tuple[Engine, Engine], pg_url: str, tmp_path: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    state, _ = same_db
    other = create_engine(make_url(pg_url).set(database="postgres"))
    definition = Definition("audience", "Other", "other", "SELECT 1 AS user_id")
    with caplog.at_level(logging.INFO, logger="audsync.plan"):
        found, stats = _plan(state, other, definition, in_database=True)
    other.dispose()
    assert not stats.in_database and found["written"]["outbox"] == [("1", "true", None)]
    assert any("another database" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("setting", ["auto", "off"])
def test_sync_in_database_setting(
    same_db: tuple[Engine, Engine], caplog: pytest.LogCaptureFixture, setting: str
) -> None:
    """`[sync] in_database = off` streams even when the source is the state DB."""
    from audsync.config import Config, SyncConfig
    from audsync.sync import run_sync

    state, source = same_db
    definition = DEFINITIONS[0]
    config = Config(
        path="test",
        source_url=source.url.render_as_string(hide_password=False),
        state_url=state.url.render_as_string(hide_password=False),
        sync=SyncConfig(in_database=setting),
        definitions=(definition,),
    )
    with caplog.at_level(logging.INFO, logger="audsync.plan"):
        outcome = run_sync(config, dry_run=True)
    assert not outcome.errors and outcome.dry_run_calls == 5
    inside = [r for r in caplog.records if "planned inside the database" in r.getMessage()]
    assert len(inside) == (1 if setting == "auto" else 0)
