"""``audsync init``: a commented starter ``audsync.toml`` that loads as it is."""

from __future__ import annotations

import os
from pathlib import Path

from audsync.errors import ConfigError

STARTER = '''\
# audsync.toml, written by `audsync init`. Every key has a default except
# [source] url and the queries; each scalar key can also be set from the
# environment as AUDSYNC_<SECTION>_<KEY> (AUDSYNC_SOURCE_URL,
# AUDSYNC_GLEAP_API_TOKEN, ...), which wins over this file. Relative SQLite
# paths below are taken relative to this file's folder, wherever audsync runs.
#
# Next:
#   1. point [source] url at your database and write your audiences below
#   2. export AUDSYNC_GLEAP_API_TOKEN=...   # Gleap: Project > Settings > Security
#   3. audsync check                        # the config, the token, every query; sends nothing
#   4. audsync sync --dry-run               # what the first sync would send, and how long
#   5. audsync sync                         # then `audsync run` as a service
#
# Trying it without touching your Gleap project: run `audsync sandbox` in another
# shell (a local Gleap-compatible API), set base_url = "http://127.0.0.1:8765"
# below and export AUDSYNC_GLEAP_API_TOKEN=sandbox-token. `audsync demo` shows a
# whole run with a made-up shop.

[gleap]
# api_token = "..."                 # better in AUDSYNC_GLEAP_API_TOKEN than in a file
base_url = "https://api.gleap.io"
rate_limit = 1000                   # requests per rate_window: Gleap's budget per project
rate_window = "60s"

[source]
# Your database, as a SQLAlchemy URL; the queries run there (give audsync a
# read-only user). Examples, with what to install next to audsync:
#   "postgresql+psycopg://reader@db.example.com/shop"   pip install 'psycopg[binary]'
#   "duckdb:///shop.duckdb"                             pip install duckdb-engine
#   "snowflake://user@account/db/schema?warehouse=wh"   pip install snowflake-sqlalchemy
url = "sqlite:///shop.db"

[state]
# What Gleap has been told (the ledger), the changes still to send and the
# history. Keep it: a new, empty one makes the next sync send every member again.
# PostgreSQL works the same ("postgresql+psycopg://audsync@db/audsync").
url = "sqlite:///audsync.db"

[schedule]
# How often `audsync run` (the daemon) plans: every interval plus 0..jitter.
interval = "2h"
jitter = "1h"

[sync]
max_exit_ratio = 0.5                # hold a plan that would remove more than half an audience

# An audience is a query returning user_id, plus any contact columns you want
# in Gleap (email, name or first_name + last_name, phone, plan, company_name,
# ...; anything else becomes a custom attribute). Gleap gets
# `<key>: true` when a user enters and `false` when they leave. The key is
# the name in snake_case (here active_customers) unless you set `key`; once
# synced, keep it.
[[audiences]]
name = "Active Customers"
sql = """
SELECT u.id AS user_id, u.email, u.first_name, u.last_name
FROM users u
WHERE u.last_order_at >= date('now', '-30 days')
"""

# A computed trait returns user_id and value: Gleap gets `<key>: value`.
# [[traits]]
# name = "Lifetime Value"
# sql = "SELECT user_id, SUM(amount) AS value FROM orders GROUP BY user_id"
'''


def starter_target(path: str) -> Path:
    """Where ``audsync init PATH`` writes: PATH, or ``audsync.toml`` inside it when it is
    a folder."""
    target = Path(path)
    return target / "audsync.toml" if target.is_dir() else target


def write_starter(path: str) -> Path:
    """Write :data:`STARTER` to ``path`` (see :func:`starter_target`); never over a file.

    Raises ConfigError (exit 2) when the file exists or its folder does not.
    """
    target = starter_target(path)
    if target.exists():
        raise ConfigError(
            str(target), "", "already exists; not overwritten (remove it or name another path)"
        )
    if not target.parent.is_dir():
        raise ConfigError(str(target), "", f"folder {target.parent} does not exist")
    try:
        # O_EXCL: a file that appears meanwhile is not overwritten either.
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise ConfigError(str(target), "", "already exists; not overwritten") from None
    except OSError as exc:
        raise ConfigError(str(target), "", f"cannot be written: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(STARTER)
    return target
