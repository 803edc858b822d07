"""JSON logs for shippers, and what `audsync check` says about the next sync."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from audsync.sandbox import Sandbox
from tests.helpers import TOKEN, MakeConfig, Receiver, Warehouse, run_cli


def test_json_logs_one_object_per_line_and_never_the_token(
    make_config: MakeConfig, warehouse: Warehouse, gleap: Sandbox, tmp_path: Path
) -> None:
    for i in range(1, 6):
        warehouse.add(i, vip=True)
    path, _ = make_config()
    env = {**os.environ, "AUDSYNC_GLEAP_API_TOKEN": TOKEN}
    done = subprocess.run(
        [sys.executable, "-m", "audsync.cli", "--log-format", "json", "-c", str(path), "sync"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(set(e) >= {"ts", "level", "logger", "message"} for e in entries)
    assert all(e["ts"].endswith("Z") for e in entries)
    assert any("planning vip_customers" in e["message"] for e in entries)
    summaries = [e["message"] for e in entries if e["message"].startswith("run ")]
    assert len(summaries) == 3  # one summary line per run, with its counts
    assert any("vip_customers (initial): succeeded; members=5 entered=5" in s for s in summaries)
    assert TOKEN not in done.stderr + done.stdout


def test_check_reports_the_next_sync(
    make_config: MakeConfig,
    warehouse: Warehouse,
    gleap: Sandbox,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for i in range(1, 11):
        warehouse.add(i, vip=i <= 4, buyer=True)
    path, _ = make_config(rate_limit=1000)
    code, out, err = run_cli(capsys, "-c", str(path), "check")
    assert code == 0, err
    assert "token accepted" in out
    assert "audience vip_customers: ok (4 rows)" in out
    assert "audience vip_customers: the next sync would make 4 calls" in out
    assert "audience buyers: the next sync would make 10 calls" in out
    assert (
        "next sync: 10 Identify calls in all (one per changed user), about 1s at 1000 calls per 1m"
        in out
    )
    assert gleap.calls("/admin/identify") == []  # check sends nothing


@pytest.mark.parametrize(
    ("previous", "status", "state"),
    [
        (None, "succeeded", None),  # never alerted and fine: quiet
        ("ok", "partial", None),
        (None, "failed", "failing"),
        ("ok", "failed", "failing"),
        ("failing", "failed", None),  # still failing: no repeat
        ("failing", "succeeded", "ok"),  # recovered
        ("held", "partial", "ok"),
        ("ok", "held", "held"),
        ("held", "held", None),
        ("failing", "held", "held"),
        ("failing", "interrupted", None),  # says nothing about health
        ("ok", "delivering", None),
    ],
)
def test_alert_transition(previous: str | None, status: str, state: str | None) -> None:
    from audsync.alerts import alert_transition

    assert alert_transition(previous, status) == state


def test_webhook_fires_once_when_failing_and_once_when_recovered(
    make_config: MakeConfig,
    warehouse: Warehouse,
    gleap: Sandbox,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
    receiver: Receiver,
) -> None:
    for i in range(1, 6):
        warehouse.add(i, vip=True)
    body = '[[audiences]]\nname = "VIP"\nsql = "SELECT id AS user_id FROM people WHERE vip = 1"\n'
    path, _ = make_config(body=body, extra=f'[alerts]\nwebhook_url = "{receiver.url}"\n')
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    assert receiver.received == []  # healthy from the start: nothing to say

    warehouse.execute("ALTER TABLE people RENAME TO people_gone")
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 1
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 1  # still failing
    assert [(m["audience"], m["event"]) for m in receiver.received] == [("vip", "failing")]
    assert "no such table" in receiver.received[0]["error"]
    assert TOKEN not in json.dumps(receiver.received)

    warehouse.execute("ALTER TABLE people_gone RENAME TO people")
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    assert [m["event"] for m in receiver.received] == ["failing", "recovered"]
    assert receiver.received[1]["state"] == "ok" and receiver.received[1]["previous"] == "failing"

    warehouse.execute("DELETE FROM people")
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 1
    assert [m["event"] for m in receiver.received] == ["failing", "recovered", "held"]


def test_a_new_audience_failing_before_its_first_plan_is_alerted(
    make_config: MakeConfig,
    warehouse: Warehouse,
    gleap: Sandbox,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
    receiver: Receiver,
) -> None:
    warehouse.add(1, vip=True)
    body = '[[audiences]]\nname = "VIP"\nsql = "SELECT id AS user_id FROM nowhere"\n'
    path, _ = make_config(body=body, extra=f'[alerts]\nwebhook_url = "{receiver.url}"\n')
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 1
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 1
    assert [(m["audience"], m["event"]) for m in receiver.received] == [("vip", "failing")]
    code, out, _ = run_cli(capsys, "-c", str(path), "status", "--json")
    assert code == 0
    vip = json.loads(out)["audiences"][0]
    assert (vip["key"], vip["members"], vip["last_status"]) == ("vip", None, "failed")

    path.write_text(path.read_text().replace("FROM nowhere", "FROM people"))
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    assert [m["event"] for m in receiver.received] == ["failing", "recovered"]
    assert gleap.contacts()["1"]["vip"] is True


def test_check_counts_what_earlier_syncs_left_queued(
    make_config: MakeConfig,
    warehouse: Warehouse,
    gleap: Sandbox,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The total includes changes still queued from before; check says so, so that
    per-audience lines of 0 beside a total of thousands do not read as a contradiction."""
    for i in range(1, 6):
        warehouse.add(i, vip=True)
    path, _ = make_config(
        body=(
            '[[audiences]]\nname = "VIP Customers"\n'
            'sql = "SELECT id AS user_id FROM people WHERE vip = 1"\n'
        ),
        max_retries=0,
    )
    gleap.fault = lambda method, path, body: (
        (503, {}, {"error": "down"}) if path == "/admin/identify" else None
    )
    code, _out, _err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 1  # Gleap was down: the five changes stay queued
    gleap.fault = None
    warehouse.add(6, vip=True)
    sent = len(gleap.calls("/admin/identify"))
    code, out, err = run_cli(capsys, "-c", str(path), "check")
    assert code == 0, err
    assert "audience vip_customers: the next sync would make 1 calls" in out
    assert "already queued: 5 users whose changes earlier syncs queued" in out
    assert "next sync: 6 Identify calls in all" in out
    assert len(gleap.calls("/admin/identify")) == sent  # check sends nothing
