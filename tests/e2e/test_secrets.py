"""The API token never reaches any channel a user or a log shipper reads.

A distinctive token is configured with a trailing ``\\r`` (a secrets file saved
on Windows), Gleap echoes it inside a long 400 body (across the 500-character
cut), URL-encoded inside another, and inside 5xx bodies; then every channel is
searched for every 8-character piece of it: stdout and stderr of every command
in human and JSON log format, ``history --json``, ``history --failures --json``,
the HTML report and every column of every table of the state DB.
"""

from __future__ import annotations

import html
import json
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from sqlalchemy import create_engine, inspect, text

from audsync.errors import GleapUnavailable, describe, redact, secret_forms
from audsync.gleap import GleapClient
from audsync.logs import RedactingFilter, safe_message
from audsync.sandbox import Sandbox
from tests.helpers import Warehouse, run_cli, wait_for, write_config

SECRET = "Qx7v+Rr2/Zmw9-s3cr3t=Kp4tLb8N"
"""Distinctive, with characters that JSON, repr and URL encoding each spell differently."""

SPELLINGS = (SECRET, quote(SECRET, safe=""), json.dumps(SECRET)[1:-1])


def pieces(secret: str, size: int = 8) -> set[str]:
    """Every ``size``-character substring of every spelling of ``secret``."""
    found = set()
    for spelling in (secret, quote(secret, safe=""), json.dumps(secret)[1:-1]):
        found |= {spelling[i : i + size] for i in range(len(spelling) - size + 1)}
    return found


PIECES = pieces(SECRET)


def leaks(text: str) -> list[str]:
    """The pieces of the token found in ``text`` (empty when it is clean)."""
    return sorted(p for p in PIECES if p in text)


def state_texts(state_url: str) -> dict[str, list[str]]:
    """Every value of every column of every table of the state DB, as text, per table."""
    engine = create_engine(state_url)
    try:
        out: dict[str, list[str]] = {}
        with engine.connect() as conn:
            for table in inspect(conn).get_table_names():
                rows = conn.execute(text(f'SELECT * FROM "{table}"')).all()
                out[table] = [str(value) for row in rows for value in row if value is not None]
        return out
    finally:
        engine.dispose()


def echoing_fault(method: str, path: str, body: Any) -> tuple[int, dict[str, str], Any] | None:
    """Gleap answers that quote the token back, for users 2, 3 and 4."""
    user = str(body.get("userId")) if isinstance(body, dict) else None
    if user == "2":  # the token straddles the 500-character cut of a failure's reason
        return 400, {}, {"error": "x" * 480 + f"bad Api-Token {SECRET} rest"}
    if user == "3":  # a 5xx echoing the request headers, every retry
        return 503, {}, {"error": f"upstream: Api-Token: {SECRET}\r\nHost: gleap"}
    if user == "4":  # URL-encoded, as a proxy's error page might quote it
        return 422, {}, {"message": f"rejected ?token={quote(SECRET, safe='')} for this user"}
    return None


