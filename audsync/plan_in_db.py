"""In-database planning: load a query's result into the state DB with one INSERT ... SELECT.

When the audience query and audsync's state live in the same PostgreSQL
database, no row needs to leave it: the query runs inside one ``INSERT ...
SELECT`` into the snapshot (or, for a first plan, the outbox), with the ids
normalised, the trait values rendered and the contact JSON built in SQL.

What is written must be exactly what the streaming path
(:func:`audsync.source.stream_snapshot`) writes for the same rows: the same
ids, values, contacts, skipped/invalid/duplicate counts. So the SQL is built
per query from its columns' types, and only for the types whose Python
rendering it reproduces exactly; a column of any other type, a value only
Python renders (a float beyond the range where PostgreSQL's and Python's
shortest forms agree, a value Gleap cannot store, whose reason is Python's
text), or any error of the statement, rolls the attempt back to its
savepoint and the caller streams instead — said in one log line.

The duplicate rule is the streaming path's, which has two steps: rows are read
in the text order of their raw id, a row whose normalised id repeats the one
right before it is dropped (the first of a run wins, even a trait row whose
value is null), and a later row whose id was already loaded is dropped by ON
CONFLICT (``42`` then ``42-1`` then ``42.0``).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import SQLAlchemyError

from audsync import models
from audsync.config import Definition
from audsync.contact import (
    NAME_PARTS,
    RECOGNISED_COLUMNS,
    STRING_FIELDS,
    map_columns,
)
from audsync.defaults import MAX_USER_ID_LENGTH
from audsync.errors import CannotExpress, ColumnProblem, Interrupted, SourceError, first_line
from audsync.source import StreamStats, cancel_on_stop, text_order
from audsync.values import ID_HAS_CONTROL, ID_TOO_LONG, dumps

log = logging.getLogger("audsync.plan")

# Python's str.strip() removes exactly the characters str.isspace() accepts: an id
# of only these is no id (values.normalize_user_id), and name parts are stripped of them.
_PY_WHITESPACE = "".join(chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace())
_WS = "||".join(f"chr({ord(c)})" for c in _PY_WHITESPACE)
# values._UNUSABLE_ID_CHAR without NUL (PostgreSQL text cannot hold one) and
# surrogates (nor those): the C0 and C1 controls, as a PostgreSQL regex.
_CONTROL_RE = r"'[\x01-\x1f\x7f-\x9f]'"

# PostgreSQL type OIDs -> the kinds of value this module renders exactly.
_KINDS = {
    20: "int", 21: "int", 23: "int",
    25: "text", 1043: "text",
    16: "bool",
    1700: "numeric",
    700: "float", 701: "float",
    1114: "timestamp", 1184: "timestamptz",
    1082: "date",
    2950: "uuid",
}

# Where PostgreSQL's shortest float text (extra_float_digits >= 1) is Python's
# repr: plain notation on both sides. Outside it the exponent forms differ.
_FLOAT_PLAIN = "(abs({x}) >= 1e-4 AND abs({x}) < 1e15)"
_ISO = """'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'"""


WORK_MEM = "256MB"
"""PostgreSQL's work_mem for the load's statement: its sort of a few million ids
stays in memory (a sort or tuplestore takes only what it needs)."""


@dataclass(frozen=True)
class Rendered:
    """A column value as SQL text (NULL when absent) and when it is one only Python renders."""

    sql: str
    bad: str | None = None


def _or(*conditions: str | None) -> str | None:
    present = [c for c in conditions if c]
    return " OR ".join(f"({c})" for c in present) if present else None


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _years_ok(x: str) -> str:
    # Python's datetime holds years 1..9999 and strftime pads only from 1000 on.
    return f"NOT (isfinite({x}) AND extract(year FROM {x}) BETWEEN 1000 AND 9999)"


def _float_json(x: str) -> Rendered:
    """Python's json.dumps of the float ``x`` (already float8)."""
    return Rendered(
        f"({x})::text",
        f"({x}) = trunc({x}) OR NOT {_FLOAT_PLAIN.format(x=x)} OR ({x}) = 'NaN'::float8",
    )


