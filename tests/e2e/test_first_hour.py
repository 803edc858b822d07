"""A new user's first hour (issue 12): installing drivers, `audsync init`, a config
used from another directory, options after the command, queries pasted with `;`,
read-only commands that create nothing, and no traceback from any command."""

from __future__ import annotations

import argparse
import os
import re
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from audsync.cli import build_parser, main
from audsync.config import anchor_file_url, load_config
from audsync.drivers import driver_package, missing_driver_hint
from audsync.query_text import trim_query
from audsync.sandbox import Sandbox
from audsync.starter import STARTER
from tests.helpers import (
    PG_URL,
    TOKEN,
    MakeConfig,
    Warehouse,
    fresh_pg_database,
    query,
    run_cli,
    write_config,
)

VIP = '[[audiences]]\nname = "VIP"\nsql = "SELECT id AS user_id FROM people WHERE vip = 1"\n'


def one_error_line(err: str, prefix: str = "audsync") -> str:
    """The single line of stderr, which must be an error of ``prefix`` (``audsync`` or
    ``audsync COMMAND``, as argparse names it) and no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert re.match(r"audsync( [\w-]+)*: error: ", lines[0]), err
    assert lines[0].startswith(f"{prefix}: error: "), err
    return lines[0]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("AUDSYNC_") and not name.startswith("AUDSYNC_TEST_"):
            monkeypatch.delenv(name)
    return monkeypatch


# -- 1. drivers ------------------------------------------------------------------

DRIVERS = [
    # (backend, driver named in the URL or None, package)
    ("postgresql", "psycopg", "psycopg[binary]"),
    ("postgresql", "psycopg2", "psycopg2-binary"),
    ("postgresql", None, "psycopg2-binary"),  # SQLAlchemy 2.0's default driver
    ("postgresql", "pg8000", "pg8000"),
    ("mysql", "pymysql", "pymysql"),
    ("mysql", None, "mysqlclient"),
    ("mariadb", "mariadbconnector", "mariadb"),
    ("mssql", "pyodbc", "pyodbc"),
    ("oracle", "oracledb", "oracledb"),
    ("duckdb", None, "duckdb-engine"),
    ("snowflake", None, "snowflake-sqlalchemy"),
    ("snowflake", "unknownthing", "snowflake-sqlalchemy"),
    ("bigquery", None, "sqlalchemy-bigquery"),
    ("trino", None, "trino"),
    ("DuckDB", None, "duckdb-engine"),
    ("nosuchdb", None, None),
    ("nosuchdb", "x", None),
]


@pytest.mark.parametrize(("backend", "driver", "package"), DRIVERS)
def test_driver_package(backend: str, driver: str | None, package: str | None) -> None:
    assert driver_package(backend, driver) == package


HINTS = [
    ("mysql+pymysql://u:pw@h/x", "the mysql+pymysql driver is not installed: pip install pymysql"),
    (
        "postgresql+psycopg://u@h/x",
        "the postgresql+psycopg driver is not installed: pip install 'psycopg[binary]'"
        " (audsync's postgres extra: pip install '.[postgres]' in its checkout)",
    ),
    (
        "snowflake://u@acct/db",
        "the snowflake driver is not installed: pip install snowflake-sqlalchemy",
    ),
    ("nosuch://h/x", "no SQLAlchemy dialect or driver for 'nosuch' is installed"),
]


@pytest.mark.parametrize(("url", "hint"), HINTS)
def test_missing_driver_hint(url: str, hint: str) -> None:
    assert missing_driver_hint(url).startswith(hint)


@pytest.mark.parametrize(
    ("which", "url", "package"),
    [
        ("state", "mysql+pymysql://audsync:hunter2@db.example/state", "pip install pymysql"),
        ("source", "snowflake://me:hunter2@acct/db/schema", "pip install snowflake-sqlalchemy"),
        ("source", "trino://me@host:8080/catalog/schema", "pip install trino"),
    ],
)
def test_a_missing_driver_names_the_package(
    which: str,
    url: str,
    package: str,
    tmp_path: Path,
    warehouse: Warehouse,
    gleap: Sandbox,
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    clean_env.setenv("AUDSYNC_GLEAP_API_TOKEN", TOKEN)
    urls = {"state": f"sqlite:///{tmp_path / 'state.db'}", "source": warehouse.url, which: url}
    path = write_config(
        tmp_path, base_url=gleap.url, source_url=urls["source"], state_url=urls["state"], body=VIP
    )
    code, _, err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 2
    line = one_error_line(err)
    assert package in line and f"{which} DB" in line
    assert "hunter2" not in err


# -- 2. init and a missing config --------------------------------------------------


def test_the_starter_loads_and_works_against_the_sandbox(
    tmp_path: Path,
    gleap: Sandbox,
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    code, out, err = run_cli(capsys, "init", str(folder))
    assert code == 0, err
    path = folder / "audsync.toml"
    assert path.read_text(encoding="utf-8") == STARTER
    assert f"wrote {path}" in out and f"audsync -c {path} check" in out
    config = load_config(str(path), env={})
    assert [d.key for d in config.definitions] == ["active_customers"]
    assert config.state_url == f"sqlite:///{folder.resolve() / 'audsync.db'}"
    # The shop the starter's query expects, next to the config: then only the
    # token and base_url (the sandbox, as the starter's comments say) are missing.
    shop = sqlite3.connect(folder / "shop.db")
    shop.executescript(
        "CREATE TABLE users (id INTEGER, email TEXT, first_name TEXT, last_name TEXT,"
        " last_order_at TEXT);"
        "INSERT INTO users VALUES (1, 'a@x.io', 'Ada', 'Lee', date('now', '-2 days'));"
        "INSERT INTO users VALUES (2, 'b@x.io', 'Bo', NULL, date('now', '-90 days'));"
    )
    shop.commit()
    shop.close()
    clean_env.setenv("AUDSYNC_GLEAP_API_TOKEN", TOKEN)
    clean_env.setenv("AUDSYNC_GLEAP_BASE_URL", gleap.url)
    code, out, err = run_cli(capsys, "check", "-c", str(path))
    assert code == 0, err
    assert "audience active_customers: ok (1 rows)" in out
    assert main(["sync", "-c", str(path)]) == 0
    assert gleap.contacts()["1"]["active_customers"] is True


def test_init_never_overwrites(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.chdir(tmp_path)
    assert main(["init"]) == 0
    capsys.readouterr()
    (tmp_path / "audsync.toml").write_text("# mine\n", encoding="utf-8")
    code, _, err = run_cli(capsys, "init")
    assert code == 2
    assert "audsync.toml: already exists; not overwritten" in one_error_line(err)
    assert (tmp_path / "audsync.toml").read_text(encoding="utf-8") == "# mine\n"
    # -c and AUDSYNC_CONFIG say where, like for every other command.
    assert main(["-c", "other.toml", "init"]) == 0
    clean_env.setenv("AUDSYNC_CONFIG", str(tmp_path / "env.toml"))
    assert main(["init"]) == 0
    assert (tmp_path / "other.toml").exists() and (tmp_path / "env.toml").exists()
    code, _, err = run_cli(capsys, "init", str(tmp_path / "no" / "such" / "dir.toml"))
    assert code == 2
    assert "does not exist" in one_error_line(err)


def test_no_config_says_where_it_looked_and_what_to_do(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.chdir(tmp_path)
    code, _, err = run_cli(capsys, "sync")
    assert code == 2
    line = one_error_line(err)
    for part in (f"looked for audsync.toml in {tmp_path}", "-c", "AUDSYNC_CONFIG", "audsync init"):
        assert part in line
    code, _, err = run_cli(capsys, "check", "-c", "elsewhere.toml")
    assert code == 2
    assert "elsewhere.toml: file not found (named by -c)" in one_error_line(err)
    clean_env.setenv("AUDSYNC_CONFIG", "from-env.toml")
    code, _, err = run_cli(capsys, "sync")
    assert code == 2
    line = one_error_line(err)
    assert "from-env.toml: file not found (named by AUDSYNC_CONFIG)" in line
    assert "audsync init from-env.toml" in line


# -- 3. relative SQLite paths are relative to the config file ----------------------

ANCHORS = [
    ("sqlite:///audsync.db", "sqlite:////etc/audsync/audsync.db"),
    ("sqlite:///data/state.db", "sqlite:////etc/audsync/data/state.db"),
    ("sqlite:///../var/state.db", "sqlite:////etc/audsync/../var/state.db"),
    ("sqlite:////var/lib/audsync/a.db", "sqlite:////var/lib/audsync/a.db"),
    ("sqlite+pysqlite:///a.db", "sqlite+pysqlite:////etc/audsync/a.db"),
    ("sqlite:///a.db?timeout=5", "sqlite:////etc/audsync/a.db?timeout=5"),
    ("sqlite://", "sqlite://"),
    ("sqlite:///:memory:", "sqlite:///:memory:"),
    ("sqlite:///file:a.db?mode=ro&uri=true", "sqlite:///file:a.db?mode=ro&uri=true"),
    ("duckdb:///shop.duckdb", "duckdb:////etc/audsync/shop.duckdb"),
    ("postgresql+psycopg://u:p@host/db", "postgresql+psycopg://u:p@host/db"),
]


@pytest.mark.parametrize(("url", "anchored"), ANCHORS)
def test_anchor_file_url(url: str, anchored: str) -> None:
    assert anchor_file_url(url, "/etc/audsync") == anchored


def cli(cwd: Path, *argv: str, token: str = TOKEN) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDSYNC_")}
    env["AUDSYNC_GLEAP_API_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "audsync.cli", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_config_used_from_another_directory_reads_its_own_state_db(
    tmp_path: Path, gleap: Sandbox
) -> None:
    etc, elsewhere = tmp_path / "etc", tmp_path / "elsewhere"
    etc.mkdir()
    elsewhere.mkdir()
    warehouse = Warehouse(etc / "warehouse.db")
    for i in range(1, 6):
        warehouse.add(i, vip=i <= 3)
    # Both paths relative, as a user writes them next to the config.
    config = write_config(
        etc,
        base_url=gleap.url,
        source_url="sqlite:///warehouse.db",
        state_url="sqlite:///audsync.db",
        body=VIP,
    )
    first = cli(elsewhere, "-c", str(config), "sync")
    assert first.returncode == 0, first.stderr
    assert (etc / "audsync.db").exists()
    assert list(elsewhere.iterdir()) == []  # no second ledger, no empty warehouse
    status = cli(tmp_path, "status", "-c", str(config))
    assert status.returncode == 0, status.stderr
    assert f"state DB: sqlite:///{etc / 'audsync.db'}" in status.stdout
    assert "vip" in status.stdout
    dry = cli(elsewhere, "-c", str(config), "sync", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    row = next(line for line in dry.stdout.splitlines() if line.startswith("vip "))
    assert row.split()[:3] == ["vip", "incremental", "3"], dry.stdout
    assert "0 Identify calls" in dry.stdout
    assert list(elsewhere.iterdir()) == []


def test_status_hides_the_state_db_password(
    pg_url: str,
    tmp_path: Path,
    gleap: Sandbox,
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sqlalchemy.engine import make_url

    url = make_url(pg_url).set(password="s3cr3t-pw").render_as_string(hide_password=False)
    clean_env.setenv("AUDSYNC_STATE_URL", pg_url)
    assert main(["db", "upgrade"]) == 0
    capsys.readouterr()
    # PostgreSQL here trusts local users, so the password is shown nowhere but works.
    clean_env.setenv("AUDSYNC_STATE_URL", url)
    code, out, err = run_cli(capsys, "status")
    assert code == 0, err
    assert "state DB: postgresql+psycopg://" in out and ":***@" in out
    assert "s3cr3t-pw" not in out + err


def test_environment_paths_stay_relative_to_the_working_directory(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    path = etc / "audsync.toml"
    path.write_text('[source]\nurl = "sqlite:///shop.db"\n', encoding="utf-8")
    config = load_config(str(path), env={"AUDSYNC_STATE_URL": "sqlite:///here.db"})
    assert config.state_url == "sqlite:///here.db"
    assert config.source_url == f"sqlite:///{etc.resolve() / 'shop.db'}"
    config = load_config(
        str(path), env={"AUDSYNC_SOURCE_URL": "sqlite:///cwd.db", "AUDSYNC_STATE_URL": ""}
    )
    assert config.source_url == "sqlite:///cwd.db"
    assert config.state_url == f"sqlite:///{etc.resolve() / 'audsync.db'}"
    clean_env.chdir(tmp_path)
    no_file = load_config(None, env={}, require_file=False)
    assert no_file.state_url == "sqlite:///audsync.db"  # no config: the working directory


def test_an_older_ledger_in_the_working_directory_is_never_replaced(
    tmp_path: Path,
    warehouse: Warehouse,
    gleap: Sandbox,
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Before this change the ledger went where the command ran (systemd's
    WorkingDirectory): a new empty one beside the config would resend everyone."""
    warehouse.add(1, vip=True)
    etc, var = tmp_path / "etc", tmp_path / "var"
    etc.mkdir()
    var.mkdir()
    path = etc / "audsync.toml"
    path.write_text(
        f'[gleap]\nbase_url = "{gleap.url}"\n[source]\nurl = "{warehouse.url}"\n{VIP}',
        encoding="utf-8",
    )
    clean_env.setenv("AUDSYNC_GLEAP_API_TOKEN", TOKEN)
    clean_env.setenv("AUDSYNC_STATE_URL", f"sqlite:///{var / 'audsync.db'}")
    assert main(["-c", str(path), "sync"]) == 0  # the old ledger, in the old place
    capsys.readouterr()
    clean_env.delenv("AUDSYNC_STATE_URL")
    clean_env.chdir(var)
    for argv in (
        ["sync"],
        ["sync", "--dry-run"],
        ["check"],
        ["status"],
        ["history"],
        ["forget", "--list"],
        ["run", "--once"],
    ):
        code, _, err = run_cli(capsys, "-c", str(path), *argv)
        assert code == 2, (argv, err)
        line = one_error_line(err)
        assert f"{var / 'audsync.db'} in the working directory" in line
        assert f'[state] url = "sqlite:///{var / "audsync.db"}"' in line
    assert not (etc / "audsync.db").exists()
    assert len(gleap.calls("/admin/identify")) == 1


