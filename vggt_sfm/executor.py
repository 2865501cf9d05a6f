"""Where the per-image and per-pair work runs: one small interface that the stages call, local or on Ray.

A stage hands `Executor.map` a function and its jobs (image names, pair indices) and gets the results back in
job order. `LocalExecutor` runs them in forked processes on this machine (or in this process); `RayExecutor`
(`vggt_sfm.executor_ray`, the only module that imports ray) sends batches of jobs to a Ray cluster. No stage knows
which one it has, so a Ray run computes the same thing as a local one.

A mapped function must be picklable for Ray (a closure over plain data is: Ray pickles it with cloudpickle);
the local executor never pickles it, since forked workers inherit it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from .errors import UserError, param
from .signals import raise_if_interrupted

J = TypeVar("J")
R = TypeVar("R")

BACKENDS = ("local", "ray")


@dataclass
class BackendConfig:
    """Where the feature extraction, matching and verification jobs run.

    `name="local"` (default) uses this machine's cores; `"ray"` sends the jobs to a Ray cluster: `address`
    "host:port" or "auto" joins a running one (`ray start --head`), None starts a private one on this machine.
    """

    name: str = "local"  # "local" | "ray"
    address: str | None = None  # ray: "host:port", "auto", or None for a private Ray instance on this machine
    batch_size: int = 0  # ray: jobs per task; 0 sizes batches to about two per CPU of the cluster
    num_cpus: int = 0  # ray, private instance only: CPUs it may use (0: all cores)
    object_store_mb: int = 0  # ray, private instance only: object store size (0: Ray's default, 30 % of memory)
    max_retries: int = 3  # ray: times a task is rerun when its worker process or node dies
    connect_timeout_s: float = 10.0  # ray: how long an address may take to answer before the run stops


class Executor:
    """Maps a function over jobs and yields the results in job order."""

    name = "executor"

    def map(
        self,
        function: Callable[[J], R],
        jobs: Iterable[J],
        workers: int = 0,
        batch_size: int = 1,
        gpu: bool = False,
    ) -> Iterator[R]:
        """`function(job)` for every job, yielded in job order as they finish.

        `workers` and `batch_size` are the stage's wishes for this machine: 0 workers is one per core, 1 runs in
        this process (work that already spreads over the cores, such as torch); jobs go out `batch_size` at a time.
        `gpu`: the jobs run on a GPU where the executor has one.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release what the executor holds (a cluster connection); the local one holds nothing between maps."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class LocalExecutor(Executor):
    """Forked processes on Linux, this process elsewhere (see `fork_map`)."""

    name = "local"

    def map(
        self,
        function: Callable[[J], R],
        jobs: Iterable[J],
        workers: int = 0,
        batch_size: int = 1,
        gpu: bool = False,
    ) -> Iterator[R]:
        return fork_map(function, jobs, default_workers(workers), chunksize=batch_size)


def make_executor(config: BackendConfig) -> Executor:
    """The executor a `BackendConfig` names; a Ray one is connected here, so a wrong address stops the run
    before any work."""
    if config.name == "local":
        return LocalExecutor()
    if config.name == "ray":
        from .executor_ray import RayExecutor

        try:
            return RayExecutor(
                address=config.address,
                batch_size=config.batch_size,
                num_cpus=config.num_cpus or None,
                object_store_memory=config.object_store_mb * 2**20 or None,
                max_retries=config.max_retries,
                connect_timeout_s=config.connect_timeout_s,
            )
        except ModuleNotFoundError as error:
            if error.name != "ray":
                raise
            raise UserError(
                f"{param('backend.name', 'ray')} needs Ray, which is not installed (pip install -e \".[ray]\", "
                "or pip install 'ray[default]')"
            ) from None
    raise UserError(
        f"unknown backend {config.name!r} in {param('backend.name')} (choose one of: {', '.join(BACKENDS)})"
    )


@contextlib.contextmanager
def open_executor(config: BackendConfig | None) -> Iterator[Executor]:
    """`make_executor(config)` (local when None), closed at the end."""
    executor = make_executor(config or BackendConfig())
    try:
        yield executor
    finally:
        executor.close()


# ---------------------------------------------------------------------------------------------------------------
# Forked processes, for stages whose inner loops hold the GIL (pycolmap's SIFT, per-pair numpy).
#
# Forked workers inherit the parent's memory, so the mapped function may be a closure over large data (features of
# every image): nothing is pickled on the way in but the job itself, and only the result on the way back.

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
        for job in jobs:
            raise_if_interrupted()
            yield function(job)
        return
    context = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_install, initargs=(function,))
    try:
        for result in pool.map(_call, jobs, chunksize=max(1, chunksize)):
            raise_if_interrupted()  # a signal that landed in the fork callbacks lost its exception there
            yield result
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM, an error, the caller stopping early): drop the jobs not yet started
        # instead of waiting for all of them.
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)
