"""What audsync says is true (issue 12): a preview that would be held says so and
exits 1; "N Identify calls" counts acknowledged calls only; each transition is
counted by one run; a daemon that exited is never shown as running."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from audsync.sandbox import Sandbox
from tests.helpers import TOKEN, MakeConfig, Warehouse, assert_counts_add_up, query, run_cli

VIP = '[[audiences]]\nname = "VIP"\nsql = "SELECT id AS user_id FROM people WHERE vip = 1"\n'


def _synced_vip(
    warehouse: Warehouse, make_config: MakeConfig, capsys: Any, users: int = 10
) -> Path:
    for i in range(1, users + 1):
        warehouse.add(i, vip=True)
    path, _ = make_config(body=VIP)
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    return path


# -- 6. a preview of a held sync exits 1 and says why ----------------------------------


def test_dry_run_of_a_held_plan_exits_1_and_says_why(
    make_config: MakeConfig,
    warehouse: Warehouse,
    gleap: Sandbox,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = _synced_vip(warehouse, make_config, capsys)
    warehouse.execute("DELETE FROM people")
    gleap.reset_calls()
    code, out, err = run_cli(capsys, "-c", str(path), "sync", "--dry-run")
    assert code == 1, (out, err)
    assert "HELD" in out
    lines = err.strip().splitlines()
    assert lines == [
        "audsync: error: audience vip: the next sync would be held by the circuit breaker:"
        " the query returned no rows but 10 users hold this key in Gleap;"
        " run `audsync sync vip --force` if that is right"
    ]
    # A dry run writes nothing: the only run is the first sync.
    assert [r["status"] for r in query(state_url, "SELECT status FROM sync_runs")] == ["succeeded"]
    assert gleap.calls("/admin/identify") == []
    # --force previews what would go ahead, and that is fine.
    code, out, err = run_cli(capsys, "-c", str(path), "sync", "--dry-run", "--force")
    assert code == 0, err
    assert "10 Identify calls" in out


def test_check_of_a_held_plan_exits_1_and_says_why(
    make_config: MakeConfig,
    warehouse: Warehouse,
    gleap: Sandbox,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = _synced_vip(warehouse, make_config, capsys, users=8)
    warehouse.execute("UPDATE people SET vip = 0 WHERE id <= 5")  # 5 of 8 leave
    code, out, err = run_cli(capsys, "-c", str(path), "check")
    assert code == 1, out
    assert "audience vip: ok (3 rows)" in out  # the query itself is fine ...
    assert "the next sync would make" not in out  # ... but no sync would send it
    assert (
        "audsync: error: audience vip: the next sync would be held by the circuit breaker:"
        " 5 of 8 users would be removed (over max_exit_ratio 0.5);"
        " run `audsync sync vip --force` if that is right"
    ) in err
    assert len(err.strip().splitlines()) == 1


# -- 9. an exited daemon is never shown as running -------------------------------------


@pytest.mark.parametrize(
    ("recorded", "host", "pid_alive", "age", "shown"),
    [
        ("running", "here", True, 5.0, "running"),
        ("stopping", "here", True, 5.0, "stopping"),
        ("running", "here", False, 5.0, "exited"),  # SIGKILL, OOM: the pid is gone
        ("running", "there", False, 5.0, "running"),  # another host's pid means nothing here
        ("running", "there", True, 61.0, "stale"),  # no heartbeat past the lease TTL
        ("running", "here", True, 61.0, "stale"),
        ("running", "there", True, 60.0, "running"),
        ("stopped", "here", True, 1.0, "stopped"),
    ],
)
def test_daemon_liveness(recorded: str, host: str, pid_alive: bool, age: float, shown: str) -> None:
    from audsync.status import daemon_liveness

    assert (
        daemon_liveness(
            recorded,
            host,
            4242,
            age,
            this_host="here",
            alive=lambda pid: pid_alive,
            stale_after=60.0,
        )
        == shown
    )


def test_stale_after_is_the_lease_ttl_but_never_under_three_beats() -> None:
    from audsync.status import DAEMON_BEAT_INTERVAL, daemon_stale_after

    assert daemon_stale_after(60.0) == 60.0
    assert daemon_stale_after(300.0) == 300.0
    assert daemon_stale_after(1.0) == 3 * DAEMON_BEAT_INTERVAL


def _status(capsys: Any, path: Path) -> tuple[dict[str, Any], str]:
    import json

    code, out, err = run_cli(capsys, "-c", str(path), "status", "--json")
    assert code == 0, err
    info = json.loads(out)
    code, text, err = run_cli(capsys, "-c", str(path), "status")
    assert code == 0, err
    return info, text


def test_run_once_marks_its_daemon_record_stopped(
    make_config: MakeConfig,
    warehouse: Warehouse,
    gleap: Sandbox,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for i in range(1, 6):
        warehouse.add(i, vip=True)
    path, _ = make_config(body=VIP)
    code, _, err = run_cli(capsys, "-c", str(path), "run", "--once")
    assert code == 0, err
    # This very process ran it and is alive: only the record can tell it stopped.
    records = query(state_url, "SELECT state, pid FROM daemons")
    assert records == [{"state": "stopped", "pid": os.getpid()}]
    info, text = _status(capsys, path)
    assert info["daemons"] == []
    assert "no daemon is running" in text


def test_status_shows_a_killed_daemon_as_exited_not_running(
    make_config: MakeConfig,
    warehouse: Warehouse,
    gleap: Sandbox,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    from tests.helpers import wait_for

    for i in range(1, 6):
        warehouse.add(i, vip=True)
    path, _ = make_config(body=VIP)
    assert run_cli(capsys, "-c", str(path), "db", "upgrade")[0] == 0
    env = {**os.environ, "AUDSYNC_GLEAP_API_TOKEN": TOKEN}
    daemon = subprocess.Popen(
        [sys.executable, "-m", "audsync.cli", "-c", str(path), "run"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        running = wait_for(
            lambda: [d for d in _status(capsys, path)[0]["daemons"] if d["alive"]],
            what="the daemon's health record",
        )
        assert running[0]["pid"] == daemon.pid and running[0]["state"] == "running"
        assert running[0]["host"] == socket.gethostname()
    finally:
        daemon.kill()  # no clean stop: the record still says running
        daemon.wait(20)
    info, text = _status(capsys, path)
    [record] = info["daemons"]
    assert record["recorded_state"] == "running"
    assert record["state"] == "exited" and record["alive"] is False
    assert info["next_run_at"] is None
    assert f"pid {daemon.pid} (not running: its process has exited without stopping)" in text
    assert "no daemon is running" in text


# -- 7. "N Identify calls" are the Identify calls Gleap acknowledged --------------------


def _summary(out: str) -> list[str]:
    """The delivery lines a sync prints after its table."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if " Identify calls; " in line)
    return lines[start:]


