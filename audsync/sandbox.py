"""A local Gleap-compatible server for the demo, the tests and trying a config safely.

It enforces the contract of docs/gleap-contract.md: the ``Api-Token`` header, the
shapes of Identify / Track bodies (400 with a reason otherwise), a fixed-window
rate limit shared by identify and track (429 with ``Retry-After``), and can
inject 5xx answers and latency. Contacts live in SQLite (in memory by default).
The v3 read endpoint (``GET /v3/sessions/by-user-id/{userId}``) answers with
``Authorization: Bearer <read_token>`` and ``project: <project>``, as a contact
with its custom attributes under ``customData``.

    with Sandbox(token="t", rate_limit=1000, rate_window=60) as gleap:
        ...  # point base_url at gleap.url
        gleap.contacts()  # {"u1": {"userId": "u1", "vip": true, ...}}

Drifting a contact behind audsync's back, as Gleap's UI or another integration
would (from a test, or with curl against ``audsync sandbox``)::

    DELETE /_sandbox/contacts/{userId}                    the contact is gone
    PATCH  /_sandbox/contacts/{userId}  {"vip": false}    attributes edited
    DELETE /_sandbox/contacts/{userId}/attributes/{name}  one attribute removed
"""

from __future__ import annotations

import datetime as dt
import json
import math
import random
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

MAX_CUSTOM_KEYS = 35

Answer = tuple[int, dict[str, str], Any]
"""(status, extra headers, JSON body) of one sandbox answer."""

Fault = Callable[[str, str, Any], "Answer | None"]
"""(method, path, parsed JSON body or None) -> an answer to send instead, or None."""
STRING_FIELDS = ("name", "email", "phone", "companyName", "companyId", "lang", "plan")
TIME_FIELDS = ("createdAt", "lastActivity")
KNOWN_FIELDS = {"userId", "value", "lastPageView", *STRING_FIELDS, *TIME_FIELDS}
READ_PREFIX = "/v3/sessions/by-user-id/"
SANDBOX_CONTACTS = "/_sandbox/contacts/"


@dataclass
class SandboxStats:
    """Counts by outcome, readable while the server runs."""

    requests: int = 0
    identify_ok: int = 0
    track_ok: int = 0
    rejected: int = 0
    unauthorized: int = 0
    throttled: int = 0
    injected_errors: int = 0
    deleted: int = 0
    reads: int = 0
    tampered: int = 0
    missing_prevent_flag: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    answered: dict[tuple[str, int], int] = field(default_factory=dict)
    """Answers by (route, status), route ``identify``, ``track``, ``delete``, ``auth`` or
    ``read``: counted before the answer is sent, so a client that has its answer is counted."""

    def count(self, route: str, ok: bool | None = None) -> int:
        """Answers on ``route``: all, only 2xx (``ok``) or only the others (not ``ok``)."""
        return sum(
            n
            for (r, status), n in list(self.answered.items())
            if r == route and (ok is None or (200 <= status < 300) == ok)
        )


