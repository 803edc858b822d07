"""The Gleap client's pure decisions: Identify bodies, Retry-After, backoff."""

from __future__ import annotations

import email.utils

import pytest

from audsync.errors import PayloadError
from audsync.gleap import (
    backoff_delay,
    identify_bodies,
    parse_retry_after,
)
from audsync.source import INVALID_MARK


def test_identify_body_is_flat_with_contact_fields() -> None:
    bodies = identify_bodies(
        "u1",
        [("vip", True), ("revenue", 450)],
        [{"email": "bob@example.com", "name": "Bob Stone", "tier": "gold"}],
    )
    assert bodies == [
        {
            "email": "bob@example.com",
            "name": "Bob Stone",
            "userId": "u1",
            "tier": "gold",
            "vip": True,
            "revenue": 450,
        }
    ]


@pytest.mark.parametrize(("custom", "calls"), [(0, 1), (1, 1), (35, 1), (36, 2), (70, 2), (71, 3)])
def test_identify_splits_at_35_custom_keys(custom: int, calls: int) -> None:
    values = [(f"aud_{i}", True) for i in range(custom)]
    bodies = identify_bodies("u1", values, [{"email": "e@x.io"}])
    assert len(bodies) == calls
    sent = {}
    for body in bodies:
        assert body["userId"] == "u1" and body["email"] == "e@x.io"
        extra = {k: v for k, v in body.items() if k not in ("userId", "email")}
        assert len(extra) <= 35
        sent.update(extra)
    assert sent == dict(values)


def test_identify_refuses_unstorable_contact() -> None:
    with pytest.raises(PayloadError, match="tags"):
        identify_bodies("u1", [("vip", True)], [{INVALID_MARK: "column 'tags': a list"}])


def test_audience_value_wins_over_same_named_column() -> None:
    (body,) = identify_bodies("u1", [("vip", False)], [{"vip": "yes"}])
    assert body["vip"] is False


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        ("", None),
        ("7", 7.0),
        ("1.5", 1.5),
        ("-3", 0.0),
        ("soon", None),
        (email.utils.formatdate(1_000_030, usegmt=True), 30.0),
        (email.utils.formatdate(999_000, usegmt=True), 0.0),
    ],
)
def test_parse_retry_after(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header, now=1_000_000) == seconds


@pytest.mark.parametrize(
    ("attempt", "retry_after", "rand", "expected"),
    [
        (1, None, 1.0, 0.5),
        (2, None, 1.0, 1.0),
        (3, None, 0.5, 1.0),
        (10, None, 1.0, 30.0),  # capped
        (1, None, 0.0, 0.0),  # full jitter may retry at once
        (1, 12.0, 1.0, 12.0),  # Retry-After wins
        (1, 10_000.0, 1.0, 600.0),  # ... up to its own cap
    ],
)
def test_backoff_delay(
    attempt: int, retry_after: float | None, rand: float, expected: float
) -> None:
    assert backoff_delay(attempt, retry_after, rand=lambda: rand) == pytest.approx(expected)
