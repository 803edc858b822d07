from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from audsync.config import (
    Config,
    Definition,
    GleapConfig,
    Secret,
    SyncConfig,
    load_config,
    parse_duration,
)
from audsync.errors import ConfigError
from tests.helpers import run_cli


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("15m", 900),
        ("2h", 7200),
        ("1h30m", 5400),
        ("1d", 86400),
        ("250ms", 0.25),
        ("45", 45),
        (60, 60),
        (1.5, 1.5),
        (" 2h ", 7200),
    ],
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "2x", "h", "1h 30", "-5", "abc", True, [1], -3])
def test_parse_duration_rejects(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def write(tmp_path: Path, body: str) -> str:
    path = tmp_path / "audsync.toml"
    path.write_text(body, encoding="utf-8")
    return str(path)


GOOD = """
[gleap]
api_token = "file-token"
[source]
url = "sqlite:///w.db"
[schedule]
interval = "4h"
jitter = "30m"
[[audiences]]
name = "High-Value Customers"
sql = "SELECT 1 AS user_id;"
[[audiences]]
name = "Renamed"
key = "order_completed_last_30days"
sql = "SELECT 1 AS user_id"
[[traits]]
name = "Total Revenue 180 Days"
sql = "SELECT 1 AS user_id, 2 AS value"
"""


def test_loads_a_good_config(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), env={})
    assert [d.key for d in config.definitions] == [
        "high_value_customers",
        "order_completed_last_30days",
        "total_revenue_180_days",
    ]
    assert [d.kind for d in config.definitions] == ["audience", "audience", "trait"]
    assert config.definitions[0].sql == "SELECT 1 AS user_id"  # trailing ; dropped
    assert config.schedule.interval == 4 * 3600
    assert config.schedule.jitter == 1800
    # The default state DB lives next to the config file, wherever audsync runs.
    assert config.state_url == f"sqlite:///{tmp_path.resolve() / 'audsync.db'}"
    assert config.gleap.rate_limit == 1000 and config.gleap.rate_window == 60
    assert config.require_token() == "file-token"


def test_env_overrides_file(tmp_path: Path) -> None:
    env = {
        "AUDSYNC_GLEAP_API_TOKEN": "env-token",
        "AUDSYNC_GLEAP_BASE_URL": "http://127.0.0.1:9",
        "AUDSYNC_GLEAP_RATE_LIMIT": "500",
        "AUDSYNC_SOURCE_URL": "sqlite:///other.db",
        "AUDSYNC_STATE_URL": "sqlite:///state2.db",
        "AUDSYNC_SCHEDULE_INTERVAL": "90s",
    }
    config = load_config(write(tmp_path, GOOD), env=env)
    assert config.require_token() == "env-token"
    assert config.gleap.base_url == "http://127.0.0.1:9"
    assert config.gleap.rate_limit == 500
    assert config.source_url == "sqlite:///other.db"
    assert config.state_url == "sqlite:///state2.db"
    assert config.schedule.interval == 90


def test_config_path_from_env(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    assert load_config(None, env={"AUDSYNC_CONFIG": path}).path == path


def test_secret_never_shows() -> None:
    secret = Secret("hunter2")
    assert "hunter2" not in repr(secret) and "hunter2" not in str(secret)
    assert "hunter2" not in repr(load_config.__name__)


def test_config_repr_hides_token(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), env={})
    assert "file-token" not in repr(config)


@pytest.mark.parametrize(
    ("body", "key", "problem"),
    [
        ("[gleap]\nrate_limit = 0\n", "gleap.rate_limit", "must be positive"),
        ("[gleap]\nrate_limit = 'many'\n", "gleap.rate_limit", "whole number"),
        ("[gleap]\nrate_limt = 5\n", "gleap.rate_limt", "unknown key"),
        ("[gleap]\nbase_url = 'ftp://x'\n", "gleap.base_url", "http"),
        ("[schedule]\ninterval = '2 hours'\n", "schedule.interval", "not a duration"),
        ("[sync]\nmax_exit_ratio = 1.5\n", "sync.max_exit_ratio", "(0, 1]"),
        ("[bogus]\n", "bogus", "unknown section"),
        ("[[audiences]]\nsql = 'SELECT 1'\n", "audiences[0].name", "missing"),
        ("[[audiences]]\nname = 'A'\n", "audiences[0].sql", "missing"),
        (
            "[[audiences]]\nname = 'A'\nsql = 'x'\nkey = 'Bad Key'\n",
            "audiences[0].key",
            "must match",
        ),
        ("[[audiences]]\nname = 'Email'\nsql = 'x'\n", "audiences[0].key", "collides"),
        ("[[audiences]]\nname = 'A'\nsql = 'x'\nwhere = 1\n", "audiences[0].where", "unknown key"),
        (
            "[[audiences]]\nname = 'VIP Buyers'\nsql = 'x'\n"
            "[[traits]]\nname = 'vip buyers'\nsql = 'y'\n",
            "key",
            "'vip_buyers' is used by more than one",
        ),
        ("[[audiences]]\nname = '!!!'\nsql = 'x'\n", "audiences[0].key", "empty"),
        ("this is = not toml [", "", "not valid TOML"),
    ],
)
def test_bad_config_names_file_key_and_problem(
    tmp_path: Path, body: str, key: str, problem: str
) -> None:
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    message = str(err.value)
    assert message.startswith(path)
    assert f": {key}:" in message or not key
    assert problem in message
    assert "\n" not in message


