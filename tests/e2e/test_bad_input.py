"""Every kind of bad input: one clear line, the right exit code, nothing lost, no token."""

from __future__ import annotations

import logging
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from audsync.cli import main
from audsync.sandbox import Sandbox
from tests.helpers import TOKEN, Warehouse, dump_state, write_config


def seed(warehouse: Warehouse) -> None:
    for i in range(1, 6):
        warehouse.add(i, vip=True, revenue=float(i))


VIP = '[[audiences]]\nname = "VIP"\nsql = "SELECT id AS user_id FROM people WHERE vip = 1"\n'

CASES: list[tuple[str, dict[str, Any], int, str]] = [
    ("missing token", {"token": None}, 2, "gleap.api_token: missing or empty"),
    ("empty token", {"token": ""}, 2, "gleap.api_token: missing or empty"),
    (
        "blank token in file",
        {"token": None, "gleap_extra": 'api_token = "  "'},
        2,
        "gleap.api_token: missing or empty",
    ),
    (
        "unreachable source",
        {"source_url": "postgresql+psycopg://nobody@127.0.0.1:1/x"},
        1,
        "source DB postgresql+psycopg://nobody@127.0.0.1:1/x cannot be reached",
    ),
    (
        "SQL syntax error",
        {"body": '[[audiences]]\nname = "Bad"\nsql = "SELEC id FROM people"\n'},
        1,
        "audience 'bad': query failed: near \"FROM\": syntax error",
    ),
    (
        "no user_id",
        {"body": '[[audiences]]\nname = "A"\nsql = "SELECT id FROM people"\n'},
        1,
        "audience 'a': the query returns no user_id column (it returns: id)",
    ),
    (
        "trait without value",
        {"body": '[[traits]]\nname = "T"\nsql = "SELECT id AS user_id FROM people"\n'},
        1,
        "trait 't': a trait query must return a value column (it returns: user_id)",
    ),
    (
        "colliding keys",
        {"body": VIP + VIP.replace('"VIP"', '"vip"')},
        2,
        "'vip' is used by more than one",
    ),
    (
        "key colliding with a Gleap field",
        {"body": '[[audiences]]\nname = "Email"\nsql = "SELECT 1 AS user_id"\n'},
        2,
        "audiences[0].key: 'email' collides with the Gleap contact field",
    ),
    (
        "malformed duration",
        {"extra": '[schedule]\ninterval = "2 hours"\n'},
        2,
        "schedule.interval: '2 hours' is not a duration",
    ),
    (
        "unreachable state DB",
        {"state_url": "postgresql+psycopg://nobody@127.0.0.1:1/state"},
        1,
        "state DB postgresql+psycopg://nobody@127.0.0.1:1/state is unusable",
    ),
    (
        "Gleap down for the whole run",
        {"base_url": "http://127.0.0.1:1"},
        1,
        "Gleap did not accept GET /admin/auth",
    ),
    ("unknown audience key", {"argv": ["sync", "nope"]}, 2, "no audience or trait with key 'nope'"),
    (
        "bad progress choice in the environment",
        {"env": {"AUDSYNC_PROGRESS": "fancy"}},
        2,
        "'fancy' is not one of auto, bars, lines, off (from the option or AUDSYNC_PROGRESS)",
    ),
    (
        "bad log format in the environment",
        {"env": {"AUDSYNC_LOG_FORMAT": "xml"}},
        2,
        "'xml' is not one of human, json (from the option or AUDSYNC_LOG_FORMAT)",
    ),
    (
        "bad log level in the environment",
        {"env": {"AUDSYNC_LOG_LEVEL": "loud"}},
        2,
        "'LOUD' is not one of DEBUG, INFO, WARNING, ERROR (from the option or AUDSYNC_LOG_LEVEL)",
    ),
]


