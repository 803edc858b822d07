"""The Gleap client against the sandbox: the contract, auth errors, rejections, retries."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from audsync.errors import GleapAuthError, GleapUnavailable
from audsync.gleap import GleapClient
from audsync.sandbox import Sandbox
from tests.helpers import TOKEN


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
