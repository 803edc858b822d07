"""``audsync verify``'s decisions, without I/O: which users to read, whether what
Gleap holds is what the ledger says it holds, and how sure the measured drift is.

- :func:`reservoir_sample`: a uniform sample of the ledger's users in one pass
  and O(n) memory, however large the ledger.
- :func:`compare_user`: the drifts of one user, from the ledger's expectations
  and Gleap's answer (docs/design.md, "Verify").
- :func:`wilson`: the 95 % confidence interval of a drift rate (Wilson score),
  which stays inside [0, 1] and means something at 0 drifted of 400 and at
  small samples, unlike the normal approximation.
- :func:`summarise`: the per-audience and overall figures the command prints.
"""

from __future__ import annotations

import datetime as dt
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from audsync.defaults import DEFAULT_OUTAGE_PROBE, GLEAP_CONTACT_FIELDS

Z95 = 1.959963984540054
"""The standard normal quantile of a two-sided 95 % interval."""

ABSENT: Any = type("Absent", (), {"__repr__": lambda self: "(absent)"})()
"""What Gleap holds for an attribute its contact does not have."""

NO_CONTACT = "(no contact)"
"""Shown as Gleap's value when the contact itself is missing."""

VOLATILE_FIELDS = frozenset({"lastActivity", "lastPageView"})
"""Contact fields Gleap moves by itself (the user's own visits): never drift."""

KNOWN_FIELDS = GLEAP_CONTACT_FIELDS - {"userId"}


def reservoir_sample(items: Iterable[str], n: int, rng: random.Random) -> tuple[list[str], int]:
    """A uniform sample of ``n`` of ``items`` (all of them when there are at most ``n``),
    and how many items there were. Algorithm R: one pass, ``n`` kept in memory."""
    kept: list[str] = []
    seen = 0
    for item in items:
        seen += 1
        if len(kept) < n:
            kept.append(item)
            continue
        slot = rng.randrange(seen)
        if slot < n:
            kept[slot] = item
    return kept, seen


