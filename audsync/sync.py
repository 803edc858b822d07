"""One sync: plan the chosen audiences and traits, then deliver (or hand over to the daemon).

Used by ``audsync sync`` and by the daemon's scheduled jobs, so a manual resync
and a scheduled one follow exactly the same path.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.engine import make_url

from audsync import alerts, locks, models
from audsync.config import Config, Definition
from audsync.deliver import DeliveryReport, deliver, pending_user_count
from audsync.errors import (
    AudsyncError,
    GleapAuthError,
    Interrupted,
    LeaseHeld,
    SourceError,
    first_line,
)
from audsync.gleap import GleapClient
from audsync.history import (
    claim_delivering_runs,
    close_open_runs,
    mark_interrupted,
    runs,
    set_run,
    start_run,
)
from audsync.manager import (
    discard_run,
    ensure_audience,
    fail_runs_left_waiting,
    finalize_runs,
    requeue_failed,
)
from audsync.pacing import budget_seconds
from audsync.plan import (
    PlanResult,
    decide_mode,
    dry_run_calls,
    plan_definition,
)
from audsync.progress import Progress
from audsync.prune import prune_and_log
from audsync.source import open_source
from audsync.state import open_configured, open_state, refuse_second_ledger

Printer = Callable[[str], None]
log = logging.getLogger("audsync.sync")


@dataclass
class SyncOutcome:
    """What ``run_sync`` did: the runs it recorded, the delivery, and the dry-run estimate."""

    run_ids: list[int] = field(default_factory=list)
    plans: list[PlanResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    delivery: DeliveryReport | None = None
    handed_over_to: str | None = None
    dry_run_calls: int = 0
    dry_run_seconds: float = 0.0

    @property
    def failed(self) -> bool:
        """True when any plan failed or was held, or delivery stopped on an error."""
        return (
            bool(self.errors)
            or any(p.held for p in self.plans)
            or bool(self.delivery and self.delivery.error)
        )


def log_run_summaries(state: Engine, run_ids: list[int]) -> None:
    """One log line per run with its counts, for people and log shippers alike."""
    for run in sorted(runs(state, ids=run_ids, limit=len(run_ids) or 1), key=lambda r: r["id"]):
        log.info(
            "run %d %s (%s): %s; members=%d entered=%d exited=%d changed=%d queued=%d"
            " delivered=%d failed=%d superseded=%d pending=%d%s",
            run["id"],
            run["audience_key"],
            run["mode"],
            run["status"],
            run["members"],
            run["entered"],
            run["exited"],
            run["changed"],
            run["queued"],
            run["delivered"],
            run["failed"],
            run["superseded"],
            run["pending"],
            f" error={run['error']}" if run["error"] else "",
        )


def make_client(config: Config, **overrides: Any) -> GleapClient:
    """A Gleap client from the config's ``[gleap]`` section."""
    g = config.gleap
    options: dict[str, Any] = {
        "rate_limit": g.rate_limit,
        "rate_window": g.rate_window,
        "timeout": g.timeout,
        "max_retries": g.max_retries,
        "concurrency": g.concurrency,
    }
    options.update(overrides)
    return GleapClient(g.base_url, config.require_token(), **options)


def run_sync(
    config: Config,
    keys: list[str] | None = None,
    *,
    full: bool = False,
    force: bool = False,
    dry_run: bool = False,
    wait: bool = False,
    trigger: str = "manual",
    stop: Callable[[], bool] = lambda: False,
    echo: Printer = lambda line: None,
    client: GleapClient | None = None,
    state: Engine | None = None,
    progress: Progress | None = None,
) -> SyncOutcome:
    """Plan ``keys`` (all when empty) and deliver every pending change.

    Raises ConfigError, GleapAuthError (before anything is written), LeaseHeld
    (another process plans one of ``keys`` and ``wait`` is off) or StateError.
    """
    definitions = config.select(keys or [])
    progress = progress or Progress()
    if dry_run:
        return _dry_run(config, definitions, full=full, force=force, progress=progress)
    own_client = client is None
    client = client or make_client(config)
    try:
        client.check_token()  # a wrong token stops us before the state DB is touched
        source = open_source(config.require_source())
        state = state or open_configured(config)
        mark_interrupted(state)
        outcome = SyncOutcome()
        plan_all(
            config,
            definitions,
            state,
            source,
            outcome,
            full=full,
            force=force,
            wait=wait,
            trigger=trigger,
            echo=echo,
            stop=stop,
            progress=progress,
        )
        deliver_or_hand_over(
            config, state, client, outcome, wait=wait, stop=stop, echo=echo, progress=progress
        )
        log_run_summaries(state, outcome.run_ids)
        alerts.notify(state, config.alert_webhook_url)
        prune_and_log(state, config.history.keep)  # after alerts: they read the last runs
        source.dispose()
        return outcome
    finally:
        if own_client:
            client.close()


