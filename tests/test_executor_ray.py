"""The Ray executor on a private Ray instance in this process (2 CPUs, a 200 MB object store, loopback only):
the same results in the same order as the local executor, errors as locally, a killed worker retried; and a whole
reconstruction with `backend.name="ray"` equal to the local one, even when a worker is killed mid-run."""

import importlib.util
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pycolmap
import pytest

from vggt_sfm import pipeline
from vggt_sfm.config import apply_overrides, load_preset
from vggt_sfm.errors import UserError
from vggt_sfm.executor import LocalExecutor

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="Ray is not installed (pip install -e \".[ray]\")"
)

DATA = Path(__file__).resolve().parents[1] / "data" / "fountain"
# Small but real: the default preset with fewer keypoints and rounds, so that two runs stay within a minute.
SMALL = [(["features", "max_keypoints"], 1024), (["refine", "rounds"], 3)]


@pytest.fixture(scope="module")
def ray_executor():
    from vggt_sfm.executor_ray import RayExecutor

    executor = RayExecutor(num_cpus=2, object_store_memory=200 * 2**20)
    yield executor
    executor.close()


def test_ray_results_equal_the_local_ones_in_order(ray_executor):
    data = np.random.default_rng(0).normal(size=(2000, 500))  # 8 MB, sent once through the object store

    def row_norm(k: int) -> float:
        return float(np.linalg.norm(data[k]))

    jobs = list(range(0, 2000, 7))
    local = list(LocalExecutor().map(row_norm, jobs, workers=2))
    assert list(ray_executor.map(row_norm, jobs)) == local
    assert list(ray_executor.map(row_norm, jobs, batch_size=50)) == local
    assert list(ray_executor.map(row_norm, [])) == []


def test_an_error_in_a_ray_task_reaches_the_caller_as_raised(ray_executor):
    def fails_on_five(k: int) -> int:
        if k == 5:
            raise UserError(f"image {k} cannot be read")
        return k

    with pytest.raises(UserError, match="image 5 cannot be read") as raised:
        list(ray_executor.map(fails_on_five, range(10)))
    assert type(raised.value) is UserError  # the task's own exception, not Ray's wrapper


def test_a_worker_that_dies_is_retried_and_the_results_are_complete(ray_executor, tmp_path):
    marker = tmp_path / "killed-once"

    def dies_once_on_three(k: int) -> int:
        if k == 3 and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)  # the worker process dies mid-task, as on a lost node
        return k * k

    assert list(ray_executor.map(dies_once_on_three, range(8))) == [k * k for k in range(8)]
    assert marker.exists()


def test_a_worker_that_dies_on_every_try_stops_the_map_with_one_line(ray_executor):
    from vggt_sfm.executor_ray import RayExecutor

    def always_dies(k: int) -> int:
        os.kill(os.getpid(), signal.SIGKILL)
        return k

    expected = r"a Ray task failed 2 times \(WorkerCrashedError\): its worker process or node died each time"
    with pytest.raises(UserError, match=expected) as raised:
        list(RayExecutor(max_retries=1).map(always_dies, range(2)))
    assert "\n" not in str(raised.value) and "backend.max_retries" in str(raised.value)


def _config(backend: dict):
    return apply_overrides(load_preset("default"), SMALL + [(["backend"], backend)])


@pytest.fixture(scope="module")
def local_run():
    start = time.perf_counter()
    result = pipeline.run(DATA / "images", predictions=DATA / "prior_vggt_sim.npz", config=_config({}), progress=False)
    return result, time.perf_counter() - start


def _assert_same_model(ours: pycolmap.Reconstruction, local: pycolmap.Reconstruction) -> None:
    assert ours.num_reg_images() == local.num_reg_images() == 11
    assert ours.num_points3D() == local.num_points3D() > 500
    for image_id, image in local.images.items():
        other = ours.images[image_id]
        assert other.name == image.name
        np.testing.assert_allclose(other.cam_from_world().matrix(), image.cam_from_world().matrix(), atol=1e-6)


@pytest.mark.slow
def test_a_ray_reconstruction_equals_the_local_one(ray_executor, local_run):
    local, local_seconds = local_run
    start = time.perf_counter()
    ours = pipeline.run(DATA / "images", predictions=DATA / "prior_vggt_sim.npz", config=_config({"name": "ray"}),
                        progress=False)  # fmt: skip
    ray_seconds = time.perf_counter() - start
    print(f"local {local_seconds:.1f} s, ray {ray_seconds:.1f} s (ratio {ray_seconds / local_seconds:.2f})")
    _assert_same_model(ours.reconstruction, local.reconstruction)
    assert ours.summary.config["backend"]["name"] == "ray"


def _ray_task_workers() -> list[int]:
    """Pids of this test's Ray workers running a batch now (descendants of this process named by Ray)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            if not cmdline.startswith(b"ray::_run_batch"):
                continue
            pid = int(entry)
            while pid > 1:  # our own descendant: the private instance's raylet is a child of this process
                pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                if pid == os.getpid():
                    found.append(int(entry))
                    break
        except (OSError, ValueError, IndexError):
            continue
    return found


@pytest.mark.slow
def test_a_reconstruction_survives_a_killed_worker(ray_executor, local_run):
    killed: list[int] = []
    stop = threading.Event()

    def kill_the_first_busy_worker():
        while not stop.is_set() and not killed:
            for pid in _ray_task_workers():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_first_busy_worker, daemon=True)
    killer.start()
    try:
        ours = pipeline.run(DATA / "images", predictions=DATA / "prior_vggt_sim.npz", config=_config({"name": "ray"}),
                            progress=False)  # fmt: skip
    finally:
        stop.set()
        killer.join()
    assert killed, "no Ray worker was seen running a task"
    _assert_same_model(ours.reconstruction, local_run[0].reconstruction)