def wilson(drifted: int, checked: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``drifted / checked``; (0, 1) when nothing was checked."""
    if checked <= 0:
        return 0.0, 1.0
    p = drifted / checked
    denominator = 1 + z * z / checked
    centre = (p + z * z / (2 * checked)) / denominator
    half = z * math.sqrt(p * (1 - p) / checked + z * z / (4 * checked * checked)) / denominator
    # At 0 (or all) drifted the exact bound is 0 (or 1); rounding must not move it.
    low = 0.0 if drifted == 0 else max(0.0, centre - half)
    high = 1.0 if drifted == checked else min(1.0, centre + half)
    return low, high


def _instant(text: str) -> dt.datetime | None:
    """The moment an ISO 8601 timestamp with a time names (naive = UTC), or None."""
    if "T" not in text and " " not in text.strip():
        return None  # a date alone stays a string compared as a string
    try:
        moment = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def same_value(expected: Any, held: Any) -> bool:
    """Whether Gleap's ``held`` is the value audsync sent as ``expected``.

    Numbers compare by value (``1`` is ``1.0``) but never with booleans; a
    timestamp matches the same instant in another spelling (Gleap may answer
    ``+00:00`` for ``Z``); ``null`` matches an absent attribute (Gleap may drop
    a null); an object matches when every field sent is held alike.
    """
    if expected is None:
        return held is None or held is ABSENT
    if held is ABSENT or held is None:
        return False
    if isinstance(expected, bool) or isinstance(held, bool):
        return isinstance(expected, bool) and isinstance(held, bool) and expected == held
    if isinstance(expected, int | float) and isinstance(held, int | float):
        return float(expected) == float(held)
    if isinstance(expected, str) and isinstance(held, str):
        if expected == held:
            return True
        a, b = _instant(expected), _instant(held)
        return a is not None and b is not None and a == b
    if isinstance(expected, Mapping) and isinstance(held, Mapping):
        return all(same_value(v, held.get(k, ABSENT)) for k, v in expected.items())
    return bool(expected == held)


def held_fields(contact: Mapping[str, Any]) -> dict[str, Any]:
    """Gleap's answer as one flat view: custom attributes from ``customData`` and the
    known fields from the top level (no audience key can be named like one)."""
    custom = contact.get("customData")
    view: dict[str, Any] = dict(custom) if isinstance(custom, Mapping) else {}
    for name in KNOWN_FIELDS:
        if name in contact:
            view[name] = contact[name]
    return view


@dataclass(frozen=True)
class Expected:
    """What the ledger says Gleap holds for one user under one key."""

    key: str
    value: Any
    """The acknowledged value (parsed JSON)."""
    send_value: bool = True
    """False for a key that is never sent itself (``@contacts``): only its fields count."""
    contact: Mapping[str, Any] = field(default_factory=dict)
    """Contact fields acknowledged with this key's calls (the contact ledger), if kept."""
    pending: tuple[Any, ...] = ()
    """Values queued and maybe already applied by Gleap: a change in flight is no drift."""
    pending_contacts: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class Drift:
    """One difference between the ledger and Gleap."""

    user_id: str
    key: str
    field: str | None
    """None for the key's own value; a contact field's name otherwise."""
    ledger: Any
    gleap: Any
    """Gleap's value, :data:`ABSENT`, or :data:`NO_CONTACT`."""

    @property
    def missing(self) -> bool:
        """The contact itself is gone."""
        return self.gleap is NO_CONTACT


def compare_user(
    user_id: str, expected: Sequence[Expected], contact: Mapping[str, Any] | None
) -> list[Drift]:
    """Every drift of one user: ``contact`` is Gleap's answer, None when it has none
    (then every key the ledger holds has drifted)."""
    if contact is None:
        return [Drift(user_id, e.key, None, e.value, NO_CONTACT) for e in expected]
    held = held_fields(contact)
    drifts: list[Drift] = []
    for e in expected:
        if e.send_value:
            value = held.get(e.key, ABSENT)
            if not any(same_value(v, value) for v in (e.value, *e.pending)):
                drifts.append(Drift(user_id, e.key, None, e.value, value))
        for name, sent in e.contact.items():
            if name in VOLATILE_FIELDS or name == "userId":
                continue
            value = held.get(name, ABSENT)
            options = (sent, *(c[name] for c in e.pending_contacts if name in c))
            if not any(same_value(v, value) for v in options):
                drifts.append(Drift(user_id, e.key, name, sent, value))
    return drifts


def reads_look_misdirected(answered: int, missing: int) -> bool:
    """Every one of many reads answered 404: a wrong base_url, path or project far more
    likely than that many deleted contacts; the reads count as failed, not as drift."""
    return answered >= DEFAULT_OUTAGE_PROBE and missing == answered


@dataclass
class AudienceDrift:
    """One audience's (or trait's) figures."""

    key: str
    checked: int = 0
    drifted: int = 0
    missing: int = 0

    @property
    def drift_rate(self) -> float:
        """drifted / checked (0 when nothing was checked)."""
        return self.drifted / self.checked if self.checked else 0.0

    @property
    def ci95(self) -> tuple[float, float]:
        """The Wilson 95 % interval of the drift rate."""
        return wilson(self.drifted, self.checked)

    def as_dict(self) -> dict[str, Any]:
        """The figures as JSON-ready values."""
        low, high = self.ci95
        return {
            "checked": self.checked,
            "drifted": self.drifted,
            "missing": self.missing,
            "drift_rate": self.drift_rate,
            "ci95": [low, high],
        }


@dataclass
class Summary:
    """The figures of one verify."""

    checked: int = 0
    drifted: int = 0
    missing: int = 0
    by_audience: dict[str, AudienceDrift] = field(default_factory=dict)
    drifts: list[Drift] = field(default_factory=list)

    @property
    def drift_rate(self) -> float:
        """Distinct users with any drift over users checked."""
        return self.drifted / self.checked if self.checked else 0.0

    @property
    def ci95(self) -> tuple[float, float]:
        """The Wilson 95 % interval of the overall drift rate."""
        return wilson(self.drifted, self.checked)

    def worst(self, limit: int) -> list[Drift]:
        """Examples to show: missing contacts first (they drift on every key), then
        values, then contact fields; one per user and key."""
        ranked = sorted(
            self.drifts,
            key=lambda d: (not d.missing, d.field is not None, d.key, d.user_id, d.field or ""),
        )
        shown: list[Drift] = []
        seen: set[tuple[str, str]] = set()
        for drift in ranked:
            if (drift.user_id, drift.key) in seen:
                continue
            seen.add((drift.user_id, drift.key))
            shown.append(drift)
            if len(shown) >= limit:
                break
        return shown


def summarise(
    checked: Mapping[str, Sequence[Expected]],
    contacts: Mapping[str, Mapping[str, Any] | None],
    keys: Sequence[str],
) -> Summary:
    """Compare every user read (``contacts``: user -> answer, None = missing) with
    their expectations (``checked``: user -> what the ledger holds); ``keys`` orders
    the per-audience figures. Users not in ``contacts`` were not read: they are left out."""
    summary = Summary(by_audience={key: AudienceDrift(key) for key in keys})
    for user_id, contact in contacts.items():
        expected = checked.get(user_id, ())
        drifts = compare_user(user_id, expected, contact)
        summary.checked += 1
        summary.drifted += bool(drifts)
        summary.missing += contact is None
        summary.drifts.extend(drifts)
        drifted_keys = {d.key for d in drifts}
        for e in expected:
            figures = summary.by_audience.setdefault(e.key, AudienceDrift(e.key))
            figures.checked += 1
            figures.drifted += e.key in drifted_keys
            figures.missing += contact is None
    return summary