def retry_failed(
    config: Config,
    keys: list[str] | None = None,
    *,
    wait: bool = False,
    stop: Callable[[], bool] = lambda: False,
    echo: Printer = lambda line: None,
    client: GleapClient | None = None,
    progress: Progress | None = None,
) -> SyncOutcome:
    """Requeue the changes Gleap rejected (all, or of ``keys``) and deliver them.

    Each audience with rejected changes gets a run in mode ``retry``.
    """
    definitions = config.select(keys or [])
    own_client = client is None
    client = client or make_client(config)
    try:
        client.check_token()
        state = open_configured(config)
        outcome = SyncOutcome()
        for definition in definitions:
            run_id = start_run(state, definition.key, "manual", "retry")
            with state.begin() as conn:
                count = requeue_failed(conn, definition.key, run_id)
                set_run(conn, run_id, status="delivering" if count else "succeeded", queued=count)
            if count:
                echo(f"{definition.key}: {count} rejected changes queued again")
                outcome.run_ids.append(run_id)
            else:
                with state.begin() as conn:
                    discard_run(conn, run_id)
        if outcome.run_ids:
            deliver_or_hand_over(
                config, state, client, outcome, wait=wait, stop=stop, echo=echo, progress=progress
            )
        return outcome
    finally:
        if own_client:
            client.close()


def plan_all(
    config: Config,
    definitions: tuple[Definition, ...],
    state: Engine,
    source: Engine,
    outcome: SyncOutcome,
    *,
    full: bool = False,
    force: bool = False,
    wait: bool = False,
    skip_held: bool = False,
    trigger: str = "manual",
    echo: Printer = lambda line: None,
    stop: Callable[[], bool] | None = None,
    progress: Progress | None = None,
) -> None:
    """Plan each definition under its lease, one transaction each, recording a run per key.

    With ``skip_held`` an audience another process is planning is skipped (the
    daemon's tick); otherwise LeaseHeld is raised unless ``wait``.
    """
    holder = locks.holder_identity()
    leases = _acquire_plan_leases(
        state,
        definitions,
        holder,
        config.sync.lease_ttl,
        wait=wait,
        skip_held=skip_held,
        echo=echo,
        stop=stop,
    )
    progress = progress or Progress()
    # Plans take wildly different times: a rate or ETA over them would mislead.
    progress.start(
        "planning", "planning", total=len(leases), unit="audiences and traits", timed=False
    )
    try:
        with locks.Heartbeat(state, *leases.values()):
            for definition in definitions:
                if definition.key not in leases:
                    continue
                if stop is not None and stop():
                    break
                echo(f"planning {definition.key} ...")
                _plan_one(
                    config,
                    definition,
                    state,
                    source,
                    outcome,
                    leases[definition.key],
                    full=full,
                    force=force,
                    trigger=trigger,
                    stop=stop,
                    progress=progress,
                )
                progress.update("planning", len(outcome.run_ids))
    finally:
        progress.finish("planning")
        for lease in leases.values():
            locks.release(state, lease)


