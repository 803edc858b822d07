"""One verify: sample users from the ledger, read them back from Gleap, compare, and
(with ``repair``) queue the drifted values again as a ``repair`` run.

Without ``repair`` nothing is written to the state DB (it is opened read-only by
convention: no migration, no run, no lease) and nothing goes to Gleap but the
reads. The decisions are in :mod:`audsync.verify`; this module does the I/O.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, select

from audsync import defaults, locks, manager, models
from audsync.clock import utcnow
from audsync.config import CONTACTS_KEY, Config
from audsync.errors import Interrupted
from audsync.gleap import CallObserver, GleapClient
from audsync.gleap_read import GleapReader, ReadResult
from audsync.history import runs, set_run, start_run
from audsync.progress import Progress
from audsync.text_tables import table
from audsync.verify import (
    ABSENT,
    NO_CONTACT,
    Expected,
    Summary,
    reads_look_misdirected,
    reservoir_sample,
    summarise,
)

log = logging.getLogger("audsync.verify")

Printer = Callable[[str], None]


ID_BATCH = 500
"""User ids per ``IN (...)`` when loading the sample's ledger rows."""


@dataclass
class RepairOutcome:
    """What ``--repair`` queued and what came of it."""

    run_ids: list[int] = field(default_factory=list)
    queued: int = 0
    delivered: int = 0
    failed: int = 0
    pending: int = 0
    handed_over_to: str | None = None
    error: str | None = None

    @property
    def complete(self) -> bool:
        """Everything queued was acknowledged (or handed to a daemon that delivers it)."""
        if self.error is not None:
            return False
        return self.handed_over_to is not None or (self.failed == 0 and self.pending == 0)


@dataclass
class VerifyReport:
    """What one verify found."""

    keys: list[str]
    population: int = 0
    """Distinct users in the ledgers of ``keys``."""
    sampled: int = 0
    summary: Summary = field(default_factory=Summary)
    failures: list[ReadResult] = field(default_factory=list)
    """Reads that failed: neither drift nor a match."""
    not_read: int = 0
    """Sampled users never read (a refused key stopped the reads, or a stop)."""
    misdirected: bool = False
    repair: RepairOutcome | None = None

    @property
    def unverified(self) -> int:
        """Sampled users whose state is unknown."""
        return len(self.failures) + self.not_read

    def as_dict(self, worst: int) -> dict[str, Any]:
        """The report as JSON-ready values (``audsync verify --json``)."""
        s = self.summary
        low, high = s.ci95
        out: dict[str, Any] = {
            "keys": self.keys,
            "population": self.population,
            "sampled": self.sampled,
            "checked": s.checked,
            "drifted": s.drifted,
            "missing": s.missing,
            "read_failures": self.unverified,
            "drift_rate": s.drift_rate,
            "ci95": [low, high],
            "by_audience": {key: figures.as_dict() for key, figures in s.by_audience.items()},
            "examples": [
                {
                    "user_id": d.user_id,
                    "key": d.key,
                    "field": d.field,
                    "ledger": d.ledger,
                    "gleap": None if d.missing else _shown(d.gleap),
                    "missing_contact": d.missing,
                }
                for d in s.worst(worst)
            ],
            "failures": [
                {"user_id": f.user_id, "http_status": f.status, "reason": f.error}
                for f in self.failures
            ],
        }
        if self.repair is not None:
            r = self.repair
            out["repair"] = {
                "run_ids": r.run_ids,
                "queued": r.queued,
                "delivered": r.delivered,
                "failed": r.failed,
                "pending": r.pending,
                "handed_over_to": r.handed_over_to,
                "error": r.error,
            }
        return out


def _shown(value: Any) -> Any:
    return "(absent)" if value is ABSENT else value


def _text(value: Any) -> str:
    if value is ABSENT or value is NO_CONTACT:
        return str(value) if value is NO_CONTACT else "(absent)"
    return json.dumps(value, ensure_ascii=False)


def _percent(share: float) -> str:
    return f"{share * 100:.1f}%"