def test_bad_env_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, GOOD), env={"AUDSYNC_GLEAP_RATE_LIMIT": "fast"})
    assert str(err.value).startswith("AUDSYNC_GLEAP_RATE_LIMIT: gleap.rate_limit:")


def test_missing_named_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(str(tmp_path / "nope.toml"), env={})


@pytest.mark.parametrize("token", [None, "", "   "])
def test_missing_token_is_a_config_error(tmp_path: Path, token: str | None) -> None:
    body = GOOD.replace(
        'api_token = "file-token"', "" if token is None else f'api_token = "{token}"'
    )
    config = load_config(write(tmp_path, body), env={})
    with pytest.raises(ConfigError, match=r"gleap\.api_token: missing or empty"):
        config.require_token()


def test_select_unknown_key(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), env={})
    with pytest.raises(ConfigError, match="no audience or trait with key 'nope'"):
        config.select(["nope"])
    assert [d.key for d in config.select(["total_revenue_180_days"])] == ["total_revenue_180_days"]


MINIMAL = '[source]\nurl = "sqlite:///w.db"\n'

# (where the value goes, the TOML or env value, the key named, the problem shown).
# Each is a value that cannot work: the CLI exits 2 with one line and does nothing.
BAD_VALUES: list[tuple[str, str, str, str]] = [
    ("gleap.rate_limit", "0", "gleap.rate_limit", "must be positive"),
    ("gleap.rate_limit", "-5", "gleap.rate_limit", "must be positive"),
    ("gleap.concurrency", "0", "gleap.concurrency", "must be positive"),
    ("gleap.concurrency", "100000", "gleap.concurrency", "at most 256"),
    # Found by review: these ended in an OverflowError traceback.
    ("gleap.rate_limit", "99999999999999999999", "gleap.rate_limit", "at most 1000000000"),
    ("sync.chunk_size", "10000000000", "sync.chunk_size", "at most 1000000"),
    ("sync.max_attempts", "100000000000000000000", "sync.max_attempts", "at most 2147483647"),
    ("gleap.max_retries", "3000000000", "gleap.max_retries", "at most 2147483647"),
    ("gleap.max_retries", "-1", "gleap.max_retries", ">= 0"),
    ("gleap.rate_window", "0", "gleap.rate_window", "must be more than 0"),
    ("gleap.rate_window", '"0s"', "gleap.rate_window", "must be more than 0"),
    ("gleap.timeout", "0", "gleap.timeout", "at least 100ms"),
    ("gleap.timeout", '"10ms"', "gleap.timeout", "at least 100ms"),
    ("gleap.timeout", "-1", "gleap.timeout", "negative"),
    ("gleap.timeout", "nan", "gleap.timeout", "not a duration"),
    ("gleap.timeout", "inf", "gleap.timeout", "not a duration"),
    ("schedule.interval", "0", "schedule.interval", "at least 1s"),
    ("schedule.interval", '"1ms"', "schedule.interval", "at least 1s"),
    ("schedule.interval", '"400d"', "schedule.interval", "at most 365d"),
    ("schedule.jitter", '"-1s"', "schedule.jitter", "not a duration"),
    ("sync.lease_ttl", "0", "sync.lease_ttl", "at least 1s"),
    ("sync.lease_ttl", '"500ms"', "sync.lease_ttl", "at least 1s"),
    ("sync.chunk_size", "0", "sync.chunk_size", "must be positive"),
    ("sync.in_database", '"sometimes"', "sync.in_database", "must be 'auto' or 'off'"),
    ("sync.in_database", "true", "sync.in_database", "must be 'auto' or 'off'"),
    ("sync.max_attempts", "0", "sync.max_attempts", "must be positive"),
    ("sync.max_exit_ratio", "0", "sync.max_exit_ratio", "(0, 1]"),
    ("sync.max_exit_ratio", "true", "sync.max_exit_ratio", "must be a number"),
    ("state.busy_timeout", "0", "state.busy_timeout", "at least 1ms"),
    ("state.busy_timeout", '"0.5ms"', "state.busy_timeout", "at least 1ms"),
    ("gleap.base_url", '"http://"', "gleap.base_url", "has no host"),
    ("gleap.base_url", '"api.gleap.io"', "gleap.base_url", "must start with http"),
    ("gleap.base_url", '"https://api. gleap.io"', "gleap.base_url", "whitespace"),
    ("gleap.base_url", '"https://api.gleap.io:99999"', "gleap.base_url", "not a valid URL"),
    (
        "alerts.webhook_url",
        '"https://hooks.example.com/T0\\nHOOKSECRET"',
        "alerts.webhook_url",
        "control character",
    ),
    (
        "alerts.webhook_url",
        '"hooks.example.com/HOOKSECRET"',
        "alerts.webhook_url",
        "must start with http",
    ),
    ("gleap.api_token", '"TOKSECRET\\u0001inner"', "gleap.api_token", "control character"),
    ("gleap.api_token", '"TOKSECRET\\u201c"', "gleap.api_token", "non-ASCII"),
    ("gleap.api_token", "12345678", "gleap.api_token", "must be a string"),
    ("source.url", '"not a url"', "source.url", "not a SQLAlchemy URL"),
    (
        "state.url",
        '"postgresql://u:PWSECRET@host:notaport/db"',
        "state.url",
        "not a SQLAlchemy URL",
    ),
    ("state.url", '"sqlite:///state.db\\u0000"', "state.url", "control character"),
]
NEVER_SHOWN = ("HOOKSECRET", "TOKSECRET", "PWSECRET", "12345678")