def _acquire_plan_leases(
    state: Engine,
    definitions: tuple[Definition, ...],
    holder: str,
    ttl: float,
    *,
    wait: bool,
    skip_held: bool,
    echo: Printer,
    stop: Callable[[], bool] | None = None,
) -> dict[str, locks.Lease]:
    leases: dict[str, locks.Lease] = {}
    try:
        for definition in definitions:
            name = locks.plan_lease_name(definition.key)
            told = False
            while (lease := locks.acquire(state, name, holder, ttl)) is None:
                other = locks.current_holder(state, name) or {}
                who = f"{other.get('host')} pid {other.get('pid')}"
                if skip_held:
                    echo(f"skipping {definition.key}: {who} is planning it")
                    break
                if not wait:
                    raise LeaseHeld(
                        f"{definition.key!r} is being planned by {who};"
                        " use --wait to queue behind it"
                    )
                if not told:
                    echo(f"waiting for {who} to finish planning {definition.key} ...")
                    told = True
                if stop is not None and stop():
                    raise Interrupted(f"stopped while waiting to plan {definition.key!r}")
                time.sleep(0.5)
            if lease is not None:
                leases[definition.key] = lease
    except BaseException:
        for lease in leases.values():
            locks.release(state, lease)
        raise
    return leases


def _plan_one(
    config: Config,
    definition: Definition,
    state: Engine,
    source: Engine,
    outcome: SyncOutcome,
    lease: locks.Lease,
    *,
    full: bool,
    force: bool,
    trigger: str,
    stop: Callable[[], bool] | None = None,
    progress: Progress,
) -> None:
    with state.connect() as conn:
        # Decided once: recorded on the run, and the plan follows it.
        mode = decide_mode(conn, definition.key, full)
        # The last plan's member count is the best guess at how many rows come.
        expected = conn.execute(
            select(models.audiences.c.members).where(models.audiences.c.key == definition.key)
        ).scalar()
    with state.begin() as conn:
        ensure_audience(conn, definition)
    run_id = start_run(state, definition.key, trigger, mode)
    outcome.run_ids.append(run_id)
    started = time.monotonic()
    on_rows = _query_progress(progress, definition.key, expected)
    with state.connect() as conn:
        tx = conn.begin()
        try:
            result = plan_definition(
                conn,
                source,
                definition,
                run_id=run_id,
                settings=config.sync,
                mode=mode,
                full=full,
                force=force,
                stop=stop,
                on_rows=on_rows,
                keys=config.key_kinds(),
            )
        except SourceError as exc:
            progress.finish("querying")
            tx.rollback()
            set_run(state, run_id, status="failed", error=str(exc))
            outcome.errors.append(str(exc))
            return
        except BaseException as exc:
            tx.rollback()
            if isinstance(exc, Exception) and not isinstance(exc, Interrupted):
                # Whatever one audience's rows do to the state DB (or to a bug),
                # it fails that run alone: the others still plan, and the daemon
                # does not crash-loop on the same rows at every start.
                progress.finish("querying")
                message = f"{definition.key}: planning failed: {first_line(exc)}"
                log.debug("planning %s failed", definition.key, exc_info=True)
                set_run(state, run_id, status="failed", error=message)
                outcome.errors.append(message)
                return
            reason = str(exc) if isinstance(exc, AudsyncError) else type(exc).__name__
            set_run(state, run_id, status="interrupted", error=f"planning did not finish: {reason}")
            raise
        progress.update("querying", result.stats.rows, total=result.stats.rows)
        progress.finish("querying")
        counts = {
            "mode": result.mode,
            "members": result.members,
            "entered": result.entered,
            "exited": result.exited,
            "changed": result.changed,
            "skipped_ids": result.stats.skipped_ids,
            "duplicate_ids": result.stats.duplicate_ids,
            "invalid_ids": result.stats.invalid_ids,
            "invalid_reasons": result.stats.invalid_reasons(),
        }
        if result.held:
            tx.rollback()
            set_run(state, run_id, status="held", error=result.held, **counts)
        elif not locks.still_held(conn, lease):
            tx.rollback()
            message = f"{definition.key}: lost the planning lease; nothing queued"
            set_run(state, run_id, status="failed", error=message, **counts)
            outcome.errors.append(message)
        else:
            status = "delivering" if result.queued else "succeeded"
            set_run(conn, run_id, status=status, queued=result.queued, **counts)
            finalize_runs(conn)  # older runs this plan superseded may be complete now
            tx.commit()
    result.seconds = time.monotonic() - started
    outcome.plans.append(result)


