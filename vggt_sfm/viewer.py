"""`vggt-sfm view OUTPUT|MODEL`: the model in 3D in a browser, served on this machine with viser.

The points in their colours, every registered image as a frustum with its photo as a thumbnail, and, for a
vggt-sfm output folder, the prior's cameras (`prior_cameras.json`, moved into the model's frame as the report
does) beside them, toggled in the panel. Sliders filter the points shown by their reprojection error (the mean
over each point's track, in pixels) and by their track length: a COLMAP model holds no per-point confidence, and
the number of images that see a point is the measure of trust every model has.

viser is an optional dependency (`pip install -e ".[viewer]"`); this module imports it only when a viewer starts,
so `import vggt_sfm` and every other command work without it. The folder is read as `vggt-sfm report` reads it
(`report_html.read_report_inputs`): an output folder of `reconstruct`, or any COLMAP model folder.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import shlex
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from .errors import UserError, param
from .evaluation.metrics import cameras_from_reconstruction
from .images import read_image
from .prior import PriorCameras
from .report_html import _prior_in_model_frame, align_prior, read_report_inputs

logger = logging.getLogger(__name__)

VIEWER_INSTALL = 'pip install -e ".[viewer]"'
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
THUMBNAIL_MAX_SIDE = 240  # px: enough to recognise a photo on its frustum; keeps the scene light to send
FRUSTUM_SIZE = 0.15  # of the scene extent, as in the report's 3D view
POINT_SIZE = 0.02  # of the points' spread: a few pixels each in the first view
MODEL_COLOUR = (40, 90, 200)
PRIOR_COLOUR = (230, 120, 20)


def require_viser() -> Any:
    """The viser module; one line naming the install when it is missing."""
    try:
        import viser
    except ImportError:
        raise UserError(f"the viewer needs viser, which is not installed: run `{VIEWER_INSTALL}`") from None
    return viser


# ----------------------------------------------------------------------------------------------------------------
# What is shown (numpy only: no viser needed)


@dataclass
class ViewerScene:
    """A model as the viewer shows it: points, the registered cameras, the prior's cameras in the model's frame."""

    label: str
    xyz: np.ndarray  # (P,3) float32
    rgb: np.ndarray  # (P,3) uint8
    point_errors: np.ndarray  # (P,) px: mean reprojection error over each point's track
    track_lengths: np.ndarray  # (P,) int: images that see each point
    cameras: PriorCameras  # the model's registered images, by name
    prior: PriorCameras | None  # the prior's cameras moved into the model's frame; None when there is none
    extent: float  # a robust size of the scene: the frusta's size, the first view's distance
    images_dir: Path | None  # where the thumbnails come from; None when the photos were not found
    warnings: list[str] = field(default_factory=list)

    @property
    def num_points(self) -> int:
        return len(self.xyz)

    @property
    def point_spread(self) -> float:
        """The median distance of the points to their median (1.0 without points): the scale of a point's size."""
        if not self.num_points:
            return 1.0
        return float(np.median(np.linalg.norm(self.xyz - np.median(self.xyz, axis=0), axis=1))) or 1.0

    def point_mask(self, max_error: float, min_track_length: int) -> np.ndarray:
        """(P,) bool: the points whose reprojection error and track length pass the two thresholds."""
        return (self.point_errors <= max_error) & (self.track_lengths >= min_track_length)


def _run_images_dir(summary: dict[str, Any] | None) -> Path | None:
    """The `--images` folder a run's recorded command names (summary.json `command`), when there is one."""
    command = (summary or {}).get("command")
    if not command:
        return None
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    for i, word in enumerate(words):
        if word == "--images" and i + 1 < len(words):
            return Path(words[i + 1])
        if word.startswith("--images="):
            return Path(word.split("=", 1)[1])
    return None


def find_images_dir(folder: Path, model_dir: Path, summary: dict[str, Any] | None, names: list[str]) -> Path | None:
    """The photos of the model: the run's `--images` folder, else an `images/` folder beside the model (COLMAP's
    project layout: project/images, project/sparse/0); the first that holds one of `names`, or None."""
    candidates = [_run_images_dir(summary), folder / "images", model_dir.parent / "images",
                  model_dir.parent.parent / "images"]  # fmt: skip
    for candidate in candidates:
        if candidate is not None and candidate.is_dir() and any((candidate / name).is_file() for name in names):
            return candidate
    return None