class Sandbox:
    """A Gleap-compatible HTTP server on 127.0.0.1 running in a background thread."""

    def __init__(
        self,
        token: str = "sandbox-token",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        rate_limit: int = 0,
        rate_window: float = 60.0,
        fail_ratio: float = 0.0,
        latency: float = 0.0,
        seed: int | None = None,
        db_path: str = ":memory:",
        reject_users: set[str] | None = None,
        read_token: str = "sandbox-read-token",
        project: str = "sandbox-project",
    ) -> None:
        self.token = token
        self.read_token = read_token
        """The v3 API key reads must carry as ``Authorization: Bearer``."""
        self.project = project
        """The project id reads must carry in the ``project`` header."""
        self.rate_limit = rate_limit
        self.rate_window = rate_window
        self.fail_ratio = fail_ratio
        self.latency = latency
        self.reject_users = set(reject_users or ())
        self.on_identify: Callable[[dict[str, Any]], None] | None = None
        """Called with each valid Identify body before it is stored (for tests)."""
        self.fault: Fault | None = None
        """Asked first about every authorised Identify, Track, delete and read request
        (for tests): an answer it returns is sent instead of the contract's; it may
        block to hold a call in flight."""
        self.trickle: float = 0.0
        """Seconds between the bytes of each admin answer's body: a server that
        keeps a connection alive without ever finishing."""
        self.stats = SandboxStats()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self._db.executescript(
            "PRAGMA journal_mode=WAL;"
            "CREATE TABLE IF NOT EXISTS contacts (user_id TEXT PRIMARY KEY, data TEXT NOT NULL);"
            "CREATE TABLE IF NOT EXISTS calls (id INTEGER PRIMARY KEY, at REAL, method TEXT,"
            " path TEXT, status INTEGER, user_id TEXT, body TEXT, query TEXT, headers TEXT);"
            "CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, user_id TEXT,"
            " name TEXT, date TEXT, data TEXT);"
        )
        self._window_index = -1
        self._window_count = 0
        self._epoch = time.monotonic()
        handler = _make_handler(self)
        self._server = _QuietServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL to put in ``[gleap] base_url``."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Sandbox:
        """Serve in a background thread."""
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="gleap-sandbox",
            daemon=True,
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted."""
        self._server.serve_forever()

    def stop(self) -> None:
        """Stop serving and close the store."""
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what Gleap now believes ------------------------------------------------

    def contacts(self) -> dict[str, dict[str, Any]]:
        """Every contact as Gleap stores it."""
        with self._lock:
            rows = self._db.execute("SELECT user_id, data FROM contacts").fetchall()
        return {user_id: json.loads(data) for user_id, data in rows}

    def contact(self, user_id: str) -> dict[str, Any] | None:
        """One contact, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT data FROM contacts WHERE user_id = ?", (user_id,)
            ).fetchone()
        return json.loads(row[0]) if row else None

    def session(self, user_id: str) -> dict[str, Any] | None:
        """The contact as the v3 read endpoint answers it, or None."""
        contact = self.contact(user_id)
        return None if contact is None else session_view(contact)

    # -- drifting a contact behind audsync's back ---------------------------------

    def drop_contact(self, user_id: str) -> bool:
        """Delete a contact, as someone in Gleap's UI would; True when it existed."""
        with self._lock:
            gone = self._db.execute("DELETE FROM contacts WHERE user_id = ?", (user_id,))
            self.stats.tampered += gone.rowcount
        return gone.rowcount > 0

    def edit_contact(self, user_id: str, fields: dict[str, Any]) -> bool:
        """Set attributes of a contact (a null is stored as null); True when it existed."""
        return self._rewrite(user_id, lambda contact: contact.update(fields))

    def drop_attribute(self, user_id: str, name: str) -> bool:
        """Remove one attribute of a contact; True when the contact existed."""
        return self._rewrite(user_id, lambda contact: contact.pop(name, None))

    def _rewrite(self, user_id: str, change: Callable[[dict[str, Any]], Any]) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT data FROM contacts WHERE user_id = ?", (user_id,)
            ).fetchone()
            if row is None:
                return False
            contact = json.loads(row[0])
            change(contact)
            contact["userId"] = user_id
            self._db.execute(
                "UPDATE contacts SET data = ? WHERE user_id = ?", (json.dumps(contact), user_id)
            )
            self.stats.tampered += 1
        return True

    def calls(self, path_prefix: str = "/admin/") -> list[dict[str, Any]]:
        """Requests received, oldest first (method, path, status, user_id, body, and the
        raw query string and headers, names lower-cased, as sent)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT at, method, path, status, user_id, body, query, headers FROM calls"
                " WHERE path LIKE ? ORDER BY id",
                (path_prefix + "%",),
            ).fetchall()
        return [
            {
                "at": at,
                "method": m,
                "path": p,
                "status": s,
                "user_id": u,
                "body": json.loads(b) if b else None,
                "query": q or "",
                "headers": json.loads(h) if h else {},
            }
            for at, m, p, s, u, b, q, h in rows
        ]

    def events(self) -> list[dict[str, Any]]:
        """Tracked events, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT user_id, name, date, data FROM events ORDER BY id")
            return [
                {"userId": u, "name": n, "date": d, "data": json.loads(x) if x else None}
                for u, n, d, x in rows.fetchall()
            ]

    def reset_calls(self) -> None:
        """Forget the request log (contacts stay)."""
        with self._lock:
            self._db.execute("DELETE FROM calls")

    # -- the contract -------------------------------------------------------------

    def _admit(self) -> tuple[int, dict[str, str], Any] | None:
        """Rate limit and fault injection shared by identify and track."""
        if self.latency:
            time.sleep(self.latency * (0.5 + self._rng.random()))
        with self._lock:
            if self.rate_limit > 0:
                now = time.monotonic() - self._epoch
                index = math.floor(now / self.rate_window)
                if index != self._window_index:
                    self._window_index, self._window_count = index, 0
                if self._window_count >= self.rate_limit:
                    self.stats.throttled += 1
                    retry = max(1, math.ceil((index + 1) * self.rate_window - now))
                    return 429, {"Retry-After": str(retry)}, {"error": "Too many requests"}
                self._window_count += 1
            if self.fail_ratio and self._rng.random() < self.fail_ratio:
                self.stats.injected_errors += 1
                return self._rng.choice((500, 502, 503)), {}, {"error": "injected failure"}
        return None

    def handle(
        self, method: str, raw_path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], Any]:
        """Answer one request: (status, extra headers, JSON body)."""
        answer = self._answer(method, raw_path, headers, body)
        route = _route(method, urlsplit(raw_path).path)
        if route is not None:
            with self._lock:
                key = (route, answer[0])
                self.stats.answered[key] = self.stats.answered.get(key, 0) + 1
        return answer

    def _answer(
        self, method: str, raw_path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], Any]:
        parts = urlsplit(raw_path)
        path = parts.path
        query = parse_qs(parts.query)
        self.stats.requests += 1
        if path.startswith("/_sandbox/"):
            return self._control(method, path, body)
        if path.startswith(READ_PREFIX):
            return self._read(method, path, headers)
        if headers.get("api-token") != self.token:
            self.stats.unauthorized += 1
            return 401, {}, {"error": "Unauthorized"}
        if method == "GET" and path == "/admin/auth":
            return 200, {}, {"ok": True}
        if self.fault is not None:
            try:
                parsed = json.loads(body) if body else None
            except ValueError:
                parsed = None
            answer = self.fault(method, path, parsed)
            if answer is not None:
                return answer
        if method == "DELETE" and path.startswith("/admin/contacts/"):
            user_id = unquote(path[len("/admin/contacts/") :])
            with self._lock:
                gone = self._db.execute("DELETE FROM contacts WHERE user_id = ?", (user_id,))
                if gone.rowcount == 0:
                    return 404, {}, {"error": "contact not found"}
                self.stats.deleted += 1
            return 200, {}, {"deleted": user_id}
        if method == "POST" and path in ("/admin/identify", "/admin/track"):
            if headers.get("content-type", "").split(";")[0].strip() != "application/json":
                return 415, {}, {"error": "Content-Type must be application/json"}
            denied = self._admit()
            if denied:
                return denied
            try:
                data = json.loads(body or b"null")
            except ValueError:
                self.stats.rejected += 1
                return 400, {}, {"error": "body is not JSON"}
            if path == "/admin/identify":
                prevent = query.get("preventLastActivityUpdate", [""])[0] == "true"
                return self._identify(data, prevent)
            return self._track(data)
        return 404, {}, {"error": f"no route {method} {path}"}

    def _read(self, method: str, path: str, headers: dict[str, str]) -> Answer:
        # The v3 API takes its own key as a Bearer token (never the admin Api-Token)
        # and names the project in a header of its own.
        if headers.get("authorization") != f"Bearer {self.read_token}":
            self.stats.unauthorized += 1
            return 401, {}, {"error": "Unauthorized"}
        if headers.get("project") != self.project:
            self.stats.unauthorized += 1
            return 403, {}, {"error": "No access to this project"}
        if method != "GET":
            return 404, {}, {"error": f"no route {method} {path}"}
        if self.fault is not None:
            answer = self.fault(method, path, None)
            if answer is not None:
                return answer
        user_id = unquote(path[len(READ_PREFIX) :])
        with self._lock:
            self.stats.reads += 1
        session = self.session(user_id)
        if session is None:
            return 404, {}, {"error": "Session not found"}
        return 200, {}, session

    def _identify(self, data: Any, prevent: bool) -> tuple[int, dict[str, str], Any]:
        problem = identify_problem(data)
        if problem is None and data["userId"] in self.reject_users:
            problem = "contact rejected by the sandbox (reject_users)"
        if problem:
            self.stats.rejected += 1
            return 400, {}, {"error": problem}
        user_id = data["userId"]
        if self.on_identify is not None:
            self.on_identify(data)
        with self._lock:
            row = self._db.execute(
                "SELECT data FROM contacts WHERE user_id = ?", (user_id,)
            ).fetchone()
            contact = json.loads(row[0]) if row else {}
            contact.update(data)
            if not prevent:
                self.stats.missing_prevent_flag += 1
                contact["lastActivity"] = dt.datetime.now(dt.UTC).isoformat()
            self._db.execute(
                "INSERT INTO contacts (user_id, data) VALUES (?, ?) ON CONFLICT(user_id)"
                " DO UPDATE SET data = excluded.data",
                (user_id, json.dumps(contact)),
            )
            self.stats.identify_ok += 1
        return 200, {}, {"success": True}

    def _track(self, data: Any) -> tuple[int, dict[str, str], Any]:
        problem = track_problem(data)
        if problem:
            self.stats.rejected += 1
            return 400, {}, {"error": problem}
        with self._lock:
            self._db.executemany(
                "INSERT INTO events (user_id, name, date, data) VALUES (?, ?, ?, ?)",
                [
                    # Gleap keeps the first ten metadata keys and ignores the rest.
                    (
                        e["userId"],
                        e["name"],
                        e["date"],
                        json.dumps(dict(list(e["data"].items())[:10])) if "data" in e else None,
                    )
                    for e in data["events"]
                ],
            )
            self.stats.track_ok += 1
        return 200, {}, {"success": True}

    def _control(self, method: str, path: str, body: bytes = b"") -> Answer:
        if method == "GET" and path == "/_sandbox/contacts":
            return 200, {}, self.contacts()
        if method == "GET" and path == "/_sandbox/stats":
            return 200, {}, self.stats.__dict__
        if path.startswith(SANDBOX_CONTACTS):
            user_id, _, rest = path[len(SANDBOX_CONTACTS) :].partition("/attributes/")
            user_id = unquote(user_id)
            if method == "DELETE" and rest:
                done = self.drop_attribute(user_id, unquote(rest))
            elif method == "DELETE" and "/attributes/" not in path:
                done = self.drop_contact(user_id)
            elif method == "PATCH" and not rest:
                try:
                    fields = json.loads(body or b"null")
                except ValueError:
                    fields = None
                if not isinstance(fields, dict):
                    return 400, {}, {"error": "body must be a JSON object of attributes"}
                done = self.edit_contact(user_id, fields)
            else:
                return 404, {}, {"error": "unknown sandbox route"}
            if not done:
                return 404, {}, {"error": f"no contact {user_id!r}"}
            return 200, {}, {"ok": True}
        return 404, {}, {"error": "unknown sandbox route"}

    def log(
        self,
        method: str,
        path: str,
        status: int,
        body: bytes,
        query: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        user_id = None
        text = body.decode("utf-8", "replace") if body else None
        if path.startswith(READ_PREFIX):
            user_id = unquote(path[len(READ_PREFIX) :])
        elif text and path.startswith("/admin/identify"):
            try:
                parsed = json.loads(text)
                user_id = parsed.get("userId") if isinstance(parsed, dict) else None
            except ValueError:
                pass
        with self._lock:
            self.stats.by_status[status] = self.stats.by_status.get(status, 0) + 1
            self._db.execute(
                "INSERT INTO calls (at, method, path, status, user_id, body, query, headers)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    time.time(),
                    method,
                    path,
                    status,
                    user_id,
                    text,
                    query,
                    json.dumps(headers or {}),
                ),
            )


