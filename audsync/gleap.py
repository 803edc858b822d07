"""The Gleap client: request bodies, auth, pacing and retries. The only module that speaks HTTP.

Bodies are built by pure functions (:func:`identify_bodies`); :class:`GleapClient`
sends them with the ``Api-Token`` header under a shared :class:`~audsync.pacing.Pacer`,
retrying 429/5xx/network errors with backoff that honours ``Retry-After``.
``timeout`` bounds each attempt as a whole — connecting, sending and reading the
entire answer — and a stop request abandons an attempt still in flight after
:data:`~audsync.defaults.DEFAULT_STOP_GRACE` seconds (see :class:`_Exchange`).
Pass ``transport=`` (any httpx transport) to test without a network.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import email.utils
import json
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import quote

import httpx

from audsync import defaults
from audsync.contact import INVALID_MARK
from audsync.errors import (
    CallAbandoned,
    GleapAuthError,
    GleapUnavailable,
    Interrupted,
    PayloadError,
    UnstorableValue,
    one_line,
    redact,
)
from audsync.pacing import Pacer
from audsync.values import timestamp

TRACK_PATH = "/admin/track"
CONTACTS_PATH = "/admin/contacts/"
MAX_EVENT_DATA_KEYS = 10
"""Gleap keeps at most ten metadata keys per event."""
MAX_EVENTS_PER_CALL = 100
"""Events per Track call: many per request saves the shared budget for Identify."""
IDENTIFY_PATH = "/admin/identify"
IDENTIFY_PARAMS = {"preventLastActivityUpdate": "true"}
AUTH_PATH = "/admin/auth"
REASON_CHARS = 500
"""Characters of Gleap's error text kept in a failure's reason (after redaction)."""

_STANDARD_FIELDS = defaults.GLEAP_CONTACT_FIELDS


def identify_bodies(
    user_id: str,
    values: Sequence[tuple[str, Any]],
    contacts: Sequence[dict[str, Any]] = (),
    max_custom_keys: int = defaults.MAX_CUSTOM_KEYS_PER_CALL,
) -> list[dict[str, Any]]:
    """The Identify Contact bodies that carry ``values`` (key, value) for one user.

    Contact fields from ``contacts`` ride along; custom attributes are split so
    no body holds more than ``max_custom_keys`` of them. Raises PayloadError
    when a contact holds a value Gleap cannot store.
    """
    standard: dict[str, Any] = {}
    custom: dict[str, Any] = {}
    for contact in contacts:
        if INVALID_MARK in contact:
            raise PayloadError(str(contact[INVALID_MARK]))
        for field, value in contact.items():
            target = standard if field in _STANDARD_FIELDS else custom
            target.setdefault(field, value)
    for key, value in values:
        custom[key] = value  # the audience's own value wins over a same-named column
    items = list(custom.items())
    bodies = []
    for start in range(0, max(len(items), 1), max_custom_keys):
        body: dict[str, Any] = {**standard, "userId": user_id}
        body.update(items[start : start + max_custom_keys])
        bodies.append(body)
    return bodies


def event_name(name: str) -> str:
    """Gleap's event name: periods and dollar signs become hyphens; case is kept."""
    return name.replace(".", "-").replace("$", "-")


def track_event(
    name: str, user_id: str | None, date: Any, data: dict[str, Any] | None = None
) -> tuple[dict[str, Any], int]:
    """One Track event per docs/gleap-contract.md, and how many data keys were dropped.

    Raises PayloadError without a name, a user id or a usable date.
    """
    if not name or not name.strip():
        raise PayloadError("an event needs a name")
    if user_id is None or not str(user_id).strip():
        raise PayloadError(f"event {name!r} has no userId")
    date_only = isinstance(date, dt.date) and not isinstance(date, dt.datetime)
    if isinstance(date, str):
        date_only = "T" not in date and " " not in date.strip()
    try:
        iso = None if date_only else timestamp(date)
    except UnstorableValue:
        iso = None
    if iso is None:
        raise PayloadError(f"event {name!r} needs a date with a time, got {date!r}")
    event: dict[str, Any] = {"name": event_name(name), "userId": str(user_id), "date": iso}
    dropped = 0
    if data:
        kept = dict(list(data.items())[:MAX_EVENT_DATA_KEYS])
        dropped = len(data) - len(kept)
        event["data"] = kept
    return event, dropped