# -- 4. global options after the command -------------------------------------------


def leaf_commands(parser: argparse.ArgumentParser) -> Iterator[list[str]]:
    """Every command line prefix that reaches a command (``db upgrade`` included)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = list(leaf_commands(sub))
                yield from ([[name, *n] for n in nested] if nested else [[name]])


COMMANDS = [" ".join(c) for c in leaf_commands(build_parser())]


def test_every_command_is_enumerated() -> None:
    assert {"sync", "db upgrade", "init", "sandbox", "demo"} <= set(COMMANDS)


REQUIRED = {"report": ["--html", "x.html"]}


@pytest.mark.parametrize("command", COMMANDS)
def test_global_options_work_after_every_command(command: str, clean_env: Any) -> None:
    parser = build_parser()
    argv = [*command.split(), *REQUIRED.get(command, [])]
    before = parser.parse_args(["-c", "a.toml", "--log-format", "json", *argv])
    after = parser.parse_args(
        [*argv, "-c", "a.toml", "--log-format", "json", "--log-level", "debug"]
    )
    both = parser.parse_args(["-c", "first.toml", *argv, "--config", "wins.toml"])
    none = parser.parse_args(argv)
    assert (before.config, before.log_format, before.log_level) == ("a.toml", "json", "INFO")
    assert (after.config, after.log_format, after.log_level) == ("a.toml", "json", "DEBUG")
    assert both.config == "wins.toml"
    assert (none.config, none.log_format, none.log_level) == (None, "human", "INFO")


def test_options_after_the_command_run_the_sync(
    make_config: MakeConfig, warehouse: Warehouse, gleap: Sandbox
) -> None:
    warehouse.add(1, vip=True)
    path, _ = make_config()
    done = subprocess.run(
        [sys.executable, "-m", "audsync.cli", "sync", "-c", str(path), "--log-format", "json"],
        env={**os.environ, "AUDSYNC_GLEAP_API_TOKEN": TOKEN},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert all(line.startswith("{") for line in done.stderr.splitlines() if line.strip())
    assert gleap.contacts()["1"]["vip_customers"] is True


# -- 5. queries ending in ; or a comment ----------------------------------------------

TRIMS = [
    ("SELECT 1", "SELECT 1"),
    ("SELECT 1;", "SELECT 1"),
    ("SELECT 1 ;; \n", "SELECT 1"),
    ("SELECT 1; -- done", "SELECT 1"),
    ("SELECT 1 -- the VIPs", "SELECT 1"),
    ("SELECT 1 -- the VIPs;", "SELECT 1"),
    ("SELECT 1; /* a; b */ ; -- c\n\n", "SELECT 1"),
    ("SELECT 1 /* unclosed ;", "SELECT 1 /* unclosed ;"),
    ("SELECT ';'", "SELECT ';'"),
    ("SELECT ';';", "SELECT ';'"),
    ("SELECT '--'; -- x", "SELECT '--'"),
    ("SELECT 'it''s; -- here'", "SELECT 'it''s; -- here'"),
    ("SELECT '/* no */';", "SELECT '/* no */'"),
    ('SELECT 1 AS "a;b" -- c', 'SELECT 1 AS "a;b"'),
    ("SELECT 1 AS `x--y`;", "SELECT 1 AS `x--y`"),
    ("SELECT E'it\\'s;';", "SELECT E'it\\'s;'"),
    ("SELECT $$a;--b$$;", "SELECT $$a;--b$$"),
    ("SELECT $q$ ; $$ -- $q$ -- c", "SELECT $q$ ; $$ -- $q$"),
    ("SELECT a$b FROM t;", "SELECT a$b FROM t"),
    ("SELECT 'open ;", "SELECT 'open ;"),  # does not scan: the engine will say why
    ("SELECT 1\n-- one\n-- two\n;\n", "SELECT 1"),
    ("SELECT x FROM t -- a\nWHERE y = 1; -- b", "SELECT x FROM t -- a\nWHERE y = 1"),
    (";", ""),
    ("-- only a comment", ""),
]


@pytest.mark.parametrize(("sql", "trimmed"), TRIMS)
def test_trim_query(sql: str, trimmed: str) -> None:
    assert trim_query(sql) == trimmed


PASTED = """
[[audiences]]
name = "VIP"
sql = \"\"\"
-- pasted from a console
SELECT id AS user_id, email, 'a;b -- c' AS note
FROM people
WHERE vip = 1; -- the VIPs
\"\"\"

