"""Reading contacts back from Gleap's v3 API, for ``audsync verify``.

``GET /v3/sessions/by-user-id/{userId}`` with ``Authorization: Bearer <v3 API key>``
and ``project: <project id>`` (docs/gleap-contract.md, "Reading contacts back").
The requests go through :class:`~audsync.gleap.GleapClient` — the same transport,
deadline, retries and ``Retry-After`` handling as every call — but under a
:class:`~audsync.pacing.Pacer` of their own (``[gleap] read_rate_limit``), so a
verify never takes budget from delivery.

A read ends in one of three ways (:class:`ReadResult`): the contact, no contact
(404), or a failure (any other answer, or none), which is neither drift nor a
match: the caller reports it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from audsync import defaults
from audsync.errors import GleapAuthError, GleapUnavailable, Interrupted, one_line, redact
from audsync.gleap import REASON_CHARS, CallObserver, GleapClient
from audsync.pacing import Pacer

READ_PATH = "/v3/sessions/by-user-id/"
READ_ENDPOINT = "read"
"""The endpoint label of reads in metrics (``audsync_gleap_calls_total{endpoint="read"}``)."""


@dataclass(frozen=True)
class ReadResult:
    """What one read of a contact came back with."""

    user_id: str
    contact: dict[str, Any] | None = None
    """Gleap's answer (``userId``, the known fields, ``customData``), or None."""
    missing: bool = False
    """Gleap has no contact with this id (404)."""
    status: int | None = None
    error: str | None = None
    """Why the read failed (then neither ``contact`` nor ``missing`` is set)."""
    fatal: bool = False
    """The failure will be the same for every read (the key or project was refused)."""

    @property
    def ok(self) -> bool:
        """The read told us something: a contact, or that there is none."""
        return self.error is None


class GleapReader:
    """Reads contacts with the v3 API key and project id, paced under their own budget."""

    def __init__(
        self,
        base_url: str,
        token: str,
        project: str,
        *,
        rate_limit: int = defaults.DEFAULT_READ_RATE_LIMIT,
        rate_window: float = defaults.DEFAULT_RATE_WINDOW,
        timeout: float = defaults.DEFAULT_TIMEOUT,
        max_retries: int = defaults.DEFAULT_MAX_RETRIES,
        concurrency: int = defaults.DEFAULT_CONCURRENCY,
        transport: httpx.BaseTransport | None = None,
        observer: CallObserver | None = None,
    ) -> None:
        self._token = token
        self.client = GleapClient(
            base_url,
            token,
            rate_limit=rate_limit,
            rate_window=rate_window,
            timeout=timeout,
            max_retries=max_retries,
            concurrency=concurrency,
            transport=transport,
            pacer=Pacer(rate_limit, rate_window),
            observer=observer,
            auth_headers={"Authorization": f"Bearer {token}", "project": project},
        )

    def close(self) -> None:
        """Close the connection pool."""
        self.client.close()

    def __enter__(self) -> GleapReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, user_id: str, stop: Callable[[], bool] | None = None) -> ReadResult:
        """Read one contact. Never raises for Gleap's answers; Interrupted on ``stop``."""
        path = READ_PATH + quote(user_id, safe="")
        try:
            outcome = self.client.fetch(READ_ENDPOINT, path, stop=stop)
        except GleapAuthError as exc:
            return ReadResult(
                user_id,
                status=exc.status,
                error=f"Gleap refused the read key or project (HTTP {exc.status}):"
                " check gleap.read_token and gleap.project",
                fatal=True,
            )
        except GleapUnavailable as exc:
            return ReadResult(user_id, error=self._safe(str(exc)))
        except Interrupted:
            raise
        if outcome.ok:
            return parse_answer(user_id, outcome.body, outcome.status)
        if outcome.status == 404:
            return ReadResult(user_id, missing=True, status=404)
        return ReadResult(
            user_id, status=outcome.status, error=self._safe(outcome.reason or "rejected")
        )

    def _safe(self, text: str) -> str:
        return one_line(redact(text, self._token))[:REASON_CHARS]


def parse_answer(user_id: str, body: bytes, status: int | None = 200) -> ReadResult:
    """A 2xx answer as a :class:`ReadResult`: a contact object for this very user, or a
    failed read saying what came instead."""
    try:
        data = json.loads(body or b"null")
    except ValueError:
        return ReadResult(user_id, status=status, error=f"HTTP {status}: the answer is not JSON")
    if not isinstance(data, dict):
        return ReadResult(
            user_id, status=status, error=f"HTTP {status}: the answer is not a contact object"
        )
    answered = data.get("userId")
    if answered is not None and str(answered) != user_id:
        # Never compare another user's data with this user's ledger.
        return ReadResult(
            user_id, status=status, error=f"HTTP {status}: the answer is about another userId"
        )
    custom = data.get("customData")
    if custom is not None and not isinstance(custom, dict):
        return ReadResult(
            user_id, status=status, error=f"HTTP {status}: customData is not an object"
        )
    return ReadResult(user_id, contact=data, status=status)
