"""The exceptions audsync raises, all under :class:`AudsyncError`.

::

    AudsyncError                      exit code 1 unless a subclass says otherwise
    ├── ConfigError                   bad config file or env (exit 2); names file + key
    ├── SourceError                   an audience query failed; names the audience
    ├── StateError                    the state DB is unreachable, locked or too old
    │   └── StateMoved                ... not there, but the one a relative path meant before is
    ├── DriverMissing                 a source/state URL's driver is not installed (exit 2)
    ├── LeaseHeld                     another process holds a lease (exit 3)
    ├── LeaseLost                     another process took the delivery lease: stop writing
    ├── Interrupted                   a shutdown request stopped the work (exit 130)
    │   └── CallAbandoned             ... while a call was in flight: Gleap may still apply it
    └── GleapError                    Gleap could not be used
        ├── GleapAuthError            401/403: "Gleap rejected the API token"
        ├── GleapUnavailable          429/5xx/network errors outlasted every retry
        └── GleapRejectingAll         the first calls of a drain were all rejected (3xx/4xx):
                                      a wrong base_url or an API change, not bad users

    ValueError                        one value, row or name is unusable; the caller turns it
    │                                 into a per-user failure or one of the errors above
    ├── UnstorableValue               a value Gleap cannot keep as an attribute (list, NaN, ...)
    ├── PayloadError                  one user's data cannot be sent to Gleap as it is
    ├── ColumnProblem                 a query's columns cannot be sent (the whole audience fails)
    ├── NoLatinForm                   a name has no Latin form: its key must be given explicitly
    └── CannotExpress                 a query's result cannot be rendered exactly in SQL:
                                      in-database planning falls back to streaming

Messages never contain the API token: every error built from an HTTP exchange
goes through :func:`redact` first, which also knows every secret the config
loaded (:func:`use_secrets`) in each form a library may print it in.
:func:`one_line` reduces any exception to one safe line for a log or an
error message: no traceback, no ``[SQL: ...]``, no ``[parameters: ...]``;
:func:`first_line` is what a driver said first, for a message that names the
query or database it is about.
"""

from __future__ import annotations

import html
import json
import re
import threading
from urllib.parse import quote, quote_plus

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_LEASE_HELD = 3
EXIT_INTERRUPTED = 130  # the shell's code for "stopped by SIGINT"
EXIT_BROKEN_PIPE = 141  # the shell's code for "the reader went away" (SIGPIPE)


class AudsyncError(Exception):
    """Base of every error audsync reports to the user as one line."""

    exit_code = EXIT_FAILED


class ConfigError(AudsyncError):
    """The config file or environment is wrong; nothing was done."""

    exit_code = EXIT_USAGE

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}")

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, str, str]]:
        # Rebuilt from its parts, so it crosses a process pool or a task queue intact.
        return type(self), (self.source, self.key, self.problem)


class SourceError(AudsyncError):
    """An audience or trait query could not be run or returned unusable rows."""

    def __init__(self, audience_key: str, problem: str, kind: str = "audience") -> None:
        self.audience_key = audience_key
        self.problem = problem
        self.kind = kind
        super().__init__(f"{kind} {audience_key!r}: {problem}")

    def __reduce__(self) -> tuple[type[SourceError], tuple[str, str, str]]:
        return type(self), (self.audience_key, self.problem, self.kind)


class StateError(AudsyncError):
    """The state database cannot be used."""


class StateMoved(StateError):
    """The config's state DB does not exist, but the file its relative path named
    when such paths were taken from the working directory does (exit 2)."""

    exit_code = EXIT_USAGE


class DriverMissing(AudsyncError):
    """A source or state URL needs a SQLAlchemy dialect or driver that is not
    installed; the message names the package (:mod:`audsync.drivers`)."""

    exit_code = EXIT_USAGE


class LeaseHeld(AudsyncError):
    """Another process holds the lease this command needs."""

    exit_code = EXIT_LEASE_HELD


class LeaseLost(AudsyncError):
    """Another process took the delivery lease: stop writing at once."""


class Interrupted(AudsyncError):
    """A shutdown request stopped the work; whatever was not finished stays queued."""

    exit_code = EXIT_INTERRUPTED


class CallAbandoned(Interrupted):
    """A shutdown request gave up a call already sent: Gleap may still apply it, so
    nothing may assume the call did not happen (``audsync forget`` waits on it)."""


class GleapError(AudsyncError):
    """Talking to Gleap failed."""


class GleapAuthError(GleapError):
    """Gleap answered 401 or 403: the API token is wrong or revoked."""

    def __init__(self, status: int) -> None:
        self.status = status
        super().__init__(f"Gleap rejected the API token (HTTP {status})")

    def __reduce__(self) -> tuple[type[GleapAuthError], tuple[int]]:
        return type(self), (self.status,)


class GleapUnavailable(GleapError):
    """Gleap kept failing (429, 5xx or network errors) past every retry."""


