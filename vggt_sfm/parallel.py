"""Work spread over forked processes, for stages whose inner loops hold the GIL (pycolmap's SIFT, per-pair numpy).

Forked workers inherit the parent's memory, so the mapped function may be a closure over large data (features of
every image): nothing is pickled on the way in but the job itself, and only the result on the way back.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

import torch

J = TypeVar("J")
R = TypeVar("R")

# Set in each worker by the pool's initializer (inherited through fork, never pickled); unused in the parent.
_function: Callable | None = None


def _install(function: Callable) -> None:
    global _function
    _function = function


def _call(job):
    return _function(job)


def default_workers(requested: int = 0) -> int:
    """`requested`, or as many workers as torch uses threads (the cores it was given) when 0."""
    return requested if requested > 0 else torch.get_num_threads()


def fork_map(function: Callable[[J], R], jobs: Iterable[J], workers: int, chunksize: int = 1) -> Iterator[R]:
    """`function(job)` for every job, in order, in `workers` forked processes; in this process when `workers`
    <= 1 or off Linux (Windows has no fork; on macOS, forking a process that has loaded system frameworks is
    unsafe). The workers must not use torch."""
    jobs = list(jobs)
    workers = min(workers, len(jobs))
    if workers <= 1 or not sys.platform.startswith("linux"):
        yield from map(function, jobs)
        return
    context = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_install, initargs=(function,))
    try:
        yield from pool.map(_call, jobs, chunksize=chunksize)
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM, an error, the caller stopping early): drop the jobs not yet started
        # instead of waiting for all of them.
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)
