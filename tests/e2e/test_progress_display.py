"""Progress of `audsync sync` as a user sees it: plain lines in a pipe, live bars in a terminal."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from audsync.progress import (
    BarProgress,
)
from audsync.sandbox import Sandbox
from tests.helpers import TOKEN, Warehouse, run_cli, write_config


@pytest.fixture
def slow_gleap() -> Any:
    """A sandbox that lets about 40 calls a second through."""
    with Sandbox(TOKEN, rate_limit=20, rate_window=0.5, seed=3) as server:
        yield server


def slow_config(tmp_path: Path, gleap: Sandbox, warehouse: Warehouse, users: int) -> Path:
    for i in range(1, users + 1):
        warehouse.add(i, vip=True)
    path = write_config(
        tmp_path,
        base_url=gleap.url,
        source_url=warehouse.url,
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
        # audsync paces itself to what the sandbox allows
        rate_limit=40,
        rate_window="1s",
    )
    return path


@pytest.mark.slow
def test_sync_in_a_pipe_prints_plain_progress_lines(
    tmp_path: Path,
    slow_gleap: Sandbox,
    warehouse: Warehouse,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = slow_config(tmp_path, slow_gleap, warehouse, 280)  # about 7 s of delivery
    monkeypatch.setenv("AUDSYNC_GLEAP_API_TOKEN", TOKEN)
    code, out, _err = run_cli(capsys, "-c", str(path), "sync", "vip_customers")
    assert code == 0
    assert "━" not in out and "\r" not in out  # no bars in a pipe
    lines = [line for line in out.splitlines() if line.startswith("delivering:")]
    moving = [
        m
        for line in lines
        if (m := re.match(r"delivering: (\d+)/280 users \(\d+%\), [\d.]+/s, about \d+s left", line))
    ]
    assert moving and 0 < int(moving[0].group(1)) < 280
    assert lines[-1].startswith("delivering: 280/280 users (100%)")
    assert "querying vip_customers: 280/280 rows (100%)" in out
    assert "planning: 1/1 audiences and traits (100%)" in out


@pytest.mark.slow
def test_sync_in_a_terminal_draws_live_bars_with_an_eta(
    tmp_path: Path, slow_gleap: Sandbox, warehouse: Warehouse
) -> None:
    path = slow_config(tmp_path, slow_gleap, warehouse, 200)
    leader, follower = pty.openpty()
    env = {
        **os.environ,
        "AUDSYNC_GLEAP_API_TOKEN": TOKEN,
        "TERM": "xterm-256color",
        "COLUMNS": "150",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "audsync.cli", "-c", str(path), "sync", "vip_customers"],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=env,
    )
    os.close(follower)
    screen = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: the process is done
                break
            if not chunk:
                break
            screen += chunk
        elif proc.poll() is not None:
            break
    os.close(leader)
    assert proc.wait(timeout=10) == 0
    raw = screen.decode("utf-8", "replace")
    assert "\x1b[" in raw  # redrawn in place with escape codes, not printed line by line
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)
    assert "━" in text  # rich's bar
    counts = [int(n) for n in re.findall(r"(\d+)/200 users", text)]
    assert counts[-1] == 200 and any(0 < n < 200 for n in counts)  # it moved
    assert re.search(r"ETA \d+s", text)


@pytest.mark.slow
@pytest.mark.parametrize("display", ["lines", "bars"])
def test_a_reader_that_goes_away_does_not_stop_the_sync(
    display: str, tmp_path: Path, gleap: Sandbox, warehouse: Warehouse
) -> None:
    """`audsync sync | head -1`: the sync finishes its work; no traceback."""
    from tests.helpers import query, source_mismatches

    for i in range(1, 301):
        warehouse.add(i, vip=i % 3 == 0, buyer=True, revenue=float(i))
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    path = write_config(tmp_path, base_url=gleap.url, source_url=warehouse.url, state_url=state_url)
    proc = subprocess.Popen(
        [sys.executable, "-m", "audsync.cli", "-c", str(path), "sync", "--progress", display],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "AUDSYNC_GLEAP_API_TOKEN": TOKEN},
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline()  # read one line, then go away like `head -1`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert "Traceback" not in err
    statuses = {r["status"] for r in query(state_url, "SELECT status FROM sync_runs")}
    assert statuses == {"succeeded"}
    assert source_mismatches(gleap, warehouse) == []


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("columns", [80, 100])
def test_bars_fit_the_terminal_without_cutting_numbers(
    columns: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))
    now = [0.0]
    screen = _Terminal()
    bars = BarProgress(screen, clock=lambda: now[0])
    bars.start("querying", "querying order_completed_last_30_days", total=1_000_000, unit="rows")
    now[0] = 10.0
    bars.update("querying", 1_000_000)
    bars.finish("querying")
    bars.start("delivering", "delivering", total=1_000_000, unit="users", budget=16.6)
    now[0] = 20.0
    bars.update("delivering", 123_456)
    bars.close()  # draws the last frame
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    frame = [line for line in text.splitlines() if line.strip()][-2:]
    assert all(len(line) <= columns for line in frame), frame
    querying, delivering = frame
    assert querying.startswith("querying ") and "1,000,000/1,000,000 rows" in querying
    assert "100,000.0/s" in querying  # a million rows in 10 s: whole, not "1000000/…"
    assert "123,456/1,000,000 users" in delivering and "12,345.6/s" in delivering
    # The ETA follows the budget (16.6/s), not the faster observed rate, and is whole.
    assert delivering.rstrip().endswith("ETA 14h 40m")


@pytest.mark.slow
def test_sync_wait_follows_the_daemon_with_progress_not_a_log_line_twice_a_second(
    tmp_path: Path,
    slow_gleap: Sandbox,
    warehouse: Warehouse,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.helpers import Process, wait_for

    monkeypatch.setenv("AUDSYNC_GLEAP_API_TOKEN", TOKEN)
    path = slow_config(tmp_path, slow_gleap, warehouse, 0)
    with path.open("a") as config:
        config.write('\n[schedule]\ninterval = "1h"\njitter = "0s"\n')
    daemon = Process(tmp_path, "daemon", "-c", str(path), "run")
    try:
        wait_for(
            lambda: "holding the delivery lease" in daemon.output()
            and "planned revenue" in daemon.output(),  # the last of its start-up plans
            30,
            "the daemon's start-up",
        )
        for i in range(1, 161):
            warehouse.add(i, vip=True)  # 160 calls at 40/s: a few seconds of delivery
        started = time.monotonic()
        code, out, err = run_cli(
            capsys, "-c", str(path), "sync", "vip_customers", "--wait", "--progress", "lines"
        )
        elapsed = time.monotonic() - started
    finally:
        daemon.stop()
    assert code == 0, err
    assert "still pending" not in out + err
    assert err.count("following the daemon's delivery of 160 changes") == 1
    assert err.count("the daemon finished delivering the changes of this sync") == 1
    lines = [line for line in out.splitlines() if line.startswith("delivered by the daemon: ")]
    assert lines[-1].startswith("delivered by the daemon: 160/160 changes (100%)")
    # A line every 5 s while it follows, and one at the end.
    assert len(lines) <= elapsed / 5 + 2
    assert slow_gleap.stats.count("identify", ok=True) == 160


@pytest.mark.slow
@pytest.mark.parametrize(
    "signals",
    [
        (signal.SIGTERM, signal.SIGTERM),  # cold stop: the daemon may close its runs
        (signal.SIGKILL,),  # killed: its runs stay open until someone sees it died
    ],
    ids=["cold-stop", "kill"],
)
def test_sync_wait_fails_when_the_daemon_stops_before_delivering_its_changes(
    signals: tuple[signal.Signals, ...], tmp_path: Path, gleap: Sandbox, warehouse: Warehouse
) -> None:
    """`sync --wait` follows the delivery to the end: a daemon stopped or killed with
    this sync's changes still queued is not "finished" (nor followed forever), and
    the sync exits 1 saying so."""
    from tests.helpers import Process, wait_for

    held, release = threading.Event(), threading.Event()

    def hold(body: dict[str, Any]) -> None:
        held.set()
        release.wait(60)  # Gleap takes the call and never answers while the test runs

    path = write_config(
        tmp_path,
        base_url=gleap.url,
        source_url=warehouse.url,
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
        extra='[schedule]\ninterval = "1h"\njitter = "0s"\n',
    )
    daemon = Process(tmp_path, "daemon", "-c", str(path), "run")
    follower: Process | None = None
    try:
        wait_for(
            lambda: "holding the delivery lease" in daemon.output()
            and "planned revenue" in daemon.output(),
            30,
            "the daemon's start-up",
        )
        gleap.on_identify = hold
        for i in range(1, 21):
            warehouse.add(i, vip=True)
        follower = Process(
            tmp_path, "sync", "-c", str(path), "sync", "vip_customers", "--wait",
            "--progress", "lines",
        )
        wait_for(lambda: "following the daemon's delivery" in follower.output(), 30, "following")
        assert held.wait(30), "the daemon never sent a call"
        for sig in signals:
            daemon.signal(sig)
        daemon.wait(15)  # how a stop exits is test_stop's subject
        code = follower.wait(30)
        out = follower.output()
    finally:
        release.set()
        gleap.on_identify = None
        daemon.stop()
        if follower is not None:
            follower.stop()
    assert code == 1, out
    assert "the daemon stopped before delivering this sync's changes" in out
    assert "20 stay queued for the next delivery" in out
    assert "the daemon finished delivering" not in out