def render_report(report: VerifyReport, worst: int) -> str:
    """The report as text for a terminal."""
    s = report.summary
    where = (
        ", ".join(report.keys)
        if len(report.keys) <= 3
        else f"{len(report.keys)} audiences and traits"
    )
    lines = [
        f"verify: {report.sampled:,} of the {report.population:,} users in the ledger of"
        f" {where}; {s.checked:,} read back"
        + (f", {report.unverified:,} not verified (reads failed)" if report.unverified else "")
    ]
    rows = []
    for key, figures in s.by_audience.items():
        low, high = figures.ci95
        rows.append(
            {
                "audience": key,
                "checked": figures.checked,
                "drifted": figures.drifted,
                "missing": figures.missing,
                "drift": _percent(figures.drift_rate),
                "95% CI": f"{_percent(low)} - {_percent(high)}",
            }
        )
    low, high = s.ci95
    rows.append(
        {
            "audience": "all users",
            "checked": s.checked,
            "drifted": s.drifted,
            "missing": s.missing,
            "drift": _percent(s.drift_rate),
            "95% CI": f"{_percent(low)} - {_percent(high)}",
        }
    )
    lines.append(table(rows, ["audience", "checked", "drifted", "missing", "drift", "95% CI"]))
    examples = s.worst(worst)
    if examples:
        lines.append(f"drift ({s.drifted:,} users; user, key, ledger value, Gleap value):")
        for d in examples:
            where = d.key if d.field is None else f"{d.key}: {d.field}"
            lines.append(f"  {d.user_id}  {where}  {_text(d.ledger)}  {_text(d.gleap)}")
    else:
        lines.append("no drift found" if s.checked else "nothing was read back")
    if report.failures or report.not_read:
        lines.append(
            f"not verified: {report.unverified:,} users (a failed read is neither drift nor a"
            " match)"
        )
        reasons: dict[str, int] = {}
        for f in report.failures:
            reasons[f.error or "?"] = reasons.get(f.error or "?", 0) + 1
        for reason, count in sorted(reasons.items(), key=lambda item: -item[1])[:worst]:
            lines.append(f"  {count:,} x {reason}")
        if report.not_read:
            lines.append(f"  {report.not_read:,} x not read (the reads stopped)")
    r = report.repair
    if r is not None:
        if r.handed_over_to:
            lines.append(
                f"repair: {r.queued:,} changes queued again; the daemon ({r.handed_over_to})"
                " is delivering them"
            )
        else:
            lines.append(
                f"repair: {r.queued:,} changes queued again; {r.delivered:,} delivered,"
                f" {r.failed:,} failed, {r.pending:,} pending"
            )
    return "\n".join(lines)


def make_reader(
    config: Config, *, observer: CallObserver | None = None, **overrides: Any
) -> GleapReader:
    """A reader from ``[gleap]``; ConfigError without ``read_token`` or ``project``."""
    token, project = config.require_reader()
    g = config.gleap
    options: dict[str, Any] = {
        "rate_limit": g.read_rate_limit,
        "rate_window": g.rate_window,
        "timeout": g.timeout,
        "max_retries": g.max_retries,
        "concurrency": g.concurrency,
        "observer": observer,
    }
    options.update(overrides)
    return GleapReader(g.base_url, token, project, **options)


def ledger_users(conn: Connection, keys: Sequence[str]) -> Iterator[str]:
    """Every distinct user in the ledgers of ``keys``, streamed."""
    l = models.ledger.c  # noqa: E741 - the table's usual alias
    result = conn.execution_options(stream_results=True, yield_per=5000).execute(
        select(l.user_id).distinct().where(l.audience_key.in_(list(keys)))
    )
    for row in result:
        yield row[0]


