"""Every default audsync uses, each with the reason it has that value."""

from __future__ import annotations

DEFAULT_CONFIG_PATH = "audsync.toml"
"""Looked for in the working directory when neither -c nor AUDSYNC_CONFIG is given."""

DEFAULT_GLEAP_BASE_URL = "https://api.gleap.io"
"""Gleap's production API."""

DEFAULT_RATE_LIMIT = 1000
"""Gleap allows 1000 identify+track requests per project per window."""

DEFAULT_RATE_WINDOW = 60.0
"""...and that window is 60 seconds."""

DEFAULT_RATE_MARGIN = 0.995
"""Pace at 99.5 % of the budget: latency jitter between our send and Gleap's count
must not tip a window over the limit, and 0.5 % is well inside the 3 % target."""

DEFAULT_STATE_URL = "sqlite:///audsync.db"
"""A local file needs no server; PostgreSQL is a URL away."""

DEFAULT_BUSY_TIMEOUT = 30.0
"""Seconds a SQLite writer waits for another process's write lock before giving up."""

DEFAULT_INTERVAL = 2 * 3600.0
"""Engage syncs every two to three hours: 2 h ..."""

DEFAULT_JITTER = 3600.0
"""... plus up to 1 h, so many installations do not hit Gleap at the same instant."""

DEFAULT_TIMEOUT = 30.0
"""Per-request timeout in seconds; Gleap answers in well under a second normally."""

DEFAULT_CONCURRENCY = 8
"""Calls in flight at once: at ~200 ms per call, 8 keep 16.7 calls/s (1000/min) busy."""

DEFAULT_MAX_RETRIES = 6
"""Retries of one call on 429/5xx/network errors before the run gives up on Gleap."""

DEFAULT_BACKOFF_BASE = 0.5
"""First backoff in seconds; doubles per retry, with full jitter."""

DEFAULT_BACKOFF_CAP = 30.0
"""No single backoff sleeps longer than this (a Retry-After may ask for more)."""

DEFAULT_RETRY_AFTER_CAP = 600.0
"""A Retry-After beyond 10 minutes is treated as 10 minutes so a run cannot hang for days."""

DEFAULT_MAX_ATTEMPTS = 5
"""A user Gleap rejects is retried on later runs this many times, then parked."""

DEFAULT_MAX_EXIT_RATIO = 0.5
"""A plan that would remove more than half an audience is held: that is a broken
query far more often than a real exodus."""

DEFAULT_CHUNK_SIZE = 5000
"""Rows fetched from the source and written to the snapshot per round trip."""

DEFAULT_DELIVER_BATCH = 200
"""Users fetched from the outbox per deliverer round."""

DEFAULT_LEASE_TTL = 60.0
"""A killed holder's lease frees itself after a minute."""

MAX_CUSTOM_KEYS_PER_CALL = 35
"""Gleap keeps at most 35 custom attributes per identify."""

GLEAP_CONTACT_FIELDS = frozenset(
    {
        "userId",
        "name",
        "email",
        "phone",
        "companyName",
        "companyId",
        "lang",
        "plan",
        "value",
        "createdAt",
        "lastActivity",
        "lastPageView",
    }
)
"""Gleap's own contact fields: no audience or trait key may take one of these names."""

DEFAULT_MAX_THROTTLES = 200
"""429s one call may meet before the run stops: a storm that long means someone
else is using the whole budget, and the changes wait in the outbox for later."""

DEFAULT_LINE_INTERVAL = 5.0
"""Seconds between plain progress lines of one phase when output is not a terminal."""

DEFAULT_METRICS_ADDR = "127.0.0.1"
"""Where the metrics endpoint listens unless told otherwise: this host only."""

DEFAULT_METRICS_CACHE = 10.0
"""Seconds a reading of the state DB serves scrapes, so a tight scrape loop
cannot keep a million-row outbox busy with counts."""

DEFAULT_REPORT_RUNS = 500
"""Runs per audience drawn: about six weeks at the default two-to-three-hour schedule."""

DEFAULT_REPORT_FAILURES = 20
"""Latest per-user delivery failures listed per audience."""

DEFAULT_HISTORY_KEEP = 90 * 86400.0
"""Finished runs and delivery failures are kept 90 days: a quarter's trend in
`history` and the report (which draws ~6 weeks), while a year of two-hourly runs
over 50 audiences stays at ~54,000 rows instead of growing by ~219,000 a year."""

DEFAULT_PRUNE_BATCH = 2000
"""Rows deleted per transaction when pruning history: one batch holds SQLite's
write lock for a few milliseconds (benchmarks/prune.py), so a first prune of a
year of history never makes the deliverer or a manual sync wait long."""
