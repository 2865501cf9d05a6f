"""Coloured point clouds as binary PLY files.

The layout is the one 3DGS writes and reads (`storePly` / `fetchPly`): x, y, z and nx, ny, nz as float, then
red, green, blue as uchar. 3DGS's loader needs the normal properties even though it ignores their values, and
nerfstudio, gsplat viewers, Open3D and COLMAP read the same file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pycolmap

from .files import atomic_output


def _vertex_dtype(double: bool) -> np.dtype:
    real = "<f8" if double else "<f4"
    return np.dtype(
        [("x", real), ("y", real), ("z", real), ("nx", real), ("ny", real), ("nz", real),
         ("red", "u1"), ("green", "u1"), ("blue", "u1")]
    )


def write_ply(
    path: Path | str,
    xyz: np.ndarray,
    rgb: np.ndarray,
    normals: np.ndarray | None = None,
    double: bool = False,
    overwrite: bool = False,
) -> None:
    """Write (N,3) points with (N,3) uint8 colours (and optional normals; zeros otherwise) as binary PLY.

    `double=True` stores coordinates as 64-bit floats, for scenes far from the origin.
    """
    xyz = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
    rgb = np.asarray(rgb).reshape(-1, 3)
    if len(rgb) != len(xyz):
        raise ValueError(f"{len(xyz)} points but {len(rgb)} colours")
    if rgb.dtype != np.uint8:
        rgb = np.clip(np.round(rgb), 0, 255).astype(np.uint8)
    vertices = np.zeros(len(xyz), dtype=_vertex_dtype(double))
    for i, axis in enumerate("xyz"):
        vertices[axis] = xyz[:, i]
    if normals is not None:
        normals = np.asarray(normals, dtype=np.float64).reshape(-1, 3)
        for i, axis in enumerate(("nx", "ny", "nz")):
            vertices[axis] = normals[:, i]
    for i, channel in enumerate(("red", "green", "blue")):
        vertices[channel] = rgb[:, i]

    real = "double" if double else "float"
    header = "\n".join(
        ["ply", "format binary_little_endian 1.0", f"element vertex {len(xyz)}"]
        + [f"property {real} {name}" for name in ("x", "y", "z", "nx", "ny", "nz")]
        + [f"property uchar {name}" for name in ("red", "green", "blue")]
        + ["end_header"]
    ) + "\n"
    with atomic_output(path, overwrite=overwrite, directory=False) as tmp:
        with open(tmp, "wb") as f:
            f.write(header.encode("ascii"))
            f.write(vertices.tobytes())


def reconstruction_points(reconstruction: pycolmap.Reconstruction) -> tuple[np.ndarray, np.ndarray]:
    """(N,3) positions and (N,3) uint8 colours of a reconstruction's 3D points, in point-id order."""
    ids = sorted(reconstruction.point3D_ids())
    if not ids:
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.uint8)
    points = reconstruction.points3D
    xyz = np.array([points[i].xyz for i in ids], dtype=np.float64)
    rgb = np.array([points[i].color for i in ids], dtype=np.uint8)
    return xyz, rgb
