"""``audsync run``: the daemon.

At start it upgrades the state DB, closes runs a dead process left open, and
plans every configured audience and trait at once; then it plans again every
``interval`` plus a random 0..``jitter`` (APScheduler's BlockingScheduler with a
trigger built on :func:`next_fire_time`). Delivery runs beside planning in its
own thread under the delivery lease, so a long backfill never delays a plan,
and routine changes overtake the backfill (the outbox is drained by priority).

A second daemon on the same state DB stands by: it plans on its schedule (under
per-audience leases) and takes over delivery when the first one's lease expires.

Signals: the first SIGTERM/SIGINT finishes the calls in flight (abandoning any
that has not answered within DEFAULT_STOP_GRACE), cancels a running source query,
records every run's state, releases the leases and exits 0; a second one exits at once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import random
import signal
import socket
import threading
from collections.abc import Callable
from types import FrameType

from apscheduler.schedulers.base import BaseScheduler
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.base import BaseTrigger
from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError

from audsync import alerts, locks, manager, models
from audsync.clock import utcnow
from audsync.config import Config
from audsync.defaults import DEFAULT_METRICS_ADDR
from audsync.deliver import deliver
from audsync.errors import (
    EXIT_OK,
    AudsyncError,
    GleapAuthError,
    GleapRejectingAll,
    Interrupted,
    LeaseLost,
    describe,
)
from audsync.gleap import GleapClient
from audsync.gleap_read import GleapReader, ReadResult
from audsync.history import (
    claim_delivering_runs,
    close_open_runs,
    mark_interrupted,
    set_run,
    start_run,
)
from audsync.manager import ensure_audience, finalize_runs
from audsync.metrics import Metrics
from audsync.prune import prune_and_log
from audsync.readback import VerifyReport, make_reader, run_verify
from audsync.signals import relay_signals
from audsync.source import open_source
from audsync.state import open_configured
from audsync.status import DAEMON_BEAT_INTERVAL
from audsync.sync import (
    SyncOutcome,
    deliver_or_hand_over,
    log_run_summaries,
    make_client,
    plan_all,
)

log = logging.getLogger("audsync.service")

IDLE_POLL = 1.0
"""Seconds between looks at an empty outbox: a manual sync's changes go out within a second."""

TROUBLE_PAUSE = 30.0
"""Seconds the deliverer waits after Gleap or the state DB failed, before trying again."""


def next_fire_time(
    previous: dt.datetime | None,
    now: dt.datetime,
    interval: float,
    jitter: float,
    rand: float,
) -> dt.datetime:
    """When the next scheduled plan runs.

    ``previous`` is the last scheduled time (None before the first); ``rand`` is
    in [0, 1). The start-up plan runs outside the schedule, so the first tick
    is one interval (plus jitter) away. A time that has already passed —
    the machine was suspended, or a plan ran long — becomes ``now``: one
    catch-up run, never a burst.
    """
    base = now if previous is None else previous
    candidate = base + dt.timedelta(seconds=interval + rand * jitter)
    return max(candidate, now)


class JitteredInterval(BaseTrigger):  # type: ignore[misc]
    """APScheduler trigger: every ``interval`` seconds plus a random 0..``jitter``."""

    def __init__(
        self, interval: float, jitter: float, rand: Callable[[], float] = random.random
    ) -> None:
        self.interval = interval
        self.jitter = jitter
        self.rand = rand

    def get_next_fire_time(
        self, previous_fire_time: dt.datetime | None, now: dt.datetime
    ) -> dt.datetime:
        return next_fire_time(previous_fire_time, now, self.interval, self.jitter, self.rand())

    def __str__(self) -> str:
        return f"every {self.interval:g}s + 0..{self.jitter:g}s"