def track_bodies(
    events: Sequence[dict[str, Any]], per_call: int = MAX_EVENTS_PER_CALL
) -> list[dict[str, Any]]:
    """``{"events": [...]}`` bodies of at most ``per_call`` events each."""
    return [
        {"events": list(events[start : start + per_call])}
        for start in range(0, len(events), per_call)
    ]


def parse_retry_after(header: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or HTTP date), or None."""
    if not header:
        return None
    header = header.strip()
    try:
        return max(0.0, float(header))  # seconds
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def backoff_delay(
    attempt: int,
    retry_after: float | None,
    *,
    base: float = defaults.DEFAULT_BACKOFF_BASE,
    cap: float = defaults.DEFAULT_BACKOFF_CAP,
    retry_after_cap: float = defaults.DEFAULT_RETRY_AFTER_CAP,
    rand: Callable[[], float] = random.random,
) -> float:
    """How long to wait before retry number ``attempt`` (1-based).

    Retry-After wins when the server gave one; otherwise exponential backoff
    with full jitter, so many workers do not retry in lockstep.
    """
    if retry_after is not None:
        return min(retry_after, retry_after_cap)
    return float(rand() * min(cap, base * (2 ** (attempt - 1))))


@dataclass
class CallOutcome:
    """What Gleap finally said about one call."""

    ok: bool
    status: int | None = None
    reason: str | None = None
    retries: int = 0
    body: bytes = b""
    """The answer's body on a 2xx (what a read came for)."""


Outcome = Literal["ok", "rejected", "auth_failed", "throttled", "server_error", "network_error"]
"""How one HTTP attempt ended, as counted in :class:`ClientStats` and by a :class:`CallObserver`."""


class CallObserver(Protocol):
    """Told about every HTTP attempt and every retry (``audsync run --metrics-port``)."""

    def call(self, endpoint: str, outcome: Outcome) -> None:
        """One attempt at ``endpoint`` (identify, track, delete_contact, auth, read) ended so."""

    def retry(self, endpoint: str) -> None:
        """A failed attempt at ``endpoint`` is tried again after a back-off."""


@dataclass
class ClientStats:
    """Counters of one client's life, for summaries and metrics."""

    calls: int = 0
    ok: int = 0
    rejected: int = 0
    throttled: int = 0
    retries: int = 0
    server_errors: int = 0
    network_errors: int = 0
    attempts: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)
    """HTTP attempts by (endpoint, outcome): what summaries count calls from."""


_STATS_FIELD: dict[str, str] = {
    "ok": "ok",
    "rejected": "rejected",
    "throttled": "throttled",
    "server_error": "server_errors",
    "network_error": "network_errors",
}


EXCHANGE_POLL = 0.1
"""Seconds between looks at the deadline and the stop request while an answer is awaited."""


