"""Load ``audsync.toml`` plus ``AUDSYNC_*`` environment overrides into frozen dataclasses.

Every problem is reported as a :class:`~audsync.errors.ConfigError` naming the
file, the key and what is wrong, e.g.::

    audsync.toml: audiences[2].sql: missing (every audience needs a query)

Environment variables override the file, section by section:
``AUDSYNC_<SECTION>_<KEY>`` (``AUDSYNC_GLEAP_API_TOKEN``, ``AUDSYNC_SOURCE_URL``,
``AUDSYNC_STATE_URL``, ``AUDSYNC_SCHEDULE_INTERVAL`` ...).

A value that cannot work is an error here, not a surprise at run time: a
duration of zero (or under the minimum in :data:`_DURATION_MIN`), a URL that
does not parse or holds a control character. Secrets (the API token, the
webhook URL) lose surrounding whitespace — a secrets file saved on Windows
ends every line in ``\\r`` — and are never echoed in an error.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from audsync import defaults
from audsync.errors import ConfigError, NoLatinForm
from audsync.keys import (
    choose_key,
    derive_key,
    duplicate_keys,
    key_problem,
    legacy_key,
    needs_ledger,
)
from audsync.query_text import trim_query

Kind = Literal["audience", "trait", "contacts"]

CONTACTS_KEY = "@contacts"
"""The key of the ``[contacts]`` query: not a valid audience key, so it can never
clash with one, and never sent to Gleap (its rows carry contact fields only)."""

StoredKeys = Callable[[str, float, Collection[str]], Collection[str]]
"""(state URL, busy timeout, candidate keys) -> those of the keys with ledger rows."""

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
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a duration")
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
    read_token: Secret | None = None
    """Gleap's v3 API key, for ``audsync verify`` (not the admin API token)."""
    project: str | None = None
    """Gleap's project id, sent with every read."""
    read_rate_limit: int = defaults.DEFAULT_READ_RATE_LIMIT
    """Reads per ``rate_window``, under a budget of their own: verifying never slows delivery."""


@dataclass(frozen=True)
class VerifyConfig:
    """The ``[verify]`` section: the daemon's continuous audit."""

    sample_per_run: int = 0
    """Users read back after each scheduled plan (0 = no audit)."""
    max_drift: float = defaults.DEFAULT_MAX_DRIFT
    """An alert goes out when an audience's measured drift rate exceeds this."""
    repair: bool = False
    """Queue the drifted users' values again, as ``audsync verify --repair`` does."""


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
    # "auto": plan inside the database when the source is the state DB's own
    # PostgreSQL database (audsync.plan_in_db); "off": always stream the rows.
    # Off by default: measured, it is not yet faster than streaming (at 1 M
    # members a first plan 3.3x the bare baseline in the database against
    # 1.9x streamed, a dry run 2.9x against 1.1x; benchmarks/README.md), so it
    # is opt-in until it is.
    in_database: str = "off"


@dataclass(frozen=True)
class HistoryConfig:
    """The ``[history]`` section: how long finished runs and delivery failures are kept."""

    keep: float = defaults.DEFAULT_HISTORY_KEEP


@dataclass(frozen=True)
class Definition:
    """One ``[[audiences]]`` or ``[[traits]]`` entry, or the ``[contacts]`` query."""

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
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    definitions: tuple[Definition, ...] = ()
    alert_webhook_url: str | None = None
    notes: tuple[str, ...] = ()
    """Things the user should know about the config that are not errors (a key kept
    because Gleap already holds it): logged by every command, printed by ``check``."""
    state_url_written: str | None = None
    """The state URL as the file gives it, when it is a relative path that
    :func:`anchor_file_url` made absolute (else None): :mod:`audsync.state` uses
    it to refuse starting a second ledger beside one that an older audsync
    kept relative to the working directory."""

    def __post_init__(self) -> None:
        # A Config built by hand in Python (audsync.__all__ exports it) gets the
        # same checks as one read from a file: a bad key or setting is a
        # ConfigError before anything is planned or sent.
        check_built(self)

    def require_token(self) -> str:
        """The API token, or a ConfigError saying where to put it."""
        if self.gleap.api_token is None or not self.gleap.api_token.reveal().strip():
            raise ConfigError(
                self.path,
                "gleap.api_token",
                "missing or empty (set AUDSYNC_GLEAP_API_TOKEN or [gleap] api_token)",
            )
        return self.gleap.api_token.reveal()

    def require_reader(self) -> tuple[str, str]:
        """The read token and the project id for ``verify``, or a ConfigError naming the
        one that is missing."""
        token = self.gleap.read_token.reveal() if self.gleap.read_token else ""
        if not token:
            raise ConfigError(
                self.path,
                "gleap.read_token",
                "missing or empty (verify reads contacts with Gleap's v3 API key: set"
                " AUDSYNC_GLEAP_READ_TOKEN or [gleap] read_token)",
            )
        if not self.gleap.project:
            raise ConfigError(
                self.path,
                "gleap.project",
                "missing or empty (verify needs Gleap's project id: set AUDSYNC_GLEAP_PROJECT"
                " or [gleap] project)",
            )
        return token, self.gleap.project

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

    def key_kinds(self) -> dict[str, Kind]:
        """Every audience and trait key with its kind: no query column may take one."""
        return {d.key: d.kind for d in self.definitions}

    def event_kinds(self) -> dict[str, Kind]:
        """Keys whose transitions are also sent as Track events, with their kind."""
        return {d.key: d.kind for d in self.definitions if d.events}


