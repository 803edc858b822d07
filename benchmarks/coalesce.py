"""Coalescing benchmark: Identify calls against membership changes.

    python benchmarks/coalesce.py [--users 20000]

Five audiences and two traits whose members overlap heavily, plus a
``[contacts]`` query (email and plan of every user) and an email column on one
audience. Engage sends one Identify per change (the baseline: the number of
changes); audsync sends one per changed user, carrying all of that user's
changes — contact fields included, so a first sync is not one call per user
more, and a later one sends a moved email in the user's one call, whether or
not a membership changed. Target: calls equal to the number of distinct changed
users (1.0 call per changed user), on the first sync and on a later one.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sqlite3
import sys
import tempfile
from pathlib import Path

from audsync.config import load_config
from audsync.sandbox import Sandbox
from audsync.sync import run_sync

TOKEN = "bench-token"
AUDIENCES = {
    "Active": "active = 1",
    "Buyers": "orders > 0",
    "Frequent Buyers": "orders >= 3",
    "Pro Plan": "plan = 'pro'",
    "Newsletter": "newsletter = 1",
}
TRAITS = {"Orders": "orders", "Lifetime Value": "ltv"}


def build(path: Path, users: int, rng: random.Random) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE people (id INTEGER PRIMARY KEY, active INT, orders INT, plan TEXT,"
               " newsletter INT, ltv REAL, email TEXT)")
    db.executemany(
        "INSERT INTO people VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(i, int(rng.random() < 0.7), rng.choice([0, 0, 1, 2, 3, 5]),
          rng.choice(["free", "pro"]), int(rng.random() < 0.5), round(rng.uniform(0, 900), 2),
          f"u{i}@example.com")
         for i in range(1, users + 1)],
    )
    db.commit()
    db.close()


def mutate(path: Path, rng: random.Random, users: int) -> None:
    db = sqlite3.connect(path)
    for user_id in rng.sample(range(1, users + 1), users // 20):
        db.execute("UPDATE people SET orders = orders + 1, ltv = ltv + 50, active = 1"
                   " WHERE id = ?", (user_id,))
    # New e-mail addresses: some of these users have no other change.
    for user_id in rng.sample(range(1, users + 1), users // 50):
        db.execute("UPDATE people SET email = 'moved-' || email WHERE id = ?", (user_id,))
    db.commit()
    db.close()


def config_text(base_url: str, folder: Path) -> str:
    parts = [
        f'[gleap]\nbase_url = "{base_url}"\nrate_limit = 100000000\nrate_window = 1\n',
        f'[source]\nurl = "sqlite:///{folder / "w.db"}"\n',
        f'[state]\nurl = "sqlite:///{folder / "state.db"}"\n',
        '[sync]\nmax_exit_ratio = 1.0\n',
    ]
    for name, where in AUDIENCES.items():
        contact = ", email" if name == "Active" else ""
        parts.append(f'[[audiences]]\nname = "{name}"\n'
                     f'sql = "SELECT id AS user_id{contact} FROM people WHERE {where}"\n')
    for name, column in TRAITS.items():
        parts.append(f'[[traits]]\nname = "{name}"\n'
                     f'sql = "SELECT id AS user_id, {column} AS value FROM people"\n')
    parts.append('[contacts]\nsql = "SELECT id AS user_id, email, plan FROM people"\n')
    return "".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20_000)
    args = parser.parse_args()
    python = sys.version.split()[0]
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores, Python {python}")
    rng = random.Random(5)
    ok = True
    with tempfile.TemporaryDirectory() as tmp, Sandbox(TOKEN) as gleap:
        folder = Path(tmp)
        build(folder / "w.db", args.users, rng)
        path = folder / "audsync.toml"
        path.write_text(config_text(gleap.url, folder))
        config = load_config(str(path), env={"AUDSYNC_GLEAP_API_TOKEN": TOKEN})
        print(f"{args.users:,} users, {len(AUDIENCES)} audiences, {len(TRAITS)} traits")
        print(f"{'sync':12} {'changes':>10} {'changed users':>14} {'audsync calls':>14}"
              f" {'calls/user':>11} {'calls saved':>12}")
        for label in ("first", "incremental"):
            if label == "incremental":
                mutate(folder / "w.db", rng, args.users)
            before = len(gleap.calls("/admin/identify"))
            outcome = run_sync(config)
            calls = gleap.calls("/admin/identify")[before:]
            changes = sum(p.queued for p in outcome.plans)
            users = len({c["user_id"] for c in calls})
            saved = 1 - len(calls) / changes
            per_user = len(calls) / users
            print(f"{label:12} {changes:10,} {users:14,} {len(calls):14,} {per_user:11.2f}"
                  f" {saved:12.0%}")
            ok = ok and len(calls) == users
    print(f"\ncalls == distinct changed users: {'PASS' if ok else 'MISS'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