def deliver_or_hand_over(
    config: Config,
    state: Engine,
    client: GleapClient,
    outcome: SyncOutcome,
    *,
    wait: bool = False,
    stop: Callable[[], bool] = lambda: False,
    echo: Printer = lambda line: None,
    progress: Progress | None = None,
) -> None:
    """Deliver everything pending under the delivery lease, or — when a daemon holds
    it — leave the changes to it (following them to the end with ``wait``)."""
    progress = progress or Progress()
    holder = locks.holder_identity()
    lease = locks.acquire(state, locks.DELIVER_LEASE, holder, config.sync.lease_ttl)
    if lease is None:
        other = locks.current_holder(state, locks.DELIVER_LEASE) or {}
        outcome.handed_over_to = f"{other.get('host')} pid {other.get('pid')}"
        with state.begin() as conn:
            claim_delivering_runs(conn, str(other.get("host")), int(other.get("pid") or 0))
        echo(
            f"changes queued; {outcome.handed_over_to} holds the delivery lease and is sending them"
        )
        if wait:
            _follow(state, outcome, stop, echo, progress)
        return
    try:
        with state.begin() as conn:
            claim_delivering_runs(conn, socket.gethostname(), os.getpid())
            users = pending_user_count(conn)
        progress.start(
            "delivering",
            "delivering",
            total=users,
            unit="users",
            budget=config.gleap.rate_limit / config.gleap.rate_window,
        )
        with locks.Heartbeat(state, lease) as beat:
            report = deliver(
                state,
                client,
                lease=lease,
                stop=lambda: stop() or beat.lost.is_set(),
                concurrency=config.gleap.concurrency,
                max_attempts=config.sync.max_attempts,
                event_kinds=config.event_kinds(),
                on_progress=lambda r: progress.update("delivering", r.users),
            )
        progress.update("delivering", report.users)
        progress.finish("delivering")
        outcome.delivery = report
        if report.error is not None or stop():
            status = "interrupted" if report.error is None else "failed"
            reason = report.stopped or "stopped"
            if isinstance(report.error, GleapAuthError):
                reason = str(report.error)
            close_open_runs(state, status, f"{reason}; pending changes stay queued")
            if report.error is not None:
                fail_runs_left_waiting(
                    state, outcome.run_ids, f"{reason}; pending changes stay queued"
                )
    finally:
        locks.release(state, lease)


def _follow(
    state: Engine,
    outcome: SyncOutcome,
    stop: Callable[[], bool],
    echo: Printer,
    progress: Progress,
) -> None:
    # Progress goes to the progress display (bars, or a line every few seconds),
    # not the log: one line when following starts and one when it ends.
    first: int | None = None
    try:
        while not stop():
            # A daemon that died (SIGKILL, a cold stop, a lost host) leaves its runs
            # open: closed as interrupted here, or --wait would follow them forever.
            mark_interrupted(state)
            rows = runs(state, ids=outcome.run_ids, limit=len(outcome.run_ids) or 1)
            open_rows = [r for r in rows if r["status"] in models.OPEN_STATUSES]
            pending = sum(r["pending"] for r in open_rows)
            if first is None:
                first = pending
                echo(f"following the daemon's delivery of {pending:,} changes")
                progress.start("delivering", "delivered by the daemon", total=first, unit="changes")
            progress.update("delivering", max(first - pending, 0))
            if not open_rows:
                _followed_to_the_end(rows, outcome, echo)
                return
            time.sleep(0.5)
    finally:
        progress.finish("delivering")


