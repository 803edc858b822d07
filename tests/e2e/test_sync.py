"""End to end through the CLI: warehouse -> audsync -> a real HTTP Gleap sandbox."""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from audsync.sandbox import Sandbox
from tests.helpers import (
    TOKEN,
    MakeConfig,
    Process,
    Warehouse,
    assert_counts_add_up,
    dump_state,
    ledger,
    query,
    run_cli,
    source_mismatches,
    wait_for,
    write_config,
)


def identify_calls(gleap: Sandbox) -> list[dict[str, Any]]:
    return [c for c in gleap.calls("/admin/identify") if c["status"] == 200]


def seed(warehouse: Warehouse) -> None:
    for i in range(1, 21):
        warehouse.add(i, vip=i <= 8, buyer=i % 2 == 0, revenue=float(i * 10) if i <= 15 else None)


def assert_gleap_matches_source(gleap: Sandbox, warehouse: Warehouse) -> None:
    contacts = gleap.contacts()
    vip, buyers, revenue = warehouse.members("vip"), warehouse.members("buyer"), warehouse.revenue()
    for user_id in vip:
        assert contacts[user_id]["vip_customers"] is True, user_id
    for user_id in buyers:
        assert contacts[user_id]["buyers"] is True, user_id
    for user_id, value in revenue.items():
        assert contacts[user_id]["revenue"] == pytest.approx(value), user_id
    for user_id, contact in contacts.items():
        if user_id not in vip:
            assert contact.get("vip_customers", False) is False, user_id
        if user_id not in buyers:
            assert contact.get("buyers", False) is False, user_id
        if user_id not in revenue:
            assert contact.get("revenue") is None, user_id


