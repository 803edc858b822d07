"""`audsync forget` asks before deleting on a terminal (unless --yes or
AUDSYNC_FORGET_YES), and tells ids Gleap did not have from ids it deleted."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from audsync.sandbox import Sandbox
from tests.helpers import TOKEN, MakeConfig, Warehouse, assert_counts_add_up, query, run_cli

VIP = '[[audiences]]\nname = "VIP"\nsql = "SELECT id AS user_id FROM people WHERE vip = 1"\n'


def forget_on_a_terminal(
    path: Path, *argv: str, answer: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`audsync forget ARGV` with a terminal for stdin, typed ``answer`` in advance
    (the terminal keeps it until the command reads; one that never asks never reads)."""
    primary, secondary = pty.openpty()
    try:
        os.write(primary, answer.encode())
        return subprocess.run(
            [sys.executable, "-m", "audsync.cli", "-c", str(path), "forget", *argv],
            stdin=secondary,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "AUDSYNC_GLEAP_API_TOKEN": TOKEN, **(env or {})},
        )
    finally:
        os.close(primary)
        os.close(secondary)


@pytest.fixture
def synced(
    make_config: MakeConfig,
    warehouse: Warehouse,
    gleap: Sandbox,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> Path:
    monkeypatch.delenv("AUDSYNC_FORGET_YES", raising=False)
    for i in range(1, 4):
        warehouse.add(i, vip=True)
    path, _ = make_config(body=VIP)
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    return path


def _deletes(gleap: Sandbox) -> list[str]:
    return [c["path"] for c in gleap.calls() if c["method"] == "DELETE"]


def test_forget_on_a_terminal_asks_and_a_no_does_nothing(
    synced: Path, gleap: Sandbox, state_url: str
) -> None:
    done = forget_on_a_terminal(synced, "1", "2", answer="n\n")
    assert done.returncode == 1
    assert "Delete 2 contacts in Gleap (1, 2) and keep them out of every later sync?" in done.stderr
    assert "audsync: error: not confirmed: nothing was suppressed or deleted" in done.stderr
    assert query(state_url, "SELECT * FROM suppressions") == []
    assert query(state_url, "SELECT * FROM sync_runs WHERE mode = 'forget'") == []
    assert _deletes(gleap) == [] and gleap.contact("1") is not None
    # Enter alone is a no too.
    assert forget_on_a_terminal(synced, "1", answer="\n").returncode == 1
    assert _deletes(gleap) == []


def test_forget_on_a_terminal_goes_ahead_on_yes_and_tells_not_found_from_deleted(
    synced: Path, gleap: Sandbox, state_url: str
) -> None:
    done = forget_on_a_terminal(synced, "1", "nobody", answer="y\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "1: deleted in Gleap and suppressed",
        "nobody: not found in Gleap (nothing to delete); suppressed",
    ]
    assert _deletes(gleap) == ["/admin/contacts/1", "/admin/contacts/nobody"]
    assert gleap.contact("1") is None
    [run] = query(state_url, "SELECT * FROM sync_runs WHERE mode = 'forget'")
    assert (run["status"], run["members"], run["queued"]) == ("succeeded", 2, 2)
    assert (run["delivered"], run["superseded"], run["failed"]) == (1, 1, 0)
    assert_counts_add_up(state_url)
    suppressed = {r["user_id"] for r in query(state_url, "SELECT user_id FROM suppressions")}
    assert suppressed == {"1", "nobody"}


@pytest.mark.parametrize("how", ["--yes", "env"])
def test_forget_with_yes_never_asks(synced: Path, gleap: Sandbox, how: str) -> None:
    argv = ("2", "--yes") if how == "--yes" else ("2",)
    env = {"AUDSYNC_FORGET_YES": "1"} if how == "env" else None
    # An answer is typed anyway: a prompt would read this "n" and fail the forget.
    done = forget_on_a_terminal(synced, *argv, answer="n\n", env=env)
    assert done.returncode == 0, done.stderr
    assert "[y/N]" not in done.stderr
    assert done.stdout.strip() == "2: deleted in Gleap and suppressed"
    assert gleap.contact("2") is None


def test_forget_without_a_terminal_does_not_ask(
    synced: Path, gleap: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    # cron, a pipe, a script: nobody to ask (stdin is not a terminal here).
    code, out, err = run_cli(capsys, "-c", str(synced), "forget", "3")
    assert code == 0, err
    assert out.strip() == "3: deleted in Gleap and suppressed" and "[y/N]" not in err
