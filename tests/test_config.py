from __future__ import annotations

from pathlib import Path

import pytest

from audsync.config import Secret, load_config, parse_duration
from audsync.errors import ConfigError


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
    assert config.state_url == "sqlite:///audsync.db"
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
