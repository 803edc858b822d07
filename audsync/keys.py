"""Audience and trait keys: derived from names, validated before anything runs.

A key is what Gleap stores, so the rule that derives it must never lose a
letter (``Straße`` -> ``strasse``, not ``strae``) and must never change a key
that is already in a ledger: :func:`choose_key` keeps the key the earlier rule
(:func:`legacy_key`) derived when that one holds ledger rows.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection, Iterable

import inflection
from anyascii import anyascii

from audsync.defaults import GLEAP_CONTACT_FIELDS
from audsync.errors import NoLatinForm

KEY_PATTERN = re.compile(r"[a-z0-9_]+")


def _ascii_fold(char: str) -> str:
    """What the earlier rule kept of ``char``: its compatibility decomposition's ASCII."""
    return unicodedata.normalize("NFKD", char).encode("ascii", "ignore").decode("ascii")


def _is_latin_letter(char: str) -> bool:
    return char.isalpha() and "LATIN" in unicodedata.name(char, "")


def foreign_letters(name: str) -> str:
    """The letters of ``name`` that have no Latin form (``'日本'`` in ``'日本 Users'``)."""
    return "".join(
        c
        for c in name
        if c.isalpha() and not c.isascii() and not _ascii_fold(c) and not _is_latin_letter(c)
    )


def _transliterate(text: str) -> str:
    # Characters the earlier rule folded (é -> e) fold the same way, so no
    # existing key changes; only Latin letters it dropped (ß, æ, œ, ø, ł, þ ...)
    # are spelled out now. Anything else that is not a letter is dropped as before.
    out = []
    for char in text:
        if char.isascii():
            out.append(char)
        elif folded := _ascii_fold(char):
            out.append(folded)
        elif _is_latin_letter(char):
            out.append(anyascii(char))
    return "".join(out)


def derive_key(name: str) -> str:
    """The key Engage would use for ``name``: snake_cased, punctuation folded to ``_``,
    Latin letters spelled in ASCII (``Straße`` -> ``strasse``, ``Œuvre`` -> ``oeuvre``).

    Letters with no Latin form are left out here; :func:`choose_key` refuses
    such a name instead of deriving a key from what is left of it.

    >>> derive_key("Order Completed Last 30 Days")
    'order_completed_last_30_days'
    """
    return inflection.parameterize(_transliterate(inflection.underscore(name)), separator="_")


def legacy_key(name: str) -> str:
    """The key audsync derived for ``name`` before Latin letters were transliterated
    (it dropped ``ß``, ``Œ``, ``Ø``, ``Ł``, ``Æ`` and every non-Latin letter)."""
    return inflection.parameterize(inflection.underscore(name), separator="_")


def needs_ledger(name: str) -> bool:
    """Whether the key of ``name`` depends on what the ledger holds (:func:`choose_key`)."""
    return bool(foreign_letters(name)) or legacy_key(name) != derive_key(name)


def choose_key(name: str, stored: Collection[str] = ()) -> tuple[str, str | None]:
    """The key for a definition named ``name`` without an explicit ``key``, and a note
    when it is not the one the current rule derives.

    ``stored`` holds the keys (among :func:`derive_key` and :func:`legacy_key` of
    ``name``) that have ledger rows. A key in a ledger never changes: when the
    earlier rule's key is stored it is kept, or that audience would be
    orphaned in Gleap. Raises NoLatinForm for a name with letters that have no
    Latin form and no stored key.
    """
    new, old = derive_key(name), legacy_key(name)
    foreign = foreign_letters(name)
    # The old key wins even when the new one is stored too: once kept, this
    # definition never writes the new key, so rows under it belong to another
    # definition (an explicit key = "strasse_kunden") and switching to it would
    # both orphan this audience and clash with that one.
    if old and old in stored and (old != new or foreign):
        return old, (
            f"{name!r} keeps its key {old!r}, which Gleap already holds"
            + (f" (the name now derives {new!r})" if new != old else "")
            + f'; set key = "{old}" to say so and silence this'
        )
    if not foreign:
        return new, None
    raise NoLatinForm(
        f"{name!r} has letters with no Latin form ({foreign!r}): set key to the"
        " attribute name Gleap should use ([a-z0-9_]+)"
    )


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