def attribute_json(x: str, kind: str) -> Rendered:
    """``dumps(values.attribute(v))`` of column ``x`` (NULL when ``v`` is null)."""
    if kind == "int":
        return Rendered(f"({x})::text")
    if kind == "text":
        return Rendered(f"to_json({x})::text")
    if kind == "bool":
        return Rendered(f"CASE WHEN {x} THEN 'true' WHEN NOT {x} THEN 'false' END")
    if kind == "numeric":
        # Integral: an int. Otherwise float(Decimal): Python's repr of the nearest double.
        f = f"({x})::float8"
        nonint = _float_json(f)
        return Rendered(
            f"CASE WHEN {x} = trunc({x}) THEN trunc({x})::text ELSE {nonint.sql} END",
            f"{x} IN ('NaN', 'Infinity', '-Infinity')"
            f" OR ({x} <> trunc({x}) AND ({nonint.bad}))",
        )
    if kind == "float":
        f = f"({x})::float8"
        # Integral and below 2**53: an int; otherwise Python's repr of the float.
        return Rendered(
            f"CASE WHEN {f} = trunc({f}) AND abs({f}) < 9007199254740992"
            f" THEN trunc({f})::int8::text ELSE {f}::text END",
            f"{f} IN ('NaN', 'Infinity', '-Infinity') OR ({f} = trunc({f})"
            f" AND abs({f}) >= 9007199254740992) OR ({f} <> trunc({f})"
            f" AND NOT {_FLOAT_PLAIN.format(x=f)})",
        )
    text = attribute_text(x, kind)
    return Rendered(f"'\"' || {text.sql} || '\"'", text.bad)


def attribute_text(x: str, kind: str) -> Rendered:
    """``str(values.attribute(v))`` — contact.as_text — of column ``x`` (NULL when null)."""
    if kind == "text":
        return Rendered(x)
    if kind in ("int", "numeric", "float"):
        return attribute_json(x, kind)
    if kind == "bool":
        return Rendered(f"CASE WHEN {x} THEN 'True' WHEN NOT {x} THEN 'False' END")
    if kind == "uuid":
        return Rendered(f"({x})::text")
    if kind == "date":
        return Rendered(f"to_char({x}, 'YYYY-MM-DD')", _years_ok(x))
    return _iso(x, kind)


def _iso(x: str, kind: str) -> Rendered:
    """values.iso_utc of a timestamp/timestamptz/date column."""
    if kind == "timestamptz":
        utc = f"({x} AT TIME ZONE 'UTC')"
    elif kind == "date":
        utc = f"({x})::timestamp"
    elif kind == "timestamp":
        utc = f"({x})"
    else:
        raise CannotExpress(kind)
    return Rendered(f"to_char({utc}, {_ISO})", _years_ok(utc))


def timestamp_text(x: str, kind: str) -> Rendered:
    """values.timestamp of column ``x``: points in time and Unix seconds/milliseconds."""
    if kind in ("timestamp", "timestamptz", "date"):
        return _iso(x, kind)
    if kind == "int":
        # Milliseconds when too large for seconds. Built from whole days, seconds
        # and milliseconds, so the interval arithmetic is exact at any size.
        ms = f"abs({x}) > 100000000000"
        secs = f"(CASE WHEN {ms} THEN ({x}) / 1000 ELSE ({x}) END)"
        at = (
            f"(timestamp '1970-01-01' + ({secs} / 86400) * interval '1 day'"
            f" + ({secs} % 86400) * interval '1 second'"
            f" + (CASE WHEN {ms} THEN ({x}) % 1000 ELSE 0 END) * interval '1 millisecond')"
        )
        # Python divides milliseconds by 1000 in a float and rounds to microseconds:
        # exact to the millisecond only below ~4e12 (year 2096).
        return Rendered(
            f"to_char({at}, {_ISO})",
            f"{x} IS NOT NULL AND (abs({x}) >= 4000000000000 OR {_years_ok(at)})",
        )
    raise CannotExpress(kind)


def _guard(x: str, rendered: Rendered) -> str | None:
    """The bad condition, only for rows where the column has a value."""
    return f"{x} IS NOT NULL AND ({rendered.bad})" if rendered.bad else None


def _nonempty(sql: str) -> str:
    return f"NULLIF({sql}, '')"