@pytest.fixture
def leaky(
    tmp_path: Path, warehouse: Warehouse, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> Any:
    with Sandbox(SECRET, seed=1) as server:
        server.fault = echoing_fault
        for user_id in range(1, 7):
            warehouse.add(user_id, vip=True, buyer=user_id % 2 == 0, revenue=float(user_id))
        # A secrets file saved on Windows: the token arrives with a trailing \r.
        monkeypatch.setenv("AUDSYNC_GLEAP_API_TOKEN", SECRET + "\r")
        for name in ("AUDSYNC_CONFIG", "AUDSYNC_STATE_URL", "AUDSYNC_SOURCE_URL"):
            monkeypatch.delenv(name, raising=False)
        path = write_config(
            tmp_path,
            base_url=server.url,
            source_url=warehouse.url,
            state_url=state_url,
            max_retries=1,
        )
        yield server, str(path)


def test_the_token_reaches_no_channel(
    leaky: tuple[Sandbox, str],
    state_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    gleap, config = leaky
    outputs: dict[str, str] = {}

    def run(*argv: str) -> int:
        code, out, err = run_cli(capsys, "-c", config, *argv)
        outputs[" ".join(argv) + " (stdout)"] = out
        outputs[" ".join(argv) + " (stderr)"] = err
        return code

    for fmt in ("human", "json"):
        logging_opts = ("--log-level", "DEBUG", "--log-format", fmt)
        run(*logging_opts, "sync", "--progress", "lines")
        run(*logging_opts, "run", "--once")
        run(*logging_opts, "retry-failed", "--progress", "lines")
        run(*logging_opts, "check")
        run(*logging_opts, "status")
        run(*logging_opts, "history")
        run(*logging_opts, "history", "--failures")
    run("history", "--json")
    run("history", "--failures", "--json")
    run("status", "--json")
    report = tmp_path / "report.html"
    assert run("report", "--html", str(report)) == 0
    outputs["report.html"] = report.read_text(encoding="utf-8")

    # The token, stripped of its \r, was accepted, and Gleap did echo it back.
    contact = gleap.contact("1")
    assert contact is not None and contact["vip_customers"] is True
    failures = json.loads(outputs["history --failures --json (stdout)"])
    reasons = {f["user_id"]: f["reason"] for f in failures}
    assert reasons["2"].startswith("HTTP 400: xxxx") and "***" in reasons["2"]
    assert len(reasons["2"]) <= len("HTTP 400: ") + 500
    assert reasons["4"].startswith("HTTP 422: rejected ?token=***")
    assert "3" not in reasons  # a 5xx is retried, never a per-user failure
    assert any("HTTP 503" in text for text in outputs.values())

    found = {where: leaks(text) for where, text in outputs.items()}
    for table, values in state_texts(state_url).items():
        found[f"state DB table {table}"] = leaks("\n".join(values))
    assert {where: hit for where, hit in found.items() if hit} == {}
    # Every record of the JSON log format is one JSON object on one line.
    for where, printed in outputs.items():
        if "--log-format json" in where and "(stderr)" in where:
            for line in printed.splitlines():
                assert line.startswith("audsync: error: ") or json.loads(line)["message"]


def test_a_token_with_an_inner_control_character_is_a_config_error_not_shown(
    leaky: tuple[Sandbox, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    gleap, config = leaky
    monkeypatch.setenv("AUDSYNC_GLEAP_API_TOKEN", SECRET[:10] + "\n" + SECRET[10:])
    code, out, err = run_cli(capsys, "-c", config, "sync")
    assert code == 2
    assert err.splitlines() == [
        "audsync: error: AUDSYNC_GLEAP_API_TOKEN: gleap.api_token: contains a control"
        " character (the value is not shown)"
    ]
    assert leaks(out + err) == [] and gleap.calls() == []


def test_a_webhook_url_with_a_newline_is_a_config_error_not_shown(
    leaky: tuple[Sandbox, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    gleap, config = leaky
    hook = f"https://hooks.example.com/services/{SECRET}\nX"
    monkeypatch.setenv("AUDSYNC_ALERTS_WEBHOOK_URL", hook)
    code, out, err = run_cli(capsys, "-c", config, "run", "--once")
    assert code == 2
    assert len(err.splitlines()) == 1
    assert err.startswith("audsync: error: AUDSYNC_ALERTS_WEBHOOK_URL: alerts.webhook_url:")
    assert "control character" in err
    assert leaks(out + err) == [] and "hooks.example.com" not in err
    assert gleap.calls() == []


def test_a_token_with_a_control_character_never_shows_in_a_network_error() -> None:
    """Given to the client directly (past the config's checks), a token holding \\r
    makes the HTTP library refuse the header and quote it escaped; the error says
    only what kind of failure it was."""
    with (
        Sandbox(SECRET) as server,
        GleapClient(server.url, SECRET + "\r", max_retries=0, sleep=lambda _s: None) as client,
        pytest.raises(GleapUnavailable) as err,
    ):
        client.check_token()
    assert leaks(str(err.value)) == [], str(err.value)
    assert leaks(repr(err.value)) == []


@pytest.mark.parametrize(
    "spelled",
    [
        SECRET,
        repr(SECRET + "\r"),
        repr((SECRET + "\r").encode()),
        json.dumps(SECRET + "\r"),
        quote(SECRET, safe=""),
        quote(SECRET),
        repr(repr(SECRET + "\r")),
    ],
)
def test_redact_hides_every_spelling(spelled: str) -> None:
    message = f"Illegal header value {spelled} in request"
    assert leaks(redact(message, SECRET + "\r")) == []
    assert redact(message, SECRET + "\r").startswith("Illegal header value ")
    assert SECRET in secret_forms(SECRET + "\r")


def test_a_sqlalchemy_error_is_one_line_without_sql_or_parameters(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (email TEXT UNIQUE)"))
        conn.execute(text("INSERT INTO t VALUES ('ann@example.com')"))
    with pytest.raises(Exception) as err, engine.begin() as conn:
        conn.execute(text("INSERT INTO t VALUES (:e)"), {"e": "ann@example.com"})
    engine.dispose()
    assert "[parameters:" in str(err.value)  # what used to be logged
    line = describe(err.value)
    assert line == "UNIQUE constraint failed: t.email"
    record = logging.LogRecord(
        "audsync.service", logging.WARNING, __file__, 1, "state DB error: %s", (err.value,), None
    )
    assert safe_message(record) == "state DB error: UNIQUE constraint failed: t.email"
    try:
        raise err.value
    except Exception:
        import sys

        record = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "failed\nbadly", None, sys.exc_info()
        )
    RedactingFilter().filter(record)
    assert record.getMessage() == "failed badly: UNIQUE constraint failed: t.email"
    assert record.exc_info is None


@pytest.mark.parametrize("log_format", ["human", "json"])
def test_a_locked_state_db_is_logged_as_one_line_without_users_data(
    tmp_path: Path,
    warehouse: Warehouse,
    log_format: str,
    processes: list[Any],
) -> None:
    """The daemon's acknowledgements meet a state DB another process holds locked:
    every log record stays one line, with no SQL, parameters or e-mail address."""
    from tests.helpers import TOKEN, Process

    for user_id in range(1, 4):
        warehouse.add(user_id, vip=True)
    state_path = tmp_path / "state.db"
    holder: dict[str, sqlite3.Connection] = {}
    locked = threading.Event()

    def lock_the_state_db(_body: dict[str, Any]) -> None:
        # The first Identify takes the state DB's write lock away from the daemon.
        if not locked.is_set():
            conn = sqlite3.connect(state_path, isolation_level=None, check_same_thread=False)
            conn.execute("BEGIN IMMEDIATE")
            holder["conn"] = conn
            locked.set()

    with Sandbox(TOKEN) as gleap:
        gleap.on_identify = lock_the_state_db
        path = write_config(
            tmp_path,
            base_url=gleap.url,
            source_url=warehouse.url,
            state_url=f"sqlite:///{state_path}",
            body=(
                "[[audiences]]\nname = 'VIP'\n"
                "sql = 'SELECT email AS user_id, email, first_name FROM people WHERE vip = 1'\n"
            ),
            state_extra='busy_timeout = "50ms"',
            extra='[schedule]\ninterval = "1h"\n',
        )
        daemon = Process(tmp_path, "daemon", "-c", str(path), "--log-format", log_format, "run")
        processes.append(daemon)
        wait_for(lambda: "state DB error" in daemon.output(), what="the locked-DB log line")
        holder["conn"].rollback()
        holder["conn"].close()
        wait_for(lambda: len(gleap.contacts()) == 3, what="the delivery after the lock")
        import signal

        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0, daemon.output()
    output = daemon.output()
    assert "database is locked" in output
    for bad in ("[SQL:", "[parameters:", "@example.com", "Traceback", "INSERT", "UPDATE"):
        assert bad not in output, output
    for line in output.splitlines():
        if log_format == "json":
            assert json.loads(line)["message"], line
        else:
            assert line[:2] == "20" and " audsync" in line, line  # a timestamped record


def test_locked_state_db_error_in_the_cli_is_one_line(
    tmp_path: Path,
    warehouse: Warehouse,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.helpers import TOKEN

    warehouse.add(1, vip=True)
    state_path = tmp_path / "state.db"
    monkeypatch.setenv("AUDSYNC_GLEAP_API_TOKEN", TOKEN)
    with Sandbox(TOKEN) as gleap:
        path = write_config(
            tmp_path,
            base_url=gleap.url,
            source_url=warehouse.url,
            state_url=f"sqlite:///{state_path}",
            state_extra='busy_timeout = "50ms"',
        )
        assert run_cli(capsys, "-c", str(path), "db", "upgrade")[0] == 0
        conn = sqlite3.connect(state_path, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        try:
            code, _out, err = run_cli(capsys, "-c", str(path), "sync")
        finally:
            conn.rollback()
            conn.close()
    assert code == 1
    assert err.splitlines()[-1].startswith("audsync: error: state DB error: database is locked")
    for bad in ("[SQL:", "[parameters:", "@example.com", "Traceback"):
        assert bad not in err
    assert all(line.count("\n") == 0 for line in err.splitlines())


HTML_TOKEN = "Tok&en<9>'\"zz-l0ng-en0ugh"


@pytest.mark.parametrize(
    "spelled",
    [
        html.escape(HTML_TOKEN),
        html.escape(HTML_TOKEN, quote=False),
        HTML_TOKEN.upper(),
        json.dumps(HTML_TOKEN)[1:-1]
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026"),
    ],
)
def test_redact_hides_an_error_pages_spellings(spelled: str) -> None:
    """Found by review: an HTML error page echoing the token escaped, a server that
    upper-cases it, a Go proxy's JSON escapes."""
    assert redact(f"<p>bad token: {spelled}</p>", HTML_TOKEN) == "<p>bad token: ***</p>"


def test_a_redirects_location_is_redacted_before_it_is_cut() -> None:
    """Found by review: the Location was cut to 200 characters before redaction, so a
    token straddling the cut left its first characters in the error."""
    with Sandbox(SECRET) as gleap:
        location = "http://127.0.0.1:1/" + "a" * 175 + "?t=" + SECRET
        gleap.fault = lambda method, path, body: (301, {"Location": location}, {})
        with GleapClient(gleap.url, SECRET, max_retries=0) as client:
            outcome = client.identify({"userId": "u1", "vip": True})
    assert not outcome.ok and outcome.status == 301
    assert outcome.reason is not None and "redirect" in outcome.reason
    assert leaks(outcome.reason) == [], outcome.reason
    assert not [
        SECRET[i : i + 6] for i in range(len(SECRET) - 5) if SECRET[i : i + 6] in outcome.reason
    ]
