"""Memory benchmark: peak RSS of `audsync sync --dry-run` at 1 M and 5 M members.

    python benchmarks/memory.py [--members 1000000 5000000]

Each size runs in a fresh process (`/usr/bin/time`-style, via resource.getrusage
of the child) so the figure is that process's own peak. The baseline is the
same interpreter importing audsync and doing nothing (`audsync --version`), so
the ratio shows what planning a large audience adds. A dry run streams the
query, loads the snapshot and diffs it exactly as a real sync does, then rolls
back. Target: <= 150 MB at every size.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path


def peak_rss_mb(argv: list[str], env: dict[str, str]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the max over all children so far: run sizes
    # from small to large so each reading is that run's own peak.
    return max(before, after) / 1024


def build(path: Path, members: int) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT)")
    batch = 200_000
    for start in range(1, members + 1, batch):
        db.executemany("INSERT INTO users VALUES (?, ?)",
                       ((i, f"user{i}@example.com") for i in range(start, min(start + batch,
                                                                                  members + 1))))
    db.commit()
    db.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, nargs="+", default=[1_000_000, 5_000_000])
    args = parser.parse_args()
    python = sys.version.split()[0]
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores, Python {python}")
    env = {**os.environ, "AUDSYNC_GLEAP_API_TOKEN": "unused"}
    baseline = peak_rss_mb([sys.executable, "-m", "audsync.cli", "--version"], env)
    print(f"baseline (import audsync, do nothing): {baseline:6.1f} MB")
    worst = 0.0
    for members in sorted(args.members):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            build(folder / "w.db", members)
            (folder / "audsync.toml").write_text(
                '[source]\nurl = "sqlite:///' + str(folder / "w.db") + '"\n'
                '[state]\nurl = "sqlite:///' + str(folder / "state.db") + '"\n'
                '[[audiences]]\nname = "Everyone"\n'
                'sql = "SELECT id AS user_id, email FROM users"\n'
            )
            argv = [sys.executable, "-m", "audsync.cli", "-c", str(folder / "audsync.toml"),
                    "sync", "--dry-run"]
            peak = peak_rss_mb(argv, env)
            worst = max(worst, peak)
            print(f"{members:>10,} members: peak RSS {peak:6.1f} MB"
                  f" ({peak / baseline:.2f}x the idle baseline)")
    print(f"\nworst {worst:.1f} MB (target <= 150) -> {'PASS' if worst <= 150 else 'MISS'}")
    return 0 if worst <= 150 else 1


if __name__ == "__main__":
    sys.exit(main())