@pytest.mark.parametrize(("case", "setup", "code", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(
    case: str,
    setup: dict[str, Any],
    code: int,
    message: str,
    tmp_path: Path,
    warehouse: Warehouse,
    gleap: Sandbox,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    seed(warehouse)
    state_url = setup.get("state_url", f"sqlite:///{tmp_path / 'state.db'}")
    path = write_config(
        tmp_path,
        base_url=setup.get("base_url", gleap.url),
        source_url=setup.get("source_url", warehouse.url),
        state_url=state_url,
        body=setup.get("body", VIP),
        extra=setup.get("extra", ""),
        gleap_extra=setup.get("gleap_extra", ""),
    )
    token = setup.get("token", TOKEN)
    if token is None:
        monkeypatch.delenv("AUDSYNC_GLEAP_API_TOKEN", raising=False)
    else:
        monkeypatch.setenv("AUDSYNC_GLEAP_API_TOKEN", token)
    monkeypatch.setenv("AUDSYNC_GLEAP_MAX_RETRIES", "1")
    for name, value in setup.get("env", {}).items():
        monkeypatch.setenv(name, value)
    before = dump_state(state_url) if state_url.startswith("sqlite") else None
    with caplog.at_level(logging.DEBUG):
        result = main(["-c", str(path), *setup.get("argv", ["sync"])])
    out, err = capsys.readouterr()
    assert result == code, err
    # ours, and argparse's ("audsync sync: error: ...")
    errors = [line for line in err.splitlines() if re.match(r"audsync( \w+)?: error: ", line)]
    assert any(message in line for line in errors), err
    assert "Traceback" not in err + out
    assert TOKEN not in out + err + caplog.text
    if before is not None and (code == 2 or "reach" in message or "Gleap" in message):
        # Nothing was done: config errors, and failures before any plan started.
        assert dump_state(state_url) == before


def test_locked_state_db_is_one_clear_line(
    tmp_path: Path,
    warehouse: Warehouse,
    gleap: Sandbox,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed(warehouse)
    state = tmp_path / "state.db"
    path = write_config(
        tmp_path,
        base_url=gleap.url,
        source_url=warehouse.url,
        state_url=f"sqlite:///{state}",
        body=VIP,
        state_extra='busy_timeout = "0.5s"',
    )
    monkeypatch.setenv("AUDSYNC_GLEAP_API_TOKEN", TOKEN)
    assert main(["-c", str(path), "db", "upgrade"]) == 0
    capsys.readouterr()
    blocker = sqlite3.connect(state, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        code = main(["-c", str(path), "sync"])
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    _, err = capsys.readouterr()
    assert code == 1
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith("audsync: error: state DB error: database is locked")
    )
    assert "busy_timeout" in err
    # Nothing was half-written: the next sync does the whole job.
    assert main(["-c", str(path), "sync"]) == 0
    assert set(gleap.contacts()) == {str(i) for i in range(1, 6)}


def test_reading_commands_never_create_the_state_db(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AUDSYNC_CONFIG", raising=False)
    monkeypatch.setenv("AUDSYNC_STATE_URL", f"sqlite:///{tmp_path / 'nothing.db'}")
    for argv in (["history"], ["status"]):
        assert main(argv) == 1
        _, err = capsys.readouterr()
        assert "does not exist yet" in err
    assert not (tmp_path / "nothing.db").exists()


def test_a_bad_variable_for_one_command_leaves_the_others_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUDSYNC_SANDBOX_PORT", "abc")
    monkeypatch.setenv("AUDSYNC_METRICS_PORT", "abc")
    monkeypatch.setenv("AUDSYNC_STATE_URL", f"sqlite:///{tmp_path / 'state.db'}")
    assert main(["db", "upgrade"]) == 0
    assert main(["sandbox"]) == 2
    assert (
        "argument --port: 'abc' is not a whole number (from the option or AUDSYNC_SANDBOX_PORT)"
        in capsys.readouterr().err
    )
    assert main(["run"]) == 2
    assert (
        "argument --metrics-port: 'abc' is not a whole number"
        " (from the option or AUDSYNC_METRICS_PORT)" in capsys.readouterr().err
    )
