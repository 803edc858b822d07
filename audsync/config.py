"""Load ``audsync.toml`` plus ``AUDSYNC_*`` environment overrides into frozen dataclasses.

Every problem is reported as a :class:`~audsync.errors.ConfigError` naming the
file, the key and what is wrong, e.g.::

    audsync.toml: audiences[2].sql: missing (every audience needs a query)

Environment variables override the file, section by section:
``AUDSYNC_<SECTION>_<KEY>`` (``AUDSYNC_GLEAP_API_TOKEN``, ``AUDSYNC_SOURCE_URL``,
``AUDSYNC_STATE_URL``, ``AUDSYNC_SCHEDULE_INTERVAL`` ...).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from audsync import defaults
from audsync.errors import ConfigError
from audsync.keys import derive_key, duplicate_keys, key_problem

Kind = Literal["audience", "trait"]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class Secret:
    """A string that never shows itself in a repr, a log line or a traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself, for the one place that must send it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def parse_duration(value: object) -> float:
    """Seconds in ``value``: a number of seconds or text like ``90s``, ``15m``, ``2h``, ``1h30m``.

    Raises ValueError with a readable reason.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"{value!r} is negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a duration")
    text = value.strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    pos = 0
    total = 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"{value!r} is not a duration (use e.g. 90s, 15m, 2h, 1h30m)")
    return total


@dataclass(frozen=True)
class GleapConfig:
    """The ``[gleap]`` section."""

    api_token: Secret | None = None
    base_url: str = defaults.DEFAULT_GLEAP_BASE_URL
    rate_limit: int = defaults.DEFAULT_RATE_LIMIT
    rate_window: float = defaults.DEFAULT_RATE_WINDOW
    timeout: float = defaults.DEFAULT_TIMEOUT
    concurrency: int = defaults.DEFAULT_CONCURRENCY
    max_retries: int = defaults.DEFAULT_MAX_RETRIES


@dataclass(frozen=True)
class ScheduleConfig:
    """The ``[schedule]`` section: run every ``interval`` plus a random 0..``jitter``."""

    interval: float = defaults.DEFAULT_INTERVAL
    jitter: float = defaults.DEFAULT_JITTER


@dataclass(frozen=True)
class SyncConfig:
    """The ``[sync]`` section: safety limits of planning and delivery."""

    max_attempts: int = defaults.DEFAULT_MAX_ATTEMPTS
    max_exit_ratio: float = defaults.DEFAULT_MAX_EXIT_RATIO
    chunk_size: int = defaults.DEFAULT_CHUNK_SIZE
    lease_ttl: float = defaults.DEFAULT_LEASE_TTL


@dataclass(frozen=True)
class HistoryConfig:
    """The ``[history]`` section: how long finished runs and delivery failures are kept."""

    keep: float = defaults.DEFAULT_HISTORY_KEEP


@dataclass(frozen=True)
class Definition:
    """One ``[[audiences]]`` or ``[[traits]]`` entry."""

    kind: Kind
    name: str
    key: str
    sql: str
    events: bool = False
    """Also send Audience Entered/Exited (or Trait Computed) Track events."""


@dataclass(frozen=True)
class Config:
    """The whole configuration, validated."""

    path: str
    source_url: str | None
    state_url: str
    state_busy_timeout: float = defaults.DEFAULT_BUSY_TIMEOUT
    gleap: GleapConfig = field(default_factory=GleapConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    definitions: tuple[Definition, ...] = ()
    alert_webhook_url: str | None = None

    def require_token(self) -> str:
        """The API token, or a ConfigError saying where to put it."""
        if self.gleap.api_token is None or not self.gleap.api_token.reveal().strip():
            raise ConfigError(
                self.path,
                "gleap.api_token",
                "missing or empty (set AUDSYNC_GLEAP_API_TOKEN or [gleap] api_token)",
            )
        return self.gleap.api_token.reveal()

    def require_source(self) -> str:
        """The source URL, or a ConfigError saying where to put it."""
        if not self.source_url:
            raise ConfigError(
                self.path, "source.url", "missing (set AUDSYNC_SOURCE_URL or [source] url)"
            )
        return self.source_url

    def select(self, keys: list[str]) -> tuple[Definition, ...]:
        """The definitions named by ``keys`` (all when empty); unknown keys are a ConfigError."""
        if not keys:
            return self.definitions
        known = {d.key: d for d in self.definitions}
        unknown = [k for k in keys if k not in known]
        if unknown:
            raise ConfigError(
                self.path,
                "audiences",
                f"no audience or trait with key {unknown[0]!r} (known: "
                + (", ".join(sorted(known)) or "none")
                + ")",
            )
        return tuple(known[k] for k in dict.fromkeys(keys))

    def event_kinds(self) -> dict[str, Kind]:
        """Keys whose transitions are also sent as Track events, with their kind."""
        return {d.key: d.kind for d in self.definitions if d.events}


_SECTIONS: dict[str, dict[str, str]] = {
    # key -> kind of value
    "gleap": {
        "api_token": "str",
        "base_url": "str",
        "rate_limit": "posint",
        "rate_window": "duration",
        "timeout": "duration",
        "concurrency": "posint",
        "max_retries": "nonnegint",
    },
    "source": {"url": "str"},
    "state": {"url": "str", "busy_timeout": "duration"},
    "schedule": {"interval": "duration", "jitter": "duration"},
    "alerts": {"webhook_url": "str"},
    "sync": {
        "max_attempts": "posint",
        "max_exit_ratio": "ratio",
        "chunk_size": "posint",
        "lease_ttl": "duration",
    },
    "history": {"keep": "duration"},
}
_DEFINITION_KEYS = {"name", "key", "sql", "events"}


def resolve_config_path(cli_path: str | None, env: Mapping[str, str]) -> tuple[str, bool]:
    """Where the config is, and whether the user named it (a named file must exist)."""
    if cli_path:
        return cli_path, True
    if env.get("AUDSYNC_CONFIG"):
        return env["AUDSYNC_CONFIG"], True
    return defaults.DEFAULT_CONFIG_PATH, False


def load_config(
    cli_path: str | None = None,
    env: Mapping[str, str] | None = None,
    *,
    require_file: bool = True,
) -> Config:
    """Read, override from ``env`` and validate the config. Raises ConfigError."""
    env = os.environ if env is None else env
    path, named = resolve_config_path(cli_path, env)
    raw: dict[str, Any] = {}
    p = Path(path)
    if p.exists():
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(path, "", f"not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(path, "", f"cannot be read: {exc.strerror}") from None
    elif named or require_file:
        raise ConfigError(path, "", "file not found")
    return parse_config(raw, env, path)


def parse_config(raw: Mapping[str, Any], env: Mapping[str, str], path: str) -> Config:
    """Validate an already-parsed TOML document plus env overrides."""
    for top in raw:
        if top not in _SECTIONS and top not in ("audiences", "traits"):
            raise ConfigError(path, top, "unknown section")
    values: dict[str, dict[str, Any]] = {}
    for section, spec in _SECTIONS.items():
        table = raw.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(path, section, "must be a table ([" + section + "])")
        for k in table:
            if k not in spec:
                raise ConfigError(path, f"{section}.{k}", "unknown key")
        merged: dict[str, Any] = dict(table)
        for k in spec:
            env_name = f"AUDSYNC_{section.upper()}_{k.upper()}"
            if env.get(env_name, "") != "":
                merged[k] = env[env_name]
                where = env_name
            else:
                where = path
            if k in merged:
                merged[k] = _coerce(merged[k], spec[k], where, f"{section}.{k}")
        values[section] = merged

    gleap_raw = values["gleap"]
    token = gleap_raw.pop("api_token", None)
    gleap = GleapConfig(api_token=Secret(token) if token is not None else None, **gleap_raw)
    if not gleap.base_url.startswith(("http://", "https://")):
        raise ConfigError(path, "gleap.base_url", f"{gleap.base_url!r} must start with http(s)://")
    history = HistoryConfig(**values["history"])
    if history.keep <= 0:
        # Zero would prune every run the moment it finishes.
        where = "AUDSYNC_HISTORY_KEEP" if env.get("AUDSYNC_HISTORY_KEEP", "") else path
        raise ConfigError(where, "history.keep", "must be longer than 0 (e.g. 90d)")
    definitions = _parse_definitions(raw, path)
    return Config(
        path=path,
        source_url=values["source"].get("url"),
        state_url=values["state"].get("url", defaults.DEFAULT_STATE_URL),
        state_busy_timeout=values["state"].get("busy_timeout", defaults.DEFAULT_BUSY_TIMEOUT),
        gleap=gleap,
        schedule=ScheduleConfig(**values["schedule"]),
        sync=SyncConfig(**values["sync"]),
        history=history,
        alert_webhook_url=values["alerts"].get("webhook_url"),
        definitions=definitions,
    )


def _coerce(value: Any, kind: str, where: str, key: str) -> Any:
    try:
        if kind == "str":
            if not isinstance(value, str):
                raise ValueError(f"{value!r} must be a string")
            return value
        if kind == "duration":
            return parse_duration(value)
        if kind in ("posint", "nonnegint"):
            if isinstance(value, bool):
                raise ValueError(f"{value!r} must be a whole number")
            number = int(value) if isinstance(value, str) else value
            if not isinstance(number, int):
                raise ValueError(f"{value!r} must be a whole number")
            if number < (1 if kind == "posint" else 0):
                raise ValueError(f"{value!r} must be {'positive' if kind == 'posint' else '>= 0'}")
            return number
        if kind == "ratio":
            ratio = float(value)
            if not 0 < ratio <= 1:
                raise ValueError(f"{value!r} must be in (0, 1]")
            return ratio
    except ValueError as exc:
        text = str(exc)
        if text.startswith("invalid literal"):
            text = f"{value!r} must be a whole number"
        elif text.startswith("could not convert"):
            text = f"{value!r} must be a number"
        raise ConfigError(where, key, text) from None
    raise AssertionError(kind)  # pragma: no cover


def _parse_definitions(raw: Mapping[str, Any], path: str) -> tuple[Definition, ...]:
    found: list[Definition] = []
    sections: tuple[tuple[str, Kind], ...] = (("audiences", "audience"), ("traits", "trait"))
    for section, kind in sections:
        entries = raw.get(section, [])
        if not isinstance(entries, list):
            raise ConfigError(path, section, f"must be an array of tables ([[{section}]])")
        for i, entry in enumerate(entries):
            where = f"{section}[{i}]"
            if not isinstance(entry, dict):
                raise ConfigError(path, where, "must be a table")
            for k in entry:
                if k not in _DEFINITION_KEYS:
                    raise ConfigError(path, f"{where}.{k}", "unknown key")
            name = entry.get("name")
            if not isinstance(name, str) or not name.strip():
                raise ConfigError(path, f"{where}.name", "missing or empty")
            sql = entry.get("sql")
            if not isinstance(sql, str) or not sql.strip():
                raise ConfigError(
                    path, f"{where}.sql", f"missing or empty ({name!r} needs a query)"
                )
            key = entry.get("key")
            if key is not None and not isinstance(key, str):
                raise ConfigError(path, f"{where}.key", "must be a string")
            key = key if key is not None else derive_key(name)
            problem = key_problem(key)
            if problem:
                raise ConfigError(path, f"{where}.key", problem)
            events = entry.get("events", False)
            if not isinstance(events, bool):
                raise ConfigError(path, f"{where}.events", f"{events!r} must be true or false")
            found.append(
                Definition(
                    kind=kind,
                    name=name,
                    key=key,
                    sql=sql.strip().rstrip(";").strip(),
                    events=events,
                )
            )
    dupes = duplicate_keys(d.key for d in found)
    if dupes:
        names = [d.name for d in found if d.key == dupes[0]]
        raise ConfigError(
            path,
            "key",
            f"{dupes[0]!r} is used by more than one audience/trait ({', '.join(map(repr, names))});"
            " set a distinct key",
        )
    return tuple(found)