def contact_sql(columns: Mapping[str, tuple[str, str]]) -> Rendered:
    """audsync.contact.build_contact, as SQL building its ``dumps`` (NULL when empty).

    ``columns`` maps each contact column's name (as contact.column_name gives it)
    to (SQL reference, kind). Raises CannotExpress for a kind it cannot render.
    """
    fields: dict[str, str] = {}  # Gleap key -> SQL of its JSON value, NULL when left out
    bad: list[str | None] = []

    def text_of(column: str) -> str | None:
        if column not in columns:
            return None
        x, kind = columns[column]
        rendered = attribute_text(x, kind)
        bad.append(_guard(x, rendered))
        return rendered.sql

    by_field: dict[str, list[str]] = {}
    for column, field_name in STRING_FIELDS.items():
        found = text_of(column)
        if found is not None:
            by_field.setdefault(field_name, []).append(_nonempty(found))
    for field_name, options in by_field.items():
        # lang, then language: the first with text (build_contact's "not in contact").
        fields[field_name] = f"to_json(COALESCE({', '.join(options)}))::text"

    parts = [p for p in (text_of(c) for c in NAME_PARTS) if p is not None]
    joined = (
        _nonempty(
            "concat_ws(' ', "
            + ", ".join(_nonempty(f"btrim({p}, {_WS})") for p in parts)
            + ")"
        )
        if parts
        else None
    )
    name = text_of("name")
    if name is not None:
        given = f"CASE WHEN {columns['name'][0]} IS NOT NULL THEN {_nonempty(name)} END"
        fields["name"] = f"to_json(COALESCE({given}, {joined or 'NULL'}))::text"
    elif joined is not None:
        fields["name"] = f"to_json({joined})::text"

    if "user_value" in columns:
        x, kind = columns["user_value"]
        if kind not in ("int", "numeric", "float"):
            raise CannotExpress(f"user_value of type {kind}")
        number = attribute_json(x, kind)
        bad.append(_guard(x, number))
        fields["value"] = number.sql

    activity: str | None = None
    for column, field_name in (("signed_up_at", "createdAt"), ("last_seen_at", "lastActivity")):
        if column in columns:
            x, kind = columns[column]
            at = timestamp_text(x, kind)
            bad.append(_guard(x, at))
            fields[field_name] = f"'\"' || {at.sql} || '\"'"
            if field_name == "lastActivity":
                activity = at.sql
    page = text_of("last_page_view")
    if page is not None:
        date = f"'\"date\":\"' || {activity} || '\",'" if activity else "NULL"
        fields["lastPageView"] = (
            f"CASE WHEN {_nonempty(page)} IS NOT NULL THEN '{{' || COALESCE({date}, '')"
            f" || '\"page\":' || to_json({page})::text || '}}' END"
        )

    for column, (x, kind) in columns.items():
        if column in RECOGNISED_COLUMNS:
            continue
        value = attribute_json(x, kind)
        bad.append(_guard(x, value))
        fields[column] = f"COALESCE({value.sql}, 'null')"

    if not fields:
        return Rendered("NULL")
    members = ", ".join(
        f"{_literal(dumps(k) + ':')} || {fields[k]}" for k in sorted(fields)
    )
    return Rendered(f"NULLIF('{{' || concat_ws(',', {members}) || '}}', '{{}}')", _or(*bad))


def user_id_sql(x: str, kind: str) -> Rendered:
    """values.normalize_user_id of column ``x``: text, or NULL for a row without an id."""
    if kind == "int":
        return Rendered(f"({x})::text")
    if kind == "text":
        return Rendered(f"CASE WHEN btrim({x}, {_WS}) <> '' THEN {x} END")
    if kind == "uuid":
        return Rendered(f"({x})::text")
    if kind == "bool":
        return Rendered("NULL::text")
    if kind == "numeric":
        # Python: str(int(d)) when integral, else str(d.normalize()) — plain
        # notation from 1e-6 up and within 28 digits (the decimal context).
        plain = f"trim_scale({x})::text"
        return Rendered(
            f"CASE WHEN {x} IN ('NaN', 'Infinity', '-Infinity') THEN NULL"
            f" WHEN {x} = trunc({x}) THEN trunc({x})::text ELSE {plain} END",
            f"{x} <> trunc({x}) AND {x} NOT IN ('NaN', 'Infinity', '-Infinity')"
            f" AND (abs({x}) < 0.000001 OR length({plain}) > 28)",
        )
    if kind == "float":
        f = f"({x})::float8"
        return Rendered(
            f"CASE WHEN {f} IN ('NaN', 'Infinity', '-Infinity') THEN NULL"
            f" WHEN {f} = trunc({f}) AND abs({f}) < 9.2e18 THEN trunc({f})::int8::text"
            f" ELSE {f}::text END",
            f"{f} NOT IN ('NaN', 'Infinity', '-Infinity') AND ("
            f"({f} = trunc({f}) AND abs({f}) >= 9.2e18)"
            f" OR ({f} <> trunc({f}) AND NOT {_FLOAT_PLAIN.format(x=f)}))",
        )
    raise CannotExpress(f"user_id of type {kind}")


