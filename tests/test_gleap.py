from __future__ import annotations

import email.utils
from typing import Any

import httpx
import pytest
from conftest import TOKEN

from audsync.errors import GleapAuthError, GleapUnavailable
from audsync.gleap import (
    GleapClient,
    PayloadError,
    backoff_delay,
    identify_bodies,
    parse_retry_after,
)
from audsync.sandbox import Sandbox
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


def client_for(server: Sandbox, token: str = TOKEN, **kwargs: Any) -> GleapClient:
    kwargs.setdefault("rate_limit", 0)
    return GleapClient(server.url, token, sleep=lambda s: None, **kwargs)


def test_identify_reaches_sandbox_with_contract(gleap: Sandbox) -> None:
    with client_for(gleap) as client:
        client.check_token()
        outcome = client.identify({"userId": "u1", "vip": True, "email": "a@b.c"})
    assert outcome.ok
    call = gleap.calls("/admin/identify")[0]
    assert call["body"] == {"userId": "u1", "vip": True, "email": "a@b.c"}
    assert gleap.stats.missing_prevent_flag == 0
    assert gleap.contact("u1") == {"userId": "u1", "vip": True, "email": "a@b.c"}


def test_wrong_token_raises_auth_error_without_the_token(gleap: Sandbox) -> None:
    with (
        client_for(gleap, token="wrong-secret-xyz") as client,
        pytest.raises(GleapAuthError) as err,
    ):
        client.identify({"userId": "u1"})
    assert "Gleap rejected the API token" in str(err.value)
    assert "wrong-secret-xyz" not in str(err.value)


def test_rejected_body_is_an_outcome_not_an_exception(gleap: Sandbox) -> None:
    with client_for(gleap) as client:
        outcome = client.identify({"userId": "u1", "nested": {"a": 1}})
    assert not outcome.ok and outcome.status == 400
    assert outcome.reason and "nested" in outcome.reason


def test_server_errors_are_retried_then_give_up(gleap: Sandbox) -> None:
    gleap.fail_ratio = 1.0
    with client_for(gleap, max_retries=2) as client, pytest.raises(GleapUnavailable) as err:
        client.identify({"userId": "u1"})
    assert len(gleap.calls("/admin/identify")) == 3
    assert TOKEN not in str(err.value)


def test_server_errors_then_success(gleap: Sandbox) -> None:
    gleap.fail_ratio = 0.5
    with client_for(gleap, max_retries=30) as client:
        for i in range(20):
            assert client.identify({"userId": f"u{i}"}).ok
    assert len(gleap.contacts()) == 20
    assert gleap.stats.injected_errors > 0


def test_429_is_waited_out_not_failed() -> None:
    # The client believes in 50 calls/s; the server allows 5 per second: 429s
    # must slow it down (Retry-After) without failing a single call.
    with (
        Sandbox(TOKEN, rate_limit=5, rate_window=1.0) as server,
        GleapClient(server.url, TOKEN, rate_limit=50, rate_window=1.0, max_retries=0) as client,
    ):
        for i in range(12):
            assert client.identify({"userId": f"u{i}"}).ok
    assert server.stats.throttled >= 1
    assert client.stats.throttled == server.stats.throttled
    assert client.pacer.rate_factor < 1.0
    assert len(server.contacts()) == 12


def test_network_error_is_retried_and_redacted() -> None:
    client = GleapClient(
        "http://127.0.0.1:9", TOKEN, rate_limit=0, max_retries=1, sleep=lambda s: None, timeout=1
    )
    with pytest.raises(GleapUnavailable) as err:
        client.identify({"userId": "u1"})
    assert "ConnectError" in str(err.value)
    assert TOKEN not in str(err.value)


def test_transport_seam() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={})

    client = GleapClient(
        "https://api.gleap.io", "tkn", rate_limit=0, transport=httpx.MockTransport(handler)
    )
    assert client.identify({"userId": "u1"}).ok
    (request,) = seen
    assert request.url == "https://api.gleap.io/admin/identify?preventLastActivityUpdate=true"
    assert request.headers["Api-Token"] == "tkn"
    assert request.headers["Content-Type"] == "application/json"
