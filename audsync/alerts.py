"""Webhook alerts: one JSON message when an audience starts failing, is held, or recovers.

Once per change of state, not once per run: the last state the webhook was
told is kept in ``audiences.alert_state``. A webhook that cannot be reached
is logged and tried again at the next change check; it never fails a sync.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from audsync import manager, models
from audsync.clock import utcnow
from audsync.errors import describe
from audsync.text_tables import jsonable

log = logging.getLogger("audsync.alerts")

STATE_OF_STATUS = {
    "succeeded": "ok",
    "partial": "ok",
    "failed": "failing",
    "held": "held",
}
"""A finished run's status -> the audience's alert state (other statuses say nothing)."""


def alert_transition(previous: str | None, status: str) -> str | None:
    """The new alert state when a run ends with ``status``, or None when nothing changes.

    An audience that was never alerted on and is fine stays quiet.
    """
    state = STATE_OF_STATUS.get(status)
    if state is None or state == (previous or "ok"):
        return None
    return state


def notify(engine: Engine, url: str | None, *, timeout: float = 10.0) -> int:
    """Post one message per audience whose state changed since the last alert.

    Never raises: the daemon calls it between its own jobs, and an alert that
    cannot go out must not stop the syncing it reports on. Trouble is logged as
    one line without the URL, and the alert is tried again at the next check.
    """
    if not url:
        return 0
    try:
        return _notify(engine, url, timeout)
    except SQLAlchemyError as exc:
        log.warning("alerts not checked: state DB error: %s", describe(exc))
    except Exception as exc:  # see the docstring: an alert never stops a sync
        log.warning("alerts not sent (%s); will retry at the next check", type(exc).__name__)
    return 0


def _notify(engine: Engine, url: str, timeout: float) -> int:
    r, a = models.sync_runs.c, models.audiences.c
    with engine.connect() as conn:
        latest = conn.execute(
            select(r.id, r.audience_key, r.status, r.error, r.finished_at).where(
                r.id.in_(
                    select(func.max(r.id))
                    .where(
                        r.status.in_(list(STATE_OF_STATUS)),
                        r.audience_key != "*",
                        # A repair (verify --repair) says nothing of the audience's plans.
                        r.mode != "repair",
                    )
                    .group_by(r.audience_key)
                )
            )
        ).all()
        known = dict(conn.execute(select(a.key, a.alert_state)).all())
    sent = 0
    for run in latest:
        if run.audience_key not in known:
            continue
        previous = known[run.audience_key]
        state = alert_transition(previous, run.status)
        if state is None:
            continue
        message: dict[str, Any] = {
            "source": "audsync",
            "audience": run.audience_key,
            "state": state,
            "previous": previous or "ok",
            "event": "recovered" if state == "ok" else state,
            "run_id": run.id,
            "status": run.status,
            "error": run.error,
            "at": utcnow(),
        }
        try:
            httpx.post(url, json=jsonable(message), timeout=timeout).raise_for_status()
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            # The URL may hold a secret (Slack-style webhooks): name the error only.
            log.warning(
                "alert webhook failed (%s); will retry at the next check", type(exc).__name__
            )
            continue
        with engine.begin() as conn:
            manager.record_alert_state(conn, run.audience_key, state)
        sent += 1
    return sent


def drift_transition(over: bool, drift_rate: float, max_drift: float) -> str | None:
    """``drift`` when an audience's audited drift rate rises above ``max_drift``,
    ``drift_recovered`` when it falls back to it; None when nothing changes (one alert
    per change, like the others)."""
    now_over = drift_rate > max_drift
    if now_over == over:
        return None
    return "drift" if now_over else "drift_recovered"


def post(url: str | None, message: dict[str, Any], *, timeout: float = 10.0) -> bool:
    """Post one alert message; never raises (a failure is logged without the URL)."""
    if not url:
        return False
    try:
        httpx.post(url, json=jsonable(message), timeout=timeout).raise_for_status()
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        log.warning("alert webhook failed (%s); will retry at the next check", type(exc).__name__)
        return False
    return True