@dataclass(frozen=True)
class Target:
    """Where the rows go: a table and its columns after ``(audience_key, user_id, value,
    contact)`` with their constant SQL literals (plan.LoadTarget's shape)."""

    table: str
    key: str
    extra: tuple[tuple[str, str], ...] = ()


def build_statement(
    sql: str, definition: Definition, names: list[str], kinds: list[str | None],
    keys: Mapping[str, str] | None, table: str, target: Target,
) -> str:
    """The one statement that loads ``target`` and returns the stream's counters.

    ``names`` are the query's raw column names, ``kinds`` their kinds (None when
    this module cannot render the type). Raises ColumnProblem as the streaming
    path does, CannotExpress when a column cannot be rendered exactly.
    """
    column_map = map_columns(names, definition.kind, definition.key, keys)

    def ref(i: int) -> tuple[str, str]:
        kind = kinds[i]
        if kind is None:
            raise CannotExpress(f"column {names[i]!r} has a type audsync renders only in Python")
        return f"audsync_q.{_quote(names[i])}", kind

    uid_kind = ref(column_map.user_id_at)[1]
    uid = user_id_sql(*ref(column_map.user_id_at))
    if definition.kind == "trait":
        value = attribute_json(*ref(column_map.value_at))
        value_sql = value.sql
        value_bad = _guard(ref(column_map.value_at)[0], value)
    else:
        value_sql, value_bad = "'true'", None
    contact = contact_sql({name: ref(i) for i, name in column_map.contact_at})
    uid_ref = ref(column_map.user_id_at)[0]
    order = text_order("postgresql").replace("user_id", uid_ref)
    # Contact problems only matter for rows a trait keeps (a null value leaves first).
    contact_bad = f"({value_sql}) IS NOT NULL AND ({contact.bad})" if contact.bad else None
    row_bad = _or(value_bad, contact_bad)
    extra_cols = "".join(f", {c}" for c, _ in target.extra)
    extra_vals = "".join(f", {v}" for _, v in target.extra)
    # Ids of other kinds are their own text: equal ids sit side by side in the
    # text order and the head rule alone collapses them. Numbers are not (42 and
    # 42.0 are one id, and other ids may sort between their texts): a repeat
    # that is not adjacent is dropped by ON CONFLICT, the first in text order
    # winning, as the streaming path drops its stragglers.
    repeats = uid_kind in ("numeric", "float")
    on_conflict = " ON CONFLICT DO NOTHING" if repeats else ""
    return f"""
WITH w AS (
  SELECT n, v, c, t, cls, id_bad, row_bad,
         cls = 0 AND n IS DISTINCT FROM lag(n) OVER (PARTITION BY cls = 0 ORDER BY t) AS head
  FROM (
    SELECT t, n, v, c, id_bad, row_bad,
           CASE WHEN n IS NULL THEN 1 WHEN length(n) > {MAX_USER_ID_LENGTH} THEN 2
                WHEN n ~ {_CONTROL_RE} THEN 3 ELSE 0 END AS cls
    FROM (
      SELECT {order} AS t, {uid.sql} AS n, {_or(uid.bad) or 'false'} AS id_bad,
             {value_sql} AS v, {contact.sql} AS c, {row_bad or 'false'} AS row_bad
      FROM (
{sql}
      ) audsync_q
    ) audsync_src
  ) audsync_classed
),
ins AS (
  INSERT INTO {table} (audience_key, user_id, value, contact{extra_cols})
  SELECT {_literal(target.key)}, n, v, c{extra_vals} FROM w WHERE head AND v IS NOT NULL
  {on_conflict}
  RETURNING 1
)
SELECT COUNT(*),
       COUNT(*) FILTER (WHERE id_bad),
       COUNT(*) FILTER (WHERE cls = 1),
       COUNT(*) FILTER (WHERE cls = 2), (array_agg(n ORDER BY t) FILTER (WHERE cls = 2))[1],
       COUNT(*) FILTER (WHERE cls = 3), (array_agg(n ORDER BY t) FILTER (WHERE cls = 3))[1],
       COUNT(*) FILTER (WHERE cls = 0),
       COUNT(*) FILTER (WHERE head),
       COUNT(*) FILTER (WHERE head AND v IS NOT NULL),
       COUNT(*) FILTER (WHERE head AND row_bad),
       (SELECT COUNT(*) FROM ins)
FROM w
"""