[[traits]]
name = "Revenue"
sql = "SELECT id AS user_id, revenue AS value FROM people WHERE revenue IS NOT NULL /* all */ ;"
"""


def pg_people(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE people (id BIGINT, email TEXT, vip INT, revenue NUMERIC)"))
        conn.execute(
            text("INSERT INTO people VALUES (:i, :e, :v, :r)"),
            [{"i": i, "e": f"p{i}@x.io", "v": int(i <= 2), "r": i * 10} for i in range(1, 4)],
        )
    engine.dispose()


@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
def test_queries_may_end_in_a_semicolon_and_a_comment(
    engine: str,
    tmp_path: Path,
    gleap: Sandbox,
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pg: Generator[str, None, None] | None = None
    if engine == "sqlite":
        warehouse = Warehouse(tmp_path / "warehouse.db")
        for i in range(1, 4):
            warehouse.add(i, vip=i <= 2, revenue=i * 10.0)
        source = warehouse.url
    else:
        if not PG_URL:
            pytest.skip("AUDSYNC_TEST_POSTGRES_URL is not set")
        pg = fresh_pg_database()
        source = next(pg)
        pg_people(source)
    try:
        clean_env.setenv("AUDSYNC_GLEAP_API_TOKEN", TOKEN)
        path = write_config(
            tmp_path,
            base_url=gleap.url,
            source_url=source,
            state_url=f"sqlite:///{tmp_path / 'state.db'}",
            body=PASTED,
        )
        code, out, err = run_cli(capsys, "-c", str(path), "check")
        assert code == 0, err
        assert "audience vip: ok (2 rows)" in out and "trait revenue: ok (3 rows)" in out
        assert main(["-c", str(path), "sync"]) == 0
    finally:
        if pg is not None:
            pg.close()
    contacts = gleap.contacts()
    assert contacts["1"]["vip"] is True and contacts["1"]["note"] == "a;b -- c"
    assert contacts["3"]["revenue"] == 30


# -- 10. read-only commands create nothing --------------------------------------------


def test_read_only_commands_never_create_a_state_db(
    tmp_path: Path,
    warehouse: Warehouse,
    gleap: Sandbox,
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    warehouse.add(1, vip=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    clean_env.chdir(empty)
    clean_env.setenv("AUDSYNC_GLEAP_API_TOKEN", TOKEN)
    # The config lives elsewhere; its state DB (relative: next to it) does not exist.
    etc = tmp_path / "etc"
    etc.mkdir()
    path = write_config(
        etc,
        base_url=gleap.url,
        source_url=warehouse.url,
        state_url="sqlite:///audsync.db",
        body=VIP,
    )
    missing = [
        ["status"],
        ["status", "--json"],
        ["history"],
        ["history", "--failures"],
        ["history", "--json"],
        ["forget", "--list"],
        ["forget", "--list", "--json"],
        ["forget", "--undo", "42"],
        ["report", "--html", str(empty / "r.html")],
    ]
    for argv in missing:
        for config in ([], ["-c", str(path)]):
            code, out, err = run_cli(capsys, *argv, *config)
            assert code == 1, (argv, out, err)
            assert "does not exist yet" in one_error_line(err), argv
    for argv in (["check"], ["sync", "--dry-run"]):
        code, out, err = run_cli(capsys, "-c", str(path), *argv)
        assert code == 0, (argv, err)
        assert "1 Identify calls" in out, out
    assert list(empty.iterdir()) == []
    assert sorted(p.name for p in etc.iterdir()) == ["audsync.toml"]
    assert gleap.calls("/admin/identify") == []


# -- 11. arguments are checked -------------------------------------------------------


def test_history_names_the_known_keys_and_checks_the_limit(
    make_config: MakeConfig,
    warehouse: Warehouse,
    gleap: Sandbox,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for i in range(1, 4):
        warehouse.add(i, vip=True, buyer=True, revenue=1.0)
    path, _ = make_config()
    assert main(["-c", str(path), "sync"]) == 0
    capsys.readouterr()
    for argv in (["history"], ["history", "--failures"], ["report", "--html", "x.html"]):
        code, _, err = run_cli(capsys, "-c", str(path), *argv, "--audience", "vip_cutsomers")
        assert code == 2
        assert (
            "--audience: vip_cutsomers: no such audience or trait"
            " (known: buyers, revenue, vip_customers)" in one_error_line(err)
        )
    for limit in ("0", "-5", "ten"):
        code, _, err = run_cli(capsys, "-c", str(path), "history", "--limit", limit)
        assert code == 2
        assert "argument --limit:" in one_error_line(err, "audsync history")
    code, out, _ = run_cli(capsys, "-c", str(path), "history", "--limit", "1", "--json")
    assert code == 0 and out.count('"audience_key"') == 1


def test_an_unreachable_gleap_names_the_host_and_counts_attempts(
    make_config: MakeConfig,
    warehouse: Warehouse,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    warehouse.add(1, vip=True)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    path, _ = make_config()
    monkeypatch.setenv("AUDSYNC_GLEAP_BASE_URL", f"http://user:pw@127.0.0.1:{port}/api")
    monkeypatch.setenv("AUDSYNC_GLEAP_MAX_RETRIES", "1")
    code, _, err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 1
    # max_retries = 1: one attempt and one retry are two attempts.
    line = one_error_line(err)
    assert f"Gleap did not accept GET /admin/auth at 127.0.0.1:{port} after 2 attempts" in line
    assert "pw" not in line
    assert TOKEN not in err


# -- 12. no traceback, whatever the arguments ------------------------------------------


def typed_options(command: str) -> list[str]:
    """Options of ``command`` that take a checked value (a number, a choice)."""
    parser: Any = build_parser()
    for word in command.split():
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return [
        action.option_strings[-1]
        for action in parser._actions
        if action.option_strings and (action.type is not None or action.choices)
    ]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_rejects_bad_arguments_in_one_line(
    command: str, tmp_path: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.chdir(tmp_path)
    cases = [["--no-such-option"], *([option, "nonsense!"] for option in typed_options(command))]
    for extra in cases:
        code, _, err = run_cli(capsys, *command.split(), *REQUIRED.get(command, []), *extra)
        assert code == 2, (extra, err)
        line = one_error_line(err, f"audsync {command}")
        assert line.startswith(f"audsync {command}: error: "), line
        assert extra[0] in line, line
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield busy.getsockname()[1]


def bad_values(tmp_path: Path, port: int) -> dict[str, list[list[str]]]:
    """Per command, arguments that parse but cannot work: each must exit 2 in one line.
    Every command must have an entry, so a new command cannot be forgotten here."""
    missing = ["-c", str(tmp_path / "missing.toml")]
    return {
        "init": [[str(tmp_path / "exists.toml")], [str(tmp_path / "nowhere" / "a.toml")]],
        "sync": [["no_such_key"], missing],
        "retry-failed": [["no_such_key"], missing],
        "forget": [[]],
        # No read key or project configured: verify cannot read anything.
        "verify": [[], ["no_such_key"], ["--sample", "0"], missing],
        "history": [["--limit", "0"], ["--audience", "typo"], missing],
        "report": [
            ["--html", str(tmp_path / "r.html"), "--runs", "0"],
            ["--html", str(tmp_path)],  # a folder, not a file (review break)
            missing,
        ],
        "status": [missing],
        "check": [missing],
        "db upgrade": [missing],
        "run": [["--metrics-port", "70000"], missing],
        "demo": [["--users", "0"], ["--users", "-3"], ["--users", "2000000"]],
        "sandbox": [
            ["--port", str(port)],
            ["--port", "99999"],
            ["--fail-ratio", "1.5"],
            ["--rate-window", "0"],
            ["--db", str(tmp_path / "nowhere" / "contacts.db"), "--port", "0"],
        ],
    }


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_rejects_values_that_cannot_work_in_one_line(
    command: str,
    tmp_path: Path,
    warehouse: Warehouse,
    gleap: Sandbox,
    taken_port: int,
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    warehouse.add(1, vip=True)
    clean_env.chdir(tmp_path)
    clean_env.setenv("AUDSYNC_GLEAP_API_TOKEN", TOKEN)
    write_config(
        tmp_path,
        base_url=gleap.url,
        source_url=warehouse.url,
        state_url="sqlite:///state.db",
        body=VIP,
    )
    (tmp_path / "exists.toml").write_text("# mine\n", encoding="utf-8")
    assert main(["sync"]) == 0
    capsys.readouterr()
    cases = bad_values(tmp_path, taken_port)
    assert command in cases, f"add bad arguments for `audsync {command}` to bad_values()"
    for extra in cases[command]:
        code, out, err = run_cli(capsys, *command.split(), *extra)
        assert code == 2, (extra, out, err)
        # argparse's errors name the command; ours (config, state) say audsync.
        prefix = f"audsync {command}" if err.startswith(f"audsync {command}:") else "audsync"
        one_error_line(err, prefix)
    assert (tmp_path / "exists.toml").read_text(encoding="utf-8") == "# mine\n"
    assert not list(tmp_path.parent.glob("*.partial")) and not list(tmp_path.glob("*.partial"))


def test_sandbox_on_a_taken_port_in_a_real_process(tmp_path: Path, taken_port: int) -> None:
    done = cli(tmp_path, "sandbox", "--port", str(taken_port))
    assert done.returncode == 2
    line = one_error_line(done.stderr)
    assert f"cannot listen on 127.0.0.1:{taken_port}" in line
    done = cli(tmp_path, "demo", "--users", "0")
    assert done.returncode == 2
    assert "argument --users: '0' must be at least 1" in one_error_line(done.stderr, "audsync demo")


def test_query_helpers_read_the_state_db(tmp_path: Path) -> None:
    """history --audience reads keys from the state DB even without a config."""
    state = f"sqlite:///{tmp_path / 'state.db'}"
    from audsync.history import known_keys
    from audsync.state import open_state

    engine = open_state(state)
    assert known_keys(engine) == []
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO sync_runs (audience_key, trigger, mode, status, started_at, members,"
                " entered, exited, changed, queued, delivered, failed, superseded, skipped_ids,"
                " duplicate_ids) VALUES ('*', 'manual', 'forget', 'succeeded', CURRENT_TIMESTAMP,"
                " 1, 0, 0, 0, 0, 1, 0, 0, 0, 0)"
            )
        )
    assert known_keys(engine) == ["*"]
    assert query(state, "SELECT COUNT(*) AS n FROM sync_runs")[0]["n"] == 1
    engine.dispose()
