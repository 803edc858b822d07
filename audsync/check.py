"""``audsync check``: is the config usable, the token accepted, every query runnable,
and what would the next sync send? Each step is a function of its own, so the command
prints each finding as it comes; :func:`check` runs them all into one :class:`Check`.

Nothing is written anywhere: the queries run read-only and the estimate is a dry run.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from audsync.config import Config, Definition
from audsync.errors import GleapError, SourceError, first_line
from audsync.pacing import budget_seconds
from audsync.source import StreamStats, open_source, stream_snapshot

COUNT_PROBE = "SELECT COUNT(*) FROM (\n{sql}\n) audsync_q"
"""How many rows a query returns, counted by the database (a subquery, so any
SELECT the config holds works unchanged)."""


@dataclass(frozen=True)
class QueryCheck:
    """One audience's or trait's query: its row count, or why it cannot run."""

    kind: str
    key: str
    rows: int | None
    problem: str | None
    """One line naming the audience; None when the query ran."""


@dataclass(frozen=True)
class PlanCalls:
    """What the next sync of one audience or trait would send."""

    kind_label: str
    key: str
    calls: int
    seconds: float
    """The calls alone at the configured budget."""
    held: str | None
    """Why the circuit breaker would hold the sync (nothing would be sent); else None."""


@dataclass(frozen=True)
class NextSync:
    """The dry run of the next sync: calls per audience and in all."""

    plans: tuple[PlanCalls, ...]
    calls: int
    """Identify calls in all: one per changed user, whatever their audiences."""
    seconds: float
    errors: tuple[str, ...]
    """Audiences whose plan failed, one line each."""
    queued_before: int = 0
    """Users whose changes earlier syncs already queued: counted in ``calls``, not in
    any plan's, since the next sync sends them whatever its plans find."""

    @property
    def held(self) -> tuple[PlanCalls, ...]:
        """The plans the circuit breaker would hold."""
        return tuple(p for p in self.plans if p.held)


@dataclass(frozen=True)
class Check:
    """Everything ``audsync check`` finds."""

    token_problem: str | None
    queries: tuple[QueryCheck, ...]
    next_sync: NextSync | None
    """None when the token or a query failed (the estimate would mean little)."""

    @property
    def ok(self) -> bool:
        """True when a ``sync`` now would run without an error or a held audience."""
        return self.next_sync is not None and not self.next_sync.errors and not self.next_sync.held


def check_token(config: Config) -> str | None:
    """Why Gleap does not accept the configured token (one line), or None when it does."""
    from audsync.sync import make_client

    try:
        with make_client(config, max_retries=1) as client:
            client.check_token()
    except GleapError as exc:
        return str(exc)
    return None


def check_queries(config: Config, source: Engine) -> Iterator[QueryCheck]:
    """Run each definition's query for its first row and its row count, in order."""
    for definition in config.definitions:
        yield check_query(config, source, definition)


def check_query(config: Config, source: Engine, definition: Definition) -> QueryCheck:
    """Stream the first row (the mapping and value checks of a real sync) and count the rows."""
    try:
        rows = stream_snapshot(source, definition, 1, StreamStats(), keys=config.key_kinds())
        next(iter(rows), None)
        with source.connect() as conn:
            count = conn.execute(text(COUNT_PROBE.format(sql=definition.sql))).scalar_one()
    except SourceError as exc:
        return QueryCheck(definition.kind, definition.key, None, str(exc))
    except SQLAlchemyError as exc:
        problem = f"{definition.kind} {definition.key!r}: query failed: {first_line(exc)}"
        return QueryCheck(definition.kind, definition.key, None, problem)
    return QueryCheck(definition.kind, definition.key, int(count), None)


def next_sync(config: Config) -> NextSync:
    """What the next sync would send, from a dry run (nothing is written or sent)."""
    from audsync.sync import run_sync

    outcome = run_sync(config, dry_run=True)
    g = config.gleap
    return NextSync(
        plans=tuple(
            PlanCalls(
                kind_label=p.kind_label,
                key=p.key,
                calls=p.queued,
                seconds=budget_seconds(p.queued, g.rate_limit, g.rate_window),
                held=p.held,
            )
            for p in outcome.plans
        ),
        calls=outcome.dry_run_calls,
        seconds=outcome.dry_run_seconds,
        errors=tuple(outcome.errors),
        queued_before=queued_before(config),
    )


def queued_before(config: Config) -> int:
    """Users with a change already queued in the state DB (0 when it does not exist yet)."""
    from audsync.deliver import pending_user_count
    from audsync.errors import StateError
    from audsync.state import open_for_reading

    try:
        state = open_for_reading(config)
    except StateError:
        return 0
    try:
        with state.connect() as conn:
            return pending_user_count(conn)
    finally:
        state.dispose()


def check(config: Config) -> Check:
    """Check the token and every query, then estimate the next sync when both pass.

    Raises SourceError, ConfigError or DriverMissing when the source database
    cannot be reached at all.
    """
    token_problem = check_token(config)
    source = open_source(config.require_source())
    try:
        queries = tuple(check_queries(config, source))
    finally:
        source.dispose()
    failed = token_problem is not None or any(q.problem for q in queries)
    return Check(token_problem, queries, None if failed else next_sync(config))
