"""Log output: human-readable lines by default, one JSON object per line for shippers.

Every record passes through :func:`audsync.errors.redact` with the API token
(from the environment and whatever the config loaded), so a message that
somehow carried it still shows ``***``. Every record is one line: an
exception in its arguments or its ``exc_info`` is reduced to
:func:`audsync.errors.describe` (no traceback, no SQL, no parameters).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys

from audsync.errors import describe, one_line, redact

HUMAN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NOISY_LOGGERS = ("httpx", "httpcore", "alembic", "apscheduler")
"""Request lines and migration chatter are noise at INFO for an operator."""


def safe_message(record: logging.LogRecord) -> str:
    """The record's message as one line with no secret, SQL, parameters or traceback."""
    args = record.args
    if isinstance(args, tuple):
        args = tuple(describe(a) if isinstance(a, BaseException) else a for a in args)
    elif isinstance(args, BaseException):
        args = (describe(args),)
    try:
        message = str(record.msg) % args if args else str(record.msg)
    except (TypeError, ValueError):
        message = record.getMessage()
    if isinstance(record.msg, BaseException):
        message = describe(record.msg)
    if record.exc_info and record.exc_info[1] is not None:
        # The traceback would be many lines of our code and the driver's text:
        # the exception's own first line is what an operator needs.
        message = f"{message}: {describe(record.exc_info[1])}"
    return one_line(
        redact(
            message,
            os.environ.get("AUDSYNC_GLEAP_API_TOKEN"),
            os.environ.get("AUDSYNC_GLEAP_READ_TOKEN"),
        )
    )


class RedactingFilter(logging.Filter):
    """Makes every record one safe line: the API token replaced by ``***``, exceptions
    (in the arguments or as ``exc_info``) reduced to what their driver said first."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.audsync_error = describe(record.exc_info[1])
        record.msg, record.args = safe_message(record), None
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC ISO 8601), level, logger, message[, error]."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        error = getattr(record, "audsync_error", None)
        if error is None and record.exc_info and record.exc_info[1] is not None:
            error = describe(record.exc_info[1])
        if error is not None:
            entry["error"] = error
        return json.dumps(entry, ensure_ascii=False)


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the moment (tests swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self._audsync = True

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def configure(level: str, fmt: str) -> None:
    """Send audsync's logs to stderr as ``fmt`` ("human" or "json") at ``level``."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_audsync", False)), None)
    if handler is None:
        handler = StderrHandler()
        handler.addFilter(RedactingFilter())
        root.addHandler(handler)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(HUMAN_FORMAT))
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