def load_expectations(
    conn: Connection, keys: Sequence[str], users: Sequence[str]
) -> dict[str, list[Expected]]:
    """What the ledger says Gleap holds for each of ``users`` under ``keys``, with the
    values queued for them (a change in flight may already be applied)."""
    l, o = models.ledger.c, models.outbox.c  # noqa: E741
    expected: dict[str, list[Expected]] = {u: [] for u in users}
    for start in range(0, len(users), ID_BATCH):
        batch = list(users[start : start + ID_BATCH])
        pending: dict[tuple[str, str], tuple[str, str | None]] = {
            (row.user_id, row.audience_key): (row.value, row.contact)
            for row in conn.execute(
                select(o.user_id, o.audience_key, o.value, o.contact).where(
                    o.user_id.in_(batch), o.audience_key.in_(list(keys))
                )
            )
        }
        for row in conn.execute(
            select(l.user_id, l.audience_key, l.value, l.contact)
            .where(l.user_id.in_(batch), l.audience_key.in_(list(keys)))
            .order_by(l.user_id, l.audience_key)
        ):
            contact = _object(row[3])
            queued = pending.get((row[0], row[1]))
            expected[row[0]].append(
                Expected(
                    key=row[1],
                    value=json.loads(row[2]),
                    # [contacts]'s key is never sent itself: only its fields count.
                    send_value=row[1] != CONTACTS_KEY,
                    contact=contact,
                    pending=(json.loads(queued[0]),) if queued else (),
                    pending_contacts=(_object(queued[1]),) if queued else (),
                )
            )
    return expected


