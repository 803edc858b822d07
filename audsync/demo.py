"""``audsync demo``: a warehouse, a Gleap sandbox, an initial and an incremental sync, offline."""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import shlex
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from audsync.sandbox import Sandbox

DEMO_TOKEN = "demo-token"
DEMO_READ_TOKEN = "demo-read-key"
DEMO_PROJECT = "demo-project"
DRIFT_AUDIENCE = "high_value_customers"
"""The audience the demo drifts and verifies: small enough to read back whole."""
DEMO_RATE_LIMIT = 60000
"""Calls per minute in the demo: Gleap allows 1000, but a demo should end in seconds."""

DEMO_PORT = 8765
"""The sandbox's port for ``demo --keep`` (``audsync sandbox``'s default), when it is free."""

CONFIG = """\
# audsync demo config: the warehouse and state DB live next to this file.
# Its Gleap is a local sandbox; restart it with:
#   {sandbox_command}
[gleap]
base_url = "{base_url}"
api_token = "{token}"                  # the sandbox's token, not a real one
rate_limit = {rate_limit}
rate_window = "60s"
read_token = "{read_token}"            # the sandbox's read key, not a real one
project = "{project}"
read_rate_limit = {rate_limit}

[source]
url = "sqlite:///{warehouse}"

[state]
url = "sqlite:///{state}"

[[audiences]]
name = "Order Completed Last 30 Days"
sql = \"\"\"
SELECT DISTINCT u.id AS user_id, u.email, u.first_name, u.last_name, u.plan
FROM users u JOIN orders o ON o.user_id = u.id
WHERE o.ordered_at >= date('{today}', '-30 days')
\"\"\"

[[audiences]]
name = "High-Value Customers"
sql = \"\"\"
SELECT user_id FROM orders
WHERE ordered_at >= date('{today}', '-180 days')
GROUP BY user_id HAVING SUM(amount) >= 500
\"\"\"

[[audiences]]
name = "Pro Plan"
sql = "SELECT id AS user_id, email, company_name, signed_up_at FROM users WHERE plan = 'pro'"

[[traits]]
name = "Total Revenue 180 Days"
sql = \"\"\"
SELECT user_id, ROUND(SUM(amount), 2) AS value FROM orders
WHERE ordered_at >= date('{today}', '-180 days') GROUP BY user_id
\"\"\"
"""

FIRST = ["Ada", "Bob", "Chen", "Dana", "Eve", "Femi", "Gus", "Hana", "Ivan", "Jo"]
LAST = ["Stone", "Okafor", "Lee", "Novak", "Garcia", "Berg", None]


def build_warehouse(path: Path, users: int, today: dt.date, seed: int = 7) -> None:
    """A small shop: users with plans and companies, and six months of orders."""
    rng = random.Random(seed)
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT, first_name TEXT,"
        " last_name TEXT, plan TEXT, company_name TEXT, signed_up_at TEXT);"
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, user_id INTEGER, amount REAL,"
        " ordered_at TEXT);"
    )
    db.executemany(
        "INSERT INTO users VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (
                i,
                f"user{i}@example.com",
                rng.choice(FIRST),
                rng.choice(LAST),
                rng.choice(["free", "free", "pro", "team"]),
                rng.choice(["Acme", "Globex", "Initech", None]),
                (today - dt.timedelta(days=rng.randint(30, 900))).isoformat() + "T09:00:00",
            )
            for i in range(1, users + 1)
        ],
    )
    orders = []
    for i in range(1, users + 1):
        for _ in range(rng.choice([0, 0, 1, 2, 3, 5])):
            days_ago = rng.randint(0, 200)
            orders.append((i, round(rng.uniform(10, 400), 2), _day(today, days_ago)))
    db.executemany("INSERT INTO orders (user_id, amount, ordered_at) VALUES (?, ?, ?)", orders)
    db.commit()
    db.close()