def test_initial_then_incremental_then_full(
    make_config: MakeConfig,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed(warehouse)
    path, _ = make_config()
    code, out, _ = run_cli(capsys, "-c", str(path), "sync")
    assert code == 0, out
    assert_gleap_matches_source(gleap, warehouse)
    first = identify_calls(gleap)
    # One call per user, carrying every audience and trait of that user.
    users = warehouse.members("vip") | warehouse.members("buyer") | set(warehouse.revenue())
    assert sorted(c["user_id"] for c in first) == sorted(users)
    assert first[[c["user_id"] for c in first].index("2")]["body"] == {
        "userId": "2",
        "email": "p2@example.com",
        "name": "P2",
        "vip_customers": True,
        "buyers": True,
        "revenue": 20,
    }
    assert "vip_customers" in out and "succeeded" in out
    # Invariant 1: the ledger is what Gleap acknowledged.
    for (key, user_id), value in ledger(state_url).items():
        assert gleap.contact(user_id)[key] == value  # type: ignore[index]

    gleap.reset_calls()
    warehouse.execute("UPDATE people SET vip = 0 WHERE id = 3")  # leaves
    warehouse.execute("UPDATE people SET buyer = 1 WHERE id = 5")  # enters
    warehouse.execute("UPDATE people SET revenue = 999 WHERE id = 7")  # trait changes
    warehouse.execute("UPDATE people SET revenue = NULL WHERE id = 9")  # trait gone
    warehouse.add(30, vip=True)  # new user
    code, out, _ = run_cli(capsys, "-c", str(path), "sync")
    assert code == 0
    second = identify_calls(gleap)
    assert sorted(c["user_id"] for c in second) == ["3", "30", "5", "7", "9"]
    bodies = {c["user_id"]: c["body"] for c in second}
    assert bodies["3"]["vip_customers"] is False
    assert bodies["9"]["revenue"] is None
    assert bodies["7"]["revenue"] == 999
    assert "buyers" not in bodies["3"]  # only what changed
    assert_gleap_matches_source(gleap, warehouse)

    gleap.reset_calls()
    code, out, _ = run_cli(capsys, "-c", str(path), "sync")
    assert code == 0 and identify_calls(gleap) == []  # nothing changed, nobody called

    code, out, _ = run_cli(capsys, "-c", str(path), "sync", "vip_customers", "--full")
    assert code == 0
    full = {c["user_id"]: c["body"] for c in identify_calls(gleap)}
    assert {u for u, b in full.items() if b.get("vip_customers") is True} == warehouse.members(
        "vip"
    )
    assert {u for u, b in full.items() if b.get("vip_customers") is False} == {"3"}
    assert all(set(b) >= {"userId", "vip_customers"} for b in full.values())

    runs = assert_counts_add_up(state_url)
    assert [r["mode"] for r in runs if r["audience_key"] == "vip_customers"] == [
        "initial",
        "incremental",
        "incremental",
        "full",
    ]
    code, out, _ = run_cli(capsys, "-c", str(path), "history", "--json", "--limit", "100")
    assert code == 0
    history = json.loads(out)
    assert len(history) == len(runs) == 3 * 3 + 1
    assert {h["status"] for h in history} == {"succeeded"}
    assert history[0]["mode"] == "full" and history[0]["finished_at"].endswith("Z")


def test_dry_run_changes_nothing_and_sends_nothing(
    make_config: MakeConfig,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed(warehouse)
    path, _ = make_config()
    before_fresh = dump_state(state_url)
    code, out, _ = run_cli(capsys, "-c", str(path), "sync", "--dry-run")
    assert code == 0
    assert "nothing was written" in out and "18 Identify calls" in out
    assert dump_state(state_url) == before_fresh
    assert gleap.calls() == []
    if state_url.startswith("sqlite"):
        assert not Path(state_url.removeprefix("sqlite:///")).exists()

    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    warehouse.execute("UPDATE people SET vip = 0 WHERE id IN (1, 2)")
    gleap.reset_calls()
    before = dump_state(state_url)
    code, out, _ = run_cli(capsys, "-c", str(path), "sync", "--dry-run", "--full")
    assert code == 0
    assert dump_state(state_url) == before
    assert gleap.calls() == []
    line = next(row for row in out.splitlines() if row.startswith("vip_customers"))
    assert line.split()[1:6] == ["full", "6", "0", "2", "0"]


def test_wrong_token_changes_nothing_and_never_prints_it(
    make_config: MakeConfig,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    seed(warehouse)
    path, _ = make_config()
    secret = "definitely-wrong-token-4711"
    monkeypatch.setenv("AUDSYNC_GLEAP_API_TOKEN", secret)
    before = dump_state(state_url)
    with caplog.at_level(logging.DEBUG):
        code, out, err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 1
    assert err.strip().splitlines() == ["audsync: error: Gleap rejected the API token (HTTP 401)"]
    assert secret not in out + err + caplog.text
    assert dump_state(state_url) == before


def test_token_revoked_mid_run_stops_and_keeps_the_rest_queued(
    make_config: MakeConfig,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    seed(warehouse)
    path, _ = make_config(gleap_extra="concurrency = 1")
    seen = []

    def revoke_after_five(body: dict[str, Any]) -> None:
        seen.append(body["userId"])
        if len(seen) == 5:
            gleap.token = "rotated"

    gleap.on_identify = revoke_after_five
    with caplog.at_level(logging.DEBUG):
        code, out, err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 1
    assert "Gleap rejected the API token" in err
    assert TOKEN not in out + err + caplog.text
    acked_users = {u for _, u in ledger(state_url)}
    assert acked_users == set(seen[:5])
    runs = assert_counts_add_up(state_url)
    assert {r["status"] for r in runs} == {"failed"}
    assert all("Gleap rejected the API token" in r["error"] for r in runs)
    for r in runs:
        assert TOKEN not in (r["error"] or "")

    gleap.token = TOKEN
    gleap.on_identify = None
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    assert_gleap_matches_source(gleap, warehouse)


def test_bad_config_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "audsync.toml"
    path.write_text("[gleap]\nrate_limit = -1\n", encoding="utf-8")
    code, _out, err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 2
    assert err == f"audsync: error: {path}: gleap.rate_limit: -1 must be positive\n"


def test_failing_query_names_the_audience_and_the_rest_go_on(
    make_config: MakeConfig,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed(warehouse)
    body = """
[[audiences]]
name = "Broken"
sql = "SELECT id AS user_id FROM no_such_table"

[[audiences]]
name = "Buyers"
sql = "SELECT id AS user_id FROM people WHERE buyer = 1"
"""
    path, _ = make_config(body=body)
    code, _out, err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 1
    assert "audience 'broken': query failed" in err and "no_such_table" in err
    assert "Traceback" not in err
    broken = query(state_url, "SELECT * FROM sync_runs WHERE audience_key = 'broken'")
    assert [r["status"] for r in broken] == ["failed"]
    assert "no_such_table" in broken[0]["error"]
    assert query(state_url, "SELECT * FROM snapshot WHERE audience_key = 'broken'") == []
    assert {c["user_id"] for c in identify_calls(gleap)} == warehouse.members("buyer")


def test_query_without_user_id(
    make_config: MakeConfig, warehouse: Warehouse, capsys: pytest.CaptureFixture[str]
) -> None:
    seed(warehouse)
    path, _ = make_config(body='[[traits]]\nname = "T"\nsql = "SELECT id FROM people"\n')
    code, _, err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 1
    # T is a trait, and the message says so.
    assert "trait 't': the query returns no user_id column (it returns: id)" in err


def test_empty_audience_is_held_and_no_false_is_sent(
    make_config: MakeConfig,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed(warehouse)
    path, _ = make_config()
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    gleap.reset_calls()
    warehouse.execute("DELETE FROM people")
    code, _out, err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 1
    assert "held" in err and "--force" in err
    assert identify_calls(gleap) == []
    held = query(state_url, "SELECT * FROM sync_runs WHERE status = 'held'")
    assert {r["audience_key"] for r in held} == {"vip_customers", "buyers", "revenue"}
    assert query(state_url, "SELECT * FROM outbox") == []
    # The user insists: --force goes ahead and sends the exits.
    code, _, _ = run_cli(capsys, "-c", str(path), "sync", "vip_customers", "--force")
    assert code == 0
    assert {c["body"]["vip_customers"] for c in identify_calls(gleap)} == {False}


def test_mass_exit_over_ratio_is_held(
    make_config: MakeConfig,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed(warehouse)
    path, _ = make_config(
        body='[[audiences]]\nname = "VIP"\nsql = "SELECT id AS user_id FROM people WHERE vip = 1"\n'
    )
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    warehouse.execute("UPDATE people SET vip = 0 WHERE id <= 5")  # 5 of 8 leave
    gleap.reset_calls()
    code, _, err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 1 and "5 of 8 users would be removed" in err
    assert identify_calls(gleap) == []


def test_rejected_user_is_recorded_and_the_rest_delivered(
    make_config: MakeConfig,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed(warehouse)
    gleap.reject_users = {"4"}
    path, _ = make_config()
    code, out, _ = run_cli(capsys, "-c", str(path), "sync")
    assert code == 0
    failures = query(state_url, "SELECT * FROM delivery_failures")
    assert {(f["user_id"], f["http_status"]) for f in failures} == {("4", 400)}
    assert {f["audience_key"] for f in failures} == {"vip_customers", "buyers", "revenue"}
    assert all("reject_users" in f["reason"] for f in failures)
    assert gleap.contact("4") is None
    assert all(u != "4" for _, u in ledger(state_url))
    runs = assert_counts_add_up(state_url)
    assert {r["status"] for r in runs} == {"partial"}
    code, out, _ = run_cli(capsys, "-c", str(path), "history", "--failures")
    assert "reject_users" in out

    gleap.reject_users = set()
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    assert gleap.contact("4") is not None
    assert_gleap_matches_source(gleap, warehouse)
    assert_counts_add_up(state_url)


def test_bad_ids_are_skipped_and_duplicates_collapsed(
    make_config: MakeConfig,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    body = """
[[audiences]]
name = "Messy"
sql = \"\"\"
SELECT 1 AS user_id UNION ALL SELECT 1 UNION ALL SELECT NULL UNION ALL SELECT ''
UNION ALL SELECT 2.0 UNION ALL SELECT 'u3' UNION ALL SELECT 'u3'
\"\"\"
"""
    path, _ = make_config(body=body)
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    (row,) = query(state_url, "SELECT * FROM sync_runs")
    assert (row["members"], row["skipped_ids"], row["duplicate_ids"]) == (3, 2, 2)
    assert set(gleap.contacts()) == {"1", "2", "u3"}


def test_postgres_source_and_unstorable_column_fails_that_audience_change_only(
    pg_url: str,
    gleap: Sandbox,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sqlalchemy import create_engine, text

    from tests.helpers import write_config

    engine = create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE customers (id BIGINT, email TEXT, tags TEXT[], signed_up TIMESTAMPTZ,"
                " spend NUMERIC(10, 2))"
            )
        )
        conn.execute(
            text(
                "INSERT INTO customers VALUES"
                " (1, 'a@x.io', NULL, '2026-01-02 12:00:00+02', 12.50),"
                " (2, 'b@x.io', ARRAY['x', 'y'], NULL, 100.00),"
                " (3, 'c@x.io', NULL, NULL, NULL)"
            )
        )
    engine.dispose()
    monkeypatch.setenv("AUDSYNC_GLEAP_API_TOKEN", TOKEN)
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    body = """
[[audiences]]
name = "Customers"
sql = "SELECT id AS user_id, email, tags, signed_up AS signed_up_at FROM customers"

[[traits]]
name = "Spend"
sql = "SELECT id AS user_id, spend AS value FROM customers"
"""
    path = write_config(
        tmp_path, base_url=gleap.url, source_url=pg_url, state_url=state_url, body=body
    )
    code, _out, err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 0, err
    assert gleap.contact("1") == {
        "userId": "1",
        "email": "a@x.io",
        "tags": None,
        "createdAt": "2026-01-02T10:00:00.000Z",
        "customers": True,
        "spend": 12.5,
    }
    assert gleap.contact("3") == {"userId": "3", "email": "c@x.io", "tags": None, "customers": True}
    # Only the audience whose row holds the array fails for user 2: the trait
    # goes in the call (issue 13 item 6).
    assert gleap.contact("2") == {"userId": "2", "spend": 100}
    (failure,) = query(state_url, "SELECT * FROM delivery_failures WHERE user_id = '2'")
    assert failure["http_status"] is None and failure["audience_key"] == "customers"
    assert failure["reason"] == (
        "not sendable: 'customers': column 'tags': a list cannot be stored in a Gleap attribute"
    )
    assert_counts_add_up(state_url)


def test_poison_user_is_parked_after_max_attempts_until_retry_failed(
    make_config: MakeConfig,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed(warehouse)
    gleap.reject_users = {"4"}
    path, _ = make_config(extra="[sync]\nmax_attempts = 3\n")
    for _ in range(5):
        assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    tries = [c for c in gleap.calls("/admin/identify") if c["user_id"] == "4"]
    assert len(tries) == 3  # then parked: later syncs leave user 4 alone
    parked = query(state_url, "SELECT * FROM outbox WHERE user_id = '4'")
    assert {(r["state"], r["attempts"], r["last_status"]) for r in parked} == {("failed", 3, 400)}
    code, out, _ = run_cli(capsys, "-c", str(path), "status")
    assert code == 0 and "parked_failures" in out

    gleap.reject_users = set()
    code, out, _ = run_cli(capsys, "-c", str(path), "retry-failed")
    assert code == 0, out
    # one line per audience the user's three rejected changes belong to
    assert out.count(": 1 rejected changes queued again") == 3, out
    assert gleap.contact("4") is not None
    assert_gleap_matches_source(gleap, warehouse)
    retry_runs = query(state_url, "SELECT * FROM sync_runs WHERE mode = 'retry'")
    assert {r["status"] for r in retry_runs} == {"succeeded"}
    assert sum(r["delivered"] for r in retry_runs) == 3
    assert_counts_add_up(state_url)
    code, out, _ = run_cli(capsys, "-c", str(path), "retry-failed")
    assert code == 0 and "no rejected changes to retry" in out


def test_full_resync_also_retries_parked_users(
    make_config: MakeConfig,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed(warehouse)
    gleap.reject_users = {"4"}
    path, _ = make_config(extra="[sync]\nmax_attempts = 1\n")
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    gleap.reject_users = set()
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    assert gleap.contact("4") is None  # parked after one attempt
    assert run_cli(capsys, "-c", str(path), "sync", "--full")[0] == 0
    assert_gleap_matches_source(gleap, warehouse)
    assert_counts_add_up(state_url)


@pytest.mark.slow
def test_first_sigint_finishes_the_calls_in_flight_and_records_every_run(
    tmp_path: Path, warehouse: Warehouse, processes: list[Process]
) -> None:
    for i in range(1, 201):
        warehouse.add(i, vip=i % 2 == 0, buyer=True)
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    with Sandbox(TOKEN, rate_limit=20, rate_window=1.0, seed=5) as gleap:
        path = write_config(
            tmp_path, base_url=gleap.url, source_url=warehouse.url, state_url=state_url
        )
        sync = Process(tmp_path, "sync", "-c", str(path), "sync", "--progress", "lines")
        processes.append(sync)
        wait_for(lambda: len(gleap.calls("/admin/identify")) >= 30, what="delivery to start")
        sync.signal(signal.SIGINT)
        asked = time.monotonic()
        assert sync.wait(timeout=15) == 130
        # Gleap's 429s ask for up to a second's wait: the stop does not sit them out.
        assert time.monotonic() - asked < 5
        output = sync.output()
        assert "SIGINT: finishing the calls in flight" in output
        assert "interrupted; changes not yet acknowledged stay queued" in output
        runs = query(state_url, "SELECT audience_key, status FROM sync_runs")
        assert {r["audience_key"]: r["status"] for r in runs} == {
            "vip_customers": "interrupted",
            "buyers": "interrupted",
            "revenue": "succeeded",  # nobody has revenue: nothing to send
        }
        assert query(state_url, "SELECT holder FROM leases WHERE holder IS NOT NULL") == []
        assert_counts_add_up(state_url)

        again = Process(tmp_path, "again", "-c", str(path), "sync")
        processes.append(again)
        assert again.wait(timeout=90) == 0, again.output()
        assert source_mismatches(gleap, warehouse) == []
