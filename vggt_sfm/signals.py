"""SIGTERM handled like Ctrl-C, so that `kill`, a job scheduler or a closing terminal stops a run cleanly.

Python turns SIGINT into KeyboardInterrupt, which the pipeline already survives (the work folder keeps the
finished stages' cache, no partial `sparse/0` appears); SIGTERM's default is to die on the spot, leaving the
hidden work folder half-written. `terminate_as_interrupt` raises KeyboardInterrupt for SIGTERM too.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: stop as on Ctrl-C."""


def _raise_terminated(signum: int, frame) -> None:
    raise Terminated(f"signal {signum}")


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises `Terminated` (a KeyboardInterrupt) in the main thread."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