def change_warehouse(path: Path, today: dt.date, seed: int = 8) -> None:
    """A few hours of business: new orders, downgrades, an upgrade."""
    rng = random.Random(seed)
    db = sqlite3.connect(path)
    count = db.execute("SELECT COUNT(*) FROM users").fetchone()[0]
    buyers = rng.sample(range(1, count + 1), k=max(1, count // 50))
    db.executemany(
        "INSERT INTO orders (user_id, amount, ordered_at) VALUES (?, ?, ?)",
        [(u, round(rng.uniform(50, 700), 2), _day(today, 0)) for u in buyers],
    )
    db.execute("UPDATE users SET plan = 'free' WHERE plan = 'pro' AND id % 17 = 0")
    db.execute("UPDATE users SET plan = 'pro' WHERE plan = 'team' AND id % 23 = 0")
    db.commit()
    db.close()


def _sandbox(contacts: Path | None) -> Sandbox:
    """The demo's Gleap: on :data:`DEMO_PORT` with its contacts in a file when the demo
    is kept (so the printed command brings the same one back), else anywhere in memory."""
    common: dict[str, Any] = {
        "rate_limit": DEMO_RATE_LIMIT,
        "rate_window": 60,
        "read_token": DEMO_READ_TOKEN,
        "project": DEMO_PROJECT,
    }
    if contacts is None:
        return Sandbox(DEMO_TOKEN, **common)
    try:
        return Sandbox(DEMO_TOKEN, port=DEMO_PORT, db_path=str(contacts), **common)
    except OSError:  # taken (a sandbox is already running there): any free port
        return Sandbox(DEMO_TOKEN, db_path=str(contacts), **common)


def _day(today: dt.date, days_ago: int) -> str:
    return (today - dt.timedelta(days=days_ago)).isoformat()


def run_demo(users: int = 3000, keep: str | None = None) -> int:
    """Build everything in a temporary folder (or ``keep``), sync twice, show the result."""
    from audsync.cli import main

    holder = None if keep else tempfile.TemporaryDirectory(prefix="audsync-demo-")
    # Absolute: the config must work from any directory afterwards.
    folder = Path(keep or (holder.name if holder else ".")).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    today = dt.date.today()
    warehouse, state, config_path = (
        folder / "warehouse.db",
        folder / "audsync.db",
        folder / "audsync.toml",
    )
    # A kept demo keeps Gleap's contacts in a file, so a sandbox started later
    # with the printed command holds what this demo sent.
    gleap_db = folder / "gleap.db" if keep else None
    for old in (warehouse, state, *((gleap_db,) if gleap_db else ())):
        old.unlink(missing_ok=True)
    build_warehouse(warehouse, users, today)
    previous = {
        name: os.environ.get(name)
        for name in ("AUDSYNC_GLEAP_API_TOKEN", "AUDSYNC_GLEAP_READ_TOKEN", "AUDSYNC_GLEAP_PROJECT")
    }
    os.environ["AUDSYNC_GLEAP_API_TOKEN"] = DEMO_TOKEN
    os.environ["AUDSYNC_GLEAP_READ_TOKEN"] = DEMO_READ_TOKEN
    os.environ.pop("AUDSYNC_GLEAP_PROJECT", None)
    try:
        with _sandbox(gleap_db) as gleap:
            port = int(gleap.url.rsplit(":", 1)[1])
            sandbox_command = shlex.join(
                ["audsync", "sandbox", "--port", str(port), "--token", DEMO_TOKEN]
                + ["--read-token", DEMO_READ_TOKEN, "--project", DEMO_PROJECT]
                + ["--rate-limit", str(DEMO_RATE_LIMIT)]
                + (["--db", str(gleap_db)] if gleap_db else [])
            )
            config_path.write_text(
                CONFIG.format(
                    base_url=gleap.url,
                    token=DEMO_TOKEN,
                    sandbox_command=sandbox_command,
                    rate_limit=DEMO_RATE_LIMIT,
                    read_token=DEMO_READ_TOKEN,
                    project=DEMO_PROJECT,
                    warehouse=warehouse,
                    state=state,
                    today=today.isoformat(),
                ),
                encoding="utf-8",
            )
            print(f"== demo in {folder}: {users:,} users, a Gleap sandbox at {gleap.url}")
            print(f"   (paced at {DEMO_RATE_LIMIT:,} calls/min to end quickly; Gleap allows 1,000)")
            print("\n== 1. initial sync: every member is sent")
            code = main(["-c", str(config_path), "--log-level", "WARNING", "sync"])
            if code:
                return code
            calls_before = gleap.stats.count("identify", ok=True)
            print("\n== 2. the shop changes: new orders, a few plan changes")
            change_warehouse(warehouse, today)
            print("\n== 3. incremental sync: only the changes are sent")
            code = main(["-c", str(config_path), "--log-level", "WARNING", "sync"])
            if code:
                return code
            calls = gleap.stats.count("identify", ok=True) - calls_before
            print(f"   {calls} Identify calls for the incremental sync")
            print("\n== 4. history (SELECT * FROM sync_runs)")
            main(["-c", str(config_path), "history"])
            print("\n== 5. a few contacts as Gleap now sees them")
            contacts = gleap.contacts()
            for user_id in sorted(contacts, key=int)[:3]:
                print(json.dumps(contacts[user_id], sort_keys=True))
            print(f"\n{len(contacts):,} contacts in the sandbox.")
            code = _drift_and_repair(gleap, config_path)
            if code:
                return code
            if keep:
                report = folder / "report.html"
                main(["-c", str(config_path), "report", "--html", str(report)])
                config = shlex.quote(str(config_path))
                print(f"\nEverything is in {folder}. To go on with it, start its Gleap sandbox")
                print("(same port, token and contacts) and leave it running:")
                print(f"  {sandbox_command}")
                print("then, in another shell:")
                print(f"  audsync -c {config} status")
                print(f"  audsync -c {config} sync")
                print(f"  audsync -c {config} verify")
                overriding = [
                    n
                    for n in (
                        "AUDSYNC_GLEAP_API_TOKEN",
                        "AUDSYNC_GLEAP_READ_TOKEN",
                        "AUDSYNC_GLEAP_PROJECT",
                    )
                    if previous[n] is not None
                ]
                if overriding:
                    print(f"  (unset {' '.join(overriding)} first: they override the demo's keys)")
                print(f"and open {report} in a browser.")
        return 0
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if holder is not None:
            holder.cleanup()


def _drift_and_repair(gleap: Sandbox, config_path: Path) -> int:
    """Drift two contacts behind audsync's back, then verify and repair, and verify again."""
    from audsync.cli import main

    members = sorted(
        (u for u, c in gleap.contacts().items() if c.get(DRIFT_AUDIENCE) is True), key=int
    )
    if len(members) < 2:
        return 0
    deleted, edited = members[0], members[-1]
    print(f"\n== 6. someone edits Gleap by hand: contact {deleted} deleted,")
    print(f"   {edited}'s {DRIFT_AUDIENCE} set to false")
    gleap.drop_contact(deleted)
    gleap.edit_contact(edited, {DRIFT_AUDIENCE: False})
    base = ["-c", str(config_path), "--log-level", "WARNING", "verify", DRIFT_AUDIENCE]
    base += ["--sample", str(len(members)), "--progress", "off"]
    print(f"\n== 7. audsync verify {DRIFT_AUDIENCE} --repair: read the contacts back, find")
    print("   the drift, and send the ledger's values again")
    code = main([*base, "--repair"])
    if code:
        return code
    print(f"\n== 8. audsync verify {DRIFT_AUDIENCE}: no drift left (exit 0)")
    return main(base)