class Daemon:
    """The long-running service behind ``audsync run``."""

    def __init__(
        self,
        config: Config,
        *,
        client: GleapClient | None = None,
        state: Engine | None = None,
        install_signals: bool = True,
        scheduler: BaseScheduler | None = None,
        metrics: Metrics | None = None,
        trouble_pause: float = TROUBLE_PAUSE,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.trouble_pause = trouble_pause
        self.client = client or make_client(config)
        self.state = state or open_configured(config)
        self.install_signals = install_signals
        self.stopping = threading.Event()
        self.holder = locks.holder_identity()
        self.scheduler = scheduler or BlockingScheduler(timezone=dt.UTC)
        self._planning = threading.Lock()
        self._scheduler_done = threading.Event()
        self._signals = 0
        self._deliverer = threading.Thread(
            target=self._deliver_loop, name="audsync-deliverer", daemon=True
        )
        self.reader: GleapReader | None = None
        if config.verify.sample_per_run > 0:
            self.reader = make_reader(config, observer=metrics)
        self._drifting: set[str] = set()
        """Audiences the last drift alert said were over [verify] max_drift."""

    # -- life cycle ---------------------------------------------------------------

    def run(self) -> int:
        """Start up, serve until a signal, shut down cleanly. Returns the exit code."""
        if not self.install_signals:
            return self._run()
        # Taken on a thread of their own: a source query stuck in a driver's C
        # code would otherwise hold the first signal back until it ends.
        with relay_signals(lambda signum: self._on_signal(signum, None)):
            return self._run()

    def _run(self) -> int:
        closed = mark_interrupted(self.state)
        if closed:
            log.info("closed %d runs left open by a dead process", closed)
        retire_removed(self.state, self.config)
        self._beat("running", None)
        self._deliverer.start()
        log.info(
            "audsync daemon started (%s); %d audiences and traits, plans %s",
            self.holder,
            len(self.config.definitions),
            JitteredInterval(self.config.schedule.interval, self.config.schedule.jitter),
        )
        try:
            self.plan("startup")
            if not self.stopping.is_set():
                self.schedule()
                self.scheduler.start()
        finally:
            self._scheduler_done.set()
            self._shutdown()
        return EXIT_OK

    def schedule(self) -> None:
        """Add the planning and health jobs to the scheduler."""
        self.scheduler.add_job(
            self.plan,
            trigger=JitteredInterval(self.config.schedule.interval, self.config.schedule.jitter),
            args=["schedule"],
            id="plan",
            max_instances=1,  # a long plan is never overlapped by the next
            coalesce=True,  # missed ticks collapse into one run
            misfire_grace_time=None,
        )
        self.scheduler.add_job(
            self._beat_job, "interval", seconds=DAEMON_BEAT_INTERVAL, id="health", coalesce=True
        )

    def stop(self) -> None:
        """Ask for a warm shutdown (what the first SIGTERM does)."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        # The health record and the scheduler's shutdown() from other threads: the
        # signal may arrive while the scheduler's lock is held by the main thread,
        # and a locked state DB must not keep the signal thread from hearing the
        # second signal (found by review: a stop that never stopped).
        threading.Thread(target=self._beat, args=("stopping", None), daemon=True).start()
        threading.Thread(target=self._stop_scheduler, daemon=True).start()

    def _stop_scheduler(self) -> None:
        # The signal can land between the start-up plan and scheduler.start():
        # keep looking until the scheduler runs (then stop it) or the main thread is done.
        while not self._scheduler_done.wait(0.05):
            if self.scheduler.running:
                self.scheduler.shutdown(wait=False)
                return

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal: exiting now; unacknowledged changes stay queued")
            os._exit(1)
        log.info("%s received: finishing the calls in flight", signal.Signals(signum).name)
        self.stop()

    def _shutdown(self) -> None:
        self.stopping.set()
        with self._planning:  # a plan in progress sees `stopping` and rolls back
            pass
        if self._deliverer.is_alive():
            self._deliverer.join()
        with self.state.begin() as conn:
            finalize_runs(conn)
        close_open_runs(self.state, "interrupted", "daemon stopped; pending changes stay queued")
        self._beat("stopped", None)
        self.client.close()
        if self.reader is not None:
            self.reader.close()
        log.info("audsync daemon stopped")

    # -- planning -------------------------------------------------------------------

    def plan(self, trigger: str) -> SyncOutcome:
        """Plan every configured audience and trait; never waits for delivery."""
        outcome = SyncOutcome()
        with self._planning:
            if self.stopping.is_set():
                return outcome
            try:
                source = open_source(self.config.require_source())
            except AudsyncError as exc:
                log.error("%s", exc)
                for definition in self.config.definitions:
                    with self.state.begin() as conn:
                        ensure_audience(conn, definition)
                    run_id = start_run(self.state, definition.key, trigger, "incremental")
                    set_run(self.state, run_id, status="failed", error=str(exc))
                return outcome
            try:
                plan_all(
                    self.config,
                    self.config.definitions,
                    self.state,
                    source,
                    outcome,
                    skip_held=True,
                    trigger=trigger,
                    echo=log.info,
                    stop=self.stopping.is_set,
                )
            except Interrupted:
                log.info("planning stopped by shutdown")
            except (AudsyncError, SQLAlchemyError) as exc:
                log.error("planning failed: %s", describe(exc))
            finally:
                source.dispose()
        for message in outcome.errors:
            log.error("%s", message)
        log_run_summaries(self.state, outcome.run_ids)
        alerts.notify(self.state, self.config.alert_webhook_url)
        # Once per plan (every 2-3 h), not per tick: cheap when nothing is old enough.
        prune_and_log(self.state, self.config.history.keep)
        for result in outcome.plans:
            if self.metrics is not None:
                self.metrics.planned(result.key, result.seconds)
            log.info(
                "planned %s (%s): %d members, %d entered, %d exited, %d changed, %d queued%s",
                result.key,
                result.mode,
                result.members,
                result.entered,
                result.exited,
                result.changed,
                result.queued,
                f"; HELD: {result.held}" if result.held else "",
            )
        self.audit(trigger)
        self._beat_job()
        return outcome

    # -- the continuous audit ---------------------------------------------------------

    def audit(self, trigger: str) -> VerifyReport | None:
        """Read ``[verify] sample_per_run`` users back after a plan: drift metrics, an
        alert when an audience's drift rate crosses ``max_drift``, and with ``repair``
        a ``repair`` run queued for this daemon's deliverer. Never raises."""
        if self.reader is None or self.stopping.is_set():
            return None
        settings = self.config.verify
        try:
            report = run_verify(
                self.config,
                sample=settings.sample_per_run,
                repair=settings.repair,
                deliver_repair=False,  # the deliverer thread sends them
                trigger=trigger,
                reader=self.reader,
                state=self.state,
                stop=self.stopping.is_set,
                on_read=self._count_read,
            )
        except (AudsyncError, SQLAlchemyError) as exc:
            log.error("audit failed: %s", describe(exc))
            return None
        s = report.summary
        low, high = s.ci95
        log.info(
            "audit: %d users read back, %d drifted (%d missing), drift %.2f%% (95%% CI"
            " %.2f%%-%.2f%%), %d not verified%s",
            s.checked,
            s.drifted,
            s.missing,
            100 * s.drift_rate,
            100 * low,
            100 * high,
            report.unverified,
            f"; {report.repair.queued} changes queued again" if report.repair else "",
        )
        for failure in report.failures[:3]:
            log.warning("audit: read of %s failed: %s", failure.user_id, failure.error)
        if self.metrics is not None:
            self.metrics.audited(
                {key: f.drift_rate for key, f in s.by_audience.items() if f.checked}
            )
        self._drift_alerts(report)
        return report

    def _count_read(self, result: ReadResult) -> None:
        if self.metrics is not None:
            self.metrics.read(
                "failed" if not result.ok else "missing" if result.missing else "contact"
            )

    def _drift_alerts(self, report: VerifyReport) -> None:
        max_drift = self.config.verify.max_drift
        for key, figures in report.summary.by_audience.items():
            if not figures.checked:
                continue
            event = alerts.drift_transition(key in self._drifting, figures.drift_rate, max_drift)
            if event is None:
                continue
            low, high = figures.ci95
            if event == "drift":
                log.warning(
                    "%s: drift %.2f%% of %d users read back, over max_drift %.2f%%",
                    key,
                    100 * figures.drift_rate,
                    figures.checked,
                    100 * max_drift,
                )
            message = {
                "source": "audsync",
                "audience": key,
                "event": event,
                "state": "drift" if event == "drift" else "ok",
                "previous": "ok" if event == "drift" else "drift",
                "drift_rate": figures.drift_rate,
                "ci95": [low, high],
                "checked": figures.checked,
                "drifted": figures.drifted,
                "missing": figures.missing,
                "max_drift": max_drift,
                "at": utcnow(),
            }
            if not self.config.alert_webhook_url or alerts.post(
                self.config.alert_webhook_url, message
            ):
                # Unsent, the state is kept as it was: the next audit tries again.
                (self._drifting.add if event == "drift" else self._drifting.discard)(key)

    # -- delivery -------------------------------------------------------------------

    def _deliver_loop(self) -> None:
        ttl = self.config.sync.lease_ttl
        while not self.stopping.is_set():
            try:
                lease = locks.acquire(self.state, locks.DELIVER_LEASE, self.holder, ttl)
            except SQLAlchemyError as exc:
                log.warning("state DB busy while taking the delivery lease: %s", describe(exc))
                lease = None
            if lease is None:
                self.stopping.wait(max(ttl / 3, 0.2))  # standby: another process delivers
                continue
            log.info("holding the delivery lease (token %d)", lease.token)
            try:
                with locks.Heartbeat(self.state, lease) as beat:
                    self._deliver_while_held(lease, beat)
            except Exception as exc:
                # Whatever went wrong, a daemon that plans but no longer delivers
                # is the worst outcome: give the lease up, say why, try again.
                log.error(
                    "delivery stopped unexpectedly, trying again in %gs: %s",
                    self.trouble_pause,
                    describe(exc),
                )
                self.stopping.wait(self.trouble_pause)
            finally:
                with contextlib.suppress(SQLAlchemyError):  # else it expires by itself
                    locks.release(self.state, lease)

    def _deliver_while_held(self, lease: locks.Lease, beat: locks.Heartbeat) -> None:
        def halted() -> bool:
            return self.stopping.is_set() or beat.lost.is_set()

        while not halted():
            try:
                with self.state.begin() as conn:
                    claim_delivering_runs(conn, socket.gethostname(), os.getpid())
                report = deliver(
                    self.state,
                    self.client,
                    lease=lease,
                    stop=halted,
                    concurrency=self.config.gleap.concurrency,
                    max_attempts=self.config.sync.max_attempts,
                    event_kinds=self.config.event_kinds(),
                )
            except SQLAlchemyError as exc:
                log.warning("state DB error while delivering, retrying: %s", describe(exc))
                self.stopping.wait(IDLE_POLL)
                continue
            if report.delivered or report.failed or report.identify_failed:
                log.info(
                    "delivered %d changes in %d Identify calls, %d failed"
                    " (%d Track calls; %d attempts failed)",
                    report.delivered,
                    report.identify_calls,
                    report.failed,
                    report.track_calls,
                    report.identify_failed + report.track_failed,
                )
            if report.error is not None:
                if beat.lost.is_set() or isinstance(report.error, LeaseLost):
                    log.warning("lost the delivery lease; standing by")
                    return
                log.error("delivery stopped: %s", report.error)
                if isinstance(report.error, GleapAuthError | GleapRejectingAll):
                    # Waiting will not fix a token or a base_url: the runs fail and
                    # the webhook hears it; their changes stay queued for after.
                    close_open_runs(
                        self.state, "failed", f"{report.error}; pending changes stay queued"
                    )
                    alerts.notify(self.state, self.config.alert_webhook_url)
                self.stopping.wait(self.trouble_pause)
            elif report.users == 0:
                self.stopping.wait(IDLE_POLL)
        if beat.lost.is_set():
            log.warning("lost the delivery lease; standing by")

    # -- health -----------------------------------------------------------------------

    def mark_stopped(self) -> None:
        """Record this daemon as stopped (``status`` then no longer lists it)."""
        self._beat("stopped", None)

    def _beat_job(self) -> None:
        job = self.scheduler.get_job("plan") if self.scheduler.running else None
        next_run = getattr(job, "next_run_time", None)
        if next_run is not None:
            next_run = next_run.astimezone(dt.UTC).replace(tzinfo=None)
        self._beat("running" if not self.stopping.is_set() else "stopping", next_run)

    def _beat(self, state: str, next_run_at: dt.datetime | None) -> None:
        try:
            with self.state.begin() as conn:
                manager.heartbeat(conn, self.holder, state, next_run_at)
        except SQLAlchemyError as exc:
            log.debug("health record not written: %s", describe(exc))


def retire_removed(state: Engine, config: Config) -> None:
    """Audiences no longer in the config stop syncing: their pending changes are dropped
    (credited as superseded to their runs) and the audience is marked inactive. Their
    ledger is kept, so adding the audience back resumes incrementally."""
    keys = [d.key for d in config.definitions]
    a = models.audiences.c
    with state.begin() as conn:
        gone = conn.execute(select(a.key).where(a.active.is_(True), a.key.not_in(keys))).scalars()
        for key in list(gone):
            manager.retire_audience(conn, key)
            log.info("%s is no longer configured: stopped syncing it (its ledger is kept)", key)
        finalize_runs(conn)


def run_daemon(
    config: Config,
    *,
    once: bool = False,
    metrics_port: int | None = None,
    metrics_addr: str = DEFAULT_METRICS_ADDR,
) -> int:
    """Entry point of ``audsync run``; ``once`` does the start-up sync and exits.

    With ``metrics_port`` Prometheus metrics are served there while it runs.
    """
    config.require_token()
    config.require_source()
    if config.verify.sample_per_run > 0:
        config.require_reader()  # the audit reads with the v3 key: exit 2 before starting
    state = open_configured(config)
    metrics = Metrics(state, config) if metrics_port is not None else None
    daemon = Daemon(
        config, state=state, client=make_client(config, observer=metrics), metrics=metrics
    )
    try:
        daemon.client.check_token()
        if metrics is not None and metrics_port is not None:
            metrics.serve(metrics_port, metrics_addr)
        if once:
            daemon.stopping.clear()
            try:
                outcome = daemon.plan("startup")
                deliver_or_hand_over(config, daemon.state, daemon.client, outcome, echo=log.info)
            finally:
                # plan() recorded us as running: an exited process must not look alive.
                daemon.mark_stopped()
            return 1 if outcome.failed or (outcome.delivery and outcome.delivery.error) else 0
        return daemon.run()
    finally:
        daemon.client.close()
        if metrics is not None:
            metrics.close()