def load_scene(folder: str | Path, images_dir: str | Path | None = None) -> ViewerScene:
    """Read an output folder or a COLMAP model folder for the viewer; a UserError when there is nothing to show.

    `images_dir`: the photos, for the thumbnails (default: found with `find_images_dir`; without them the frusta
    are drawn empty, with a warning). A model without points shows its cameras; one without registered images
    shows its points; one with neither is refused.
    """
    folder = Path(folder)
    inputs = read_report_inputs(folder)
    rec = inputs.reconstruction
    cameras = cameras_from_reconstruction(rec)
    if cameras.num_images == 0 and rec.num_points3D() == 0:
        raise UserError(f"{inputs.model_dir}: the model has no registered image and no 3D point; nothing to show")
    warnings = []
    if rec.num_points3D() == 0:
        warnings.append(f"{inputs.model_dir} has no 3D points: showing its {cameras.num_images} camera(s) only")
    elif cameras.num_images == 0:
        warnings.append(f"{inputs.model_dir} has no registered image: showing its points only")
    rec.update_point_3d_errors()  # fills each point's mean reprojection error over its track
    points = list(rec.points3D.values())
    xyz = np.array([p.xyz for p in points], dtype=np.float32).reshape(-1, 3)
    rgb = np.array([p.color for p in points], dtype=np.uint8).reshape(-1, 3)
    errors = np.array([p.error if p.has_error() else np.inf for p in points], dtype=np.float64)
    track_lengths = np.array([p.track.length() for p in points], dtype=int)

    prior = None
    if inputs.prior is not None:
        alignment = align_prior(inputs.prior, cameras)
        if alignment is None:
            warnings.append("the prior's cameras are not shown: they share fewer than 2 images with the model")
        else:
            prior = _prior_in_model_frame(inputs.prior, alignment)

    if images_dir is not None:
        images_dir = Path(images_dir)
        if not images_dir.is_dir():
            raise UserError(f"{param('images_dir')} {images_dir} is not a folder (give the photos of the model)")
    else:
        images_dir = find_images_dir(folder, inputs.model_dir, inputs.summary, cameras.image_names)
        if images_dir is None and cameras.num_images:
            warnings.append(f"the photos were not found (no thumbnails on the frusta): pass {param('images_dir')} "
                            "with the model's images folder")  # fmt: skip
    label = str(inputs.model_dir if inputs.model_dir == folder else folder)
    scene = ViewerScene(label, xyz, rgb, errors, track_lengths, cameras, prior, 1.0, images_dir, warnings)
    # The frusta's size: the cameras' spread when there are two or more, else the points'.
    scene.extent = cameras.scene_scale() if cameras.num_images >= 2 else scene.point_spread
    return scene


def thumbnail(path: Path, max_side: int = THUMBNAIL_MAX_SIDE) -> np.ndarray | None:
    """An image scaled down to `max_side` (H, W, 3 uint8), or None (with a warning) when it cannot be read."""
    try:
        image = Image.fromarray(read_image(path))
    except UserError as error:
        logger.warning("no thumbnail for %s: %s", path.name, error)
        return None
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return np.asarray(image)


def world_from_cam(cam_from_world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(R_world_from_cam (3,3), camera centre (3,)) of a (3,4) cam_from_world: viser places frusta by those."""
    R, t = cam_from_world[:, :3], cam_from_world[:, 3]
    return R.T, -R.T @ t


def vertical_fov(intrinsics: np.ndarray, height: int) -> float:
    """The vertical field of view in radians of a camera with calibration matrix `intrinsics`."""
    return float(2.0 * np.arctan2(height / 2.0, intrinsics[1, 1]))


def _up_direction(cameras: PriorCameras) -> np.ndarray:
    """The world direction the photos' tops point to, on average (the cameras' -y axis): the viewer's 'up'."""
    up = -cameras.cam_from_world[:, 1, :3].sum(axis=0)
    norm = np.linalg.norm(up)
    return up / norm if norm > 0 else np.array([0.0, -1.0, 0.0])


# ----------------------------------------------------------------------------------------------------------------
# The server


