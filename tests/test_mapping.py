"""The initial model on real images (Strecha fountain, SIFT, simulated VGGT-level prior): cameras, points,
colours, re-localisation of a 20-degree-off frame, frames without matches, points from predicted depth."""

import dataclasses

import numpy as np
import pycolmap
import pytest
from sfm_scenes import scene, simulated_prior, tracks, without_image  # noqa: F401 (fixtures)

from vggt_sfm.errors import UserError
from vggt_sfm.evaluation import evaluate
from vggt_sfm.images import read_image
from vggt_sfm.mapping import MappingConfig, initialize_reconstruction
from vggt_sfm.predictions import Predictions
from vggt_sfm.prior import PriorCameras
from vggt_sfm.tracks import build_tracks

def _pair_errors_with(result, frame: int) -> np.ndarray:
    involved = (result.pairs == frame).any(axis=1)
    return result.pair_rotation_errors[involved]


def test_initial_model_from_a_noisy_prior(scene, tracks):
    prior = simulated_prior(scene)
    rec, report = initialize_reconstruction(prior, scene.features, tracks, None)

    assert rec.is_valid()
    assert sorted(rec.reg_image_ids()) == list(range(1, prior.num_images + 1))
    assert [rec.images[i + 1].name for i in range(prior.num_images)] == prior.image_names
    assert report.relocalized == [] and report.not_refined == []
    # Poses are the prior's (no frame was off), keypoints are all kept.
    for i in range(prior.num_images):
        image = rec.images[i + 1]
        assert np.allclose(image.cam_from_world().matrix(), prior.cam_from_world[i], atol=1e-9)
        assert image.num_points2D() == len(scene.features[i].keypoints)
    # One shared camera: the median of the prior intrinsics, SIMPLE_RADIAL with k = 0.
    assert rec.num_cameras() == 1
    camera = rec.cameras[1]
    assert camera.model == pycolmap.CameraModelId.SIMPLE_RADIAL
    K = np.median(prior.intrinsics, axis=0)
    assert camera.params == pytest.approx([0.5 * (K[0, 0] + K[1, 1]), K[0, 2], K[1, 2], 0.0])
    # Nearly every track becomes a point; errors are those of a 2-degree prior, not of wrong matches.
    assert report.num_points > 0.9 * tracks.num_tracks
    assert report.num_observations > 0.9 * tracks.num_observations
    assert report.mean_reprojection_error < 30.0
    errors = np.array([p.error for p in rec.points3D.values()])
    assert np.percentile(errors, 99) < 100.0

    # Colours are the pixels the points are seen at.
    point_ids = sorted(rec.point3D_ids())[::20]
    first = {}
    for pid in point_ids:
        element = rec.points3D[pid].track.elements[0]
        first.setdefault(element.image_id, []).append((pid, element.point2D_idx))
    observed, stored = [], []
    for image_id, items in first.items():
        pixels = read_image(scene.images_dir / rec.images[image_id].name)
        for pid, idx in items:
            x, y = rec.images[image_id].points2D[idx].xy
            observed.append(pixels[int(y), int(x)].astype(float))
            stored.append(rec.points3D[pid].color.astype(float))
    observed, stored = np.array(observed), np.array(stored)
    assert np.corrcoef(observed.ravel(), stored.ravel())[0, 1] > 0.8
    assert stored.std() > 10


def test_a_frame_twenty_degrees_off_is_relocalized(scene, tracks):
    bad = 2
    prior = simulated_prior(scene, outliers=[bad])
    before = evaluate(prior, scene.gt)
    assert np.median(_pair_errors_with(before, bad)) > 15.0

    rec, report = initialize_reconstruction(prior, scene.features, tracks, None)
    assert report.relocalized == [prior.image_names[bad]]
    assert report.not_refined == []
    # The evidence: its matches contradict the prior far more than the other frames' do.
    for errors in (report.prior_epipolar_error_px, report.prior_reprojection_error_px):
        others = [e for name, e in errors.items() if name != prior.image_names[bad]]
        assert errors[prior.image_names[bad]] > 3 * np.median(others)
    after = evaluate(rec, scene.gt)
    # Now as good as the other frames of a VGGT-level prior.
    assert np.median(_pair_errors_with(after, bad)) < 4.0
    assert report.num_observations > 0.9 * tracks.num_observations


def test_a_frame_without_matches_keeps_its_prior_and_is_flagged(scene):
    lonely = 5
    verified = without_image(scene.verified, lonely)
    tracks = build_tracks(verified, [len(f.keypoints) for f in scene.features])
    prior = simulated_prior(scene)
    colorless = [dataclasses.replace(f, colors=None) for f in scene.features]
    rec, report = initialize_reconstruction(prior, colorless, tracks, None)
    assert report.not_refined == [prior.image_names[lonely]]
    image = rec.images[lonely + 1]
    assert image.has_pose and image.num_points3D == 0
    assert np.allclose(image.cam_from_world().matrix(), prior.cam_from_world[lonely])
    assert report.num_points > 1000
    # Without keypoint colours, points are grey.
    assert all((p.color == 128).all() for p in list(rec.points3D.values())[:50])


