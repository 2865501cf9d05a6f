"""Dense points from predicted depth: a sphere seen by the 16 real templeSR cameras (with lens distortion added),
its depth rendered on VGGT's prediction grid in an unknown per-image scale; the points must land on the sphere."""

from __future__ import annotations

import dataclasses
import functools

from pathlib import Path

import numpy as np
import pycolmap
import pytest

from vggt_sfm.errors import UserError
from vggt_sfm.export.dense import DenseConfig, dense_points, fit_depth
from vggt_sfm.images import read_image
from vggt_sfm.predictions import Predictions, vggt_grid_from_image

TEMPLE = Path(__file__).resolve().parents[1] / "data" / "templeSR"
RADIUS = 0.04
DISTORTION = -0.08
BACKGROUND_CONFIDENCE = 1.05  # below DenseConfig.min_confidence


def _sphere_center(gt: pycolmap.Reconstruction) -> np.ndarray:
    """The point closest to every optical axis (the object the cameras look at)."""
    A, b = np.zeros((3, 3)), np.zeros(3)
    for image in gt.images.values():
        axis = image.cam_from_world().rotation.matrix()[2]
        projector = np.eye(3) - np.outer(axis, axis)
        A += projector
        b += projector @ image.projection_center()
    return np.linalg.solve(A, b)


def _ray_sphere_depth(rays: np.ndarray, center_cam: np.ndarray) -> np.ndarray:
    """z-depth where rays (x, y, 1) first meet the sphere; NaN where they miss."""
    d = np.c_[rays, np.ones(len(rays))]
    a = np.sum(d * d, axis=1)
    b = -2 * d @ center_cam
    c = center_cam @ center_cam - RADIUS**2
    disc = b * b - 4 * a * c
    with np.errstate(invalid="ignore"):
        return np.where(disc >= 0, (-b - np.sqrt(disc)) / (2 * a), np.nan)


def sphere_scene(preprocess: str = "crop"):
    """(reconstruction with sparse sphere points, predictions with scaled sphere depth, sphere centre, true scales).

    Each call returns its own copy of a scene built once per preprocessing mode.
    """
    model, predictions, center, scales = _sphere_scene(preprocess)
    predictions = dataclasses.replace(predictions, depth=predictions.depth.copy())
    return pycolmap.Reconstruction(model), predictions, center, scales


