"""Delivery benchmark: audsync's delivered calls per second against a bare httpx loop.

    python benchmarks/deliver.py [--changes 100000] [--concurrency 8]

Both post the same Identify bodies to the same sandbox (no rate limit), which
runs in its own process so it does not share a GIL with the client. The
bare loop is the floor any client pays: one httpx.Client posting bodies as
fast as the server answers, with as many threads as audsync uses, and nothing
else — no outbox, no ledger, no acknowledgement bookkeeping. audsync drains a
planned outbox of the same size (one user per change), committing each
acknowledgement to a SQLite state DB.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from audsync.config import load_config
from audsync.deliver import deliver
from audsync.gleap import IDENTIFY_PARAMS, IDENTIFY_PATH
from audsync.source import open_source
from audsync.state import open_configured
from audsync.sync import SyncOutcome, make_client, plan_all

TOKEN = "bench-token"


@contextlib.contextmanager
def sandbox_process() -> Iterator[str]:
    """`audsync sandbox` in a child process, unlimited; yields its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "audsync.cli", "sandbox", "--port", str(port), "--token", TOKEN,
         "--rate-limit", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.get(url + "/_sandbox/stats", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait()


def bare_loop(url: str, users: int, concurrency: int) -> float:
    """Seconds for ``users`` Identify posts with a bare client."""
    client = httpx.Client(
        base_url=url,
        headers={"Api-Token": TOKEN, "Content-Type": "application/json"},
        limits=httpx.Limits(max_connections=concurrency),
    )

    def post(chunk: range) -> None:
        for i in chunk:
            body = f'{{"userId":"b{i}","everyone":true}}'.encode()
            client.post(IDENTIFY_PATH, params=IDENTIFY_PARAMS, content=body).raise_for_status()

    per = -(-users // concurrency)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(post, [range(s, min(s + per, users)) for s in range(0, users, per)]))
    elapsed = time.perf_counter() - started
    client.close()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    python = sys.version.split()[0]
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores, Python {python}")
    with tempfile.TemporaryDirectory() as tmp, sandbox_process() as url:
        folder = Path(tmp)
        db = sqlite3.connect(folder / "w.db")
        db.execute("CREATE TABLE people (id INTEGER PRIMARY KEY)")
        db.executemany("INSERT INTO people VALUES (?)", ((i,) for i in range(args.changes)))
        db.commit()
        db.close()
        path = folder / "audsync.toml"
        path.write_text(
            f'[gleap]\nbase_url = "{url}"\nrate_limit = 100000000\nrate_window = 1\n'
            f"concurrency = {args.concurrency}\n"
            f'[source]\nurl = "sqlite:///{folder / "w.db"}"\n'
            f'[state]\nurl = "sqlite:///{folder / "state.db"}"\n'
            '[[audiences]]\nname = "Everyone"\nsql = "SELECT id AS user_id FROM people"\n'
        )
        config = load_config(str(path), env={"AUDSYNC_GLEAP_API_TOKEN": TOKEN})
        state = open_configured(config)
        source = open_source(config.require_source())
        plan_all(config, config.definitions, state, source, SyncOutcome())

        bare = bare_loop(url, args.changes, args.concurrency)
        with make_client(config) as client:
            started = time.perf_counter()
            report = deliver(state, client, concurrency=args.concurrency)
            ours = time.perf_counter() - started
        assert report.delivered == args.changes, report
    bare_rate, our_rate = args.changes / bare, args.changes / ours
    ratio = our_rate / bare_rate
    print(f"{args.changes:,} Identify calls, concurrency {args.concurrency}")
    print(f"  bare httpx loop  {bare:8.2f} s  {bare_rate:9,.0f} calls/s")
    print(f"  audsync deliver  {ours:8.2f} s  {our_rate:9,.0f} calls/s")
    print(f"  ratio {ratio:.2f} (target >= 0.7) -> {'PASS' if ratio >= 0.7 else 'MISS'}")
    return 0 if ratio >= 0.7 else 1


if __name__ == "__main__":
    sys.exit(main())
