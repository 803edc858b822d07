"""The ``audsync`` command. ``main(argv) -> exit code``.

Exit codes: 0 ok, 1 the work failed, 2 bad usage or bad config (nothing done),
3 another process holds the lease (only without ``--wait``), 130 stopped by a
signal (what was not acknowledged stays queued), 141 the reader of the output
went away (the work itself went on).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from sqlalchemy.exc import SQLAlchemyError

from audsync import __version__, defaults, logs
from audsync.config import Config, load_config
from audsync.errors import (
    EXIT_BROKEN_PIPE,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    AudsyncError,
    ConfigError,
    describe,
    one_line,
    redact,
    use_secrets,
)
from audsync.progress import PROGRESS_CHOICES, make_progress
from audsync.text_tables import duration, jsonable, table

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from audsync.deliver import DeliveryReport
    from audsync.sync import SyncOutcome

log = logging.getLogger("audsync")

SUMMARY_COLUMNS = [
    "audience",
    "mode",
    "status",
    "members",
    "entered",
    "exited",
    "changed",
    "queued",
    "delivered",
    "failed",
    "pending",
]
HISTORY_COLUMNS = [
    "id",
    "audience_key",
    "trigger",
    "mode",
    "status",
    "started_at",
    "finished_at",
    "members",
    "entered",
    "exited",
    "changed",
    "queued",
    "delivered",
    "failed",
    "superseded",
    "pending",
    "skipped_ids",
    "duplicate_ids",
    "invalid_ids",
    "error",
    "invalid_reasons",
]


MAX_DEMO_USERS = 1_000_000
"""More would take minutes for a demo; the benchmarks measure large audiences."""

LOG_FORMATS = ("human", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _env_default(name: str, fallback: Any = None) -> Any:
    return os.environ.get(name, fallback)


def _env_flag(name: str) -> bool:
    """A yes/no option from the environment: 1, true, yes or on (any case) mean yes."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _one_of(
    variable: str, choices: Sequence[str], normalise: Callable[[str], str] = str
) -> Callable[[str], str]:
    """Validate a choice; argparse checks ``choices`` on the command line but not on a
    default taken from the environment, which would otherwise slip through."""

    def check(raw: str) -> str:
        value = normalise(raw)
        if value not in choices:
            raise argparse.ArgumentTypeError(
                f"{value!r} is not one of {', '.join(choices)} (from the option or {variable})"
            )
        return value

    return check


def _progress_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress",
        choices=PROGRESS_CHOICES,
        type=_one_of("AUDSYNC_PROGRESS", PROGRESS_CHOICES),
        default=_env_default("AUDSYNC_PROGRESS", "auto"),
        help="live bars, plain lines every few seconds, or off; auto = bars in a terminal,"
        " lines otherwise (env AUDSYNC_PROGRESS)",
    )


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other error of audsync."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _number(
    kind: Callable[[str], float],
    least: float | None = None,
    most: float | None = None,
    *,
    above: bool = False,
    variable: str | None = None,
) -> Callable[[str], Any]:
    """An argparse type: a number of ``kind`` within bounds, or a one-line reason
    (naming ``variable`` when the value may come from the environment)."""
    where = f" (from the option or {variable})" if variable else ""

    def check(raw: str) -> Any:
        try:
            value = kind(raw)
        except ValueError:
            noun = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{raw!r} is not {noun}{where}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{raw!r} is not a number{where}")
        if least is not None and (value <= least if above else value < least):
            raise argparse.ArgumentTypeError(
                f"{raw!r} must be {'more than' if above else 'at least'} {least:g}{where}"
            )
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(f"{raw!r} must be at most {most:g}{where}")
        return value

    return check


_POSITIVE = _number(int, 1)


