"""JSON logs for shippers, and what `audsync check` says about the next sync."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import TOKEN, Warehouse
from helpers import run_cli

from audsync.sandbox import Sandbox


def test_json_logs_one_object_per_line_and_never_the_token(
    make_config: Any, warehouse: Warehouse, gleap: Sandbox, tmp_path: Path
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
    assert TOKEN not in done.stderr + done.stdout


def test_check_reports_the_next_sync(
    make_config: Any, warehouse: Warehouse, gleap: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in range(1, 11):
        warehouse.add(i, vip=i <= 4, buyer=True)
    path, _ = make_config(gleap_extra="")
    text = path.read_text().replace(
        'rate_limit = 100000\nrate_window = "60s"', 'rate_limit = 1000\nrate_window = "60s"'
    )
    path.write_text(text)
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
