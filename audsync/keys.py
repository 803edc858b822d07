"""Audience and trait keys: derived from names, validated before anything runs."""

from __future__ import annotations

import re
from collections.abc import Iterable

import inflection

from audsync.defaults import GLEAP_CONTACT_FIELDS

KEY_PATTERN = re.compile(r"[a-z0-9_]+")


def derive_key(name: str) -> str:
    """The key Engage would use for ``name``: snake_cased, punctuation folded to ``_``.

    >>> derive_key("Order Completed Last 30 Days")
    'order_completed_last_30_days'
    """
    return inflection.parameterize(inflection.underscore(name), separator="_")


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot be used as a Gleap custom attribute, or None when it can."""
    if not key:
        return "is empty (give the audience a name with letters or digits, or set key)"
    if not KEY_PATTERN.fullmatch(key):
        return f"{key!r} must match [a-z0-9_]+"
    if key in GLEAP_CONTACT_FIELDS or key in {f.lower() for f in GLEAP_CONTACT_FIELDS}:
        return f"{key!r} collides with the Gleap contact field of that name"
    return None


def duplicate_keys(keys: Iterable[str]) -> list[str]:
    """Keys that appear more than once, in order of their second appearance."""
    seen: set[str] = set()
    dupes: list[str] = []
    for key in keys:
        if key in seen and key not in dupes:
            dupes.append(key)
        seen.add(key)
    return dupes
