"""`audsync demo --keep DIR` leaves a demo the user can go on with: a config that
works from anywhere, and the command that brings its Gleap sandbox back."""

from __future__ import annotations

import datetime as dt
import json
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from audsync.demo import change_warehouse
from tests.helpers import run_cli, wait_for


def test_a_kept_demo_works_afterwards_with_the_printed_sandbox(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AUDSYNC_GLEAP_API_TOKEN", "AUDSYNC_CONFIG", "AUDSYNC_STATE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(
        capsys, "--log-level", "WARNING", "demo", "--users", "60", "--keep", "kept"
    )
    assert code == 0, err
    folder = (tmp_path / "kept").resolve()
    config = folder / "audsync.toml"
    lines = out.splitlines()
    start = lines.index("(same port, token and contacts) and leave it running:")
    command = shlex.split(lines[start + 1])
    assert command[:2] == ["audsync", "sandbox"] and "--db" in command
    assert lines[start + 3 : start + 5] == [
        f"  audsync -c {config} status",
        f"  audsync -c {config} sync",
    ]
    contacts_after_demo = int(
        out.split(" contacts in the sandbox.")[0].split()[-1].replace(",", "")
    )

    # Elsewhere, later: the printed command, then the printed commands.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    port = command[command.index("--port") + 1]
    sandbox = subprocess.Popen(
        [sys.executable, "-m", "audsync.cli", *command[1:]],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def contacts() -> dict[str, object] | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_sandbox/contacts") as r:
                    return json.loads(r.read())  # type: ignore[no-any-return]
            except OSError:
                return None

        held = wait_for(contacts, 30, "the printed sandbox to listen")
        assert len(held) == contacts_after_demo  # the same Gleap, contacts and all

        code, out, err = run_cli(capsys, "-c", str(config), "status")
        assert code == 0, err
        assert "pending: 0 users" in out
        code, out, err = run_cli(capsys, "-c", str(config), "sync", "--dry-run")
        assert code == 0, err
        assert "0 Identify calls" in out  # nothing changed since the demo: nothing to send

        change_warehouse(folder / "warehouse.db", dt.date.today(), seed=11)
        code, out, err = run_cli(capsys, "-c", str(config), "--log-level", "WARNING", "sync")
        assert code == 0, err
        sent = int(
            next(line for line in out.splitlines() if " Identify calls; " in line).split()[0]
        )
        assert sent > 0
        assert "incremental" in out and "initial" not in out  # the same ledger, not a new one
    finally:
        sandbox.terminate()
        sandbox.wait(20)