def _route(method: str, path: str) -> str | None:
    if path == "/admin/identify" and method == "POST":
        return "identify"
    if path == "/admin/track" and method == "POST":
        return "track"
    if path.startswith("/admin/contacts/") and method == "DELETE":
        return "delete"
    if path == "/admin/auth":
        return "auth"
    if path.startswith(READ_PREFIX) and method == "GET":
        return "read"
    return None


def session_view(contact: dict[str, Any]) -> dict[str, Any]:
    """A stored contact as Gleap's v3 API answers it: the known fields at the top
    level, every custom attribute under ``customData``."""
    view: dict[str, Any] = {"userId": contact.get("userId")}
    custom: dict[str, Any] = {}
    for name, value in contact.items():
        if name in KNOWN_FIELDS:
            view[name] = value
        else:
            custom[name] = value
    view["customData"] = custom
    return view


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_iso(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def identify_problem(data: Any) -> str | None:
    """Why Gleap would reject this Identify body, or None when it is acceptable."""
    if not isinstance(data, dict):
        return "body must be a JSON object"
    user_id = data.get("userId")
    if not isinstance(user_id, str) or not user_id:
        return "userId is required and must be a non-empty string"
    custom = 0
    for key, value in data.items():
        if key in STRING_FIELDS and value is not None and not isinstance(value, str):
            return f"{key} must be a string"
        if key in TIME_FIELDS and value is not None and not _is_iso(value):
            return f"{key} must be an ISO 8601 date"
        if key == "value" and value is not None and not _is_number(value):
            return "value must be a number"
        if key == "lastPageView":
            if not isinstance(value, dict) or not isinstance(value.get("page"), str):
                return "lastPageView must be {page, date}"
            if "date" in value and not _is_iso(value["date"]):
                return "lastPageView.date must be an ISO 8601 date"
        if key not in KNOWN_FIELDS:
            custom += 1
            if value is not None and not isinstance(value, str | int | float | bool):
                return f"custom attribute {key} must be a string, number or boolean"
    if custom > MAX_CUSTOM_KEYS:
        return f"at most {MAX_CUSTOM_KEYS} custom attributes per call ({custom} sent)"
    return None


def track_problem(data: Any) -> str | None:
    """Why Gleap would reject this Track body, or None when it is acceptable."""
    if not isinstance(data, dict) or not isinstance(data.get("events"), list):
        return 'body must be {"events": [...]}'
    for i, event in enumerate(data["events"]):
        if not isinstance(event, dict):
            return f"events[{i}] must be an object"
        if not isinstance(event.get("name"), str) or not event["name"]:
            return f"events[{i}].name is required"
        if not isinstance(event.get("userId"), str) or not event["userId"]:
            return f"events[{i}].userId is required"
        if not _is_iso(event.get("date")):
            return f"events[{i}].date must be an ISO 8601 date"
        if "data" in event and not isinstance(event["data"], dict):
            return f"events[{i}].data must be an object"
    return None


class _QuietServer(ThreadingHTTPServer):
    """A client that hangs up mid-answer is the client's business: no
    traceback on the server's stderr (it would land in the CLI's output)."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


def _make_handler(sandbox: Sandbox) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out as two writes; with Nagle's algorithm and
        # delayed ACKs each keep-alive request then stalls ~40 ms.
        disable_nagle_algorithm = True

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, extra, payload = sandbox.handle(self.command, self.path, headers, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in extra.items():
                self.send_header(name, value)
            # Logged before the answer goes out: a client that holds its
            # answer (a test reading calls() right after) always finds it.
            if not self.path.startswith("/_sandbox/"):
                parts = urlsplit(self.path)
                sandbox.log(self.command, parts.path, status, body, parts.query, headers)
            try:
                self.end_headers()
                if sandbox.trickle and not self.path.startswith("/_sandbox/"):
                    for i in range(len(data)):
                        self.wfile.write(data[i : i + 1])
                        self.wfile.flush()
                        time.sleep(sandbox.trickle)
                else:
                    self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up, as it may

        do_GET = do_POST = do_DELETE = do_PATCH = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: the calls table is the log

    return Handler
