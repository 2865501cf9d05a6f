"""The output folder of a run: reserved by a lock, built in a hidden work folder, swapped into place at the end.

`reserved_output(OUTPUT)` takes an exclusive lock on `.OUTPUT.lock` beside the output (a second run writing the
same output refuses instead of mixing its files in; the lock dies with its process, so a killed run never blocks
the next one), prepares `.OUTPUT.partial/` (keeping the cache of an interrupted run, to resume from), and on
failure removes everything of the work folder but the finished stages' cache (nothing at all when no stage
finished). `commit_output` renames the finished work folder to OUTPUT, the old results going only after the new
ones are in place. A full disk or a read-only folder ends as one line, the previous results untouched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError, param
from .signals import raise_if_interrupted

logger = logging.getLogger(__name__)

CACHE_FOLDER = "cache"
# The errors a user fixes by freeing space or choosing another folder, not bugs.
_FULL_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_WRITE_ERRORS = _FULL_ERRORS | {errno.EROFS, errno.EACCES, errno.EPERM}


def work_folder(output: Path) -> Path:
    """The hidden folder a run writes into before it is renamed to `output`."""
    return output.parent / f".{output.name}.partial"


def lock_path(output: Path) -> Path:
    """The lock file that reserves `output` for one run at a time."""
    return output.parent / f".{output.name}.lock"


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold an exclusive lock on `output` for the duration; refuse with one line when another run holds it."""
    path = lock_path(output)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(
                f"another vggt-sfm run (pid {holder}) is writing {output} (lock {path}); wait for it to finish "
                f"or choose another {param('output')}"
            ) from None
        # The previous holder unlinks the file when it releases it: a lock on an unlinked file reserves nothing.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _cache_entries(work: Path) -> list[Path]:
    cache = work / CACHE_FOLDER
    return [p for p in cache.iterdir() if not p.name.endswith(".partial")] if cache.is_dir() else []


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _prepare_work(output: Path, overwrite: bool) -> Path:
    work = work_folder(output)
    work.mkdir(exist_ok=True)
    # An interrupted run leaves its cache (to resume from) and possibly half-written files (to discard).
    for leftover in work.iterdir():
        if leftover.name != CACHE_FOLDER:
            _remove(leftover)
    old_cache = output / CACHE_FOLDER
    if overwrite and old_cache.is_dir() and not (work / CACHE_FOLDER).exists():
        shutil.copytree(old_cache, work / CACHE_FOLDER)
    return work


def _discard_failed(work: Path) -> bool:
    """After a failure keep only the finished stages' cache (True), or nothing at all when no stage finished."""
    if not work.exists():
        return False
    for leftover in work.iterdir():
        if leftover.name != CACHE_FOLDER:
            _remove(leftover)
    if _cache_entries(work):
        return True
    _remove(work)
    return False


def write_error(error: OSError, output: Path) -> UserError | None:
    """The one-line UserError for a full disk or an unwritable folder, None for any other OSError."""
    if error.errno not in _WRITE_ERRORS:
        return None
    if error.filename and output.parent.resolve() not in Path(os.fsdecode(error.filename)).resolve().parents:
        return None  # an input that cannot be read is not the output's fault
    where = f" ({error.filename})" if error.filename else ""
    kept = f"; the previous results in {output} are unchanged" if output.exists() else ""
    fix = "free some space" if error.errno in _FULL_ERRORS else "make the folder writable"
    return UserError(f"cannot write {output}: {error.strerror or error}{where}; {fix} or choose another {param('output')}{kept}")


@contextlib.contextmanager
def reserved_output(output: Path | None, overwrite: bool) -> Iterator[Path | None]:
    """The work folder of a run writing `output` (None: nothing is written), locked for the run's duration."""
    if output is None:
        yield None
        return
    if output.exists() and not output.is_dir():
        raise UserError(f"{param('output')} {output} is a file; give a folder")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise UserError(
            f"output folder {output} already holds results; pass {param('overwrite', True)} or choose another "
            f"{param('output')}"
        )
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with output_lock(output):
            work = work_folder(output)
            try:
                yield _prepare_work(output, overwrite)
            except BaseException as error:
                problem = error if isinstance(error, UserError) else None
                if isinstance(error, OSError):
                    problem = write_error(error, output)
                kept = _discard_failed(work)
                note = f"the finished stages' cache is kept in {work / CACHE_FOLDER}: rerun with the same {param('output')} to resume"
                if problem is not None:  # still one line
                    raise UserError(f"{problem}; {note}" if kept else str(problem)) from None
                if kept and not isinstance(error, KeyboardInterrupt):  # the command line says it for Ctrl-C
                    logger.warning("%s", note)
                raise
    except OSError as error:  # taking the lock or preparing the work folder
        problem = write_error(error, output)
        if problem is None:
            raise
        raise problem from None


def commit_output(work: Path, output: Path) -> None:
    """Swap the finished work folder into place; the old results (if any) go only after the new ones are there."""
    raise_if_interrupted()  # a stopped run publishes nothing, even where the signal's exception was swallowed
    trash = None
    if output.exists():
        trash = output.parent / f".{output.name}.old-{int(time.time())}"
        output.rename(trash)
    try:
        work.rename(output)
    except OSError:
        if trash is not None:
            trash.rename(output)  # put the previous results back
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
