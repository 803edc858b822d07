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
"""Seconds one request may take in all, answer included; Gleap answers in well
under a second normally."""

DEFAULT_STOP_GRACE = 2.0
"""Seconds a stop request lets a call in flight finish before abandoning it (the
change stays queued): long enough for a normal answer, short enough that the
first Ctrl-C ends the process within a few seconds whatever Gleap is doing."""

DEFAULT_FORGET_WAIT_MARGIN = 35.0
"""Seconds ``audsync forget`` waits for the deliverer beyond one request's timeout:
the daemon rests 30 s between drains after Gleap trouble before it looks again,
plus a few seconds for the state DB. Past this, forget exits 1 instead of deleting
a contact that a call still in flight could recreate."""

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

DEFAULT_OUTAGE_PROBE = 20
"""A drain whose first 20 distinct users (or Track events) are all rejected, with not
one acknowledged, stops as an outage instead of blaming them: twenty independent bad
users in a row is far less likely than a wrong base_url, a proxy or an API change."""

DEFAULT_MAX_EXIT_RATIO = 0.5
"""A plan that would remove more than half an audience is held: that is a broken
query far more often than a real exodus."""

DEFAULT_CHUNK_SIZE = 5000
"""Rows fetched from the source and written to the snapshot per round trip."""

DEFAULT_DELIVER_BATCH = 200
"""Users fetched from the outbox per deliverer round."""

DEFAULT_LEASE_TTL = 60.0
"""A killed holder's lease frees itself after a minute."""

MIN_LEASE_TTL = 1.0
"""A lease is renewed every ttl/3 by a state-DB write; under a second one slow commit
(or a SQLite writer waiting its turn) lets the lease lapse mid-delivery."""

MIN_INTERVAL = 1.0
"""The daemon plans at most once a second: a shorter interval only re-runs every
query back to back (``interval = 0`` spun at 100 % CPU)."""

MIN_TIMEOUT = 0.1
"""No request to Gleap (TLS handshake included) completes in under 100 ms, so a
shorter timeout makes every call fail."""

MIN_BUSY_TIMEOUT = 0.001
"""SQLite takes its busy timeout in whole milliseconds: below 1 ms it is 0, "fail at
once on any lock", and a daemon beside a manual sync would fail routinely."""

MAX_DURATION = 365 * 86400.0
"""No duration setting means more than a year; beyond it timers and timestamps overflow."""

MAX_WHOLE_NUMBER = 2**31 - 1
"""No whole-number setting may exceed a 32-bit signed integer: the state DB keeps
counts like ``attempts`` in INTEGER columns and drivers pass sizes as C ints
(found by review: a huge ``rate_limit`` ended in an OverflowError traceback)."""

MAX_CHUNK_SIZE = 1_000_000
"""Rows per round trip from the source: beyond a million, one chunk's memory is
the problem chunking exists to avoid."""

MAX_RATE_LIMIT = 1_000_000_000
"""Requests per rate window: the pacer keeps a slot per request in the window (the
benchmarks switch pacing off with 100 million)."""

MAX_CONCURRENCY = 256
"""One thread per call in flight: at Gleap's ~17 calls/s more than a few dozen only
wait, and thousands of threads exhaust the process."""

MAX_USER_ID_LENGTH = 400
"""Longest user id audsync keeps, in characters (not bytes): the state DB's
``user_id`` columns are ``VARCHAR(400)``, which PostgreSQL counts in characters
and SQLite does not enforce, so the check is made in Python for both. A longer
id is skipped and counted (``invalid_ids``), never truncated: a cut id would name
another user."""

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

DEFAULT_READ_RATE_LIMIT = 1000
"""Reads (``audsync verify``) per ``rate_window``, paced apart from Identify and Track:
Gleap documents no read limit, so the identify budget is the assumption, and a budget
of their own means verifying never slows delivery."""

DEFAULT_VERIFY_SAMPLE = 400
"""Users ``audsync verify`` reads by default: at a true drift of 1 %, 400 reads bound
it within about ±1.3 points (95 %, Wilson) in under half a minute of reads."""

MAX_VERIFY_SAMPLE = 1_000_000
"""Users one verify reads at most: a million reads take 17 hours at 1000 a minute."""

DEFAULT_MAX_DRIFT = 0.01
"""The daemon's audit alerts when more than 1 % of an audience's checked users drifted."""

DEFAULT_VERIFY_WORST = 10
"""Examples of drift (user, key, ledger value, Gleap value) printed by verify."""