_SECTIONS: dict[str, dict[str, str]] = {
    # key -> kind of value
    "gleap": {
        "api_token": "secret",
        "base_url": "http_url",
        "rate_limit": "posint",
        "rate_window": "duration",
        "timeout": "duration",
        "concurrency": "posint",
        "max_retries": "nonnegint",
        "read_token": "secret",
        "project": "header",
        "read_rate_limit": "posint",
    },
    "source": {"url": "db_url"},
    "state": {"url": "db_url", "busy_timeout": "duration"},
    "schedule": {"interval": "duration", "jitter": "duration"},
    "alerts": {"webhook_url": "secret_url"},
    "sync": {
        "max_attempts": "posint",
        "max_exit_ratio": "ratio",
        "chunk_size": "posint",
        "lease_ttl": "duration",
        "in_database": "in_database",
    },
    "history": {"keep": "duration"},
    "contacts": {"sql": "str"},
    "verify": {"sample_per_run": "nonnegint", "max_drift": "fraction", "repair": "bool"},
}
_DEFINITION_KEYS = {"name", "key", "sql", "events"}
IN_DATABASE_SETTINGS = ("auto", "off")
"""``[sync] in_database``: ``auto`` plans inside the database when it can, ``off`` never."""

_DURATION_MIN: dict[str, float] = {
    # key -> the least value that can work; a key not named here may be 0 (jitter).
    "gleap.rate_window": 0.0,  # exclusive: any window > 0 paces
    "gleap.timeout": defaults.MIN_TIMEOUT,
    "schedule.interval": defaults.MIN_INTERVAL,
    "sync.lease_ttl": defaults.MIN_LEASE_TTL,
    "state.busy_timeout": defaults.MIN_BUSY_TIMEOUT,
}
_INT_MAX: dict[str, int] = {
    "gleap.concurrency": defaults.MAX_CONCURRENCY,
    "gleap.rate_limit": defaults.MAX_RATE_LIMIT,
    "gleap.read_rate_limit": defaults.MAX_RATE_LIMIT,
    "verify.sample_per_run": defaults.MAX_VERIFY_SAMPLE,
    "sync.chunk_size": defaults.MAX_CHUNK_SIZE,
}


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
    stored_keys: StoredKeys | None = None,
) -> Config:
    """Read, override from ``env`` and validate the config. Raises ConfigError.

    A definition whose derived key depends on the ledger (``keys.needs_ledger``)
    asks ``stored_keys`` (by default the state DB, read only) which keys Gleap
    already holds, so a key in a ledger never changes.
    """
    env = os.environ if env is None else env
    path, named = resolve_config_path(cli_path, env)
    if stored_keys is None:
        from audsync.state import keys_in_ledger  # the state module imports this one

        stored_keys = keys_in_ledger
    raw: dict[str, Any] = {}
    p = Path(path)
    if p.is_file():
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(path, "", f"not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(path, "", f"cannot be read: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(path, "", "is not UTF-8 text") from None
        return parse_config(
            raw, env, path, stored_keys=stored_keys, base_dir=str(p.resolve().parent)
        )
    if p.exists():
        raise ConfigError(path, "", "is not a file")
    if named or require_file:
        raise ConfigError(path, "", not_found_problem(path, named, cli_path is not None))
    return parse_config(raw, env, path, stored_keys=stored_keys)


def not_found_problem(path: str, named: bool, by_option: bool) -> str:
    """Why there is no config, where audsync looked, and the ways to give it one."""
    if named:
        by = "-c" if by_option else "AUDSYNC_CONFIG"
        return (
            f"file not found (named by {by}); write a commented starter there with"
            f" `audsync init {path}`"
        )
    return (
        f"file not found: looked for {path} in {Path.cwd()} because neither -c PATH nor"
        " AUDSYNC_CONFIG names a config; name one, or write a commented starter with"
        " `audsync init`"
    )


def anchor_file_url(url: str, base_dir: str) -> str:
    """``url`` with a relative SQLite (or DuckDB) file path made absolute under
    ``base_dir``; any other URL unchanged.

    A relative path in a config file means "next to this file", wherever the
    command runs from: read from the working directory, ``audsync -c
    /etc/audsync/audsync.toml status`` run from elsewhere would find no state
    DB, and a sync there would start a second ledger and resend everyone.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return url
    database = parsed.database
    if (
        parsed.get_backend_name() not in ("sqlite", "duckdb")
        or not database
        or database == ":memory:"
        or database.startswith("file:")  # an SQLite URI: relative to nothing we can tell
        or Path(database).is_absolute()
    ):
        return url
    anchored = str(Path(base_dir) / database)
    return parsed.set(database=anchored).render_as_string(hide_password=False)


def check_built(config: Config) -> None:
    """Check a :class:`Config` against the rules a config file is held to: every
    setting of ``[gleap]``, ``[sync]``, ``[schedule]``, ``[history]`` and
    ``[verify]``, each definition's kind, name, query and key, and unique keys.
    Raises ConfigError naming the setting (``config.path`` as the source)."""
    where = config.path or "Config"
    sections = {
        "gleap": config.gleap,
        "sync": config.sync,
        "schedule": config.schedule,
        "history": config.history,
        "verify": config.verify,
    }
    for section, settings in sections.items():
        for key, kind in _SECTIONS[section].items():
            value = getattr(settings, key)
            if value is None:
                continue
            if kind == "secret":
                if not isinstance(value, Secret):
                    # Never echo the value: it is a token.
                    raise ConfigError(where, f"{section}.{key}", "must be a Secret(...)")
                continue
            _coerce(value, kind, where, f"{section}.{key}")
    if config.history.keep <= 0:
        raise ConfigError(where, "history.keep", "must be longer than 0 (e.g. 90d)")
    for i, definition in enumerate(config.definitions):
        at = f"definitions[{i}]"
        if definition.kind not in ("audience", "trait", "contacts"):
            raise ConfigError(
                where, f"{at}.kind", f"{definition.kind!r} must be 'audience' or 'trait'"
            )
        if not isinstance(definition.name, str) or not definition.name.strip():
            raise ConfigError(where, f"{at}.name", "missing or empty")
        if not isinstance(definition.sql, str) or not definition.sql.strip():
            raise ConfigError(where, f"{at}.sql", "missing or empty")
        if definition.kind != "contacts":
            problem = key_problem(definition.key) if isinstance(definition.key, str) else (
                "must be a string"
            )
            if problem:
                raise ConfigError(where, f"{at}.key", problem)
    problem = duplicate_key_problem(config.definitions)
    if problem:
        raise ConfigError(where, "key", problem)


def duplicate_key_problem(definitions: Sequence[Definition]) -> str | None:
    """Why two definitions cannot share their key (naming both), or None."""
    dupes = duplicate_keys(d.key for d in definitions)
    if not dupes:
        return None
    names = [d.name for d in definitions if d.key == dupes[0]]
    return (
        f"{dupes[0]!r} is used by more than one audience/trait ({', '.join(map(repr, names))});"
        " set a distinct key"
    )


def parse_config(
    raw: Mapping[str, Any],
    env: Mapping[str, str],
    path: str,
    *,
    stored_keys: StoredKeys | None = None,
    base_dir: str | None = None,
) -> Config:
    """Validate an already-parsed TOML document plus env overrides.

    Without ``stored_keys`` no key is taken to be in a ledger.

    ``base_dir`` is the config file's folder: a relative SQLite or DuckDB path
    written in the file (or the default state DB) is taken relative to it. A
    value from the environment is taken as the shell gives it, relative to the
    working directory, and so is everything when there is no file.
    """
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
                if (section, k) == ("source", "url") and where == path and base_dir:
                    merged[k] = anchor_file_url(merged[k], base_dir)
        values[section] = merged

    gleap_raw = values["gleap"]
    token = gleap_raw.pop("api_token", None)
    read_token = gleap_raw.pop("read_token", None)
    gleap = GleapConfig(
        api_token=Secret(token) if token is not None else None,
        read_token=Secret(read_token) if read_token is not None else None,
        **gleap_raw,
    )
    history = HistoryConfig(**values["history"])
    if history.keep <= 0:
        # Zero would prune every run the moment it finishes.
        where = "AUDSYNC_HISTORY_KEEP" if env.get("AUDSYNC_HISTORY_KEEP", "") else path
        raise ConfigError(where, "history.keep", "must be longer than 0 (e.g. 90d)")
    state_written = values["state"].get("url", defaults.DEFAULT_STATE_URL)
    state_url = state_written
    if base_dir is not None and not env.get("AUDSYNC_STATE_URL", ""):
        state_url = anchor_file_url(state_written, base_dir)
    busy_timeout = values["state"].get("busy_timeout", defaults.DEFAULT_BUSY_TIMEOUT)

    def in_ledger(candidates: Collection[str]) -> Collection[str]:
        return stored_keys(state_url, busy_timeout, candidates) if stored_keys else ()

    notes: list[str] = []
    definitions = _parse_definitions(raw, path, in_ledger, notes)
    contacts = _parse_contacts(values["contacts"], "contacts" in raw, env, path)
    if contacts is not None:
        definitions = (*definitions, contacts)
    return Config(
        path=path,
        source_url=values["source"].get("url"),
        state_url=state_url,
        state_url_written=state_written if state_written != state_url else None,
        state_busy_timeout=busy_timeout,
        gleap=gleap,
        schedule=ScheduleConfig(**values["schedule"]),
        sync=SyncConfig(**values["sync"]),
        history=history,
        verify=VerifyConfig(**values["verify"]),
        alert_webhook_url=values["alerts"].get("webhook_url"),
        definitions=definitions,
        notes=tuple(notes),
    )


def _seconds_text(seconds: float) -> str:
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def duration_problem(key: str, seconds: float) -> str | None:
    """Why ``seconds`` cannot work for the duration setting ``key``, or None."""
    if seconds > defaults.MAX_DURATION:
        return "must be at most 365d"
    least = _DURATION_MIN.get(key)
    if least is None:
        return None
    if least == 0.0 and seconds <= 0:
        return "must be more than 0"
    if seconds < least:
        return f"must be at least {_seconds_text(least)}"
    return None


def secret_problem(value: str) -> str | None:
    """Why a secret (already stripped) cannot be sent in a header or URL, or None.

    The message never contains the value.
    """
    if any(not c.isprintable() for c in value):
        return "contains a control character (the value is not shown)"
    if not value.isascii():
        return "contains a non-ASCII character (a typographic quote from a copy-paste?)"
    return None


def http_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be used as an http(s) endpoint, or None. Never echoes it."""
    if any(not c.isprintable() or c.isspace() for c in url):
        return "contains whitespace or a control character (the value is not shown)"
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError when out of range or not a number
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in ("http", "https"):
        return "must start with http:// or https://"
    if not parts.hostname:
        return "has no host (expected e.g. https://api.gleap.io)"
    del port
    return None


def db_url_problem(url: str) -> str | None:
    """Why ``url`` is not a SQLAlchemy URL, or None. Never echoes it (it may hold a password)."""
    if any(not c.isprintable() for c in url):
        return "contains a control character (the value is not shown)"
    try:
        make_url(url)
    except (ArgumentError, ValueError):
        return (
            "is not a SQLAlchemy URL (expected e.g. sqlite:///audsync.db or"
            " postgresql+psycopg://user@host/db)"
        )
    return None


def _text(value: Any, kind: str) -> str:
    if not isinstance(value, str):
        # A secret's value is not echoed even when it has the wrong type.
        shown = "the value" if kind.startswith("secret") else repr(value)
        raise ValueError(f"{shown} must be a string")
    if kind == "str":
        return value
    # Surrounding whitespace is never meant: a trailing \r from a file saved on
    # Windows, a newline from `echo` into a secrets file.
    text = value.strip()
    problem = {
        "secret": secret_problem,
        "header": secret_problem,
        "secret_url": lambda v: secret_problem(v) or http_url_problem(v),
        "http_url": http_url_problem,
        "db_url": db_url_problem,
    }[kind](text)
    if problem is not None:
        raise ValueError(problem)
    return text


def _boolean(value: Any) -> bool:
    """true/false from TOML, or its spelling in an environment variable."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
    raise ValueError(f"{value!r} must be true or false")


def _coerce(value: Any, kind: str, where: str, key: str) -> Any:
    try:
        if kind in ("str", "secret", "header", "secret_url", "http_url", "db_url"):
            return _text(value, kind)
        if kind == "bool":
            return _boolean(value)
        if kind == "duration":
            seconds = parse_duration(value)
            problem = duration_problem(key, seconds)
            if problem is not None:
                raise ValueError(f"{value!r} {problem}")
            return seconds
        if kind in ("posint", "nonnegint"):
            if isinstance(value, bool):
                raise ValueError(f"{value!r} must be a whole number")
            number = int(value) if isinstance(value, str) else value
            if not isinstance(number, int):
                raise ValueError(f"{value!r} must be a whole number")
            if number < (1 if kind == "posint" else 0):
                raise ValueError(f"{value!r} must be {'positive' if kind == 'posint' else '>= 0'}")
            most = _INT_MAX.get(key, defaults.MAX_WHOLE_NUMBER)
            if number > most:
                raise ValueError(f"{value!r} must be at most {most}")
            return number
        if kind == "in_database":
            choice = str(value).strip().lower() if isinstance(value, str) else value
            if choice not in IN_DATABASE_SETTINGS:
                raise ValueError(f"{value!r} must be 'auto' or 'off'")
            return choice
        if kind == "fraction":
            if isinstance(value, bool):
                raise ValueError(f"{value!r} must be a number")
            share = float(value)
            if not 0 <= share <= 1:
                raise ValueError(f"{value!r} must be in [0, 1]")
            return share
        if kind == "ratio":
            if isinstance(value, bool):
                raise ValueError(f"{value!r} must be a number")
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


def _parse_contacts(
    table: Mapping[str, Any], in_file: bool, env: Mapping[str, str], path: str
) -> Definition | None:
    """The optional ``[contacts]`` query: ``user_id`` plus contact columns for every
    user whose contact fields are kept in step, member of an audience or not."""
    if not table and not in_file:
        return None
    where = "AUDSYNC_CONTACTS_SQL" if env.get("AUDSYNC_CONTACTS_SQL", "") else path
    sql = table.get("sql")
    if isinstance(sql, str):
        sql = trim_query(sql)  # a pasted query's trailing semicolons and comments
    if not isinstance(sql, str) or not sql:
        raise ConfigError(
            where, "contacts.sql", "missing or empty ([contacts] needs a query returning user_id)"
        )
    return Definition(
        kind="contacts",
        name="contacts",
        key=CONTACTS_KEY,
        sql=sql,
    )


def _key_from_name(
    name: str, in_ledger: Callable[[Collection[str]], Collection[str]], path: str, where: str
) -> tuple[str, str | None]:
    if not needs_ledger(name):
        return derive_key(name), None
    stored = in_ledger(sorted({derive_key(name), legacy_key(name)} - {""}))
    try:
        return choose_key(name, stored)
    except NoLatinForm as exc:
        raise ConfigError(path, f"{where}.key", str(exc)) from None


def _parse_definitions(
    raw: Mapping[str, Any],
    path: str,
    in_ledger: Callable[[Collection[str]], Collection[str]],
    notes: list[str],
) -> tuple[Definition, ...]:
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
            if isinstance(sql, str):
                sql = trim_query(sql)
            if not isinstance(sql, str) or not sql:
                raise ConfigError(
                    path, f"{where}.sql", f"missing or empty ({name!r} needs a query)"
                )
            key = entry.get("key")
            if key is not None and not isinstance(key, str):
                raise ConfigError(path, f"{where}.key", "must be a string")
            if key is None:
                key, note = _key_from_name(name, in_ledger, path, where)
                if note:
                    notes.append(f"{where}: {note}")
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
                    sql=sql,
                    events=events,
                )
            )
    problem = duplicate_key_problem(found)
    if problem:
        raise ConfigError(path, "key", problem)
    return tuple(found)
