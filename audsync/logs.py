"""Log output: human-readable lines by default, one JSON object per line for shippers.

Every record passes through :func:`audsync.errors.redact` with the API token,
so a message that somehow carried it still shows ``***``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys

HUMAN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NOISY_LOGGERS = ("httpx", "httpcore", "alembic", "apscheduler")
"""Request lines and migration chatter are noise at INFO for an operator."""


class RedactingFilter(logging.Filter):
    """Replaces the API token in every record's final message."""

    def filter(self, record: logging.LogRecord) -> bool:
        token = os.environ.get("AUDSYNC_GLEAP_API_TOKEN")
        if token:
            message = record.getMessage()
            if token in message:
                record.msg, record.args = message.replace(token, "***"), None
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
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info).splitlines()[-1]
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