def _object(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    value = json.loads(raw)
    return value if isinstance(value, dict) else {}


def read_all(
    reader: GleapReader,
    users: Sequence[str],
    *,
    concurrency: int,
    stop: Callable[[], bool],
    on_read: Callable[[int], None] = lambda n: None,
) -> tuple[dict[str, ReadResult], int]:
    """Read ``users`` with ``concurrency`` calls in flight; returns the results and
    how many were never read (a refused key or project stops the rest)."""
    results: dict[str, ReadResult] = {}
    queue = list(reversed(users))
    fatal = False
    with ThreadPoolExecutor(
        max_workers=max(1, concurrency), thread_name_prefix="audsync-read"
    ) as pool:
        running: set[Future[ReadResult]] = set()
        while queue or running:
            while queue and len(running) < concurrency and not fatal and not stop():
                running.add(pool.submit(reader.read, queue.pop(), stop))
            if not running:
                break
            done, running = wait(running, timeout=0.25, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    result = future.result()
                except Interrupted:
                    continue
                results[result.user_id] = result
                fatal = fatal or result.fatal
                on_read(len(results))
    return results, len(users) - len(results)


def run_verify(
    config: Config,
    keys: Sequence[str] = (),
    *,
    sample: int = defaults.DEFAULT_VERIFY_SAMPLE,
    repair: bool = False,
    wait_delivery: bool = False,
    deliver_repair: bool = True,
    trigger: str = "manual",
    reader: GleapReader | None = None,
    client: GleapClient | None = None,
    state: Engine | None = None,
    rng: random.Random | None = None,
    stop: Callable[[], bool] = lambda: False,
    echo: Printer = lambda line: None,
    progress: Progress | None = None,
    on_read: Callable[[ReadResult], None] = lambda r: None,
) -> VerifyReport:
    """Verify ``keys`` (every configured audience and trait when empty).

    ``state`` is the config's state DB when not given (opened read-only unless
    ``repair``). Raises ConfigError (no read token or project, an unknown key)
    before any read.
    """
    definitions = config.select(list(keys))
    key_list = [d.key for d in definitions]
    if state is None:
        from audsync.state import open_configured, open_for_reading

        state = open_configured(config) if repair else open_for_reading(config)
    own_reader = reader is None
    reader = reader or make_reader(config)
    progress = progress or Progress()
    report = VerifyReport(keys=key_list)
    try:
        with state.connect() as conn:
            users, report.population = reservoir_sample(
                ledger_users(conn, key_list), sample, rng or random.Random()
            )
            users.sort()
            expected = load_expectations(conn, key_list, users)
        report.sampled = len(users)
        progress.start("reading", "reading contacts", total=len(users), unit="contacts")
        results, report.not_read = read_all(
            reader,
            users,
            concurrency=config.gleap.concurrency,
            stop=stop,
            on_read=lambda n: progress.update("reading", n),
        )
        progress.finish("reading")
        for result in results.values():
            on_read(result)
    finally:
        if own_reader:
            reader.close()
    answered = [r for r in results.values() if r.ok]
    if reads_look_misdirected(len(answered), sum(r.missing for r in answered)):
        report.misdirected = True
        report.failures = [
            ReadResult(
                r.user_id,
                status=404,
                error="every read answered 404: check gleap.base_url and gleap.project",
            )
            for r in answered
        ]
        answered = []
    report.failures += sorted((r for r in results.values() if not r.ok), key=lambda r: r.user_id)
    contacts = {r.user_id: (None if r.missing else r.contact) for r in answered}
    report.summary = summarise(expected, contacts, key_list)
    if repair and report.summary.drifted and not stop():
        report.repair = repair_drift(
            config,
            state,
            report.summary,
            trigger=trigger,
            client=client,
            wait_delivery=wait_delivery,
            stop=stop,
            echo=echo,
            progress=progress,
            deliver=deliver_repair,
        )
    return report


def queue_repairs(
    state: Engine,
    summary: Summary,
    *,
    trigger: str,
    stop: Callable[[], bool],
    lease_ttl: float,
) -> tuple[list[int], int]:
    """Queue the ledger value (and contact fields) of every drifted (key, user) again,
    one ``repair`` run per key, under the key's plan lease so no plan writes it at
    the same time. A (key, user) with a change already queued is left to it.
    Returns the run ids and how many changes were queued."""
    by_key: dict[str, set[str]] = {}
    for drift in summary.drifts:
        by_key.setdefault(drift.key, set()).add(drift.user_id)
    run_ids: list[int] = []
    queued_total = 0
    holder = locks.holder_identity()
    for key in sorted(by_key):
        lease = _plan_lease(state, key, holder, lease_ttl, stop)
        try:
            run_id = start_run(state, key, trigger, "repair")
            with state.begin() as conn:
                queued = 0
                now = utcnow()
                for user_id in sorted(by_key[key]):
                    queued += manager.queue_repair(conn, run_id, key, user_id, now)
                checked = summary.by_audience[key].checked if key in summary.by_audience else 0
                set_run(
                    conn,
                    run_id,
                    status="delivering" if queued else "succeeded",
                    members=checked,
                    queued=queued,
                )
            run_ids.append(run_id)
            queued_total += queued
        finally:
            locks.release(state, lease)
    return run_ids, queued_total


def _plan_lease(
    state: Engine, key: str, holder: str, ttl: float, stop: Callable[[], bool]
) -> locks.Lease:
    name = locks.plan_lease_name(key)
    while (lease := locks.acquire(state, name, holder, ttl)) is None:
        if stop():
            raise Interrupted(f"stopped while waiting to repair {key!r}")
        time.sleep(0.5)
    return lease


def repair_drift(
    config: Config,
    state: Engine,
    summary: Summary,
    *,
    trigger: str = "manual",
    client: GleapClient | None = None,
    wait_delivery: bool = False,
    stop: Callable[[], bool] = lambda: False,
    echo: Printer = lambda line: None,
    progress: Progress | None = None,
    deliver: bool = True,
) -> RepairOutcome:
    """Queue the drift again and deliver it like a sync (or hand it to the daemon)."""
    from audsync.sync import SyncOutcome, deliver_or_hand_over, make_client

    outcome = RepairOutcome()
    own_client = client is None and deliver
    if deliver:
        client = client or make_client(config)
        client.check_token()  # a wrong admin token stops us before anything is queued
    try:
        outcome.run_ids, outcome.queued = queue_repairs(
            state, summary, trigger=trigger, stop=stop, lease_ttl=config.sync.lease_ttl
        )
        echo(f"repair: {outcome.queued} changes queued again")
        if deliver and outcome.queued:
            assert client is not None
            sync = SyncOutcome(run_ids=list(outcome.run_ids))
            deliver_or_hand_over(
                config,
                state,
                client,
                sync,
                wait=wait_delivery,
                stop=stop,
                echo=echo,
                progress=progress,
            )
            outcome.handed_over_to = None if wait_delivery else sync.handed_over_to
            if sync.delivery is not None and sync.delivery.error is not None:
                outcome.error = str(sync.delivery.error)
    finally:
        if own_client and client is not None:
            client.close()
    for run in runs(state, ids=outcome.run_ids, limit=len(outcome.run_ids) or 1):
        outcome.delivered += run["delivered"]
        outcome.failed += run["failed"]
        outcome.pending += run["pending"]
    return outcome