def _followed_to_the_end(
    rows: list[dict[str, Any]], outcome: SyncOutcome, echo: Printer
) -> None:
    """Say how the followed delivery ended. A daemon stopped (or failing) closes the
    runs it was delivering as interrupted or failed: that is not "finished", and
    when changes of this sync are still queued, the sync has not done its job."""
    stopped = [r for r in rows if r["status"] not in ("succeeded", "held")]  # held: said already
    left = sum(r["pending"] for r in stopped)
    if not stopped:
        echo("the daemon finished delivering the changes of this sync")
        return
    how = ", ".join(f"run {r['id']} {r['status']}" for r in stopped)
    if not left:
        echo(f"the daemon's delivery ended ({how}) with nothing of this sync left to send")
        return
    problem = (
        f"the daemon stopped before delivering this sync's changes ({how});"
        f" {left:,} stay queued for the next delivery"
    )
    echo(problem)
    outcome.errors.append(problem)


def _dry_run(
    config: Config,
    definitions: tuple[Definition, ...],
    *,
    full: bool,
    force: bool,
    progress: Progress,
) -> SyncOutcome:
    """Plan inside one transaction that is always rolled back: nothing is written, nothing sent."""
    refuse_second_ledger(config)  # else every audience would show as `initial`
    source = open_source(config.require_source())
    outcome = SyncOutcome()
    with _DryRunState(config.state_url) as state, state.connect() as conn:
        tx = conn.begin()
        try:
            for number, definition in enumerate(definitions, start=1):
                try:
                    result = plan_definition(
                        conn,
                        source,
                        definition,
                        run_id=-number,  # never a real run id; rolled back anyway
                        settings=config.sync,
                        mode=decide_mode(conn, definition.key, full),
                        full=full,
                        force=force,
                        on_rows=_query_progress(progress, definition.key, None),
                        keys=config.key_kinds(),
                        dry_run=True,
                    )
                except SourceError as exc:
                    outcome.errors.append(str(exc))
                    continue
                finally:
                    progress.finish("querying")
                outcome.plans.append(result)
            outcome.dry_run_calls = dry_run_calls(
                conn, (p.key for p in outcome.plans if p.counted_only)
            )
        finally:
            tx.rollback()
    source.dispose()
    g = config.gleap
    outcome.dry_run_seconds = budget_seconds(outcome.dry_run_calls, g.rate_limit, g.rate_window)
    return outcome


def _query_progress(progress: Progress, key: str, expected: int | None) -> Callable[[int], None]:
    """Start the ``querying`` phase of ``key``; returns what to tell about rows read."""
    progress.start("querying", f"querying {key}", total=expected or None, unit="rows")

    def on_rows(rows: int) -> None:
        progress.update("querying", rows, total=max(rows, expected) if expected else None)

    return on_rows


def _scratch_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Thrown away after the dry run (always rolled back): no durability needed.
    dbapi_connection.execute("PRAGMA synchronous=OFF")
    dbapi_connection.execute("PRAGMA journal_mode=MEMORY")


class _DryRunState:
    """The real state DB read-only-by-rollback, or a throwaway one when it was never created.

    Creating or migrating the real DB would be a change, which a dry run must not make.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.tmp: tempfile.TemporaryDirectory[str] | None = None
        self.engine: Engine | None = None

    def __enter__(self) -> Engine:
        from audsync import migrate

        parsed = make_url(self.url)
        missing_file = parsed.get_backend_name() == "sqlite" and (
            not parsed.database or not Path(parsed.database).exists()
        )
        if not missing_file:
            engine = open_state(self.url, upgrade=False)
            if migrate.current_revision(engine) == migrate.head_revision():
                self.engine = engine
                return engine
            engine.dispose()
        # An empty scratch DB stands in for the state; its tables are created
        # from the models (what the migrations build), not migrated step by step.
        self.tmp = tempfile.TemporaryDirectory(prefix="audsync-dry-run-")
        self.engine = create_engine(f"sqlite:///{self.tmp.name}/state.db")
        event.listen(self.engine, "connect", _scratch_pragmas)
        models.metadata.create_all(self.engine)
        return self.engine

    def __exit__(self, *exc: object) -> None:
        if self.engine is not None:
            self.engine.dispose()
        if self.tmp is not None:
            self.tmp.cleanup()