class GleapRejectingAll(GleapError):
    """Gleap (or whatever answers at base_url) rejected every call a drain made and
    acknowledged none: the changes stay queued and no user is blamed for it."""


class UnstorableValue(ValueError):
    """A value Gleap cannot keep as a contact attribute (lists, objects, NaN ...)."""


class PayloadError(ValueError):
    """This user's data cannot be sent to Gleap as it is (a per-user failure)."""


class ColumnProblem(ValueError):
    """A query's columns cannot be sent as they are (the whole audience fails)."""


class NoLatinForm(ValueError):
    """A name holds letters with no Latin form: its key must be given explicitly."""


class CannotExpress(ValueError):
    """The query's result cannot be rendered exactly in SQL: stream it instead."""


_registered: set[str] = set()
_registered_lock = threading.Lock()


def use_secrets(*secrets: str | None) -> None:
    """The configured secrets: every later :func:`redact` (and log line) hides them.

    Replaces the previous set: one process runs one config (the tests run many).
    """
    with _registered_lock:
        _registered.clear()
        _registered.update(s for s in secrets if s)


def registered_secrets() -> tuple[str, ...]:
    """The secrets given to :func:`use_secrets` (the configured token, the webhook URL)."""
    with _registered_lock:
        return tuple(_registered)


def secret_forms(secret: str) -> set[str]:
    """Every spelling of ``secret`` a message may carry: raw, stripped, as Python's repr
    escapes it (``tok\\r``, as httpx/h11 quote a bad header), JSON-escaped, URL-encoded,
    HTML-escaped (an error page), and with runs of white space collapsed."""
    forms: set[str] = set()
    for raw in (secret, secret.strip()):
        if not raw:
            continue
        forms.add(raw)
        for escaped in (repr(raw)[1:-1], ascii(raw)[1:-1], json.dumps(raw)[1:-1]):
            forms.add(escaped)
            forms.add(repr(escaped)[1:-1])  # escaped twice: a repr of a message holding a repr
        forms.add(json.dumps(raw, ensure_ascii=False)[1:-1])
        forms.add(quote(raw, safe=""))
        forms.add(quote_plus(raw, safe=""))
        forms.add(quote(raw))
        forms.add(html.escape(raw))
        # Go's JSON encoder (many proxies) escapes <, > and & as \u003c ...
        forms.add(
            json.dumps(raw)[1:-1]
            .replace("<", "\\u003c")
            .replace(">", "\\u003e")
            .replace("&", "\\u0026")
        )
        forms.add(html.escape(raw, quote=False))
        forms.add(" ".join(raw.split()))
    return {form for form in forms if form}


def redact(text: str, *secrets: str | None) -> str:
    """Return ``text`` with every secret (given, or registered) replaced by ``***``,
    in each of its :func:`secret_forms`, longest first so no escaped tail survives."""
    forms: set[str] = set()
    for secret in (*secrets, *registered_secrets()):
        if secret:
            forms |= secret_forms(secret)
    for form in sorted(forms, key=len, reverse=True):
        # Case-insensitively: a server may shout the token back in upper case.
        text = re.sub(re.escape(form), "***", text, flags=re.IGNORECASE)
    return text


def safe_url(url: str) -> str:
    """A database URL to show: its password as ``***``; never the raw text of one that
    does not parse (it may hold a password where the parser did not expect one)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable URL>"


_SQLALCHEMY_NOISE = re.compile(
    r"\s*(\[SQL:.*|\[parameters:.*|\(Background on this error at:.*)", re.DOTALL
)


def one_line(text: str) -> str:
    """``text`` on one line: line breaks and other control characters become spaces."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def first_line(exc: BaseException) -> str:
    """The first line of what the driver said (``exc.orig``: no ``(sqlite3.Error)``
    prefix, no ``[SQL: ...]``) or else of ``exc``; its type when both are empty.

    Unlike :func:`describe` it keeps a DETAIL and redacts nothing: for a message about
    the user's own query or database, which the caller words and the CLI redacts."""
    message = str(getattr(exc, "orig", None) or exc).strip()
    return message.splitlines()[0] if message else type(exc).__name__


def describe(exc: BaseException) -> str:
    """One safe line about ``exc`` for a log or an error message.

    A SQLAlchemy error says only what its driver said first (``database is
    locked``), never the statement or its parameters, which hold users' ids,
    e-mail addresses and values; every registered secret is redacted.
    """
    orig = getattr(exc, "orig", None)
    text = str(orig) if isinstance(orig, BaseException) else str(exc)
    text = _SQLALCHEMY_NOISE.sub("", text).strip()
    first = text.splitlines()[0] if text else ""
    # A driver's DETAIL/HINT lines repeat row values (psycopg: "Key (email)=(...)").
    first = first.split("DETAIL:")[0].strip()
    return redact(one_line(first)) or type(exc).__name__
