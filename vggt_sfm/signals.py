"""SIGTERM handled like Ctrl-C, so that `kill`, a job scheduler or a closing terminal stops a run cleanly.

Python turns SIGINT into KeyboardInterrupt, which the pipeline already survives (the work folder keeps the
finished stages' cache, no partial `sparse/0` appears); SIGTERM's default is to die on the spot, leaving the
hidden work folder half-written. `terminate_as_interrupt` raises KeyboardInterrupt for SIGTERM too.

An exception raised by a signal handler is lost when the signal lands inside code whose exceptions Python ignores
(an `os.fork` callback of the logging module, a finaliser): the run would go on and publish its result as if
never stopped. So the handler also records the signal, and `raise_if_interrupted` (called before a result is
published, and between the pieces of parallel work) raises it again.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: stop as on Ctrl-C."""


# The signals that arrived in this process since `terminate_as_interrupt` was entered; signal dispositions are
# process-wide, so this record is too.
_received: list[int] = []


def _interruption(signum: int) -> KeyboardInterrupt:
    return Terminated(f"signal {signum}") if signum == signal.SIGTERM else KeyboardInterrupt()


def _record_and_raise(signum: int, frame) -> None:
    _received.append(signum)
    raise _interruption(signum)


def raise_if_interrupted() -> None:
    """Raise the interruption again if a signal arrived whose exception was swallowed on the way."""
    if _received:
        raise _interruption(_received[0])


def interruption_handled() -> None:
    """Forget the signals received so far: the command stopped on them as it should (a viewer closed by Ctrl-C)."""
    _received.clear()


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises `Terminated` and SIGINT KeyboardInterrupt in the main thread, both recorded."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return
    _received.clear()
    previous = {signum: signal.signal(signum, _record_and_raise) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
        raise_if_interrupted()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        interruption_handled()  # one that ended this block (exit 143) must not stop the next run in this process