def check_port_free(host: str, port: int) -> None:
    """Refuse, naming the port and the fix, when `port` on `host` is taken (viser would silently take the next
    one) or `host` is not an address of this machine."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a port number (0-65535; 0 picks a free one)")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as error:
        raise UserError(f"--host {host} is not a known address ({error}); use e.g. --host 127.0.0.1") from None
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} on {host} is already in use (another viewer?): pass --port with a free "
                                f"port, e.g. --port {port + 1 if port < 65535 else 8080}, or --port 0 for any") from None  # fmt: skip
            raise UserError(f"cannot serve on {host}:{port} ({error.strerror}): choose another --host or --port") from None


class Viewer:
    """A running viewer: the viser server, the scene's handles and the panel's controls."""

    def __init__(self, scene: ViewerScene, server: Any, host: str) -> None:
        self.scene = scene
        self.server = server
        self.host = host
        self.frustums: list[Any] = []
        self.prior_frustums: list[Any] = []
        self.point_cloud: Any = None
        self.thumbnails: list[np.ndarray | None] = []  # per model frustum, as sent
        self._lock = threading.Lock()
        self._build()

    @property
    def port(self) -> int:
        return int(self.server.get_port())

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def num_points_shown(self) -> int:
        return 0 if self.point_cloud is None or not self.point_cloud.visible else len(self.point_cloud.points)

    def stop(self) -> None:
        """Stop the server; its port is free when this returns."""
        with _quiet():
            self.server.stop()

    def _build(self) -> None:
        scene, server = self.scene, self.server
        server.scene.set_up_direction(tuple(_up_direction(scene.cameras)) if scene.cameras.num_images else "-y")
        with server.atomic():
            self._add_cameras(scene.cameras, "/cameras", MODEL_COLOUR, scene.images_dir, self.frustums)
            if scene.prior is not None:
                self._add_cameras(scene.prior, "/prior", PRIOR_COLOUR, None, self.prior_frustums)
            if scene.num_points:
                self.point_cloud = server.scene.add_point_cloud(
                    "/points", scene.xyz, scene.rgb, point_size=POINT_SIZE * scene.point_spread, precision="float32",
                    point_shape="circle", point_shading="flat",  # flat: each point in its own colour, unshaded
                )  # fmt: skip
        self._add_panel()
        self._place_initial_camera()

    def _add_cameras(self, cameras: PriorCameras, root: str, colour: tuple[int, int, int], images_dir: Path | None,
                     handles: list[Any]) -> None:  # fmt: skip
        import viser.transforms as vtf

        size = FRUSTUM_SIZE * self.scene.extent
        for k, (name, pose, K, (width, height)) in enumerate(
            zip(cameras.image_names, cameras.cam_from_world, cameras.intrinsics, cameras.image_sizes)
        ):
            R, center = world_from_cam(pose)
            image = thumbnail(images_dir / name) if images_dir is not None and (images_dir / name).is_file() else None
            if images_dir is not None:
                self.thumbnails.append(image)
            handles.append(self.server.scene.add_camera_frustum(
                f"{root}/{k:05d}", fov=vertical_fov(K, int(height)), aspect=float(width) / float(height), scale=size,
                thickness=2.0, thickness_units="screen", color=colour, image=image, wxyz=vtf.SO3.from_matrix(R).wxyz,
                position=center,
            ))  # fmt: skip

    def _add_panel(self) -> None:
        scene, gui = self.scene, self.server.gui
        gui.add_markdown(f"**{scene.label}**  \n{scene.cameras.num_images} camera(s), {scene.num_points} point(s)")
        for text in scene.warnings:
            gui.add_markdown(f"⚠ {text}")
        self.counter = gui.add_markdown(self._counter_text())
        finite = scene.point_errors[np.isfinite(scene.point_errors)]
        top_error = float(np.ceil(finite.max() * 10.0) / 10.0) if finite.size else 1.0
        self.max_error = gui.add_slider("max reproj. error (px)", min=0.0, max=max(top_error, 0.1), step=0.05,
                                        initial_value=max(top_error, 0.1), disabled=not scene.num_points,
                                        hint="hide points whose mean reprojection error is above this")  # fmt: skip
        longest = int(scene.track_lengths.max()) if scene.num_points else 2
        self.min_track = gui.add_slider("min track length", min=1, max=max(longest, 2), step=1, initial_value=1,
                                        disabled=not scene.num_points,
                                        hint="hide points seen by fewer images than this")  # fmt: skip
        self.point_size = gui.add_slider("point size", min=0.1, max=5.0, step=0.1, initial_value=1.0,
                                         disabled=not scene.num_points)  # fmt: skip
        self.show_prior = gui.add_checkbox("prior cameras (orange)", initial_value=scene.prior is not None,
                                           disabled=scene.prior is None,
                                           hint="the predicted cameras the run started from, aligned to the model")  # fmt: skip
        self.show_images = gui.add_checkbox("photos on the frusta", initial_value=True,
                                            disabled=scene.images_dir is None)  # fmt: skip
        self.max_error.on_update(lambda _: self.filter_points())
        self.min_track.on_update(lambda _: self.filter_points())
        self.point_size.on_update(lambda _: self._set_point_size())
        self.show_prior.on_update(lambda _: self._set_visible(self.prior_frustums, self.show_prior.value))
        self.show_images.on_update(lambda _: self._show_images(self.show_images.value))

    def _counter_text(self) -> str:
        return f"points shown: {self.num_points_shown} of {self.scene.num_points}"

    def filter_points(self) -> int:
        """Show the points under the panel's thresholds; returns how many are shown."""
        if self.point_cloud is None:
            return 0
        with self._lock:
            max_error = float(self.max_error.value)
            if max_error >= self.max_error.max:  # the slider's end means every point (its end is rounded)
                max_error = np.inf
            keep = self.scene.point_mask(max_error, int(self.min_track.value))
            with self.server.atomic():
                if keep.any():
                    self.point_cloud.points = self.scene.xyz[keep]
                    self.point_cloud.colors = self.scene.rgb[keep]
                self.point_cloud.visible = bool(keep.any())
            self.counter.content = self._counter_text()
        return self.num_points_shown

    def _set_point_size(self) -> None:
        if self.point_cloud is not None:
            self.point_cloud.point_size = POINT_SIZE * self.scene.point_spread * float(self.point_size.value)

    @staticmethod
    def _set_visible(handles: list[Any], visible: bool) -> None:
        for handle in handles:
            handle.visible = visible

    def _show_images(self, visible: bool) -> None:
        # A frustum's image is one of its properties: hiding the photos sends the frusta without one, showing them
        # sends the thumbnails again.
        for handle, image in zip(self.frustums, self.thumbnails):
            handle.image = image if visible else None

    def _place_initial_camera(self) -> None:
        """Start the browser's view behind and above the cameras, looking at the middle of the scene."""
        scene = self.scene
        if scene.num_points:
            target = np.median(scene.xyz, axis=0).astype(np.float64)
        else:
            target = scene.cameras.centers().mean(axis=0)
        if scene.cameras.num_images:
            centers = scene.cameras.centers()
            back = -scene.cameras.viewing_directions().mean(axis=0)
            norm = np.linalg.norm(back)
            back = back / norm if norm > 0 else np.array([0.0, 0.0, -1.0])
            position = centers.mean(axis=0) + scene.extent * (1.5 * back + 0.8 * _up_direction(scene.cameras))
        else:
            position = target + np.array([0.0, -1.0, -3.0]) * scene.extent
        self.server.initial_camera.position = position
        self.server.initial_camera.look_at = target


