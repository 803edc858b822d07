"""Telling an outage from bad users: pure decisions about a drain's rejections.

A server that rejects every call — a wrong ``base_url`` answering 301, an API
change answering 400, a proxy answering 413 — looks, call by call, like users
Gleap refuses. These functions decide from what a drain saw which it was, so
the deliverer can stop without blaming anyone (see :mod:`audsync.deliver` and
:mod:`audsync.events`).
"""

from __future__ import annotations

from collections.abc import Mapping

from audsync.defaults import DEFAULT_OUTAGE_PROBE


def misrouted(status: int | None) -> bool:
    """A status saying the call never reached Gleap's endpoint (a redirect, no such route)."""
    return status is not None and (300 <= status < 400 or status in (404, 405))


def outage_verdict(
    fresh: Mapping[str, int | None],
    known: Mapping[str, int | None],
    acked: bool,
    *,
    finished: bool,
    probe: int = DEFAULT_OUTAGE_PROBE,
    minimum: int | None = None,
) -> bool:
    """True when a drain's rejections mean Gleap rejects every call, not that the users are bad.

    ``fresh``/``known``: the distinct users (or events) rejected so far, each with
    its HTTP status; ``known`` ones were rejected before, in a drain where Gleap
    acknowledged others, so a repeat says nothing about Gleap. Nothing is an
    outage once anything was acknowledged. ``probe`` fresh rejections in a row
    are one. When the drain ended (``finished``) with fewer, it is one only if
    every answer was a redirect or "no such route" — otherwise a few bad users
    alone in a small drain would never be counted and never parked — or, with
    ``minimum``, if at least that many were rejected.
    """
    if acked or not (fresh or known):
        return False
    if len(fresh) >= probe:
        return True
    if not finished:
        return False
    if minimum is not None and len(fresh) + len(known) >= minimum:
        return True
    return all(misrouted(status) for status in (*fresh.values(), *known.values()))


def outage_message(
    what: str, rejected: Mapping[str, int | None], reason: str | None, method: str, path: str
) -> str:
    """The one line an outage is reported with: statuses and path, never the token."""
    counts: dict[int | None, int] = {}
    for status in rejected.values():
        counts[status] = counts.get(status, 0) + 1
    statuses = ", ".join(
        f"HTTP {status} x{n}" for status, n in sorted(counts.items(), key=lambda kv: -kv[1])
    )
    return (
        f"Gleap rejected {len(rejected)} {what} in a row and acknowledged none of them"
        f" ({statuses}) at {method} {path}: {reason or 'rejected'}"
        + ("" if reason and "gleap.base_url" in reason else "; check gleap.base_url")
    )
