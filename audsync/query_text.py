"""Make a user's query safe to wrap as a subquery.

audsync runs every audience and trait query as ``SELECT * FROM (<sql>) audsync_q
...``; a query pasted from a SQL console often ends in ``;`` or a comment
(``-- last 30 days``), and a ``;`` inside the parentheses is a syntax error on
every engine. :func:`trim_query` removes what follows the last token of the
query — semicolons, comments, white space — reading the text the way the
engines do, so a ``;`` or ``--`` inside a string, a quoted identifier or a
PostgreSQL dollar-quoted body is never touched.
"""

from __future__ import annotations

import re

_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$")
_WORD = re.compile(r"[A-Za-z0-9_$]")


def trim_query(sql: str) -> str:
    """``sql`` without trailing semicolons, comments (``--``, ``/* */``) and white space.

    When the text ends inside a string, identifier or comment that never closes,
    only white space is trimmed: the engine will say what is wrong with it,
    and audsync does not guess.
    """
    end = _last_token_end(sql)
    return sql.strip() if end is None else sql[:end].strip()


def _last_token_end(sql: str) -> int | None:
    """Index just past the last character that belongs to the statement (not a
    comment, ``;`` or white space); None when the text does not scan."""
    i, n, end = 0, len(sql), 0
    while i < n:
        c = sql[i]
        if c.isspace() or c == ";":
            i += 1
        elif sql.startswith("--", i):
            newline = sql.find("\n", i)
            i = n if newline < 0 else newline + 1
        elif sql.startswith("/*", i):
            close = sql.find("*/", i + 2)
            if close < 0:
                return None
            i = close + 2
        elif c in "'\"`":
            # E'...' (PostgreSQL) takes backslash escapes; elsewhere a quote is
            # escaped by doubling it, which the loop below reads as two strings.
            escapes = c == "'" and i > 0 and sql[i - 1] in "eE" and _starts_word(sql, i - 1)
            quoted = _closing_quote(sql, i, c, escapes)
            if quoted is None:
                return None
            i = end = quoted + 1
        elif c == "$" and (tag := _DOLLAR_TAG.match(sql, i)) and not _in_word(sql, i):
            close = sql.find(tag.group(), tag.end())
            if close < 0:
                return None
            i = end = close + len(tag.group())
        else:
            i = end = i + 1
    return end


def _closing_quote(sql: str, start: int, quote: str, escapes: bool) -> int | None:
    i = start + 1
    while i < len(sql):
        if escapes and sql[i] == "\\":
            i += 2
            continue
        if sql[i] == quote:
            return i
        i += 1
    return None


def _in_word(sql: str, i: int) -> bool:
    """Whether position ``i`` continues an identifier (``a$b``, ``$1`` after a name)."""
    return i > 0 and bool(_WORD.match(sql[i - 1]))


def _starts_word(sql: str, i: int) -> bool:
    return not _in_word(sql, i)