def _toml(key: str, value: str) -> str:
    section, name = key.split(".")
    body = MINIMAL if section != "source" else ""
    return f"{body}[{section}]\n{name} = {value}\n"


@pytest.mark.parametrize(("key", "value", "named", "problem"), BAD_VALUES)
def test_value_that_cannot_work_exits_2_naming_file_and_key(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    key: str,
    value: str,
    named: str,
    problem: str,
) -> None:
    monkeypatch.setenv("AUDSYNC_GLEAP_API_TOKEN", "t0ken-for-config-tests")
    if key == "gleap.api_token":
        monkeypatch.delenv("AUDSYNC_GLEAP_API_TOKEN")  # else the env wins over the file
    path = write(tmp_path, _toml(key, value))
    code, out, err = run_cli(capsys, "-c", path, "check")
    assert code == 2, (out, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"audsync: error: {path}: {named}: "), err
    assert problem in lines[0], err
    assert "Traceback" not in err
    assert not any(secret in err for secret in NEVER_SHOWN), err


ENV_BAD: list[tuple[str, str, str]] = [
    ("AUDSYNC_SCHEDULE_INTERVAL", "0", "schedule.interval"),
    ("AUDSYNC_GLEAP_TIMEOUT", "0s", "gleap.timeout"),
    ("AUDSYNC_GLEAP_RATE_LIMIT", "0", "gleap.rate_limit"),
    ("AUDSYNC_SYNC_LEASE_TTL", "0.2", "sync.lease_ttl"),
    ("AUDSYNC_SYNC_IN_DATABASE", "on", "sync.in_database"),
    ("AUDSYNC_GLEAP_API_TOKEN", "TOKSECRET\ninner", "gleap.api_token"),
    ("AUDSYNC_ALERTS_WEBHOOK_URL", "https://hooks.example.com/\rHOOKSECRET", "alerts.webhook_url"),
    ("AUDSYNC_STATE_URL", "no url at all", "state.url"),
]


@pytest.mark.parametrize(("variable", "value", "named"), ENV_BAD)
def test_bad_env_value_exits_2_naming_the_variable(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    named: str,
) -> None:
    monkeypatch.setenv("AUDSYNC_GLEAP_API_TOKEN", "t0ken-for-config-tests")
    monkeypatch.setenv(variable, value)
    code, out, err = run_cli(capsys, "-c", write(tmp_path, MINIMAL), "check")
    assert code == 2, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"audsync: error: {variable}: {named}: "), err
    assert not any(secret in err for secret in NEVER_SHOWN), err