class _Exchange:
    """One HTTP request and its whole answer, on a daemon thread its caller can walk away from.

    httpx's ``timeout`` bounds each read, so a server trickling a byte every few
    seconds keeps a plain call alive indefinitely, and a blocked read cannot be
    interrupted from another thread. Run here, the caller waits with a deadline
    of its own; the reader stops between chunks once abandoned, and a read that
    hears nothing ends at httpx's per-read timeout. Being a daemon thread, an
    abandoned reader never holds up the process's exit.
    """

    def __init__(self, http: httpx.Client, request: httpx.Request) -> None:
        self.request = request
        self.done = threading.Event()
        self._http = http
        self._abandoned = threading.Event()
        self._response: httpx.Response | None = None
        self._error: BaseException | None = None
        threading.Thread(target=self._run, name="audsync-http", daemon=True).start()

    def abandon(self) -> None:
        """Tell the reader to drop the answer at its next chunk and close the connection."""
        self._abandoned.set()

    def result(self) -> httpx.Response:
        """The complete answer (call after ``done``); raises what the exchange raised."""
        if self._error is not None:
            raise self._error
        assert self._response is not None
        return self._response

    def _run(self) -> None:
        try:
            response = self._http.send(self.request, stream=True)
            try:
                body = bytearray()
                for chunk in response.iter_bytes():
                    if self._abandoned.is_set():
                        return  # nobody waits for it any more
                    body += chunk
            finally:
                response.close()
            # A plain, fully read response; the body is decoded already.
            headers = response.headers.copy()
            headers.pop("Content-Encoding", None)
            self._response = httpx.Response(
                response.status_code,
                headers=headers,
                content=bytes(body),
                request=self.request,
                extensions={
                    k: v
                    for k, v in response.extensions.items()
                    if k in ("http_version", "reason_phrase")
                },
            )
        except BaseException as exc:  # handed to the caller, who decides
            self._error = exc
        finally:
            self.done.set()