def test_camera_models_and_per_image_cameras(scene, tracks):
    prior = simulated_prior(scene)
    for model, num_params in [("PINHOLE", 4), ("OPENCV", 8), ("SIMPLE_PINHOLE", 3)]:
        config = MappingConfig(camera_model=model, shared_camera=False, extract_colors=False, relocalize=False)
        rec, _ = initialize_reconstruction(prior, scene.features, tracks, None, config)
        assert rec.num_cameras() == prior.num_images
        for i in range(prior.num_images):
            camera = rec.cameras[rec.images[i + 1].camera_id]
            assert camera.camera_id == i + 1
            assert camera.model_name == model and len(camera.params) == num_params
            K = prior.intrinsics[i]
            assert camera.principal_point_x == pytest.approx(K[0, 2])
            assert camera.mean_focal_length() == pytest.approx(0.5 * (K[0, 0] + K[1, 1]))
    with pytest.raises(UserError, match="FISHEYE"):
        initialize_reconstruction(prior, scene.features, tracks, None, MappingConfig(camera_model="FISHEYE"))
    with pytest.raises(UserError, match="depth"):
        initialize_reconstruction(prior, scene.features, tracks, None, MappingConfig(use_depth=True))


def _depth_predictions(scene, tracks, confidence: float, grid_scale: float = 0.25) -> Predictions:
    """Ground-truth cameras with a quarter-resolution depth map per image: the depth of the true-pose
    triangulation of the tracks, spread to every grid pixel by nearest-neighbour fill (so keypoints read
    interpolated depths of their neighbours, not their own)."""
    from scipy.interpolate import NearestNDInterpolator

    gt = scene.gt
    rec, _ = initialize_reconstruction(gt, scene.features, tracks, None, MappingConfig(relocalize=False))
    width, height = gt.image_sizes[0]
    grid_w, grid_h = int(np.ceil(width * grid_scale)), int(np.ceil(height * grid_scale))
    # Pixel edges scale: x_grid + 0.5 = s (x_image + 0.5), both with integer pixel centres.
    G = np.array([[grid_scale, 0, 0.5 * grid_scale - 0.5], [0, grid_scale, 0.5 * grid_scale - 0.5], [0, 0, 1]])
    K_image = gt.intrinsics.copy()
    K_image[:, :2, 2] -= 0.5
    predictions = Predictions(
        image_names=list(gt.image_names),
        cam_from_world=gt.cam_from_world.copy(),
        intrinsics=G @ K_image,
        grid_from_image=np.tile(G, (gt.num_images, 1, 1)),
        depth=np.zeros((gt.num_images, grid_h, grid_w), np.float32),
        depth_conf=np.full((gt.num_images, grid_h, grid_w), confidence, np.float32),
    )
    assert np.allclose(predictions.image_intrinsics(), gt.intrinsics)
    rows, cols = np.mgrid[0:grid_h, 0:grid_w]
    for i in range(gt.num_images):
        image = rec.images[i + 1]
        pose = image.cam_from_world()
        xy, z = [], []
        for point2D in image.points2D:
            if point2D.has_point3D():
                xy.append(point2D.xy)
                z.append((pose * rec.points3D[point2D.point3D_id].xyz)[2])
        fill = NearestNDInterpolator(predictions.grid_points(i, np.array(xy)), np.array(z))
        predictions.depth[i] = fill(cols, rows)
    return predictions


def test_points_from_predicted_depth(scene, tracks):
    gt = scene.gt
    dlt, _ = initialize_reconstruction(gt, scene.features, tracks, None, MappingConfig(relocalize=False))
    config = MappingConfig(use_depth=True, relocalize=False, extract_colors=False)
    confident = _depth_predictions(scene, tracks, confidence=3.0)
    rec, report = initialize_reconstruction(gt, scene.features, tracks, confident, config)
    assert report.num_points > 0.8 * dlt.num_points3D()
    # Depth points sit where the triangulated ones are, to the accuracy of the depth map, not exactly.
    def key(point):
        return tuple(sorted((e.image_id, e.point2D_idx) for e in point.track.elements))

    by_track = {key(p): p.xyz for p in dlt.points3D.values()}
    distances = []
    for point in rec.points3D.values():
        if key(point) in by_track:
            distances.append(np.linalg.norm(point.xyz - by_track[key(point)]))
    distances = np.array(distances) / PriorCameras.scene_scale(gt)
    assert len(distances) > 0.5 * report.num_points
    assert 0 < np.median(distances) < 0.05

    # Depth below the confidence threshold is not used: the points are the triangulated ones.
    unsure = _depth_predictions(scene, tracks, confidence=1.0)
    fallback, _ = initialize_reconstruction(gt, scene.features, tracks, unsure, config)
    assert fallback.num_points3D() == dlt.num_points3D()
    a = np.array(sorted(tuple(p.xyz) for p in fallback.points3D.values()))
    b = np.array(sorted(tuple(p.xyz) for p in dlt.points3D.values()))
    assert np.allclose(a, b)
