"""The Ray executor: a stage's jobs as Ray tasks, on a cluster or a private Ray instance on this machine.

The only module that imports ray (an optional extra: `pip install -e ".[ray]"`). The mapped function, with the
data it closes over (every image's features, the prior), goes into the object store once (`ray.put`); each task
gets a reference to it and a batch of jobs. A task whose worker process or node dies is rerun (`max_retries`), so
a lost worker costs time, not the run.

Every node needs vggt-sfm installed (the same version) and, for feature extraction, the images folder at the same
path (a shared file system): tasks read the images themselves rather than receive them through the driver.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from .errors import UserError, param
from .executor import Executor

J = TypeVar("J")
R = TypeVar("R")

logger = logging.getLogger(__name__)

# Ray replaces a loopback node address with the machine's routable one and then listens on every interface; a
# private instance serves this process alone, so it keeps to loopback. Read when ray is imported.
_LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _import_ray(private: bool):
    if private:
        os.environ.setdefault(_LOOPBACK_ONLY, "0")
    import ray

    return ray


def _check_reachable(address: str, timeout_s: float) -> None:
    """Refuse an address that does not answer, within `timeout_s`: Ray itself would retry for minutes."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(
            f"Ray address {address!r} is not host:port (e.g. 127.0.0.1:6379, or auto); check {param('backend.address')}"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as error:
        reason = "nothing answered" if isinstance(error, TimeoutError) else error.strerror or str(error)
        raise UserError(
            f"cannot reach the Ray cluster at {address} ({reason} within {timeout_s:g} s); start it with "
            f"`ray start --head --port={port}` there, or fix {param('backend.address')}"
        ) from None


@contextlib.contextmanager
def _stderr_kept_aside() -> Iterator[None]:
    """Ray's core writes its connection retries (a line a second) to the process's stderr, below Python's
    logging; they go to a temporary file instead, so that a failed connection reads as one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as aside:
        os.dup2(aside.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _run_batch(function: Callable[[J], R], jobs: list[J]) -> list[R]:
    return [function(job) for job in jobs]


class RayExecutor(Executor):
    """Jobs as Ray tasks. `address`: None starts a private Ray instance here (`num_cpus`, `object_store_memory`
    in bytes); "auto" or "host:port" joins a running cluster. Closing disconnects (and stops a private instance)
    only when this executor connected."""

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        batch_size: int = 0,
        num_cpus: int | None = None,
        object_store_memory: int | None = None,
        max_retries: int = 3,
        connect_timeout_s: float = 10.0,
    ) -> None:
        self.address, self.batch_size, self.max_retries = address, batch_size, max_retries
        ray = self._ray = _import_ray(private=address is None)
        self._connected_here = not ray.is_initialized()
        if not self._connected_here and address not in (None, "auto"):
            connected = ray.get_runtime_context().gcs_address
            if address.split("://", 1)[-1] != connected:
                raise UserError(
                    f"this process is already connected to the Ray cluster at {connected}, not {address}; use "
                    f"that one (or auto) in {param('backend.address')}, or call ray.shutdown() first"
                )
        if self._connected_here:
            if address not in (None, "auto"):
                _check_reachable(address, connect_timeout_s)
            options = dict(logging_level=logging.WARNING, log_to_driver=False, configure_logging=False)
            if address is None:
                options.update(num_cpus=num_cpus, object_store_memory=object_store_memory, include_dashboard=False)
            try:
                with _stderr_kept_aside():
                    ray.init(address=address, **options)
            except ConnectionError as error:
                reason = str(error).splitlines()[0].rstrip(".")
                if reason.startswith("Failed to connect"):
                    reason = "it answers, but not as a Ray head node of this Ray version that accepts this auth token"
                raise UserError(
                    f"cannot connect to the Ray cluster at {address} ({reason}); start one with `ray start --head`, "
                    f"or pass its host:port in {param('backend.address')}"
                ) from None
        self._task = ray.remote(max_retries=max_retries, retry_exceptions=False)(_run_batch)
        resources = ray.cluster_resources()
        self.num_cpus = max(1, int(resources.get("CPU", 1)))
        self.has_gpu = resources.get("GPU", 0) > 0
        logger.info("ray: %d CPUs%s on %d node(s)", self.num_cpus, ", GPUs" if self.has_gpu else "",
                    len([n for n in ray.nodes() if n.get("Alive")]))  # fmt: skip

    def _batches(self, jobs: list, stage_batch_size: int) -> list[list]:
        if self.batch_size > 0:
            size = self.batch_size
        else:
            # About two batches per CPU: few enough that a task's overhead (ms) stays small next to its jobs,
            # enough that a slow batch does not hold the others up.
            size = max(1, stage_batch_size, math.ceil(len(jobs) / (2 * self.num_cpus)))
        return [jobs[start : start + size] for start in range(0, len(jobs), size)]

    def map(
        self,
        function: Callable[[J], R],
        jobs: Iterable[J],
        workers: int = 0,
        batch_size: int = 1,
        gpu: bool = False,
    ) -> Iterator[R]:
        ray = self._ray
        jobs = list(jobs)
        if not jobs:
            return
        task = self._task.options(num_gpus=1) if gpu and self.has_gpu else self._task
        function_ref = ray.put(function)  # once, however many tasks read it
        pending = [task.remote(function_ref, batch) for batch in self._batches(jobs, batch_size)]
        try:
            for ref in list(pending):
                try:
                    results = ray.get(ref)
                except ray.exceptions.RayTaskError as error:
                    # The task's own exception (a UserError naming a file, a bug): raised as locally.
                    raise error.cause if isinstance(error.cause, UserError) else error
                except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                        ray.exceptions.ObjectLostError, ray.exceptions.TaskUnschedulableError) as error:  # fmt: skip
                    raise UserError(
                        f"a Ray task failed {self.max_retries + 1} times ({type(error).__name__}): its worker "
                        "process or node died each time; check the nodes' memory and `ray logs` (raise "
                        f"{param('backend.max_retries')} for a cluster that loses nodes)"
                    ) from None
                pending.remove(ref)
                yield from results
        finally:
            # Interrupted, failed, or the caller stopped early: the tasks not finished are not needed. (Not
            # force=True: Ray 2.60 aborts the driver when a force-cancelled task completes at the same time.)
            if pending:
                _, unfinished = ray.wait(pending, num_returns=len(pending), timeout=0)
                for ref in unfinished:
                    ray.cancel(ref)

    def close(self) -> None:
        if self._connected_here and self._ray.is_initialized():
            self._ray.shutdown()