class GleapClient:
    """Send calls to Gleap's admin API under a shared budget, with retries."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        rate_limit: int = defaults.DEFAULT_RATE_LIMIT,
        rate_window: float = defaults.DEFAULT_RATE_WINDOW,
        timeout: float = defaults.DEFAULT_TIMEOUT,
        max_retries: int = defaults.DEFAULT_MAX_RETRIES,
        concurrency: int = defaults.DEFAULT_CONCURRENCY,
        transport: httpx.BaseTransport | None = None,
        pacer: Pacer | None = None,
        sleep: Callable[[float], None] = time.sleep,
        observer: CallObserver | None = None,
        auth_headers: dict[str, str] | None = None,
    ) -> None:
        # ``auth_headers`` replaces the admin API's Api-Token header: Gleap's v3 read
        # API takes a Bearer key and a project id instead (audsync.gleap_read).
        self._token = token
        self.timeout = timeout
        self.observer = observer
        self.max_retries = max_retries
        self.pacer = pacer or Pacer(rate_limit, rate_window)
        self.stats = ClientStats()
        self._stats_lock = threading.Lock()
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={
                **(auth_headers if auth_headers is not None else {"Api-Token": token}),
                "Content-Type": "application/json",
            },
            timeout=timeout,
            transport=transport,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )

    def attempts(self) -> dict[tuple[str, str], int]:
        """A copy of the attempts so far by (endpoint, outcome), taken consistently."""
        with self._stats_lock:
            return dict(self.stats.attempts)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> GleapClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def host(self) -> str:
        """base_url's host and port, for messages: where calls go, without credentials."""
        url = self._http.base_url
        default = {"http": 80, "https": 443}.get(url.scheme)
        return url.host if url.port in (None, default) else f"{url.host}:{url.port}"

    def request_path(self, path: str) -> str:
        """The URL path a call to ``path`` goes to (base_url's own path included), for
        messages: it names where the calls went without the host's secrets or the token."""
        return self._http.base_url.path.rstrip("/") + path

    def check_token(self) -> None:
        """GET /admin/auth: raise GleapAuthError on 401/403, GleapUnavailable if unreachable."""
        outcome = self._send("auth", "GET", AUTH_PATH, None, paced=False)
        if not outcome.ok:
            raise GleapUnavailable(
                f"Gleap answered {outcome.status} to the token check: {outcome.reason}"
            )

    def identify(
        self,
        body: dict[str, Any],
        stop: Callable[[], bool] | None = None,
        skip: Callable[[], bool] | None = None,
    ) -> CallOutcome:
        """POST one Identify Contact body. Raises GleapAuthError / GleapUnavailable."""
        return self._send(
            "identify", "POST", IDENTIFY_PATH, body, params=IDENTIFY_PARAMS, stop=stop, skip=skip
        )

    def track(self, body: dict[str, Any], stop: Callable[[], bool] | None = None) -> CallOutcome:
        """POST one Track body (up to 100 events) under the same budget as Identify."""
        return self._send("track", "POST", TRACK_PATH, body, stop=stop)

    def fetch(
        self, endpoint: str, path: str, stop: Callable[[], bool] | None = None
    ) -> CallOutcome:
        """GET ``path`` under this client's budget and retries; a 2xx answer's body is
        in ``body``. Raises GleapAuthError / GleapUnavailable like every call."""
        return self._send(endpoint, "GET", path, None, stop=stop)

    def delete_contact(self, user_id: str) -> CallOutcome:
        """DELETE one contact; a 404 (Gleap has no such contact) counts as done, with
        ``status`` 404 so the caller can tell "not found" from "deleted"."""
        outcome = self._send(
            "delete_contact", "DELETE", CONTACTS_PATH + quote(user_id, safe=""), None, paced=False
        )
        if not outcome.ok and outcome.status == 404:
            return CallOutcome(ok=True, status=404, retries=outcome.retries)
        return outcome

    def _record(self, endpoint: str, outcome: Outcome) -> None:
        # Sender threads record at once: without the lock an increment can be lost,
        # and the summary's counts must equal what Gleap saw.
        with self._stats_lock:
            self.stats.calls += 1
            name = _STATS_FIELD.get(outcome)
            if name is not None:
                setattr(self.stats, name, getattr(self.stats, name) + 1)
            key = (endpoint, outcome)
            self.stats.attempts[key] = self.stats.attempts.get(key, 0) + 1
        if self.observer is not None:
            self.observer.call(endpoint, outcome)

    def _send(
        self,
        endpoint: str,
        method: str,
        path: str,
        body: Any,
        *,
        params: dict[str, str] | None = None,
        paced: bool = True,
        stop: Callable[[], bool] | None = None,
        skip: Callable[[], bool] | None = None,
    ) -> CallOutcome:
        # ``stop`` also abandons an attempt in flight (after a grace); ``skip`` only
        # keeps the next attempt from starting: a call about a user being
        # forgotten must end on its own, never be walked away from.
        between = stop
        if skip is not None:
            between = (lambda: stop() or skip()) if stop is not None else skip
        content = json.dumps(body, separators=(",", ":")).encode() if body is not None else None
        last_problem = "no attempt made"
        failures = throttles = 0
        while True:
            if paced and not self.pacer.acquire(between):
                raise Interrupted("stopped while waiting for the rate budget")
            retry_after: float | None = None
            try:
                response = self._exchange(method, path, params, content, stop)
            except httpx.TransportError as exc:
                self._record(endpoint, "network_error")
                last_problem = self._network_problem(exc)
            else:
                status = response.status_code
                if 200 <= status < 300:
                    self._record(endpoint, "ok")
                    self.pacer.succeeded()
                    return CallOutcome(
                        ok=True,
                        status=status,
                        retries=failures + throttles,
                        body=response.content,
                    )
                if status in (401, 403):
                    self._record(endpoint, "auth_failed")
                    raise GleapAuthError(status)
                if 300 <= status < 400:
                    # Never followed (httpx does not by default) and never a success:
                    # Gleap's API does not redirect, so a 3xx means base_url points
                    # somewhere else (http:// for https://, a wrong path, a proxy).
                    self._record(endpoint, "rejected")
                    # Redacted before it is cut, like every text from the server.
                    location = one_line(
                        redact(response.headers.get("Location") or "nowhere", self._token)
                    )
                    return CallOutcome(
                        ok=False,
                        status=status,
                        reason=f"HTTP {status}: redirect to {location[:200]} (not followed;"
                        " check gleap.base_url)",
                        retries=failures + throttles,
                    )
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                if status == 429:
                    # Gleap asking us to wait is never a failure and uses up no
                    # retry; only an endless storm ends the call.
                    self._record(endpoint, "throttled")
                    throttles += 1
                    wait = min(
                        retry_after if retry_after is not None else 1.0,
                        defaults.DEFAULT_RETRY_AFTER_CAP,
                    )
                    self.pacer.throttle(wait)
                    if throttles <= defaults.DEFAULT_MAX_THROTTLES:
                        if not paced:
                            self._sleep_for(wait, between)
                        continue
                    last_problem = f"{throttles} answers of HTTP 429 in a row"
                    break
                if status < 500:
                    self._record(endpoint, "rejected")
                    return CallOutcome(
                        ok=False,
                        status=status,
                        reason=self._reason(response),
                        retries=failures + throttles,
                    )
                self._record(endpoint, "server_error")
                last_problem = f"HTTP {status}"
            failures += 1
            if failures > self.max_retries:
                break
            self.stats.retries += 1
            if self.observer is not None:
                self.observer.retry(endpoint)
            self._sleep_for(backoff_delay(failures, retry_after), between)
        # failures + throttles counts every attempt made (the first one too), not
        # the retries; the host says where they went (never the token, nor any
        # user:password a base_url might hold).
        raise GleapUnavailable(
            f"Gleap did not accept {method} {path} at {self.host} after"
            f" {failures + throttles} attempts (last: {last_problem})"
        )

    def _exchange(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None,
        content: bytes | None,
        stop: Callable[[], bool] | None,
    ) -> httpx.Response:
        """One attempt, answered in full within ``timeout`` seconds in all.

        Raises httpx.ReadTimeout past the deadline (a network error, retried
        like one) and Interrupted when ``stop`` has asked for DEFAULT_STOP_GRACE
        seconds while the answer is still coming: a shutdown lets a call in
        flight finish, but never waits long for it. The change stays queued.
        """
        request = self._http.build_request(method, path, params=params, content=content)
        exchange = _Exchange(self._http, request)
        deadline = time.monotonic() + self.timeout
        stop_asked: float | None = None
        while not exchange.done.wait(EXCHANGE_POLL):
            now = time.monotonic()
            if now >= deadline:
                exchange.abandon()
                raise httpx.ReadTimeout(
                    f"no complete answer within {self.timeout:g}s", request=request
                )
            if stop is not None and stop():
                stop_asked = now if stop_asked is None else stop_asked
                if now - stop_asked >= defaults.DEFAULT_STOP_GRACE:
                    exchange.abandon()
                    raise CallAbandoned("stopped while a call was in flight; it stays queued")
        return exchange.result()

    def _sleep_for(self, seconds: float, stop: Callable[[], bool] | None) -> None:
        # Slept in short steps so a shutdown request is noticed within 0.25 s.
        remaining = seconds
        while remaining > 0:
            if stop is not None and stop():
                raise Interrupted("stopped while backing off")
            step = min(remaining, 0.25)
            self._sleep(step)
            remaining -= step

    def _reason(self, response: httpx.Response) -> str:
        # Redact before cutting: a token echoed across the cut would leave its
        # first half behind. One line, since it lands in logs and tables.
        text = response.text.strip() or response.reason_phrase
        try:
            data = response.json()
            if isinstance(data, dict):
                text = str(data.get("error") or data.get("message") or text)
        except ValueError:
            pass
        text = one_line(redact(text, self._token))
        return f"HTTP {response.status_code}: {text[:REASON_CHARS]}"

    def _network_problem(self, exc: httpx.TransportError) -> str:
        # A protocol error quotes what it could not send, headers included (an
        # API token with a stray control character was printed escaped as
        # 'tok\\r'): only its type is told. Other network errors say what the
        # socket said ("Connection refused"), redacted and on one line.
        name = type(exc).__name__
        if isinstance(exc, httpx.ProtocolError | httpx.UnsupportedProtocol | httpx.ProxyError):
            return name
        text = one_line(redact(str(exc), self._token))[:REASON_CHARS]
        return f"{name}: {text}" if text else name
