"""The exceptions audsync raises, all under :class:`AudsyncError`.

::

    AudsyncError                      exit code 1 unless a subclass says otherwise
    ├── ConfigError                   bad config file or env (exit 2); names file + key
    ├── SourceError                   an audience query failed; names the audience
    ├── StateError                    the state DB is unreachable, locked or too old
    ├── LeaseHeld                     another process holds a lease (exit 3)
    ├── Interrupted                   a shutdown request stopped the work (exit 130)
    └── GleapError                    Gleap could not be used
        ├── GleapAuthError            401/403: "Gleap rejected the API token"
        ├── GleapUnavailable          429/5xx/network errors outlasted every retry
        └── GleapRejectingAll         the first calls of a drain were all rejected (3xx/4xx):
                                      a wrong base_url or an API change, not bad users

Messages never contain the API token: every error built from an HTTP exchange
goes through :func:`redact` first.
"""

from __future__ import annotations

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


class SourceError(AudsyncError):
    """An audience or trait query could not be run or returned unusable rows."""

    def __init__(self, audience_key: str, problem: str) -> None:
        self.audience_key = audience_key
        super().__init__(f"audience {audience_key!r}: {problem}")


class StateError(AudsyncError):
    """The state database cannot be used."""


class LeaseHeld(AudsyncError):
    """Another process holds the lease this command needs."""

    exit_code = EXIT_LEASE_HELD


class Interrupted(AudsyncError):
    """A shutdown request stopped the work; whatever was not finished stays queued."""

    exit_code = EXIT_INTERRUPTED


class GleapError(AudsyncError):
    """Talking to Gleap failed."""


class GleapAuthError(GleapError):
    """Gleap answered 401 or 403: the API token is wrong or revoked."""

    def __init__(self, status: int) -> None:
        self.status = status
        super().__init__(f"Gleap rejected the API token (HTTP {status})")


class GleapUnavailable(GleapError):
    """Gleap kept failing (429, 5xx or network errors) past every retry."""


class GleapRejectingAll(GleapError):
    """Gleap (or whatever answers at base_url) rejected every call a drain made and
    acknowledged none: the changes stay queued and no user is blamed for it."""


def redact(text: str, *secrets: str | None) -> str:
    """Return ``text`` with every non-empty secret replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text