def start_viewer(scene: ViewerScene, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> Viewer:
    """Serve `scene` on http://host:port (port 0: any free one) and return at once; `Viewer.stop()` ends it."""
    viser = require_viser()
    check_port_free(host, port)
    with _quiet():
        server = viser.ViserServer(host=host, port=port, label="vggt-sfm", verbose=False)
    if port and server.get_port() != port:  # taken between the check and the bind: viser moved to the next port
        taken = server.get_port()
        with _quiet():
            server.stop()
        raise UserError(f"port {port} on {host} was taken as the viewer started: pass --port with a free port "
                        f"(e.g. --port {taken})")  # fmt: skip
    try:
        return Viewer(scene, server, host)
    except BaseException:
        with _quiet():
            server.stop()
        raise


@contextlib.contextmanager
def _quiet():
    """viser prints a banner on start and a line on stop whatever `verbose` says; the command prints its own."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def view(
    folder: str | Path,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    images_dir: str | Path | None = None,
    announce: Callable[[str], None] = print,
    warn: Callable[[str], None] = logger.warning,
) -> None:
    """Serve the viewer of an output folder or COLMAP model folder until Ctrl-C (or SIGTERM); the port is free
    again when this returns. `announce` gets the line with the address, `warn` each of the scene's warnings."""
    require_viser()  # before the model is read: the missing install is the first thing to fix
    scene = load_scene(folder, images_dir)
    viewer = start_viewer(scene, host, port)
    try:
        for text in scene.warnings:
            warn(text)
        announce(f"viewing {scene.label}: {scene.cameras.num_images} camera(s), {scene.num_points} point(s) at "
                 f"{viewer.url} (Ctrl-C to stop)")  # fmt: skip
        threading.Event().wait()  # until KeyboardInterrupt; the server runs in its own threads
    finally:
        viewer.stop()
