"""Prometheus metrics for ``audsync run --metrics-port PORT``.

Counters move in this process (the Gleap calls it makes, the plans it runs).
Gauges are read from the state DB when Prometheus scrapes (at most once per
``DEFAULT_METRICS_CACHE`` seconds), so they stay right while a manual sync or a
second daemon does part of the work. Every name starts with ``audsync_``::

    audsync_gleap_calls_total{endpoint,outcome}      every HTTP attempt and how it ended
    audsync_gleap_rate_limited_total{endpoint}       HTTP 429 answers
    audsync_gleap_retries_total{endpoint}            failed attempts tried again
    audsync_plan_duration_seconds{audience}          plans run by this process (histogram)
    audsync_outbox_depth{audience,state}             changes pending, or parked as failed
    audsync_event_outbox_depth                       Track events waiting to be sent
    audsync_ledger_size{audience}                    users Gleap was told a value for
    audsync_members{audience}                        members at the last successful plan
    audsync_last_successful_plan_timestamp_seconds{audience}
    audsync_last_run_duration_seconds{audience}      start to end of the last finished run
    audsync_audience_failing{audience}               1 while failing or held, else 0
    audsync_state_db_up                              0 when the last read of the state DB failed
    audsync_drift_ratio{audience}                    drift rate of the daemon's last audit
    audsync_verify_reads_total{outcome}              audit reads: contact, missing or failed
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from audsync import models
from audsync.clock import unix_seconds
from audsync.config import Config
from audsync.defaults import DEFAULT_METRICS_ADDR, DEFAULT_METRICS_CACHE
from audsync.errors import ConfigError
from audsync.gleap import Outcome
from audsync.status import collect_status

log = logging.getLogger("audsync.metrics")


PLAN_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600)


class StateCollector(Collector):
    """Gauges read from the state DB at scrape time."""

    def __init__(
        self,
        engine: Engine,
        config: Config,
        cache_seconds: float = DEFAULT_METRICS_CACHE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.config = config
        self.cache_seconds = cache_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._cached: list[Metric] = []
        self._read_at: float | None = None

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            now = self.clock()
            if self._read_at is None or now - self._read_at >= self.cache_seconds:
                self._cached = self._read()
                self._read_at = now
            return list(self._cached)

    def _read(self) -> list[Metric]:
        up = GaugeMetricFamily(
            "audsync_state_db_up", "1 when the state DB could be read for these metrics"
        )
        try:
            families = self._families()
        except SQLAlchemyError as exc:
            log.warning("metrics: state DB not readable: %s", exc)
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        return [*families, up]

    def _families(self) -> list[Metric]:
        status = collect_status(self.engine, self.config)
        depth = GaugeMetricFamily(
            "audsync_outbox_depth",
            "Changes waiting to be sent (pending) or parked after max_attempts (failed)",
            labels=["audience", "state"],
        )
        members = GaugeMetricFamily(
            "audsync_members", "Members at the last successful plan", labels=["audience"]
        )
        planned = GaugeMetricFamily(
            "audsync_last_successful_plan_timestamp_seconds",
            "Unix time of the last plan that was committed",
            labels=["audience"],
        )
        failing = GaugeMetricFamily(
            "audsync_audience_failing",
            "1 while the audience's sync is failing or held by the circuit breaker",
            labels=["audience"],
        )
        for audience in status.audiences:
            key = audience.key
            depth.add_metric([key, "pending"], audience.pending)
            depth.add_metric([key, "failed"], audience.parked_failures)
            if audience.members is not None:
                members.add_metric([key], audience.members)
            planned_at = unix_seconds(audience.last_planned_at)
            if planned_at is not None:
                planned.add_metric([key], planned_at)
            failing.add_metric([key], 1 if audience.last_status in ("failed", "held") else 0)

        ledger = GaugeMetricFamily(
            "audsync_ledger_size", "Users Gleap was told a value for", labels=["audience"]
        )
        durations = GaugeMetricFamily(
            "audsync_last_run_duration_seconds",
            "Start to end (last acknowledgement) of the audience's last finished run",
            labels=["audience"],
        )
        events = GaugeMetricFamily("audsync_event_outbox_depth", "Track events waiting")
        lg, r = models.ledger.c, models.sync_runs.c
        with self.engine.connect() as conn:
            for key, count in conn.execute(
                select(lg.audience_key, func.count()).group_by(lg.audience_key)
            ):
                ledger.add_metric([key], count)
            last_finished = (
                select(func.max(r.id))
                .where(r.finished_at.is_not(None), r.mode.not_in(["retry", "forget", "repair"]))
                .group_by(r.audience_key)
            )
            for key, started, finished in conn.execute(
                select(r.audience_key, r.started_at, r.finished_at).where(r.id.in_(last_finished))
            ):
                durations.add_metric([key], max((finished - started).total_seconds(), 0.0))
            events.add_metric(
                [],
                conn.execute(select(func.count()).select_from(models.event_outbox)).scalar_one(),
            )
        return [depth, members, planned, failing, ledger, durations, events]


class Metrics:
    """This process's metrics: Gleap call counters, plan durations, the state DB's gauges.

    Pass it as the Gleap client's ``observer``; :meth:`serve` exposes it over HTTP.
    """

    def __init__(self, engine: Engine, config: Config) -> None:
        self.registry = CollectorRegistry()
        self.calls = Counter(
            "audsync_gleap_calls",
            "HTTP attempts at Gleap by endpoint and outcome",
            ["endpoint", "outcome"],
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "audsync_gleap_rate_limited",
            "HTTP 429 answers from Gleap",
            ["endpoint"],
            registry=self.registry,
        )
        self.retries = Counter(
            "audsync_gleap_retries",
            "Failed attempts at Gleap tried again after a back-off",
            ["endpoint"],
            registry=self.registry,
        )
        self.plan_duration = Histogram(
            "audsync_plan_duration_seconds",
            "Time to query, snapshot and diff one audience or trait",
            ["audience"],
            buckets=PLAN_BUCKETS,
            registry=self.registry,
        )
        self.drift_ratio = Gauge(
            "audsync_drift_ratio",
            "Share of the users checked by the daemon's last audit whose values in Gleap"
            " differ from the ledger",
            ["audience"],
            registry=self.registry,
        )
        self.verify_reads = Counter(
            "audsync_verify_reads",
            "Contacts read back by the daemon's audit, by outcome (contact, missing, failed)",
            ["outcome"],
            registry=self.registry,
        )
        self.state = StateCollector(engine, config)
        self.registry.register(self.state)
        self._server: WSGIServer | None = None

    def call(self, endpoint: str, outcome: Outcome) -> None:
        """Count one HTTP attempt (the Gleap client's observer)."""
        self.calls.labels(endpoint, outcome).inc()
        if outcome == "throttled":
            self.rate_limited.labels(endpoint).inc()

    def retry(self, endpoint: str) -> None:
        """Count one retry (the Gleap client's observer)."""
        self.retries.labels(endpoint).inc()

    def audited(self, ratios: dict[str, float]) -> None:
        """Record the drift rate per audience measured by an audit."""
        for audience, ratio in ratios.items():
            self.drift_ratio.labels(audience).set(ratio)

    def read(self, outcome: str) -> None:
        """Count one audit read: ``contact``, ``missing`` or ``failed``."""
        self.verify_reads.labels(outcome).inc()

    def planned(self, audience: str, seconds: float) -> None:
        """Record how long one plan took."""
        self.plan_duration.labels(audience).observe(seconds)

    def serve(self, port: int, addr: str = DEFAULT_METRICS_ADDR) -> int:
        """Serve ``/metrics`` on a background thread; returns the port (useful with 0)."""
        try:
            self._server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as exc:
            raise ConfigError(
                "--metrics-port", str(port), f"cannot listen on {addr}:{port}: {exc.strerror}"
            ) from None
        log.info("metrics on http://%s:%d/metrics", addr, self._server.server_port)
        return int(self._server.server_port)

    def close(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
