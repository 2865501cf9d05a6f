"""Quiet logging and progress bars.

pycolmap's pipeline functions (bundle_adjustment, incremental_mapping, ...) reset glog's `minloglevel` to 0 on
every call, so INFO lines come back after each one. `quiet_pycolmap()` sets it before the call and again after.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

import pycolmap

logger = logging.getLogger("vggt_sfm")
T = TypeVar("T")

# glog levels: 0 INFO, 1 WARNING, 2 ERROR, 3 FATAL.
_QUIET_GLOG_LEVEL = 2


def set_pycolmap_quiet(quiet: bool = True) -> None:
    """Silence (or restore) COLMAP's glog output below ERROR."""
    pycolmap.logging.minloglevel = _QUIET_GLOG_LEVEL if quiet else 0


@contextlib.contextmanager
def quiet_pycolmap(quiet: bool = True) -> Iterator[None]:
    """Keep COLMAP quiet around a pycolmap call that resets the log level."""
    if quiet:
        set_pycolmap_quiet(True)
    try:
        yield
    finally:
        if quiet:
            set_pycolmap_quiet(True)


_CLEAR_LINE = "\r\x1b[K"  # back to the start of the line and erase it (any ANSI terminal)
_stage_shown = False  # a stage line without its newline is on the terminal


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the message (it may be replaced, e.g. by tests)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        clear_stage()  # a message never lands on the end of the stage line
        super().emit(record)


def show_stage(name: str) -> None:
    """On a terminal, one line `vggt-sfm: NAME ...` that the next stage replaces; nothing when not a terminal."""
    global _stage_shown
    if not sys.stderr.isatty():
        return
    sys.stderr.write(f"{_CLEAR_LINE}vggt-sfm: {name} ...")
    sys.stderr.flush()
    _stage_shown = True


def clear_stage() -> None:
    """Erase the stage line `show_stage` left, if any."""
    global _stage_shown
    if _stage_shown:
        sys.stderr.write(_CLEAR_LINE)
        sys.stderr.flush()
        _stage_shown = False


def configure_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Log our messages to stderr: INFO when verbose, WARNING otherwise, ERROR only when quiet; COLMAP's only
    when verbose."""
    level = logging.INFO if verbose else logging.ERROR if quiet else logging.WARNING
    if not any(isinstance(h, _CurrentStderrHandler) for h in logger.handlers):
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("vggt-sfm: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    set_pycolmap_quiet(not verbose)


def progress(items: Iterable[T], desc: str, total: int | None = None, enabled: bool = True) -> Iterable[T]:
    """Wrap a long loop in a tqdm bar, shown only on a terminal and when enabled."""
    if not enabled or not sys.stderr.isatty():
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, leave=False, dynamic_ncols=True)