def test_identify_calls_count_acknowledged_calls_with_failures_on_their_own(
    make_config: MakeConfig,
    warehouse: Warehouse,
    gleap: Sandbox,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for i in range(1, 151):
        warehouse.add(i, vip=True)
    gleap.fail_ratio = 0.3  # 500/502/503 on about a third of the attempts
    # Enough retries that no user runs out of them (0.3 ** 9 per user).
    path, _ = make_config(body=VIP, max_retries=8)
    code, out, err = run_cli(capsys, "-c", str(path), "--log-level", "WARNING", "sync")
    assert code == 0, err
    failed = gleap.stats.count("identify", ok=False)
    assert failed > 0 and gleap.stats.count("identify", ok=True) == 150
    assert _summary(out) == [
        "150 Identify calls; 150 changes delivered, 0 failed",
        f"{failed} attempts failed ({failed} Identify, 0 Track):"
        " server or network errors and rejections",
    ]
    assert_counts_add_up(state_url)


def test_track_calls_are_reported_apart_from_identify_calls(
    make_config: MakeConfig,
    warehouse: Warehouse,
    gleap: Sandbox,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for i in range(1, 151):
        warehouse.add(i, vip=True)
    body = VIP.replace('name = "VIP"\n', 'name = "VIP"\nevents = true\n')
    path, _ = make_config(body=body)
    code, out, err = run_cli(capsys, "-c", str(path), "--log-level", "WARNING", "sync")
    assert code == 0, err
    assert gleap.stats.count("identify", ok=True) == 150
    assert gleap.stats.count("track", ok=True) == 2 == gleap.stats.count("track")
    assert len(gleap.events()) == 150
    assert _summary(out) == [
        "150 Identify calls; 150 changes delivered, 0 failed",
        "2 Track calls (150 events)",
    ]


def test_no_identify_call_is_counted_while_gleap_is_down(
    make_config: MakeConfig,
    warehouse: Warehouse,
    gleap: Sandbox,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for i in range(1, 61):
        warehouse.add(i, vip=True)
    gleap.fault = lambda method, path, body: (503, {}, {"error": "down for maintenance"})
    path, _ = make_config(body=VIP, max_retries=1)
    code, out, _err = run_cli(capsys, "-c", str(path), "--log-level", "WARNING", "sync")
    assert code == 1
    attempts = gleap.stats.count("identify")
    assert attempts > 0 and gleap.stats.count("identify", ok=True) == 0
    assert _summary(out) == [
        "0 Identify calls; 0 changes delivered, 0 failed",
        f"{attempts} attempts failed ({attempts} Identify, 0 Track):"
        " server or network errors and rejections",
    ]
    assert query(state_url, "SELECT COUNT(*) AS n FROM outbox")[0]["n"] == 60  # all still queued


def test_a_sync_that_queues_nothing_new_while_gleap_is_down_is_not_a_success(
    make_config: MakeConfig,
    warehouse: Warehouse,
    gleap: Sandbox,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Review break: the second sync of an outage owns none of the waiting changes
    (the first run queued them), yet it must not read `succeeded` — that would
    move the audience's last success while Gleap is down."""
    for i in range(1, 11):
        warehouse.add(i, vip=True)
    gleap.fault = lambda method, path, body: (503, {}, {"error": "down for maintenance"})
    path, _ = make_config(body=VIP, max_retries=0)
    for _ in range(2):
        assert run_cli(capsys, "-c", str(path), "--log-level", "ERROR", "sync")[0] == 1
    runs = query(state_url, "SELECT status, queued, error FROM sync_runs ORDER BY id")
    assert [(r["status"], r["queued"]) for r in runs] == [("failed", 10), ("failed", 0)]
    assert "pending changes stay queued" in runs[1]["error"]
    gleap.fault = None
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    runs = query(state_url, "SELECT status FROM sync_runs ORDER BY id")
    assert [r["status"] for r in runs] == ["failed", "failed", "succeeded"]
    assert len(gleap.contacts()) == 10
    assert_counts_add_up(state_url)


# -- 8. each transition is counted once ---------------------------------------------------


def _runs(state_url: str) -> list[dict[str, Any]]:
    return query(
        state_url,
        "SELECT id, status, entered, exited, changed, queued, delivered, failed, superseded"
        " FROM sync_runs ORDER BY id",
    )


@pytest.mark.parametrize("max_attempts", [1, 3])
def test_a_rejected_user_is_entered_once_not_at_every_later_run(
    make_config: MakeConfig,
    warehouse: Warehouse,
    gleap: Sandbox,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
    max_attempts: int,
) -> None:
    for i in range(1, 6):
        warehouse.add(i, vip=True)
    gleap.reject_users = {"3"}
    path, _ = make_config(body=VIP, extra=f"[sync]\nmax_attempts = {max_attempts}\n")
    for _ in range(3):
        run_cli(capsys, "-c", str(path), "sync")
    runs = _runs(state_url)
    assert [(r["entered"], r["delivered"], r["failed"]) for r in runs] == [
        (5, 4, 1),  # user 3 entered once, here, and Gleap rejected it
        (0, 0, 1 if max_attempts > 1 else 0),  # its next attempt is not a new entry
        (0, 0, 1 if max_attempts > 2 else 0),
    ]
    # Parked (max_attempts 1) it is not queued again; otherwise each run owns one attempt.
    assert [r["queued"] for r in runs] == [5, int(max_attempts > 1), int(max_attempts > 2)]
    assert sum(r["entered"] for r in runs) == 5
    assert_counts_add_up(state_url)


def test_changes_left_pending_by_a_stopped_run_are_counted_by_it_alone(
    make_config: MakeConfig,
    warehouse: Warehouse,
    gleap: Sandbox,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for i in range(1, 151):
        warehouse.add(i, vip=True)

    def down_for_some(method: str, path: str, body: Any) -> Any:
        if path == "/admin/identify" and int(body["userId"]) > 100:
            return 503, {}, {"error": "down"}
        return None

    gleap.fault = down_for_some
    path, _ = make_config(body=VIP, max_retries=0)
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 1  # Gleap gave out for 50 users
    [first] = _runs(state_url)
    assert first["entered"] == first["queued"] == 150
    assert first["delivered"] == gleap.stats.count("identify", ok=True) < 150
    gleap.fault = None
    code, out, err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 0, err
    first, second = _runs(state_url)
    # The resuming run sends what the first one queued: the first run counts them.
    assert (second["entered"], second["queued"], second["delivered"]) == (0, 0, 0)
    assert (first["entered"], first["queued"], first["delivered"]) == (150, 150, 150)
    assert len(gleap.contacts()) == 150
    assert "150 changes delivered" not in out and " changes delivered" in out
    assert_counts_add_up(state_url)


def test_history_shows_skipped_and_duplicate_ids(
    make_config: MakeConfig,
    warehouse: Warehouse,
    gleap: Sandbox,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for i in range(1, 4):
        warehouse.add(i, vip=True)
    body = (
        '[[audiences]]\nname = "VIP"\nsql = "SELECT id AS user_id FROM people WHERE vip = 1'
        " UNION ALL SELECT NULL UNION ALL SELECT '' UNION ALL SELECT 2\"\n"
    )
    path, _ = make_config(body=body)
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    code, out, err = run_cli(capsys, "-c", str(path), "history")
    assert code == 0, err
    header, rule, row = out.splitlines()
    # Columns sit where the rule's dashes are (cells may hold spaces: timestamps).
    spans = [(m.start(), m.end()) for m in re.finditer(r"-+", rule)]
    values = {header[a:b].strip(): row[a:b].strip() for a, b in spans}
    assert (values["members"], values["skipped_ids"], values["duplicate_ids"]) == ("3", "2", "1")
    assert (values["queued"], values["superseded"]) == ("3", "0")
