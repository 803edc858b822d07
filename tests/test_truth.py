"""What audsync says is true (issue 12): a preview that would be held says so and
exits 1; "N Identify calls" counts acknowledged calls only; each transition is
counted by one run; a daemon that exited is never shown as running."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import TOKEN, Warehouse
from helpers import assert_counts_add_up, query, run_cli

from audsync.sandbox import Sandbox

VIP = '[[audiences]]\nname = "VIP"\nsql = "SELECT id AS user_id FROM people WHERE vip = 1"\n'


def _synced_vip(warehouse: Warehouse, make_config: Any, capsys: Any, users: int = 10) -> Path:
    for i in range(1, users + 1):
        warehouse.add(i, vip=True)
    path, _ = make_config(body=VIP)
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    return path


# -- 6. a preview of a held sync exits 1 and says why ----------------------------------


def test_dry_run_of_a_held_plan_exits_1_and_says_why(
    make_config: Any,
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
    make_config: Any,
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
