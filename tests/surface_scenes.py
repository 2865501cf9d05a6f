"""Ground-truth cameras plus a synthetic surface they see, as a COLMAP model with 3D points and tracks.

The ground-truth models have cameras only; `simulate_prior(depth_from=...)` renders simulated depth from a model
with points. These give it one without running a reconstruction: a bumpy plane across the view (forward-facing
captures) or a bumpy sphere at the point the cameras look at (orbits), each point observed by the images that
see it (in the image, in front of the camera, and for the sphere on the side facing the camera). And the two
ways the merge tests make predictions of several passes differ, as independent VGGT passes do: `random_frame`
(each pass in a frame of its own) and `shaken` (each camera turned a little).
"""

from __future__ import annotations

import functools
from pathlib import Path

import dataclasses

import numpy as np
import pycolmap
from scipy.spatial.transform import Rotation

from vggt_sfm.predictions import Predictions


def _observe(model: pycolmap.Reconstruction, points: np.ndarray, normals: np.ndarray | None) -> pycolmap.Reconstruction:
    images = [model.images[i] for i in sorted(model.images)]
    elements: list[list[pycolmap.TrackElement]] = [[] for _ in points]
    for image in images:
        camera = model.cameras[image.camera_id]
        in_camera = image.cam_from_world() * points
        xy = camera.img_from_cam(in_camera)
        seen = (in_camera[:, 2] > 0) & (xy[:, 0] >= 0) & (xy[:, 0] < camera.width) & (xy[:, 1] >= 0) & (xy[:, 1] < camera.height)
        if normals is not None:
            seen &= np.einsum("ij,ij->i", normals, image.projection_center() - points) > 0
        inside = np.flatnonzero(seen)
        image.points2D = pycolmap.Point2DList([pycolmap.Point2D(p) for p in xy[inside]])
        for keypoint, point in enumerate(inside):
            elements[point].append(pycolmap.TrackElement(image.image_id, keypoint))
    for xyz, track in zip(points, elements):
        if len(track) >= 3:
            model.add_point3D(xyz, pycolmap.Track(track))
    return model


@functools.lru_cache(maxsize=None)
def plane_model(gt: Path, seed: int = 0) -> pycolmap.Reconstruction:
    """The cameras of `gt` and a bumpy plane across their mean view, 10x the cameras' spread away."""
    rng = np.random.default_rng(seed)
    model = pycolmap.Reconstruction(str(gt))
    images = [model.images[i] for i in sorted(model.images)]
    centers = np.array([im.projection_center() for im in images])
    axis = np.mean([im.viewing_direction() for im in images], axis=0)
    axis /= np.linalg.norm(axis)
    depth = 10.0 * np.linalg.norm(centers - centers.mean(axis=0), axis=1).max()
    # A plane across the view at `depth`, with bumps of 10 % of it, sampled wider than any camera's view.
    side = np.cross(axis, [0.0, 1.0, 0.0])
    side /= np.linalg.norm(side)
    up = np.cross(axis, side)
    ab = rng.uniform(-1.0, 1.0, size=(6000, 2)) * depth
    bumps = 0.1 * depth * np.sin(3.0 * ab[:, :1] / depth) * np.cos(2.0 * ab[:, 1:] / depth)
    points = centers.mean(axis=0) + (depth + bumps) * axis + ab[:, :1] * side + ab[:, 1:] * up
    return _observe(model, points, None)


def look_at_point(model: pycolmap.Reconstruction) -> np.ndarray:
    """The point nearest (least squares) to every camera's optical axis."""
    A, b = np.zeros((3, 3)), np.zeros(3)
    for image in model.images.values():
        d = image.viewing_direction()
        P = np.eye(3) - np.outer(d, d)
        A += P
        b += P @ image.projection_center()
    return np.linalg.solve(A, b)


@functools.lru_cache(maxsize=None)
def sphere_model(gt: Path, seed: int = 0) -> pycolmap.Reconstruction:
    """The cameras of `gt` (an orbit) and a bumpy sphere at the point they look at, a quarter of their distance
    to it in radius; a point is seen from the side it faces."""
    rng = np.random.default_rng(seed)
    model = pycolmap.Reconstruction(str(gt))
    centre = look_at_point(model)
    radius = 0.25 * np.mean([np.linalg.norm(im.projection_center() - centre) for im in model.images.values()])
    normals = rng.normal(size=(8000, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    bumps = 1.0 + 0.1 * np.sin(4.0 * normals[:, :1]) * np.cos(3.0 * normals[:, 1:2])
    return _observe(model, centre + radius * bumps * normals, normals)


def random_frame(rng: np.random.Generator) -> pycolmap.Sim3d:
    """A random similarity: scale e^U(-2,2), a uniform rotation, a unit-normal translation."""
    return pycolmap.Sim3d(
        float(np.exp(rng.uniform(-2, 2))), pycolmap.Rotation3d(Rotation.random(random_state=rng).as_matrix()), rng.normal(size=3)
    )


def shaken(predictions: Predictions, degrees: float, rng: np.random.Generator) -> Predictions:
    """Every camera turned about its own centre by a random rotation of about `degrees`."""
    poses = predictions.cam_from_world.copy()
    for pose in poses:
        delta = Rotation.from_rotvec(rng.normal(size=3) * np.radians(degrees) / np.sqrt(3)).as_matrix()
        center = -pose[:, :3].T @ pose[:, 3]
        pose[:, :3] = delta @ pose[:, :3]
        pose[:, 3] = -pose[:, :3] @ center
    return dataclasses.replace(predictions, cam_from_world=poses)