@functools.lru_cache(maxsize=None)
def _sphere_scene(preprocess: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    gt = pycolmap.Reconstruction(str(TEMPLE / "gt"))
    center = _sphere_center(gt)
    sparse = rng.normal(size=(600, 3))
    sparse = center + RADIUS * sparse / np.linalg.norm(sparse, axis=1, keepdims=True)

    model = pycolmap.Reconstruction()
    ids = sorted(gt.images)[::2]  # 8 of the 16 views around the object are enough
    names = [gt.images[i].name for i in ids]
    tracks: dict[int, list] = {k: [] for k in range(len(sparse))}
    for image_id in ids:
        truth = gt.images[image_id]
        fx, fy, cx, cy = gt.cameras[truth.camera_id].params
        camera = pycolmap.Camera(
            camera_id=image_id, model="SIMPLE_RADIAL", width=640, height=480, params=[(fx + fy) / 2, cx, cy, DISTORTION]
        )
        model.add_camera_with_trivial_rig(camera)
        pose = truth.cam_from_world()
        facing = (sparse - center) @ (truth.projection_center() - center) > 0.2 * RADIUS**2
        visible = np.flatnonzero(facing)
        xy = camera.img_from_cam(pose * sparse[visible])
        image = pycolmap.Image(name=truth.name, keypoints=xy, camera_id=image_id, image_id=image_id)
        model.add_image_with_trivial_frame(image, pose)
        for keypoint, point in enumerate(visible):
            tracks[int(point)].append(pycolmap.TrackElement(image_id, keypoint))
    for point, elements in tracks.items():
        if len(elements) >= 2:
            model.add_point3D(sparse[point], pycolmap.Track(elements))

    G, (grid_w, grid_h) = vggt_grid_from_image([(640, 480)] * len(ids), preprocess)
    v, u = np.mgrid[0:grid_h, 0:grid_w]
    grid = np.stack([u.reshape(-1), v.reshape(-1), np.ones(u.size)], 1)
    scales = rng.uniform(0.2, 5.0, size=len(ids))  # predicted = true depth / scale
    depth = np.zeros((len(ids), grid_h, grid_w), np.float32)
    confidence = np.zeros_like(depth)
    for k, image_id in enumerate(ids):
        image = model.images[image_id]
        camera = model.cameras[image.camera_id]
        xy = grid @ np.linalg.inv(G[k]).T
        xy = xy[:, :2] / xy[:, 2:] + 0.5
        inside = (xy[:, 0] >= 0) & (xy[:, 0] <= 640) & (xy[:, 1] >= 0) & (xy[:, 1] <= 480)
        z = _ray_sphere_depth(camera.cam_from_img(np.ascontiguousarray(xy)), image.cam_from_world() * center)
        hit = np.isfinite(z) & inside
        # Off the sphere: a far background of low confidence; outside the image (padding): confident nonsense.
        values = np.where(hit, z, 10.0 * RADIUS) / scales[k]
        conf = np.where(hit, rng.uniform(2.0, 10.0, size=len(z)), np.where(inside, BACKGROUND_CONFIDENCE, 10.0))
        values = np.where(inside, values, 0.5 * RADIUS)
        depth[k] = values.reshape(grid_h, grid_w)
        confidence[k] = conf.reshape(grid_h, grid_w)
    predictions = Predictions(
        image_names=names,
        cam_from_world=np.array([gt.images[i].cam_from_world().matrix() for i in ids]),
        intrinsics=np.array([gt.cameras[gt.images[i].camera_id].calibration_matrix() for i in ids]),
        grid_from_image=G,
        depth=depth,
        depth_conf=confidence,
    )
    return model, predictions, center, scales


def _radial_errors(xyz: np.ndarray, center: np.ndarray) -> np.ndarray:
    return np.abs(np.linalg.norm(xyz - center, axis=1) - RADIUS) / RADIUS


@pytest.mark.parametrize("preprocess", ["crop", "pad"])
def test_dense_points_lie_on_the_surface_and_respect_the_cap(preprocess):
    model, predictions, center, scales = sphere_scene(preprocess)
    # One image's depth disagrees with the model: it must be skipped, not unprojected.
    predictions.depth[5] = np.random.default_rng(1).uniform(0.01, 1.0, size=predictions.depth[5].shape)
    dense = dense_points(predictions, model, TEMPLE / "images", DenseConfig(max_points=3000))

    assert list(dense.skipped) == [predictions.image_names[5]]
    assert "disagrees" in dense.skipped[predictions.image_names[5]]
    for k, name in enumerate(predictions.image_names):
        if k != 5:
            assert dense.fits[name].scale == pytest.approx(scales[k], rel=1e-3)
    assert 1500 <= len(dense.xyz) <= 3000
    errors = _radial_errors(dense.xyz, center)
    assert np.median(errors) < 1e-3 and errors.max() < 1e-2  # voxel means sit slightly inside a curved surface
    # The points cover the sphere seen from all around, not one side.
    directions = (dense.xyz - center) / np.linalg.norm(dense.xyz - center, axis=1, keepdims=True)
    assert np.linalg.norm(directions.mean(axis=0)) < 0.5


def test_dense_points_with_a_depth_shift_and_exact_colours():
    model, predictions, center, scales = sphere_scene()
    name = predictions.image_names[3]
    predictions = predictions.subset([name])  # the other images have no prediction: they are skipped
    predictions.depth[0] += np.median(predictions.depth[0])  # predicted = true / scale + shift
    scale_only = dense_points(predictions, model, TEMPLE / "images", DenseConfig(max_points=10**6))
    assert _radial_errors(scale_only.xyz, center).max() > 0.05

    dense = dense_points(predictions, model, TEMPLE / "images", DenseConfig(max_points=10**6, fit_shift=True))
    assert dense.voxel_size == 0.0  # under the cap: every confident pixel is kept
    # Scale and shift from depths spanning only the sphere's depth: well fitted, if less sharply than a scale.
    assert _radial_errors(dense.xyz, center).max() < 3e-3
    assert list(dense.fits) == [name]
    # Colours are the image's pixels where the points project.
    image = next(image for image in model.images.values() if image.name == name)
    xy = model.cameras[image.camera_id].img_from_cam(image.cam_from_world() * dense.xyz)
    pixels = read_image(TEMPLE / "images" / image.name)
    inner = (np.abs(xy - np.round(xy)) > 1e-3).all(axis=1)  # away from pixel borders, where floor is ambiguous
    expected = pixels[np.floor(xy[inner, 1]).astype(int), np.floor(xy[inner, 0]).astype(int)]
    np.testing.assert_array_equal(dense.rgb[inner], expected)


def test_fit_depth_is_robust_to_outliers():
    rng = np.random.default_rng(2)
    predicted = rng.uniform(1.0, 3.0, size=200)
    refined = 2.5 * predicted + 0.4
    refined[:30] = rng.uniform(0.1, 10.0, size=30)
    fit = fit_depth(predicted, refined, fit_shift=True)
    assert fit.scale == pytest.approx(2.5, rel=1e-9) and fit.shift == pytest.approx(0.4, abs=1e-9)
    assert fit_depth(predicted[:2], refined[:2], fit_shift=True) is None


def test_dense_points_need_depth():
    model, predictions, _, _ = sphere_scene()
    predictions.depth = None
    with pytest.raises(UserError, match="depth"):
        dense_points(predictions, model, TEMPLE / "images")


def test_confident_wrong_depth_is_dropped_by_the_other_views():
    # VGGT's failure mode: per-frame depth scale a few percent off (the fit absorbs it) and patches of wrong depth
    # at the highest confidence (sky, reflections), which only the other views can contradict.
    from vggt_sfm.evaluation.failure_modes import FailureModes, apply_depth_failures

    model, predictions, center, _ = sphere_scene()
    predictions.depth, predictions.depth_conf = apply_depth_failures(
        FailureModes.named("depth"), np.random.default_rng(4), predictions.depth, predictions.depth_conf
    )
    unchecked = dense_points(predictions, model, TEMPLE / "images", DenseConfig(max_points=10**6, check_views=0))
    checked = dense_points(predictions, model, TEMPLE / "images", DenseConfig(max_points=10**6))
    off_before = np.mean(_radial_errors(unchecked.xyz, center) > 0.05)
    off_after = np.mean(_radial_errors(checked.xyz, center) > 0.05)
    assert off_before > 0.02  # the patches are there without the check
    assert off_after < 0.25 * off_before and checked.inconsistent > 0
    sound_before = np.sum(_radial_errors(unchecked.xyz, center) <= 0.05)
    assert np.sum(_radial_errors(checked.xyz, center) <= 0.05) > 0.8 * sound_before  # the sound points stay
