"""``audsync verify`` through the CLI against the sandbox (issue 14).

Contacts are drifted behind audsync's back through the sandbox's ``/_sandbox/``
endpoints, the way Gleap's UI or another integration would; verify must find
exactly those, read with both headers, never write or send anything without
``--repair``, and with it converge.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from audsync.sandbox import Sandbox
from tests.helpers import (
    AUDIENCES,
    TOKEN,
    MakeConfig,
    Receiver,
    Warehouse,
    assert_counts_add_up,
    dump_state,
    query,
    run_cli,
    seed,
)

READ_TOKEN = "read-key-5ecr3t-v3"
PROJECT = "proj-4242"
USERS = 60  # vip: i % 3 == 0 (20), buyers: i % 2 == 0 (30), revenue: i % 5 != 0 (48)
HOLDERS = 56  # users in at least one of them: all but 5, 25, 35 and 55


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUDSYNC_GLEAP_READ_TOKEN", READ_TOKEN)
    monkeypatch.setenv("AUDSYNC_GLEAP_PROJECT", PROJECT)


@pytest.fixture
def synced(
    make_config: MakeConfig,
    gleap: Sandbox,
    warehouse: Warehouse,
    capsys: pytest.CaptureFixture[str],
    reads: None,
) -> Path:
    """A config whose three definitions were synced to the sandbox; returns its path."""
    gleap.read_token, gleap.project = READ_TOKEN, PROJECT
    seed(warehouse, USERS)
    path, _ = make_config(max_retries=1)
    code, _out, err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 0, err
    gleap.reset_calls()
    return path


def verify(capsys: pytest.CaptureFixture[str], path: Path, *argv: str) -> tuple[int, Any, str]:
    code, out, err = run_cli(
        capsys, "-c", str(path), "verify", "--json", "--progress", "off", *argv
    )
    try:
        return code, json.loads(out), err
    except ValueError:
        return code, out, err


def identify_calls(gleap: Sandbox) -> list[dict[str, Any]]:
    return gleap.calls("/admin/identify")


def test_no_drift_exits_0_and_reads_every_user_with_both_headers(
    synced: Path, gleap: Sandbox, capsys: pytest.CaptureFixture[str], state_url: str
) -> None:
    before = dump_state(state_url)
    code, report, err = verify(capsys, synced, "--sample", "1000")
    assert code == 0, err
    population = len(gleap.contacts())
    assert population == HOLDERS
    assert report["population"] == report["sampled"] == report["checked"] == population
    assert report["drifted"] == report["missing"] == report["read_failures"] == 0
    assert report["drift_rate"] == 0.0
    assert report["ci95"][0] == 0.0 and 0 < report["ci95"][1] < 0.1
    assert report["by_audience"]["vip_customers"]["checked"] == 20
    assert report["by_audience"]["buyers"]["checked"] == 30
    assert report["by_audience"]["revenue"]["checked"] == 48
    reads = gleap.calls("/v3/")
    assert len(reads) == population
    assert {c["user_id"] for c in reads} == set(gleap.contacts())
    for call in reads:
        assert call["method"] == "GET"
        assert call["path"] == f"/v3/sessions/by-user-id/{call['user_id']}"
        assert call["headers"]["authorization"] == f"Bearer {READ_TOKEN}"
        assert call["headers"]["project"] == PROJECT
        assert "api-token" not in call["headers"]  # the admin token stays with the admin API
    assert identify_calls(gleap) == []
    assert gleap.stats.count("read", ok=True) == population
    assert dump_state(state_url) == before


def test_tampered_contacts_are_found_exactly_and_nothing_is_sent_or_written(
    synced: Path, gleap: Sandbox, capsys: pytest.CaptureFixture[str], state_url: str
) -> None:
    # Two deleted contacts (3: vip + revenue; 6: vip + buyer + revenue), one vip
    # flag flipped by hand (9), one trait edited (2), one buyer flag removed (4).
    httpx.delete(f"{gleap.url}/_sandbox/contacts/3").raise_for_status()
    httpx.delete(f"{gleap.url}/_sandbox/contacts/6").raise_for_status()
    httpx.patch(
        f"{gleap.url}/_sandbox/contacts/9", json={"vip_customers": False}
    ).raise_for_status()
    httpx.patch(f"{gleap.url}/_sandbox/contacts/2", json={"revenue": 999}).raise_for_status()
    httpx.delete(f"{gleap.url}/_sandbox/contacts/4/attributes/buyers").raise_for_status()
    before = dump_state(state_url)
    code, report, err = verify(capsys, synced, "--sample", "1000")
    assert code == 1, err
    assert report["checked"] == len(gleap.contacts()) + 2
    assert report["drifted"] == 5
    assert report["missing"] == 2
    by = report["by_audience"]
    assert (by["vip_customers"]["drifted"], by["vip_customers"]["missing"]) == (3, 2)
    assert (by["buyers"]["drifted"], by["buyers"]["missing"]) == (2, 1)
    assert (by["revenue"]["drifted"], by["revenue"]["missing"]) == (3, 2)
    assert by["vip_customers"]["drift_rate"] == pytest.approx(3 / 20)
    low, high = by["vip_customers"]["ci95"]
    assert low < 3 / 20 < high
    examples = {(e["user_id"], e["key"]): e for e in report["examples"]}
    assert examples[("3", "vip_customers")]["missing_contact"] is True
    assert examples[("9", "vip_customers")]["ledger"] is True
    assert examples[("9", "vip_customers")]["gleap"] is False
    assert examples[("2", "revenue")]["ledger"] == 2.0
    assert examples[("2", "revenue")]["gleap"] == 999
    assert examples[("4", "buyers")]["gleap"] == "(absent)"
    assert identify_calls(gleap) == []  # no Identify call without --repair
    assert dump_state(state_url) == before  # nothing written to the state DB


def test_text_output_names_the_drift(
    synced: Path, gleap: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    gleap.edit_contact("9", {"vip_customers": False})
    code, out, err = run_cli(capsys, "-c", str(synced), "verify", "--progress", "off")
    assert code == 1, err
    assert "vip_customers" in out and "95% CI" in out
    assert "  9  vip_customers  true  false" in out


def test_repair_converges_and_is_recorded_as_a_repair_run(
    synced: Path, gleap: Sandbox, capsys: pytest.CaptureFixture[str], state_url: str
) -> None:
    gleap.drop_contact("3")
    gleap.edit_contact("9", {"vip_customers": False, "email": "changed@x.io"})
    gleap.drop_attribute("4", "buyers")
    # Right after a first sync (no snapshot yet) the contact ledger knows the fields.
    assert query(state_url, "SELECT COUNT(*) AS n FROM snapshot") == [{"n": 0}]
    code, report, err = verify(capsys, synced, "--sample", "1000", "--repair")
    assert code == 0, err
    assert report["drifted"] == 3
    assert report["repair"]["queued"] == 4  # 3: vip + revenue; 9: vip; 4: buyers
    assert report["repair"]["delivered"] == 4
    # One coalesced call per drifted user; the deleted contact comes back whole.
    calls = identify_calls(gleap)
    assert sorted(c["user_id"] for c in calls) == ["3", "4", "9"]
    contact = gleap.contact("3")
    assert contact is not None
    assert contact["vip_customers"] is True and contact["revenue"] == 3.0
    assert contact["email"] == "p3@x.io"
    assert gleap.contact("9")["email"] == "p9@x.io"  # type: ignore[index]
    runs = query(state_url, "SELECT * FROM sync_runs WHERE mode = 'repair' ORDER BY audience_key")
    assert [(r["audience_key"], r["queued"], r["delivered"], r["status"]) for r in runs] == [
        ("buyers", 1, 1, "succeeded"),
        ("revenue", 1, 1, "succeeded"),
        ("vip_customers", 2, 2, "succeeded"),
    ]
    assert all(r["trigger"] == "manual" for r in runs)
    assert_counts_add_up(state_url)
    gleap.reset_calls()
    code, report, err = verify(capsys, synced, "--sample", "1000")
    assert code == 0, err
    assert report["drifted"] == 0 and report["checked"] == len(gleap.contacts())
    assert identify_calls(gleap) == []


def test_repair_without_drift_queues_nothing(
    synced: Path, gleap: Sandbox, capsys: pytest.CaptureFixture[str], state_url: str
) -> None:
    code, report, err = verify(capsys, synced, "--repair")
    assert code == 0, err
    assert "repair" not in report
    assert identify_calls(gleap) == []
    assert query(state_url, "SELECT * FROM sync_runs WHERE mode = 'repair'") == []


def test_named_keys_and_a_sample_bound_what_is_read(
    synced: Path, gleap: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    gleap.drop_attribute("4", "buyers")  # drift outside the named key is not looked at
    code, report, err = verify(capsys, synced, "vip_customers", "--sample", "7")
    assert code == 0, err
    assert report["keys"] == ["vip_customers"]
    assert report["population"] == 20 and report["sampled"] == report["checked"] == 7
    assert list(report["by_audience"]) == ["vip_customers"]
    read = {c["user_id"] for c in gleap.calls("/v3/")}
    assert len(read) == 7 and all(int(u) % 3 == 0 for u in read)


@pytest.mark.parametrize(
    ("unset", "key"),
    [("AUDSYNC_GLEAP_READ_TOKEN", "gleap.read_token"), ("AUDSYNC_GLEAP_PROJECT", "gleap.project")],
)
def test_missing_read_token_or_project_is_a_config_error(
    synced: Path,
    gleap: Sandbox,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    unset: str,
    key: str,
) -> None:
    monkeypatch.delenv(unset)
    code, _out, err = run_cli(capsys, "-c", str(synced), "verify")
    assert code == 2
    assert err.count("\n") == 1 and key in err and "Traceback" not in err
    assert unset in err
    assert gleap.calls("/v3/") == []


def test_unknown_key_and_bad_sample_are_usage_errors(
    synced: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "-c", str(synced), "verify", "nope")
    assert code == 2 and "'nope'" in err
    code, _, err = run_cli(capsys, "-c", str(synced), "verify", "--sample", "0")
    assert code == 2 and "--sample" in err


@pytest.mark.parametrize(
    ("field", "value", "status"),
    [("read_token", "wrong-key", 401), ("project", "other-project", 403)],
)
def test_a_refused_read_key_stops_the_reads_and_is_reported_never_drift(
    synced: Path,
    gleap: Sandbox,
    capsys: pytest.CaptureFixture[str],
    field: str,
    value: str,
    status: int,
) -> None:
    setattr(gleap, field, value)
    code, report, err = verify(capsys, synced, "--sample", "1000", "--repair")
    assert code == 1
    assert report["checked"] == report["drifted"] == report["missing"] == 0
    assert report["read_failures"] == report["sampled"]
    assert report["failures"][0]["http_status"] == status
    assert "gleap.read_token" in report["failures"][0]["reason"]
    # Stopped at the first refusal (at most one read per sender in flight).
    assert len(gleap.calls("/v3/")) <= 8
    assert identify_calls(gleap) == []  # a failed read is no drift: nothing repaired
    assert READ_TOKEN not in json.dumps(report) + err


def test_404_429_and_5xx_on_reads(
    synced: Path, gleap: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    gleap.drop_contact("6")  # a real 404: missing, drift on every key
    seen: dict[str, int] = {}

    def fault(method: str, path: str, body: Any) -> Any:
        user = path.rsplit("/", 1)[1]
        seen[user] = seen.get(user, 0) + 1
        if user == "9" and seen[user] == 1:
            return 429, {"Retry-After": "0"}, {"error": "slow down"}  # waited, sent again
        if user == "12" and seen[user] == 1:
            return 503, {}, {"error": "blip"}  # retried (max_retries = 1)
        if user == "15":
            return 500, {}, {"error": "boom"}  # every attempt: a failed read
        if user == "18":
            return 400, {}, {"error": "bad request"}  # a failed read, not missing
        return None

    gleap.fault = fault
    code, report, _err = verify(capsys, synced, "--sample", "1000")
    assert code == 1
    assert report["sampled"] == HOLDERS
    assert report["read_failures"] == 2
    failed = {f["user_id"]: f for f in report["failures"]}
    assert set(failed) == {"15", "18"}
    assert failed["18"]["http_status"] == 400 and "bad request" in failed["18"]["reason"]
    assert "HTTP 500" in failed["15"]["reason"]
    assert report["checked"] == report["sampled"] - 2
    assert report["drifted"] == report["missing"] == 1  # user 6 alone
    assert seen["9"] == 2 and seen["12"] == 2 and seen["15"] == 2


def test_every_read_answering_404_is_a_misdirected_read_not_drift(
    synced: Path, gleap: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    gleap.fault = lambda method, path, body: (404, {}, {"error": "no such route"})
    code, report, _err = verify(capsys, synced, "--sample", "1000", "--repair")
    assert code == 1
    assert report["missing"] == report["drifted"] == 0
    assert report["read_failures"] == report["sampled"]
    assert "gleap.base_url" in report["failures"][0]["reason"]
    assert identify_calls(gleap) == []


def test_read_token_is_a_secret_in_errors(
    synced: Path,
    gleap: Sandbox,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def echo(method: str, path: str, body: Any) -> Any:
        return 400, {}, {"error": f"key {READ_TOKEN} is not allowed here"}

    gleap.fault = echo
    code, out, err = run_cli(capsys, "-c", str(synced), "verify", "--progress", "off")
    assert code == 1
    assert READ_TOKEN not in out + err and "***" in out
    monkeypatch.setenv("AUDSYNC_GLEAP_READ_TOKEN", "bad\x01key")
    code, out, err = run_cli(capsys, "-c", str(synced), "verify")
    assert code == 2 and "gleap.read_token" in err and "bad" not in err


def test_a_change_in_flight_is_not_drift(
    synced: Path,
    gleap: Sandbox,
    warehouse: Warehouse,
    capsys: pytest.CaptureFixture[str],
    state_url: str,
) -> None:
    # Gleap already holds the queued value while the ledger still holds the old one
    # (the acknowledgement has not been recorded): no drift.
    from sqlalchemy import create_engine, text

    engine = create_engine(state_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox (audience_key, user_id, value, run_id, version, priority,"
                " state, attempts, queued_at, attempted) VALUES ('vip_customers', '9', 'false',"
                " 1, 1, 0, 'pending', 0, CURRENT_TIMESTAMP, TRUE)"
            )
        )
    engine.dispose()
    gleap.edit_contact("9", {"vip_customers": False})
    code, report, err = verify(capsys, synced, "--sample", "1000")
    assert code == 0, err
    assert report["drifted"] == 0


def test_sync_does_not_need_a_read_token(
    synced: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AUDSYNC_GLEAP_READ_TOKEN")
    code, out, err = run_cli(capsys, "-c", str(synced), "sync")
    assert code == 0, err
    assert TOKEN not in out + err


def test_demo_ends_with_a_verify_that_finds_and_repairs_its_drift(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run_cli(capsys, "demo", "--users", "300")
    assert code == 0, err
    repaired, clean = out.split("== 7.")[1].split("== 8.")[0], out.split("== 8.")[1]
    assert "(no contact)" in repaired and "true  false" in repaired
    assert "repair: 2 changes queued again; 2 delivered, 0 failed, 0 pending" in repaired
    assert "no drift found" in clean and "drift (" not in clean
    assert "demo-read-key" not in out + err  # a read key is redacted like any secret


VERIFY_EVERYONE = "[verify]\nsample_per_run = 1000\nmax_drift = 0.05\nrepair = true\n"


def test_the_daemon_audits_after_a_plan_alerts_on_drift_and_queues_a_repair(
    synced: Path,
    make_config: MakeConfig,
    gleap: Sandbox,
    capsys: pytest.CaptureFixture[str],
    state_url: str,
    receiver: Receiver,
) -> None:
    from audsync.metrics import Metrics
    from audsync.service import Daemon
    from audsync.state import open_state

    _, config = make_config(
        max_retries=1,
        extra=f'[alerts]\nwebhook_url = "{receiver.url}"\n{VERIFY_EVERYONE}',
    )
    gleap.drop_contact("3")  # vip + revenue
    gleap.edit_contact("9", {"vip_customers": False})
    state = open_state(state_url)
    metrics = Metrics(state, config)
    daemon = Daemon(config, state=state, install_signals=False, metrics=metrics)
    try:
        daemon.plan("schedule")
        ratio = metrics.registry.get_sample_value
        assert ratio("audsync_drift_ratio", {"audience": "vip_customers"}) == pytest.approx(2 / 20)
        assert ratio("audsync_drift_ratio", {"audience": "revenue"}) == pytest.approx(1 / 48)
        assert ratio("audsync_drift_ratio", {"audience": "buyers"}) == 0.0
        reads = metrics.registry.get_sample_value
        assert reads("audsync_verify_reads_total", {"outcome": "contact"}) == HOLDERS - 1
        assert reads("audsync_verify_reads_total", {"outcome": "missing"}) == 1
        assert reads("audsync_gleap_calls_total", {"endpoint": "read", "outcome": "ok"}) == (
            HOLDERS - 1
        )
        # Only vip_customers is over max_drift (5 %): one alert, with its numbers.
        assert [(m["audience"], m["event"]) for m in receiver.received] == [
            ("vip_customers", "drift")
        ]
        alert = receiver.received[0]
        assert (alert["checked"], alert["drifted"], alert["missing"]) == (20, 2, 1)
        assert alert["drift_rate"] == pytest.approx(0.1) and alert["max_drift"] == 0.05
        # The repair is queued for the daemon's deliverer (not started here): nothing sent.
        runs = query(state_url, "SELECT * FROM sync_runs WHERE mode = 'repair' ORDER BY id")
        assert [(r["audience_key"], r["trigger"], r["queued"]) for r in runs] == [
            ("revenue", "schedule", 1),
            ("vip_customers", "schedule", 2),
        ]
        assert identify_calls(gleap) == []
        # A plan before their delivery takes the repairs over instead of withdrawing
        # them as "no change" (the ledger equals the snapshot), then delivers them.
        code, _out, err = run_cli(capsys, "-c", str(synced), "sync")
        assert code == 0, err
        assert sorted(c["user_id"] for c in identify_calls(gleap)) == ["3", "9"]
        contact = gleap.contact("3")
        assert contact is not None and contact["vip_customers"] is True
        repairs = query(state_url, "SELECT * FROM sync_runs WHERE mode = 'repair' ORDER BY id")
        assert [(r["superseded"], r["status"]) for r in repairs] == [
            (1, "succeeded"),
            (2, "succeeded"),
        ]
        daemon.plan("schedule")
        assert ratio("audsync_drift_ratio", {"audience": "vip_customers"}) == 0.0
        assert [m["event"] for m in receiver.received] == ["drift", "drift_recovered"]
        assert_counts_add_up(state_url)
    finally:
        daemon.client.close()
        if daemon.reader is not None:
            daemon.reader.close()
        state.dispose()


def test_the_daemon_needs_a_read_key_when_it_audits(
    make_config: MakeConfig,
    capsys: pytest.CaptureFixture[str],
    reads: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AUDSYNC_GLEAP_PROJECT")
    path, _ = make_config(extra=VERIFY_EVERYONE)
    code, _out, err = run_cli(capsys, "-c", str(path), "run", "--once")
    assert code == 2 and "gleap.project" in err


def test_contact_fields_from_the_contact_ledger_drift_and_are_repaired(
    make_config: MakeConfig,
    gleap: Sandbox,
    warehouse: Warehouse,
    capsys: pytest.CaptureFixture[str],
    state_url: str,
    reads: None,
) -> None:
    gleap.read_token, gleap.project = READ_TOKEN, PROJECT
    seed(warehouse, USERS)
    path, _ = make_config(
        max_retries=1,
        body=AUDIENCES + '[contacts]\nsql = "SELECT id AS user_id, email AS plan FROM people"\n',
    )
    code, _out, err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 0, err
    gleap.reset_calls()
    gleap.edit_contact("9", {"email": "hand@edit.io"})  # a field vip_customers sent
    gleap.edit_contact("10", {"plan": "gold"})  # a field only [contacts] sent
    gleap.edit_contact("11", {"lastActivity": "2030-01-01T00:00:00.000Z"})  # Gleap's own
    code, report, err = verify(capsys, path, "--sample", "1000")
    assert code == 1, err
    assert report["drifted"] == 2 and report["missing"] == 0
    assert report["by_audience"]["vip_customers"]["drifted"] == 1
    assert report["by_audience"]["@contacts"]["drifted"] == 1
    assert report["by_audience"]["@contacts"]["checked"] == USERS
    examples = {(e["user_id"], e["key"], e["field"]): e for e in report["examples"]}
    assert examples[("9", "vip_customers", "email")]["gleap"] == "hand@edit.io"
    assert examples[("9", "vip_customers", "email")]["ledger"] == "p9@x.io"
    assert examples[("10", "@contacts", "plan")]["ledger"] == "p10@x.io"
    assert identify_calls(gleap) == []
    code, report, err = verify(capsys, path, "--sample", "1000", "--repair")
    assert code == 0, err
    calls = {c["user_id"]: c["body"] for c in identify_calls(gleap)}
    assert set(calls) == {"9", "10"}
    assert calls["9"]["email"] == "p9@x.io" and calls["9"]["vip_customers"] is True
    assert calls["10"]["plan"] == "p10@x.io" and "@contacts" not in calls["10"]
    code, report, err = verify(capsys, path, "--sample", "1000")
    assert code == 0 and report["drifted"] == 0, err
    assert_counts_add_up(state_url)