def test_secrets_and_urls_lose_surrounding_whitespace(tmp_path: Path) -> None:
    env = {
        "AUDSYNC_GLEAP_API_TOKEN": " tok-from-a-windows-file\r",
        "AUDSYNC_ALERTS_WEBHOOK_URL": "https://hooks.example.com/T0/B1\n",
        "AUDSYNC_STATE_URL": "sqlite:///state.db\r\n",
        "AUDSYNC_GLEAP_BASE_URL": "http://127.0.0.1:9/\r",
    }
    config = load_config(write(tmp_path, MINIMAL), env=env)
    assert config.require_token() == "tok-from-a-windows-file"
    assert config.alert_webhook_url == "https://hooks.example.com/T0/B1"
    assert config.state_url == "sqlite:///state.db"
    assert config.gleap.base_url == "http://127.0.0.1:9/"


@pytest.mark.parametrize(
    ("key", "value", "seconds"),
    [
        ("schedule.jitter", "0", 0.0),
        ("schedule.interval", '"1s"', 1.0),
        ("gleap.timeout", '"100ms"', 0.1),
        ("sync.lease_ttl", '"1s"', 1.0),
        ("state.busy_timeout", '"1ms"', 0.001),
        ("gleap.rate_window", '"1ms"', 0.001),
    ],
)
def test_smallest_values_that_work_are_accepted(
    tmp_path: Path, key: str, value: str, seconds: float
) -> None:
    config = load_config(write(tmp_path, _toml(key, value)), env={})
    section, name = key.split(".")
    found = {
        "schedule": config.schedule,
        "gleap": config.gleap,
        "sync": config.sync,
    }.get(section)
    held = config.state_busy_timeout if section == "state" else getattr(found, name)
    assert held == pytest.approx(seconds)


def test_in_database_defaults_to_off_and_is_settable_from_file_and_env(tmp_path: Path) -> None:
    """Issue 15: [sync] in_database = auto|off, overridden by AUDSYNC_SYNC_IN_DATABASE;
    off by default until it measures faster than streaming (benchmarks/README.md)."""
    assert load_config(write(tmp_path, MINIMAL), env={}).sync.in_database == "off"
    path = write(tmp_path, _toml("sync.in_database", '"AUTO"'))
    assert load_config(path, env={}).sync.in_database == "auto"
    env = {"AUDSYNC_SYNC_IN_DATABASE": "off"}
    assert load_config(path, env=env).sync.in_database == "off"


@pytest.mark.parametrize(
    ("built", "key", "problem"),
    [
        ({"definitions": (Definition("audience", "Bad", "Bad Key!", "SELECT 1"),)},
         "definitions[0].key", "must match [a-z0-9_]+"),
        ({"definitions": (Definition("audience", "A", "dup", "SELECT 1"),
                          Definition("trait", "B", "dup", "SELECT 1"))},
         "key", "used by more than one"),
        ({"definitions": (Definition("audience", "E", "email", "SELECT 1"),)},
         "definitions[0].key", "collides with the Gleap contact field"),
        ({"definitions": (Definition("audiences", "E", "e", "SELECT 1"),)},  # type: ignore[arg-type]
         "definitions[0].kind", "must be 'audience' or 'trait'"),
        ({"definitions": (Definition("audience", "E", "e", "  "),)},
         "definitions[0].sql", "missing or empty"),
        ({"gleap": GleapConfig(api_token="PLAIN-SECRET")},  # type: ignore[arg-type]
         "gleap.api_token", "must be a Secret(...)"),
        ({"gleap": GleapConfig(concurrency=0)}, "gleap.concurrency", "must be positive"),
        ({"gleap": GleapConfig(rate_window=0)}, "gleap.rate_window", "more than 0"),
        ({"sync": SyncConfig(max_exit_ratio=2.0)}, "sync.max_exit_ratio", "(0, 1]"),
        ({"sync": SyncConfig(in_database="yes")}, "sync.in_database", "'auto' or 'off'"),
    ],
)
def test_a_config_built_in_python_is_held_to_the_files_rules(
    built: dict[str, Any], key: str, problem: str
) -> None:
    """audsync.Config is public: one built by hand gets the checks a file gets, before
    anything is planned or sent, and a plain-string token is refused without echoing it."""
    with pytest.raises(ConfigError) as err:
        Config(path="", source_url=None, state_url="sqlite:///state.db", **built)
    assert err.value.key == key and problem in err.value.problem
    assert "PLAIN-SECRET" not in str(err.value)


def test_a_good_config_built_in_python_is_accepted() -> None:
    config = Config(
        path="",
        source_url="sqlite:///warehouse.db",
        state_url="sqlite:///state.db",
        gleap=GleapConfig(api_token=Secret("t0ken")),
        definitions=(Definition("audience", "VIP", "vip", "SELECT 1 AS user_id"),),
    )
    assert config.require_token() == "t0ken" and "t0ken" not in repr(config)
