"""A real two-node Ray cluster on this machine (`ray start --head --node-ip-address=127.0.0.1` and a second
`ray start --address` node with a custom resource `node2`), started and stopped by the tests: tasks run on both
nodes, and a reconstruction there equals the local one. An address where no cluster answers is one line and
exit status 2.

Only the processes these tests started are stopped (found by their temporary folder), never other Ray instances
(`ray stop --force` would stop every Ray process of the user on the machine).
"""

import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from vggt_sfm import cli, pipeline
from vggt_sfm.config import apply_overrides, load_preset

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None or shutil.which("ray") is None,
    reason="Ray is not installed (pip install -e \".[ray]\")",
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "fountain"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _cluster_processes(temp_dir: str) -> list[int]:
    """Pids of the processes whose command line names `temp_dir`, and all their descendants (the workers)."""
    roots, parents = set(), {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = _ppid(int(entry))
                if temp_dir.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    roots.add(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    found = set(roots)
    changed = True
    while changed:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        found |= children
        changed = bool(children)
    return sorted(found)


def _stop(temp_dir: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _cluster_processes(temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        for _ in range(50):
            if not _cluster_processes(temp_dir):
                return
            time.sleep(0.1)


def _ray_start(args: list[str], auth: dict[str, str]) -> None:
    # Ray (2.60) keeps to loopback only in single-machine mode, where it refuses a second node; a multi-node
    # cluster rewrites 127.0.0.1 to the machine's own address and listens on every interface while the test runs.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", **auth}
    ports = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
             "--runtime-env-agent-port"]  # fmt: skip
    args += [f"{option}={_free_port()}" for option in ports]
    command = ["ray", "start", *args, "--disable-usage-stats", "--num-cpus=1", "--object-store-memory=200000000"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.fixture(scope="module")
def loopback_cluster():
    temp_dir = tempfile.mkdtemp(prefix="vsray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = _free_port()
    # The cluster's own token (Ray's token authentication), given to both nodes and to this process, the driver.
    token = Path(temp_dir) / "auth_token"
    token.write_text(secrets.token_hex(32))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    try:
        _ray_start(["--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--include-dashboard=false",
                    f"--ray-client-server-port={_free_port()}", f"--temp-dir={temp_dir}"], auth)  # fmt: skip
        _ray_start([f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", '--resources={"node2": 1}',
                    f"--temp-dir={temp_dir}"], auth)  # fmt: skip
        # Drivers run in processes of their own: a process keeps the Ray settings (auth) of its first connection.
        yield f"127.0.0.1:{port}", {**os.environ, **auth, "PYTHONPATH": str(ROOT)}
    finally:
        _stop(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_an_address_that_does_not_answer_is_one_line_and_exit_2(tmp_path, capsys):
    address = f"127.0.0.1:{_free_port()}"  # nothing listens there
    start = time.perf_counter()
    code = cli.main(["reconstruct", "--images", str(DATA / "images"), "--predictions", str(DATA / "prior_vggt_sim.npz"),
                     "--output", str(tmp_path / "out"), "--backend", "ray", "--ray-address", address])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert f"cannot reach the Ray cluster at {address}" in err and "ray start --head" in err and "--ray-address" in err
    assert time.perf_counter() - start < 30
    assert list(tmp_path.iterdir()) == []  # no output folder, no .partial, no lock


NODES_OF_EACH_JOB = """
import json, sys, time
import ray
from vggt_sfm.executor_ray import RayExecutor

def where(k):
    time.sleep(0.5)  # long enough that one node alone cannot take every batch first
    return k, ray.get_runtime_context().get_node_id()

with RayExecutor(address=sys.argv[1]) as executor:
    nodes = {node["NodeID"]: node["Resources"] for node in ray.nodes() if node["Alive"]}
    ran = list(executor.map(where, range(8), batch_size=1))
print(json.dumps({"nodes": nodes, "ran": ran}))
"""


@pytest.mark.slow
def test_tasks_run_on_both_nodes_of_a_loopback_cluster(loopback_cluster):
    address, env = loopback_cluster
    done = subprocess.run([sys.executable, "-c", NODES_OF_EACH_JOB, address], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    nodes, ran = found["nodes"], found["ran"]
    assert [k for k, _ in ran] == list(range(8))
    assert len(nodes) == 2
    assert {node for _, node in ran} == set(nodes)
    (second,) = [node_id for node_id, resources in nodes.items() if resources.get("node2")]
    print({node_id[:8]: sum(n == node_id for _, n in ran) for node_id in nodes}, "tasks per node")
    assert any(node == second for _, node in ran)


@pytest.mark.slow
def test_a_reconstruction_on_the_cluster_equals_the_local_one(loopback_cluster, tmp_path):
    address, env = loopback_cluster
    config = apply_overrides(load_preset("default"), [(["features", "max_keypoints"], 1024), (["refine", "rounds"], 3)])
    local = pipeline.run(DATA / "images", predictions=DATA / "prior_vggt_sim.npz", config=config, progress=False)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "vggt_sfm", "reconstruct", "--images", str(DATA / "images"), "--predictions",
         str(DATA / "prior_vggt_sim.npz"), "--output", str(out), "--max-keypoints", "1024", "--ba-rounds", "3",
         "--backend", "ray", "--ray-address", address, "--quiet"],
        env=env, capture_output=True, text=True, timeout=400, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    import pycolmap

    ours = pycolmap.Reconstruction(out / "sparse" / "0")
    assert ours.num_points3D() == local.reconstruction.num_points3D() > 500
    for image_id, image in local.reconstruction.images.items():
        np.testing.assert_allclose(
            ours.images[image_id].cam_from_world().matrix(), image.cam_from_world().matrix(), atol=1e-6
        )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["backend"]["name"] == "ray" and summary["config"]["backend"]["address"] == address