def _global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """-c, --log-level and --log-format: on the top parser with their defaults, and on
    every command with no default, so they work on either side of the command
    (``audsync sync -c x.toml``) and a value after it wins."""

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    parser.add_argument(
        "-c",
        "--config",
        # No default from the environment here: load_config reads AUDSYNC_CONFIG
        # itself, and so can say which of the two named a file that is missing.
        default=default(None),
        help="config file (env AUDSYNC_CONFIG; default ./audsync.toml)",
    )
    parser.add_argument(
        "--log-level",
        default=default(_env_default("AUDSYNC_LOG_LEVEL", "INFO")),
        type=_one_of("AUDSYNC_LOG_LEVEL", LOG_LEVELS, str.upper),
        help="DEBUG, INFO, WARNING or ERROR (env AUDSYNC_LOG_LEVEL)",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        type=_one_of("AUDSYNC_LOG_FORMAT", LOG_FORMATS),
        default=default(_env_default("AUDSYNC_LOG_FORMAT", "human")),
        help="human lines, or one JSON object per line for log shippers (env AUDSYNC_LOG_FORMAT)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every option can also be set from an AUDSYNC_* variable."""
    parser = _Parser(
        prog="audsync",
        description="Sync SQL-defined audiences and computed traits to Gleap contacts.",
    )
    _global_options(parser, top=True)
    parser.add_argument("--version", action="version", version=f"audsync {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = sub.add_parser("init", help="write a commented starter audsync.toml")
    init.add_argument(
        "path",
        nargs="?",
        metavar="PATH",
        help="where to write it (default: -c, AUDSYNC_CONFIG, or ./audsync.toml)",
    )

    sync = sub.add_parser("sync", help="plan now and deliver the changes (manual resync)")
    sync.add_argument("keys", nargs="*", metavar="KEY", help="audiences/traits (default: all)")
    sync.add_argument("--full", action="store_true", help="re-assert every value, not just changes")
    sync.add_argument(
        "--dry-run", action="store_true", help="show the plan; write and send nothing"
    )
    sync.add_argument("--force", action="store_true", help="go ahead although the breaker holds")
    sync.add_argument(
        "--wait",
        action="store_true",
        help="wait for other processes' leases and follow delivery to the end",
    )
    _progress_option(sync)

    retry = sub.add_parser(
        "retry-failed", help="queue again the changes Gleap rejected (after max_attempts)"
    )
    retry.add_argument("keys", nargs="*", metavar="KEY", help="audiences/traits (default: all)")
    retry.add_argument("--wait", action="store_true", help="follow the daemon's delivery")
    _progress_option(retry)

    forget = sub.add_parser(
        "forget", help="delete users in Gleap and keep them out of every later sync"
    )
    forget.add_argument("user_ids", nargs="*", metavar="USER_ID")
    forget.add_argument("--list", action="store_true", help="show the suppressed user ids")
    forget.add_argument("--undo", action="store_true", help="lift the suppression of USER_IDs")
    forget.add_argument("--json", action="store_true", help="with --list: JSON output")
    forget.add_argument(
        "--yes",
        action="store_true",
        default=_env_flag("AUDSYNC_FORGET_YES"),
        help="do not ask for confirmation on a terminal (env AUDSYNC_FORGET_YES=1)",
    )

    verify = sub.add_parser(
        "verify", help="read contacts back from Gleap, measure the drift from the ledger, repair it"
    )
    verify.add_argument("keys", nargs="*", metavar="KEY", help="audiences/traits (default: all)")
    verify.add_argument(
        "--sample",
        type=_number(int, 1, defaults.MAX_VERIFY_SAMPLE, variable="AUDSYNC_VERIFY_SAMPLE"),
        default=_env_default("AUDSYNC_VERIFY_SAMPLE", defaults.DEFAULT_VERIFY_SAMPLE),
        metavar="N",
        help="users to read back, drawn uniformly from the ledger; every user when N is at"
        f" least its size (env AUDSYNC_VERIFY_SAMPLE; default {defaults.DEFAULT_VERIFY_SAMPLE})",
    )
    verify.add_argument(
        "--repair", action="store_true", help="queue the drifted values again and deliver them"
    )
    verify.add_argument(
        "--wait", action="store_true", help="with --repair: follow a daemon's delivery to the end"
    )
    verify.add_argument("--json", action="store_true", help="one JSON object on stdout")
    _progress_option(verify)

    history = sub.add_parser("history", help="past runs from the state DB")
    history.add_argument("--audience", metavar="KEY")
    history.add_argument(
        "--limit", type=_POSITIVE, default=20, metavar="N", help="newest N (default 20)"
    )
    history.add_argument("--json", action="store_true")
    history.add_argument(
        "--failures", action="store_true", help="per-user delivery failures instead of runs"
    )

    report = sub.add_parser(
        "report", help="write the sync history as one self-contained HTML page with charts"
    )
    report.add_argument(
        "--html",
        required=_env_default("AUDSYNC_REPORT_HTML") is None,
        metavar="FILE",
        default=_env_default("AUDSYNC_REPORT_HTML"),
        help="where to write the page (env AUDSYNC_REPORT_HTML)",
    )
    report.add_argument("--audience", metavar="KEY", help="only this audience or trait")
    report.add_argument(
        "--runs",
        type=_number(int, 1, variable="AUDSYNC_REPORT_RUNS"),
        default=_env_default("AUDSYNC_REPORT_RUNS", 500),
        metavar="N",
        help="runs per audience to draw (env AUDSYNC_REPORT_RUNS; default 500)",
    )

    status = sub.add_parser("status", help="backlog, last plans and who is delivering")
    status.add_argument("--json", action="store_true")

    sub.add_parser("check", help="validate the config, the token and every query")

    db = sub.add_parser("db", help="state database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_sub.add_parser("upgrade", help="migrate the state DB to the newest schema")

    run = sub.add_parser("run", help="the daemon: sync at start, then every interval + jitter")
    run.add_argument("--once", action="store_true", help="do the start-up sync, then exit")
    run.add_argument(
        "--metrics-port",
        type=_number(int, 0, 65535, variable="AUDSYNC_METRICS_PORT"),
        default=_env_default("AUDSYNC_METRICS_PORT"),
        metavar="PORT",
        help="serve Prometheus metrics on PORT at /metrics (env AUDSYNC_METRICS_PORT)",
    )
    run.add_argument(
        "--metrics-addr",
        default=_env_default("AUDSYNC_METRICS_ADDR", defaults.DEFAULT_METRICS_ADDR),
        metavar="ADDR",
        help="address the metrics listen on; 0.0.0.0 for every interface"
        " (env AUDSYNC_METRICS_ADDR; default 127.0.0.1)",
    )

    demo = sub.add_parser("demo", help="a self-contained demo (no config, no network)")
    demo.add_argument(
        "--users",
        type=_number(int, 1, MAX_DEMO_USERS),
        default=3000,
        help=f"users in the demo shop (1 to {MAX_DEMO_USERS:,}; default 3,000)",
    )
    demo.add_argument("--keep", metavar="DIR", help="build the demo in DIR and keep it")

    sandbox = sub.add_parser("sandbox", help="serve a local Gleap-compatible API for trying things")
    sandbox.add_argument(
        "--port",
        type=_number(int, 0, 65535, variable="AUDSYNC_SANDBOX_PORT"),
        default=_env_default("AUDSYNC_SANDBOX_PORT", 8765),
        help="port on 127.0.0.1 (env AUDSYNC_SANDBOX_PORT; default 8765; 0 picks a free one)",
    )
    sandbox.add_argument("--token", default=_env_default("AUDSYNC_SANDBOX_TOKEN", "sandbox-token"))
    sandbox.add_argument(
        "--read-token",
        default=_env_default("AUDSYNC_SANDBOX_READ_TOKEN", "sandbox-read-token"),
        help="the v3 API key reads must carry (env AUDSYNC_SANDBOX_READ_TOKEN)",
    )
    sandbox.add_argument(
        "--project",
        default=_env_default("AUDSYNC_SANDBOX_PROJECT", "sandbox-project"),
        help="the project id reads must carry (env AUDSYNC_SANDBOX_PROJECT)",
    )
    sandbox.add_argument(
        "--rate-limit",
        type=_number(int, 0),
        default=defaults.DEFAULT_RATE_LIMIT,
        help="calls per --rate-window before HTTP 429 (0: no limit; default 1000)",
    )
    sandbox.add_argument(
        "--rate-window",
        type=_number(float, 0, above=True),
        default=defaults.DEFAULT_RATE_WINDOW,
        help="seconds (default 60)",
    )
    sandbox.add_argument(
        "--fail-ratio",
        type=_number(float, 0, 1),
        default=0.0,
        help="share of calls answered HTTP 500 (0 to 1)",
    )
    sandbox.add_argument(
        "--latency", type=_number(float, 0, 60), default=0.0, help="seconds before each answer"
    )
    sandbox.add_argument("--db", default=":memory:", help="SQLite file for the contacts")
    for command in sub.choices.values():
        _global_options(command, top=False)
    for action in db_sub.choices.values():
        _global_options(action, top=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``audsync`` command and return its exit code."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            # Said by the command's parser, so the line names the command.
            _command_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:
        return int(exc.code or 0) and EXIT_USAGE
    logs.configure(str(args.log_level), str(args.log_format))
    try:
        return COMMANDS[args.command](args)
    except AudsyncError as exc:
        _error(str(exc))
        return exc.exit_code
    except SQLAlchemyError as exc:
        message = describe(exc)  # never the statement or its parameters (users' data)
        if "locked" in message.lower():
            message += " (another process kept it busy past [state] busy_timeout; try again)"
        _error(f"state DB error: {message}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of our output went away (`| head`): not worth a traceback.
        # Point stdout at /dev/null so the interpreter's final flush stays quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as exc:
        # Whatever was not foreseen still ends as one line, never a traceback
        # (which could quote a secret or a user's data).
        _error(
            f"unexpected {type(exc).__name__} in `audsync {args.command}`: {describe(exc)}"
            " (a bug in audsync; please report it with this line)"
        )
        return EXIT_FAILED


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Any:
    """The parser of the (sub)command ``args`` were parsed for."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = getattr(args, action.dest, None)
            if chosen in action.choices:
                return _command_parser(action.choices[chosen], args)
    return parser


@contextlib.contextmanager
def _warm_stop() -> Iterator[threading.Event]:
    """The first SIGINT/SIGTERM finishes the calls in flight, cancels a running
    source query and records every run (warm); a second one exits at once (cold).
    Nothing is lost either way. The signals are taken on a thread of their own,
    so a query stuck in a driver's C code cannot delay them."""
    from audsync.signals import relay_signals

    stopping = threading.Event()

    def on_signal(signum: int) -> None:
        if stopping.is_set():
            _error("second signal: exiting now; unacknowledged changes stay queued")
            os._exit(EXIT_INTERRUPTED)
        stopping.set()
        log.warning(
            "%s: finishing the calls in flight (again to exit at once)",
            signal.Signals(signum).name,
        )

    with relay_signals(on_signal):
        yield stopping


def _interrupted(stopping: threading.Event) -> int:
    if not stopping.is_set():
        return EXIT_OK
    _error("interrupted; changes not yet acknowledged stay queued for the next sync")
    return EXIT_INTERRUPTED


def _error(message: str) -> None:
    """One line on stderr, with every known secret (token, webhook URL) redacted."""
    safe = one_line(
        redact(
            message,
            os.environ.get("AUDSYNC_GLEAP_API_TOKEN"),
            os.environ.get("AUDSYNC_GLEAP_READ_TOKEN"),
        )
    )
    print(f"audsync: error: {safe}", file=sys.stderr)


def _config(args: argparse.Namespace, *, require_file: bool = True) -> Config:
    config = load_config(args.config, require_file=require_file)
    # Whatever their source (file or env), the configured secrets are hidden from
    # every later log line and error message of this process.
    token = config.gleap.api_token.reveal() if config.gleap.api_token else None
    read_token = config.gleap.read_token.reveal() if config.gleap.read_token else None
    use_secrets(token, read_token, config.alert_webhook_url)
    if args.command != "check":  # check prints them among its findings
        for note in config.notes:
            log.warning("%s: %s", config.path, note)
    return config


def cmd_init(args: argparse.Namespace) -> int:
    from audsync.config import resolve_config_path
    from audsync.starter import write_starter

    path = args.path or resolve_config_path(args.config, os.environ)[0]
    written = write_starter(path)
    named = written.resolve() != Path(defaults.DEFAULT_CONFIG_PATH).resolve()
    use = f"audsync -c {written}" if named else "audsync"
    print(f"wrote {written}: point [source] url at your database and write your audiences,")
    print(f"then: {use} check")
    return EXIT_OK


def cmd_sync(args: argparse.Namespace) -> int:
    from audsync.sync import run_sync

    config = _config(args)
    with _warm_stop() as stopping, make_progress(args.progress, sys.stdout) as progress:
        outcome = run_sync(
            config,
            args.keys,
            full=args.full,
            force=args.force,
            dry_run=args.dry_run,
            wait=args.wait,
            stop=stopping.is_set,
            echo=lambda line: log.info(line),
            progress=progress,
        )
    for message in outcome.errors:
        _error(message)
    if args.dry_run:
        rows = [
            {
                "audience": p.key,
                "mode": p.mode,
                "members": p.members,
                "entered": p.entered,
                "exited": p.exited,
                "changed": p.changed,
                "queued": p.queued,
                "held": "HELD: " + p.held if p.held else "-",
            }
            for p in outcome.plans
        ]
        print("dry run: nothing was written and nothing was sent")
        print(
            table(
                rows,
                ["audience", "mode", "members", "entered", "exited", "changed", "queued", "held"],
            )
        )
        print(
            f"{outcome.dry_run_calls:,} Identify calls, about "
            f"{duration(outcome.dry_run_seconds)} at {_rate(config)}"
        )
        held = _report_held(outcome.plans)
        return EXIT_FAILED if outcome.errors or held else EXIT_OK
    code = _print_runs(config, outcome, wait=args.wait)
    return _interrupted(stopping) or code


def _delivery_lines(report: DeliveryReport) -> list[str]:
    """What a delivery did, in lines: acknowledged Identify calls first, then Track
    calls, failed attempts and 429s each on their own (only when there were any)."""
    lines = [
        f"{report.identify_calls:,} Identify calls; {report.delivered:,} changes delivered, "
        f"{report.failed:,} failed"
    ]
    if report.track_calls or report.track_failed:
        lines.append(f"{report.track_calls:,} Track calls ({report.events:,} events)")
    failed = report.identify_failed + report.track_failed
    if failed:
        lines.append(
            f"{failed:,} attempts failed ({report.identify_failed:,} Identify,"
            f" {report.track_failed:,} Track): server or network errors and rejections"
        )
    if report.throttled:
        lines.append(f"{report.throttled:,} answers of 429: waited, never a failure")
    return lines


class _MaybeHeld(Protocol):
    """A plan, or a check's estimate of one: what the circuit breaker would say."""

    @property
    def key(self) -> str: ...
    @property
    def kind_label(self) -> str: ...
    @property
    def held(self) -> str | None: ...


def _rate(config: Config) -> str:
    """The configured budget as every command quotes it: ``1000 calls per 1m``."""
    return f"{config.gleap.rate_limit} calls per {duration(config.gleap.rate_window)}"


def _report_held(plans: Sequence[_MaybeHeld]) -> int:
    """One error line per plan the circuit breaker would hold; returns how many.

    A dry run or ``check`` that finds one exits 1: following it with ``sync``
    would queue nothing for that audience and fail.
    """
    held = [p for p in plans if p.held]
    for plan in held:
        why = (plan.held or "").replace("sync KEY", f"sync {plan.key}")
        _error(
            f"{plan.kind_label} {plan.key}: the next sync would be held by the circuit breaker:"
            f" {why}"
        )
    return len(held)


def _print_runs(config: Config, outcome: SyncOutcome, *, wait: bool) -> int:
    """The per-audience summary of a sync, and its exit code."""
    from audsync.history import runs
    from audsync.state import open_for_reading

    state = open_for_reading(config)
    rows = []
    for run in sorted(
        runs(state, ids=outcome.run_ids, limit=len(outcome.run_ids) or 1), key=lambda r: r["id"]
    ):
        rows.append({**run, "audience": run["audience_key"]})
    if rows:
        print(table(rows, SUMMARY_COLUMNS))
    for run in rows:
        if run["status"] == "held":
            _error(f"{run['audience']} held: {run['error']}")
    if outcome.handed_over_to and not wait:
        print(f"changes are queued; the daemon ({outcome.handed_over_to}) is delivering them")
    report = outcome.delivery
    if report is not None:
        for line in _delivery_lines(report):
            print(line)
        if report.error is not None:
            _error(str(report.error))
    return EXIT_FAILED if outcome.failed else EXIT_OK


def cmd_retry_failed(args: argparse.Namespace) -> int:
    from audsync.sync import retry_failed

    config = _config(args)
    with _warm_stop() as stopping, make_progress(args.progress, sys.stdout) as progress:
        outcome = retry_failed(
            config, args.keys, wait=args.wait, stop=stopping.is_set, echo=print, progress=progress
        )
    if not outcome.run_ids:
        print("no rejected changes to retry")
        return EXIT_OK
    code = _print_runs(config, outcome, wait=args.wait)
    return _interrupted(stopping) or code


def cmd_forget(args: argparse.Namespace) -> int:
    from audsync.forget import forget, forget_wait, suppressed, unforget
    from audsync.state import open_configured, open_for_reading
    from audsync.sync import make_client

    config = _config(args, require_file=False)
    if args.list:
        rows = suppressed(open_for_reading(config))
        if args.json:
            print(json.dumps(jsonable(rows), indent=2))
        elif rows:
            print(table(rows, ["user_id", "suppressed_at", "deleted_in_gleap_at", "last_error"]))
        else:
            print("no users are suppressed")
        return EXIT_OK
    if not args.user_ids:
        _error("forget: name at least one USER_ID (or use --list)")
        return EXIT_USAGE
    if args.undo:
        lifted = unforget(open_for_reading(config), args.user_ids)
        for user_id in args.user_ids:
            print(
                f"{user_id}: "
                + ("no longer suppressed" if user_id in lifted else "was not suppressed")
            )
        return EXIT_OK
    if not args.yes and not _confirm_forget(args.user_ids):
        _error("not confirmed: nothing was suppressed or deleted")
        return EXIT_FAILED
    with make_client(config) as client:
        client.check_token()
        report = forget(
            open_configured(config),
            client,
            args.user_ids,
            wait=forget_wait(config.gleap.timeout),
            echo=lambda line: print(line, flush=True),
        )
    for user_id in report.deleted:
        print(f"{user_id}: deleted in Gleap and suppressed")
    for user_id in report.not_found:
        print(f"{user_id}: not found in Gleap (nothing to delete); suppressed")
    for user_id, why in report.failed.items():
        _error(f"{user_id}: suppressed, but not deleted in Gleap ({why}); run forget again")
    return EXIT_FAILED if report.failed else EXIT_OK


def _confirm_forget(user_ids: Sequence[str]) -> bool:
    """Ask on a terminal before deleting contacts; anywhere else (cron, a pipe, a
    script) there is nobody to ask, and the command goes ahead as it always has."""
    try:
        interactive = sys.stdin.isatty()
    except (AttributeError, ValueError):  # no stdin, or a closed one
        interactive = False
    if not interactive:
        return True
    user_ids = list(dict.fromkeys(user_ids))
    shown = ", ".join(user_ids[:10])
    if len(user_ids) > 10:
        shown += f" and {len(user_ids) - 10} more"
    print(
        f"Delete {len(user_ids)} contact{'s' if len(user_ids) != 1 else ''} in Gleap ({shown})"
        " and keep them out of every later sync? Gleap cannot undo a delete. [y/N] ",
        end="",
        file=sys.stderr,
        flush=True,
    )
    try:
        answer = sys.stdin.readline()
    except (OSError, ValueError):
        return False
    return answer.strip().lower() in ("y", "yes")


def cmd_verify(args: argparse.Namespace) -> int:
    from audsync.readback import render_report, run_verify

    config = _config(args)
    config.select(args.keys)  # an unknown key, a missing read key: exit 2 before any read
    config.require_reader()
    if args.repair:
        config.require_token()
    with _warm_stop() as stopping, make_progress(args.progress, sys.stderr) as progress:
        report = run_verify(
            config,
            args.keys,
            sample=args.sample,
            repair=args.repair,
            wait_delivery=args.wait,
            stop=stopping.is_set,
            echo=lambda line: log.info(line),
            progress=progress,
        )
    if args.json:
        print(json.dumps(jsonable(report.as_dict(defaults.DEFAULT_VERIFY_WORST)), indent=2))
    else:
        print(render_report(report, defaults.DEFAULT_VERIFY_WORST))
    if report.repair is not None and report.repair.error:
        _error(f"repair: {report.repair.error}")
    if stopping.is_set():
        return _interrupted(stopping)
    if report.unverified:
        return EXIT_FAILED  # some users could not be read: no claim about them
    if report.repair is not None:
        return EXIT_OK if report.repair.complete else EXIT_FAILED
    return EXIT_FAILED if report.summary.drifted else EXIT_OK


def cmd_history(args: argparse.Namespace) -> int:
    from audsync.history import failures, runs
    from audsync.state import open_for_reading

    config = _config(args, require_file=False)
    state = open_for_reading(config)
    _check_audience(state, config, args.audience)
    if args.failures:
        rows = failures(state, audience=args.audience, limit=args.limit)
        columns = ["id", "run_id", "audience_key", "user_id", "http_status", "reason", "failed_at"]
    else:
        rows = runs(state, audience=args.audience, limit=args.limit)
        columns = HISTORY_COLUMNS
    if args.json:
        print(json.dumps(jsonable(rows), indent=2))
    elif rows:
        print(table(rows, columns))
    else:
        print("no runs recorded yet" if not args.failures else "no delivery failures recorded")
    return EXIT_OK


def _check_audience(state: Engine, config: Config, key: str | None) -> None:
    """A ConfigError naming the known keys when ``--audience KEY`` names none of them."""
    from audsync.history import known_keys

    if key is None:
        return
    known = sorted(set(known_keys(state)) | {d.key for d in config.definitions})
    if key not in known:
        raise ConfigError(
            "--audience",
            key,
            "no such audience or trait (known: " + (", ".join(known) or "none yet") + ")",
        )


def cmd_report(args: argparse.Namespace) -> int:
    from audsync.html_report import collect_report, write_report
    from audsync.state import open_for_reading

    config = _config(args, require_file=False)
    target = Path(args.html)
    if not target.parent.is_dir():
        raise ConfigError("--html", args.html, f"folder {target.parent} does not exist")
    if target.is_dir():
        raise ConfigError("--html", args.html, "is a folder: name the file, e.g. DIR/report.html")
    state = open_for_reading(config)
    report = collect_report(state, config, audience=args.audience, runs_per_audience=args.runs)
    if args.audience and not report.audiences:
        _check_audience(state, config, args.audience)
        raise ConfigError("--audience", args.audience, "no such audience or trait in the state DB")
    try:
        written = write_report(target, report)
    except OSError as exc:
        raise ConfigError("--html", args.html, exc.strerror or type(exc).__name__) from None
    print(f"wrote {written} ({len(report.audiences)} audiences and traits)")
    return EXIT_OK


STATUS_COLUMNS = [
    "key",
    "kind",
    "configured",
    "members",
    "last_status",
    "last_planned_at",
    "last_success_at",
    "pending",
    "parked_failures",
]


def cmd_status(args: argparse.Namespace) -> int:
    from audsync.status import status

    config = _config(args, require_file=False)
    found = status(config)
    info = found.as_dict()
    for row, audience in zip(info["audiences"], found.audiences, strict=True):
        row["eta"] = duration(audience.eta_seconds) if audience.pending else "-"
    if args.json:
        print(json.dumps(jsonable(info), indent=2))
        return EXIT_OK
    print(f"state DB: {found.state_db}")
    if found.audiences:
        print(table(info["audiences"], STATUS_COLUMNS))
    for daemon in found.daemons:
        why = {
            "exited": "not running: its process has exited without stopping",
            "stale": "not running, or cut off: no heartbeat since",
        }.get(daemon.state)
        print(
            f"daemon: {daemon.host} pid {daemon.pid} "
            + (f"({daemon.state}), last beat" if why is None else f"({why})")
            + f" {daemon.beat_at:%Y-%m-%d %H:%M:%S} UTC"
        )
    if found.next_run_at is not None:
        print(f"next scheduled plan: {found.next_run_at:%Y-%m-%d %H:%M:%S} UTC")
    elif not any(d.alive for d in found.daemons):
        print("next scheduled plan: none (no daemon is running; start one with `audsync run`)")
    lease = found.delivery_lease
    print(
        f"pending: {found.pending_users:,} users, about {duration(found.eta_seconds)} "
        f"at {_rate(config)}"
    )
    print(f"delivering: {lease.host} pid {lease.pid}" if lease else "delivering: nobody")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from audsync.check import check_queries, check_token, next_sync
    from audsync.source import open_source

    config = _config(args)
    print(f"config {config.path}: ok ({len(config.definitions)} audiences and traits)")
    for note in config.notes:
        print(f"config {config.path}: {note}")
    problems = 0
    token_problem = check_token(config)
    if token_problem is None:
        print(f"gleap {config.gleap.base_url}: token accepted")
    else:
        _error(token_problem)
        problems += 1
    source = open_source(config.require_source())
    print("source: reachable")
    try:
        for query in check_queries(config, source):
            if query.problem is None:
                print(f"{query.kind} {query.key}: ok ({query.rows:,} rows)")
            else:
                _error(query.problem)
                problems += 1
    finally:
        source.dispose()
    if problems:
        return EXIT_FAILED
    estimate = next_sync(config)
    for plan in estimate.plans:
        if plan.held:
            continue  # said below, as an error
        print(
            f"{plan.kind_label} {plan.key}: the next sync would make {plan.calls:,}"
            f" calls (about {duration(plan.seconds)} on its own)"
        )
    if estimate.queued_before:
        print(
            f"already queued: {estimate.queued_before:,} users whose changes earlier syncs"
            " queued (the next sync sends them too)"
        )
    print(
        f"next sync: {estimate.calls:,} Identify calls in all (one per changed user),"
        f" about {duration(estimate.seconds)} at {_rate(config)}"
    )
    for message in estimate.errors:
        _error(message)
    held = _report_held(estimate.plans)
    return EXIT_FAILED if held or estimate.errors else EXIT_OK


def cmd_db(args: argparse.Namespace) -> int:
    from audsync import migrate
    from audsync.state import open_configured

    config = _config(args, require_file=False)
    engine = open_configured(config)
    print(f"state DB at revision {migrate.current_revision(engine)} (newest)")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from audsync.service import run_daemon

    return run_daemon(
        _config(args),
        once=args.once,
        metrics_port=args.metrics_port,
        metrics_addr=args.metrics_addr,
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from audsync.demo import run_demo

    return run_demo(users=args.users, keep=args.keep)


def cmd_sandbox(args: argparse.Namespace) -> int:
    import sqlite3

    from audsync.sandbox import Sandbox

    try:
        server = Sandbox(
            args.token,
            port=args.port,
            rate_limit=args.rate_limit,
            rate_window=args.rate_window,
            fail_ratio=args.fail_ratio,
            latency=args.latency,
            db_path=args.db,
            read_token=args.read_token,
            project=args.project,
        )
    except sqlite3.Error as exc:
        raise ConfigError("--db", args.db, f"cannot be used: {exc}") from None
    except OSError as exc:
        raise ConfigError(
            "--port", str(args.port), f"cannot listen on 127.0.0.1:{args.port}: {exc.strerror}"
        ) from None
    print(
        f"Gleap sandbox on {server.url} (token {args.token!r}; reads: key {args.read_token!r},"
        f" project {args.project!r}); Ctrl-C stops it",
        flush=True,
    )
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return EXIT_OK


COMMANDS = {
    "init": cmd_init,
    "sync": cmd_sync,
    "retry-failed": cmd_retry_failed,
    "forget": cmd_forget,
    "verify": cmd_verify,
    "history": cmd_history,
    "report": cmd_report,
    "status": cmd_status,
    "check": cmd_check,
    "db": cmd_db,
    "run": cmd_run,
    "demo": cmd_demo,
    "sandbox": cmd_sandbox,
}

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
