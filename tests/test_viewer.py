"""`vggt-sfm view`: the viser viewer of an output folder or a COLMAP model, looked at by a real headless Chromium.

A small real run (four fountain photos with their simulated prior, few keypoints) gives the model. The scene the
server holds is checked against the model (every point in its colour, one frustum per image with its photo, the
prior's frusta); the browser loads viser's client, connects, and renders it (the server asks that client for a
frame: the points and frusta arrive, and hiding the points with the error slider changes the frame). The command
serves until Ctrl-C or SIGTERM, exits 0 and frees its port. Bad input: one line, exit status 2.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pycolmap
import pytest
from browser import browser_unavailable, distinct_colours, headless_chromium

from vggt_sfm.cli import main
from vggt_sfm.errors import UserError
from vggt_sfm.predictions import load_predictions, save_predictions
from vggt_sfm.report_html import model_statistics

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "fountain"
NAMES = [f"{i:04d}.jpg" for i in range(4)]
TIMEOUT = 60  # s: the longest any step may wait (the browser's start, the first frame, the command's exit)

needs_viser = pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import viser"], capture_output=True).returncode != 0,
    reason='viser is not installed (pip install -e ".[viewer]")',
)
needs_browser = pytest.mark.skipif(browser_unavailable() is not None, reason=str(browser_unavailable()))


@pytest.fixture(scope="module")
def run_output(tmp_path_factory) -> Path:
    """One command-line run (so that its summary records the `--images` folder); its output folder."""
    root = tmp_path_factory.mktemp("viewer_scene")
    images = root / "images"
    images.mkdir()
    for name in NAMES:
        shutil.copy(DATA / "images" / name, images / name)
    save_predictions(load_predictions(DATA / "prior_vggt_sim.npz").subset(NAMES), root / "prior.npz")
    output = root / "out"
    run = subprocess.run([
        sys.executable, "-m", "vggt_sfm", "reconstruct", "--images", str(images), "--predictions",
        str(root / "prior.npz"), "--output", str(output), "--set", "features.max_keypoints=512",
        "--set", "features.resize_max=640", "--no-report", "--quiet",
    ], cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    return output


def _model_variant(run_output: Path, folder: Path, keep_points: bool, keep_images: int | None) -> Path:
    """A copy of the run's model with its points deleted and / or all but `keep_images` frames deregistered."""
    rec = pycolmap.Reconstruction(run_output / "sparse" / "0")
    if not keep_points:
        for point_id in list(rec.point3D_ids()):
            rec.delete_point3D(point_id)
    if keep_images is not None:
        for frame_id in sorted(rec.reg_frame_ids())[keep_images:]:
            rec.deregister_frame(frame_id)
    folder.mkdir(parents=True)
    rec.write(folder)
    return folder


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(condition, what: str, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value is not None and value is not False and (not hasattr(value, "__len__") or len(value)):
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_the_scene_holds_the_model_its_photos_and_the_prior(run_output):
    from vggt_sfm.viewer import load_scene

    scene = load_scene(run_output)
    rec = pycolmap.Reconstruction(run_output / "sparse" / "0")
    assert scene.warnings == [] and scene.label == str(run_output)
    assert scene.num_points == rec.num_points3D() > 100 and scene.cameras.num_images == rec.num_reg_images() == 4
    by_position = {tuple(np.round(p.xyz, 3)): p for p in rec.points3D.values()}
    for xyz, rgb, length in zip(scene.xyz[:50], scene.rgb[:50], scene.track_lengths[:50]):
        point = by_position[tuple(np.round(xyz.astype(np.float64), 3))]
        assert tuple(rgb) == tuple(point.color) and length == point.track.length()
    # Each point's error is the mean over its track: weighted by the track lengths, the mean over the observations
    # (as the report projects them); unweighted, COLMAP's mean reprojection error (a mean over the points).
    assert np.isclose(np.average(scene.point_errors, weights=scene.track_lengths),
                      np.mean(model_statistics(rec).errors), rtol=1e-6)  # fmt: skip
    assert np.isclose(np.mean(scene.point_errors), rec.compute_mean_reprojection_error(), rtol=1e-9)
    # The photos are the run's --images folder, found from its summary.
    assert scene.images_dir == run_output.parent / "images"
    # The prior's cameras, moved into the model's frame: a 2-degree simulated prior lies close to the result.
    assert scene.prior is not None and sorted(scene.prior.image_names) == NAMES
    moved = np.linalg.norm(scene.prior.centers() - scene.cameras.centers(), axis=1)
    assert np.median(moved) < 0.2 * scene.extent
    # The sliders' filter: a threshold keeps exactly the points under it.
    threshold = float(np.median(scene.point_errors))
    assert scene.point_mask(threshold, 1).sum() == np.sum(scene.point_errors <= threshold)
    assert scene.point_mask(np.inf, 3).sum() == np.sum(scene.track_lengths >= 3)


@needs_viser
@needs_browser
def test_the_browser_loads_the_viewer_and_renders_the_scene(run_output, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from vggt_sfm.viewer import load_scene, start_viewer

    scene = load_scene(run_output)
    port = _free_port()
    viewer = start_viewer(scene, port=port)
    driver = None
    try:
        assert viewer.port == port and viewer.url == f"http://127.0.0.1:{port}"
        # The server's scene: the point cloud (every point) and a frustum per image with its photo, the prior's too.
        assert viewer.server.scene.get_handle_by_name("/points") is viewer.point_cloud
        assert len(viewer.point_cloud.points) == scene.num_points == viewer.num_points_shown
        assert [viewer.server.scene.get_handle_by_name(f"/cameras/{k:05d}") for k in range(4)] == viewer.frustums
        assert len(viewer.prior_frustums) == 4 and all(h.visible for h in viewer.prior_frustums)
        for handle in viewer.frustums:
            assert handle.image is not None and handle.image.ndim == 3 and max(handle.image.shape[:2]) == 240

        driver = headless_chromium(tmp_path, width=1000, height=800)
        driver.set_page_load_timeout(TIMEOUT)
        driver.get(viewer.url)
        WebDriverWait(driver, TIMEOUT).until(lambda d: d.execute_script("return !!document.querySelector('canvas')"))
        clients = _wait_for(lambda: viewer.server.get_clients(), "the browser to connect to the server")
        client = next(iter(clients.values()))
        # A frame from the browser's renderer (the server asks the connected client for it): the scene arrived.
        frame = _wait_for(lambda: _render(client), "a frame with the scene in it")
        viewer.max_error.value = 0.0  # no point has zero error: all are hidden
        assert viewer.num_points_shown == 0 and not viewer.point_cloud.visible
        empty = _wait_for(lambda: _render(client, differing_from=frame), "a frame without the points")
        viewer.max_error.value = viewer.max_error.max
        assert viewer.num_points_shown == scene.num_points
        assert np.abs(frame.astype(int) - empty.astype(int)).max() > 100  # the points were drawn, and went

        page = driver.get_screenshot_as_png()
        canvas = driver.find_element(By.TAG_NAME, "canvas").screenshot_as_png
        (tmp_path / "viewer.png").write_bytes(page)
        assert distinct_colours(canvas) > 30  # the 3D view drew photos, frusta and points: not a blank canvas
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == [], errors
    finally:
        if driver is not None:
            driver.quit()
        viewer.stop()
    assert _port_is_free(port)


def _render(client, differing_from: np.ndarray | None = None) -> np.ndarray | None:
    """A frame of the client's view with something in it (and unlike `differing_from`), else None (retry)."""
    frame = client.get_render(height=400, width=500, timeout=TIMEOUT)
    if len(np.unique(frame.reshape(-1, frame.shape[-1]), axis=0)) < 20:
        return None  # the scene is not drawn yet
    if differing_from is not None and np.array_equal(frame, differing_from):
        return None
    return frame


class _Command:
    """`vggt-sfm view ...` as a process of its own, its stdout read line by line as it comes."""

    def __init__(self, args: list[str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vggt_sfm", "view", *args], cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.process.stdout.readline, "")),
                                       daemon=True)  # fmt: skip
        self.reader.start()

    def address(self) -> str:
        """host:port, once the command says it serves there."""
        try:
            line = _wait_for(lambda: next((text for text in self.lines if "http://" in text), None)
                             or self.process.poll() is not None, "the command to print its address")  # fmt: skip
        except AssertionError:
            self.process.kill()
            raise
        if line is True:
            raise AssertionError(f"the viewer exited with {self.process.returncode}: {self.process.stderr.read()}")
        return line.split("http://", 1)[1].split()[0]

    def stop(self, signum: int) -> tuple[int, str, str]:
        """Send `signum` and wait for the exit: (exit status, stdout, stderr)."""
        self.process.send_signal(signum)
        try:
            self.process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError("the viewer did not stop within a minute of the signal") from None
        self.reader.join(timeout=TIMEOUT)
        return self.process.returncode, "".join(self.lines), self.process.stderr.read()


@needs_viser
def test_the_command_serves_until_ctrl_c_and_frees_its_port(run_output):
    command = _Command([str(run_output), "--port", "0"])
    address = command.address()
    port = int(address.rsplit(":", 1)[1])
    try:
        with urllib.request.urlopen(f"http://{address}", timeout=TIMEOUT) as response:
            assert response.status == 200 and b"<html" in response.read().lower()
        # A second viewer on the same port: one line naming the port and the fix, before anything is read.
        second = subprocess.run([sys.executable, "-m", "vggt_sfm", "view", str(run_output), "--port", str(port)],
                                cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
        assert second.returncode == 2 and second.stdout == "", second
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert f"port {port} on 127.0.0.1 is already in use" in second.stderr and "--port" in second.stderr
    finally:
        code, stdout, stderr = command.stop(signal.SIGINT)
    assert code == 0, stderr
    assert "viewer stopped" in stdout and "Traceback" not in stderr and "viser" not in stdout.lower()
    assert _port_is_free(port)


@needs_viser
def test_a_model_with_one_image_and_no_points_still_opens(run_output, tmp_path):
    from vggt_sfm.viewer import load_scene, start_viewer

    model = _model_variant(run_output, tmp_path / "one_image", keep_points=False, keep_images=1)
    scene = load_scene(model, images_dir=run_output.parent / "images")
    assert scene.num_points == 0 and scene.cameras.num_images == 1 and scene.prior is None
    assert scene.warnings == [f"{model} has no 3D points: showing its 1 camera(s) only"]
    viewer = start_viewer(scene, port=0)
    try:
        assert len(viewer.frustums) == 1 and viewer.frustums[0].image is not None and viewer.point_cloud is None
        assert viewer.max_error.disabled and viewer.show_prior.disabled and viewer.filter_points() == 0
    finally:
        viewer.stop()

    # The command opens it too (the warning on stderr, one line) and SIGTERM ends it as Ctrl-C does.
    command = _Command([str(model), "--port", "0"])
    address = command.address()
    code, stdout, stderr = command.stop(signal.SIGTERM)
    assert code == 0 and "viewer stopped" in stdout, stderr
    assert "has no 3D points: showing its 1 camera(s) only" in stderr
    assert "the photos were not found" in stderr and "--images" in stderr  # a bare model folder: no photos beside it
    assert _port_is_free(int(address.rsplit(":", 1)[1]))


@needs_viser
def test_a_plain_colmap_model_shows_points_and_cameras_without_a_prior(run_output, tmp_path):
    from vggt_sfm.viewer import load_scene, start_viewer

    project = tmp_path / "project"  # COLMAP's layout: project/images beside project/sparse/0
    shutil.copytree(run_output / "sparse" / "0", project / "sparse" / "0")
    shutil.copytree(run_output.parent / "images", project / "images")
    scene = load_scene(project / "sparse" / "0")
    assert scene.prior is None and scene.images_dir == project / "images" and scene.warnings == []
    viewer = start_viewer(scene, port=0)
    try:
        assert len(viewer.frustums) == 4 and viewer.prior_frustums == [] and viewer.num_points_shown > 100
        viewer.min_track.value = 3
        assert viewer.num_points_shown == int(np.sum(scene.track_lengths >= 3)) < scene.num_points
        viewer.show_images.value = False
        assert all(handle.image is None for handle in viewer.frustums)
        viewer.show_images.value = True
        assert all(handle.image is not None for handle in viewer.frustums)
    finally:
        viewer.stop()


def test_bad_input_is_one_line_and_exit_status_2(run_output, tmp_path, monkeypatch, capsys):
    def refused(args: list[str], *expected: str) -> None:
        code = main(["view", *args])
        stdout, stderr = capsys.readouterr()
        assert code == 2 and stdout == "", (code, stdout, stderr)
        assert len(stderr.strip().splitlines()) == 1, stderr
        for text in expected:
            assert text in stderr, stderr

    pytest.importorskip("viser")
    (tmp_path / "photo.jpg").write_bytes(b"not a model")
    refused([str(tmp_path)], str(tmp_path), "neither a vggt-sfm output")
    refused([str(tmp_path / "missing")], str(tmp_path / "missing"), "is not a folder")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "cameras.bin").write_bytes(b"garbage")
    (broken / "images.bin").write_bytes(b"garbage")
    refused([str(broken)], "cannot read a COLMAP model")
    empty = _model_variant(run_output, tmp_path / "empty", keep_points=False, keep_images=0)
    refused([str(empty)], str(empty), "no registered image and no 3D point")
    refused([str(run_output), "--images", str(tmp_path / "nowhere")], "--images", "is not a folder")
    refused([str(run_output), "--port", "70000"], "--port 70000 is not a port number")
    refused([str(run_output), "--host", "no-such-host.invalid"], "--host no-such-host.invalid")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused([str(run_output), "--port", str(port)], f"port {port} on 127.0.0.1 is already in use",
                f"--port {port + 1}")  # fmt: skip

    monkeypatch.setitem(sys.modules, "viser", None)  # `import viser` raises ImportError
    refused([str(run_output)], 'pip install -e ".[viewer]"')
    with pytest.raises(UserError, match="needs viser"):
        from vggt_sfm.viewer import start_viewer, load_scene

        start_viewer(load_scene(run_output), port=0)


def test_the_package_does_not_import_viser():
    code = "import sys, vggt_sfm, vggt_sfm.cli, vggt_sfm.viewer; vggt_sfm.cli.build_parser(); print('viser' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0 and result.stdout.strip() == "False", result