def _kind(type_code: Any) -> str | None:
    return _KINDS.get(int(type_code)) if isinstance(type_code, int) else None


def _identity(conn: Connection) -> tuple[Any, ...]:
    """Which PostgreSQL database ``conn`` is connected to: a cluster and a database in it."""
    row = conn.exec_driver_sql(
        "SELECT current_database(), pg_postmaster_start_time(), inet_server_port(),"
        " (SELECT oid FROM pg_database WHERE datname = current_database())"
    ).one()
    return tuple(row)


def _search_path(conn: Connection) -> list[str]:
    return [
        s
        for s in conn.exec_driver_sql("SELECT unnest(current_schemas(true))").scalars()
        if not s.startswith("pg_temp")
    ]


def same_database(conn: Connection, source: Engine) -> tuple[bool, list[str]]:
    """Whether ``source`` is the database ``conn`` is in, and the source's effective
    search path (the schemas its query's names resolve in)."""
    with source.connect() as src:
        theirs = _identity(src)
        path = _search_path(src)
    return _identity(conn) == theirs, path


def load_in_database(
    conn: Connection,
    source: Engine,
    definition: Definition,
    target: Target,
    stats: StreamStats,
    *,
    stop: Callable[[], bool] | None = None,
    on_rows: Callable[[int], None] | None = None,
    keys: Mapping[str, str] | None = None,
) -> bool:
    """Load ``target`` from ``definition``'s query inside the state DB; False to stream instead.

    True when the rows were loaded and ``stats`` filled as the streaming path
    would fill them. False (nothing written, one line logged) when the source
    is another database or the query's result cannot be rendered exactly in
    SQL. Raises SourceError for a query whose columns cannot be sent, as the
    streaming path does, and Interrupted when ``stop`` cancelled the statement.
    """
    key = definition.key
    if conn.dialect.name != "postgresql" or source.dialect.name != "postgresql":
        log.debug("%s: source and state are not one PostgreSQL database: streaming", key)
        return False
    try:
        same, path = same_database(conn, source)
    except SQLAlchemyError as exc:
        log.info("%s: in-database planning not possible (%s): streaming", key, first_line(exc))
        return False
    if not same:
        log.info("%s: the source is another database than the state DB: streaming", key)
        return False
    savepoint = conn.begin_nested()
    # The driver's own cursor: the user's SQL goes to the server as written (no
    # placeholders parsed, so a literal % stays one).
    cursor: Any = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        loaded = _load(conn, cursor, definition, target, stats, path, stop, keys)
    except BaseException:
        savepoint.rollback()
        raise
    finally:
        cursor.close()
    if loaded is None:
        savepoint.commit()
        stats.in_database = True
        log.info("%s: planned inside the database (%d rows)", key, stats.rows)
        if on_rows is not None:
            on_rows(stats.rows)
        return True
    savepoint.rollback()
    log.info("%s: in-database planning not possible (%s): streaming", key, loaded)
    return False


