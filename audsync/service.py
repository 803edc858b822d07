"""``audsync run``: the daemon. Placeholder wiring until the scheduling issue lands."""

from __future__ import annotations

from audsync.config import Config
from audsync.errors import EXIT_FAILED, EXIT_OK
from audsync.sync import run_sync


def run_daemon(config: Config, *, once: bool = False) -> int:
    """Sync everything now; the scheduled loop is built on top of this."""
    outcome = run_sync(config, trigger="startup")
    return EXIT_FAILED if outcome.failed else EXIT_OK
