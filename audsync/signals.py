"""Shutdown signals handled at once, whatever the main thread is doing.

Python runs a signal handler only when the main thread next executes Python
code: while it waits inside a database driver's C call (a SQLite or DuckDB
query), the first Ctrl-C would wait for the query to end. :func:`relay_signals`
has the interpreter's C-level handler write the signal number to a socket
(``signal.set_wakeup_fd``) that a thread of ours reads, so the handler runs
within milliseconds on that thread — and can, for one, cancel the query.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from types import FrameType

SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _deferred(_signum: int, _frame: FrameType | None) -> None:
    """The Python-level handler: the relay thread has done the work already."""


@contextlib.contextmanager
def relay_signals(
    handler: Callable[[int], None], signals: tuple[signal.Signals, ...] = SHUTDOWN_SIGNALS
) -> Iterator[None]:
    """Call ``handler(signum)`` on a relay thread as each of ``signals`` arrives.

    Must be entered on the main thread (as ``signal.signal`` must). The previous
    handlers and wakeup fd are restored on exit.
    """
    reader, writer = socket.socketpair()
    writer.setblocking(False)  # the C handler must never block on a full buffer
    wanted = {int(sig) for sig in signals}
    previous = {sig: signal.signal(sig, _deferred) for sig in signals}
    previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)

    def pump() -> None:
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return  # closed on exit
            for signum in data:
                if signum in wanted:
                    handler(signum)

    thread = threading.Thread(target=pump, name="audsync-signals", daemon=True)
    thread.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_fd)
        for sig, old in previous.items():
            signal.signal(sig, old)
        writer.close()
        with contextlib.suppress(OSError):
            reader.shutdown(socket.SHUT_RDWR)
        thread.join(timeout=1)
        reader.close()