def _load(
    conn: Connection,
    cursor: Any,
    definition: Definition,
    target: Target,
    stats: StreamStats,
    path: list[str],
    stop: Callable[[], bool] | None,
    keys: Mapping[str, str] | None,
) -> str | None:
    """The load inside the savepoint; None when done, or why it cannot be done."""
    schema, encoding, saved_path, saved_mem, saved_digits = conn.exec_driver_sql(
        "SELECT n.nspname, current_setting('server_encoding'), current_setting('search_path'),"
        " current_setting('work_mem'), current_setting('extra_float_digits')"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.oid = 'snapshot'::regclass"
    ).one()
    if encoding != "UTF8":
        return f"the database's encoding is {encoding}, not UTF8"
    # A dry run's counted members go to its temp table (plan.CREATE_COUNTED).
    where = "pg_temp" if target.table == "audsync_counted" else schema
    table = f"{_quote(where)}.{_quote(target.table)}"
    # The query's names resolve as on the source connection: its schemas, in its
    # order. Floats print in their shortest form. The one sort of the load (by the
    # id's text) stays in memory up to WORK_MEM instead of spilling to disk.
    conn.execute(
        text(
            "SELECT set_config('search_path', :p, true),"
            " set_config('extra_float_digits', '1', true),"
            " set_config('work_mem', :mem, true)"
        ),
        {"p": ", ".join(_quote(s) for s in path), "mem": WORK_MEM},
    )
    driver_error = conn.dialect.loaded_dbapi.Error
    try:
        clash = _clash(cursor, definition.sql, schema)
        if clash:
            return f"the query reads {clash}, audsync's own table"
        cursor.execute(f"SELECT * FROM (\n{definition.sql}\n) audsync_q WHERE 1 = 0")
        described = cursor.description
    except driver_error as exc:
        return f"the query fails as the state DB's user: {first_line(exc)}"
    if not described:
        return "the query returns no columns"
    names = [d[0] for d in described]
    kinds = [_kind(d[1]) for d in described]
    try:
        statement = build_statement(
            definition.sql, definition, names, kinds, keys, table, target
        )
    except ColumnProblem as exc:
        raise SourceError(definition.key, str(exc)) from None
    except CannotExpress as exc:
        return str(exc)
    stats.columns = names
    cancelled: Callable[[], bool] = lambda: False  # noqa: E731
    try:
        with cancel_on_stop(conn, stop) as cancelled:
            cursor.execute(statement)
            rows = cursor.fetchall()
    except driver_error as exc:
        if cancelled():
            raise Interrupted(f"planning {definition.key} stopped by a shutdown request") from None
        return f"the statement failed: {first_line(exc)}"
    (
        total, bad_id, skipped, too_long, long_example, control, control_example,
        ok, heads, heads_valued, bad_row, inserted,
    ) = rows[0]
    if bad_id:
        return "an id only Python normalises exactly (a float or decimal out of plain range)"
    if bad_row:
        return "a value only Python renders exactly (or one Gleap cannot store)"
    found = StreamStats(rows=int(total), columns=names, skipped_ids=int(skipped))
    for count, example, reason in (
        (too_long, long_example, ID_TOO_LONG), (control, control_example, ID_HAS_CONTROL)
    ):
        if count:
            found.invalid_ids += int(count)
            found.invalid_by_reason[reason] = (int(count), str(example))
    # Repeats next to each other, then repeats ON CONFLICT dropped (none for ids
    # that are their own text).
    found.duplicate_ids = int(ok) - int(heads) + int(heads_valued) - int(inserted)
    conn.execute(
        text(
            "SELECT set_config('search_path', :p, true), set_config('work_mem', :mem, true),"
            " set_config('extra_float_digits', :digits, true)"
        ),
        {"p": saved_path, "mem": saved_mem, "digits": saved_digits},
    )
    stats.rows += found.rows
    stats.skipped_ids += found.skipped_ids
    stats.duplicate_ids += found.duplicate_ids
    stats.invalid_ids += found.invalid_ids
    stats.invalid_by_reason.update(found.invalid_by_reason)
    return None


def _clash(cursor: Any, sql: str, schema: str) -> str | None:
    """A table of audsync's that the query reads (directly or through a view), as
    PostgreSQL's own plan of it names them: inside the plan's transaction it would
    see this plan's half-written rows, where the streaming path sees committed ones."""
    cursor.execute(f"EXPLAIN (VERBOSE, FORMAT JSON) SELECT * FROM (\n{sql}\n) audsync_q")
    (document,) = cursor.fetchone()
    plans = json.loads(document) if isinstance(document, str) else document
    ours = {*models.metadata.tables, "alembic_version", "audsync_changes"}
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            where, name = node.get("Schema"), node.get("Relation Name")
            if isinstance(where, str) and isinstance(name, str) and (
                where.startswith("pg_temp") or (where == schema and name in ours)
            ):
                found.append(f"{where}.{name}")
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(plans)
    return min(found) if found else None
