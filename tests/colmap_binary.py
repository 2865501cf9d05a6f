"""A reader of COLMAP model files (cameras, images, points3D; .bin and .txt), written from COLMAP's format
description (https://colmap.github.io/format.html) with `struct`, independent of pycolmap.

It reads what the legacy readers (the original 3DGS code's colmap_loader.py, nerfstudio's colmap_parsing_utils,
COLMAP 3.x) read, field by field, and refuses a file with bytes left over or missing, so a layout change in what
pycolmap writes shows here even when pycolmap reads its own files back. Binary layout, little-endian:

    cameras.bin   u64 count; per camera: u32 camera_id, i32 model_id, u64 width, u64 height, f64 params[n(model)]
    images.bin    u64 count; per image: u32 image_id, f64 qw qx qy qz, f64 tx ty tz, u32 camera_id, name (bytes, NUL),
                  u64 num_points2D, per point: f64 x, f64 y, i64 point3D_id (-1: none)
    points3D.bin  u64 count; per point: u64 point3D_id, f64 x y z, u8 r g b, f64 error, u64 track_length,
                  per element: u32 image_id, u32 point2D_idx

The text files hold the same fields, one camera / point per line and two lines per image.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# COLMAP's camera model ids, names and parameter counts (src/colmap/sensor/models.h).
CAMERA_MODELS: dict[int, tuple[str, int]] = {
    0: ("SIMPLE_PINHOLE", 3),
    1: ("PINHOLE", 4),
    2: ("SIMPLE_RADIAL", 4),
    3: ("RADIAL", 5),
    4: ("OPENCV", 8),
    5: ("OPENCV_FISHEYE", 8),
    6: ("FULL_OPENCV", 12),
    7: ("FOV", 5),
    8: ("SIMPLE_RADIAL_FISHEYE", 4),
    9: ("RADIAL_FISHEYE", 5),
    10: ("THIN_PRISM_FISHEYE", 12),
    11: ("RAD_TAN_THIN_PRISM_FISHEYE", 16),
}
_MODEL_IDS = {name: (model_id, count) for model_id, (name, count) in CAMERA_MODELS.items()}


@dataclass
class Camera:
    camera_id: int
    model: str
    width: int
    height: int
    params: np.ndarray


@dataclass
class Image:
    image_id: int
    qvec: np.ndarray  # w, x, y, z of the rotation cam_from_world
    tvec: np.ndarray  # translation of cam_from_world
    camera_id: int
    name: str
    xys: np.ndarray  # (N, 2) keypoints, COLMAP pixel convention
    point3D_ids: np.ndarray  # (N,) int64, -1 where the keypoint has no 3D point

    def cam_from_world(self) -> np.ndarray:
        """(3, 4) [R | t]."""
        return np.c_[rotation_matrix(self.qvec), self.tvec]


@dataclass
class Point3D:
    point3D_id: int
    xyz: np.ndarray
    rgb: np.ndarray  # uint8
    error: float
    image_ids: np.ndarray
    point2D_idxs: np.ndarray


@dataclass
class Model:
    cameras: dict[int, Camera]
    images: dict[int, Image]
    points3D: dict[int, Point3D]


def rotation_matrix(qvec: np.ndarray) -> np.ndarray:
    """3x3 rotation of a unit quaternion given as (w, x, y, z)."""
    w, x, y, z = np.asarray(qvec, dtype=np.float64) / np.linalg.norm(qvec)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


class _Reader:
    """Sequential little-endian reads from a byte string that must be consumed exactly."""

    def __init__(self, path: Path):
        self.path = path
        self.data = path.read_bytes()
        self.offset = 0

    def read(self, fmt: str) -> tuple:
        fmt = "<" + fmt
        size = struct.calcsize(fmt)
        if self.offset + size > len(self.data):
            raise ValueError(f"{self.path}: truncated at byte {self.offset} (wanted {size} more)")
        values = struct.unpack_from(fmt, self.data, self.offset)
        self.offset += size
        return values

    def read_array(self, dtype: np.dtype, count: int) -> np.ndarray:
        dtype = np.dtype(dtype)
        size = dtype.itemsize * count
        if self.offset + size > len(self.data):
            raise ValueError(f"{self.path}: truncated at byte {self.offset} (wanted {size} more)")
        array = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.offset)
        self.offset += size
        return array

    def read_name(self) -> str:
        end = self.data.index(b"\x00", self.offset)
        name = self.data[self.offset:end].decode("utf-8")
        self.offset = end + 1
        return name

    def done(self) -> None:
        if self.offset != len(self.data):
            raise ValueError(f"{self.path}: {len(self.data) - self.offset} bytes left over after the last record")


def read_cameras_binary(path: Path | str) -> dict[int, Camera]:
    reader = _Reader(Path(path))
    cameras = {}
    for _ in range(reader.read("Q")[0]):
        camera_id, model_id, width, height = reader.read("IiQQ")
        if model_id not in CAMERA_MODELS:
            raise ValueError(f"{path}: camera {camera_id} has unknown model id {model_id}")
        name, count = CAMERA_MODELS[model_id]
        params = np.array(reader.read("d" * count))
        cameras[camera_id] = Camera(camera_id, name, width, height, params)
    reader.done()
    return cameras


_POINT2D = np.dtype([("x", "<f8"), ("y", "<f8"), ("point3D_id", "<i8")])
_TRACK_ELEMENT = np.dtype([("image_id", "<u4"), ("point2D_idx", "<u4")])


def read_images_binary(path: Path | str) -> dict[int, Image]:
    reader = _Reader(Path(path))
    images = {}
    for _ in range(reader.read("Q")[0]):
        image_id, qw, qx, qy, qz, tx, ty, tz, camera_id = reader.read("I7dI")
        name = reader.read_name()
        points = reader.read_array(_POINT2D, reader.read("Q")[0])
        images[image_id] = Image(
            image_id, np.array([qw, qx, qy, qz]), np.array([tx, ty, tz]), camera_id, name,
            np.stack([points["x"], points["y"]], 1), points["point3D_id"].astype(np.int64),
        )
    reader.done()
    return images


def read_points3D_binary(path: Path | str) -> dict[int, Point3D]:
    reader = _Reader(Path(path))
    points = {}
    for _ in range(reader.read("Q")[0]):
        point3D_id, x, y, z, r, g, b, error = reader.read("Q3d3Bd")
        track = reader.read_array(_TRACK_ELEMENT, reader.read("Q")[0])
        points[point3D_id] = Point3D(
            point3D_id, np.array([x, y, z]), np.array([r, g, b], dtype=np.uint8), error,
            track["image_id"].astype(np.int64), track["point2D_idx"].astype(np.int64),
        )
    reader.done()
    return points


def _data_lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")]


def read_cameras_text(path: Path | str) -> dict[int, Camera]:
    cameras = {}
    for line in _data_lines(Path(path)):
        fields = line.split()
        camera_id, model, width, height = int(fields[0]), fields[1], int(fields[2]), int(fields[3])
        params = np.array([float(v) for v in fields[4:]])
        if model not in _MODEL_IDS or len(params) != _MODEL_IDS[model][1]:
            raise ValueError(f"{path}: camera {camera_id}: {model} with {len(params)} parameters")
        cameras[camera_id] = Camera(camera_id, model, width, height, params)
    return cameras


def read_images_text(path: Path | str) -> dict[int, Image]:
    # Not _data_lines: an image without keypoints has an empty second line, which must stay in place.
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if not line.startswith("#")]
    if len(lines) % 2 == 1 and lines[-1] == "":
        lines = lines[:-1]
    images = {}
    for header, points_line in zip(lines[0::2], lines[1::2]):
        fields = header.split()
        image_id = int(fields[0])
        values = [float(v) for v in fields[1:8]]
        camera_id, name = int(fields[8]), " ".join(fields[9:])
        points = points_line.split()
        if len(points) % 3:
            raise ValueError(f"{path}: image {image_id}: the points line has {len(points)} values")
        xys = np.array([[float(x), float(y)] for x, y in zip(points[0::3], points[1::3])]).reshape(-1, 2)
        ids = np.array([int(v) for v in points[2::3]], dtype=np.int64)
        images[image_id] = Image(image_id, np.array(values[:4]), np.array(values[4:]), camera_id, name, xys, ids)
    return images


def read_points3D_text(path: Path | str) -> dict[int, Point3D]:
    points = {}
    for line in _data_lines(Path(path)):
        fields = line.split()
        point3D_id = int(fields[0])
        track = np.array([int(v) for v in fields[8:]], dtype=np.int64)
        if len(track) % 2:
            raise ValueError(f"{path}: point {point3D_id}: odd track length")
        points[point3D_id] = Point3D(
            point3D_id, np.array([float(v) for v in fields[1:4]]), np.array([int(v) for v in fields[4:7]], dtype=np.uint8),
            float(fields[7]), track[0::2], track[1::2],
        )
    return points


def read_model(directory: Path | str, ext: str = ".bin") -> Model:
    """cameras, images and points3D of a model folder, from the .bin (or with ext=".txt", the text) files."""
    directory = Path(directory)
    if ext == ".bin":
        return Model(read_cameras_binary(directory / "cameras.bin"), read_images_binary(directory / "images.bin"),
                     read_points3D_binary(directory / "points3D.bin"))
    if ext == ".txt":
        return Model(read_cameras_text(directory / "cameras.txt"), read_images_text(directory / "images.txt"),
                     read_points3D_text(directory / "points3D.txt"))
    raise ValueError(f"unknown model file extension {ext!r}")
