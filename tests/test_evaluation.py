"""Evaluation metrics against exact, hand-derived answers on the Middlebury temple ground truth."""

from pathlib import Path

import numpy as np
import pycolmap
import pytest
from scipy.spatial.transform import Rotation

from vggt_sfm.evaluation import evaluate
from vggt_sfm.evaluation.metrics import pose_auc, read_ground_truth, rotation_errors_deg
from vggt_sfm.predictions import Predictions
from vggt_sfm.prior import PriorCameras

GT_DIR = Path(__file__).resolve().parents[1] / "data" / "templeSR" / "gt"


@pytest.fixture
def gt_model() -> pycolmap.Reconstruction:
    return pycolmap.Reconstruction(str(GT_DIR))


def _rotate_camera(rec: pycolmap.Reconstruction, image_id: int, delta: np.ndarray) -> None:
    """Turn one camera about its own centre: R' = delta R, the centre kept."""
    image = rec.images[image_id]
    pose = image.cam_from_world().matrix()
    center = -pose[:, :3].T @ pose[:, 3]
    R = delta @ pose[:, :3]
    rec.frames[image.frame_id].set_cam_from_world(
        image.camera_id, pycolmap.Rigid3d(pycolmap.Rotation3d(R), -R @ center)
    )


def test_auc_of_hand_made_errors():
    # Errors 0.5 and 2.5 deg: 1-degree bins [0,1) [1,2) [2,3] hold 1/2, 0, 1/2 -> cumsum 1/2, 1/2, 1.
    assert pose_auc(np.array([0.5, 0.1]), np.array([0.2, 2.5]), 3) == pytest.approx(2 / 3)
    assert pose_auc(np.array([0.5, 0.1]), np.array([0.2, 2.5]), 1) == pytest.approx(1 / 2)
    assert pose_auc(np.array([40.0]), np.array([0.0]), 30) == 0.0


def test_rotation_error_matches_axis_angle():
    rng = np.random.default_rng(1)
    R = Rotation.random(50, random_state=rng).as_matrix()
    angles = rng.uniform(0, 170, size=50)
    axes = rng.normal(size=(50, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    delta = Rotation.from_rotvec(axes * np.radians(angles)[:, None]).as_matrix()
    np.testing.assert_allclose(rotation_errors_deg(delta @ R, R), angles, atol=1e-5)


def test_ground_truth_against_itself_is_perfect(gt_model):
    result = evaluate(gt_model, GT_DIR)
    assert result.num_registered == result.num_images == 16
    assert len(result.pairs) == 120
    assert all(value == 1.0 for value in result.auc.values())
    assert result.pair_rotation_errors.max() < 1e-4
    assert np.nanmax(result.center_errors) < 1e-9
    assert np.nanmax(result.focal_errors) == 0.0
    # templeSR0001 and templeSR0011 share a pose: that pair has no translation direction.
    assert result.extras["num_pairs_without_baseline"] == 1


def test_similarity_transformed_copy_has_no_error(gt_model):
    moved = pycolmap.Reconstruction(gt_model)
    sim = pycolmap.Sim3d(3.7, pycolmap.Rotation3d(Rotation.from_euler("xyz", [30, -50, 120], degrees=True).as_matrix()),
                         np.array([5.0, -2.0, 10.0]))
    moved.transform(sim)
    result = evaluate(moved, gt_model)
    assert result.auc[1] == 1.0
    assert result.pair_translation_errors.max() < 1e-4
    assert np.nanmax(result.rotation_errors) < 1e-4
    assert 100 * np.nanmax(result.center_errors) / result.scene_extent < 1e-8
    assert result.as_dict()["center_error_median_pct"] < 1e-8


def test_known_rotation_perturbation(gt_model):
    theta = 10.5
    perturbed = pycolmap.Reconstruction(gt_model)
    k = 5  # image_id 5 = templeSR0005.png, index 4 in name order
    _rotate_camera(perturbed, k, Rotation.from_rotvec(np.radians(theta) * np.array([0.6, 0.0, 0.8])).as_matrix())
    result = evaluate(perturbed, gt_model)
    index = result.image_names.index("templeSR0005.png")
    involved = (result.pairs == index).any(axis=1)
    assert involved.sum() == 15
    np.testing.assert_allclose(result.pair_rotation_errors[involved], theta, atol=1e-6)
    assert result.pair_rotation_errors[~involved].max() < 1e-4
    # Pairs with camera k have max(rot, trans) = theta (the translation direction turns by at most theta).
    assert np.all(result.pair_translation_errors[involved] <= theta + 1e-6)
    f = 105 / 120  # share of pairs without k, error ~0 (bin 0); the others fall in bin 10
    assert result.auc[5] == pytest.approx(f)
    assert result.auc[10] == pytest.approx(f)
    assert result.auc[30] == pytest.approx((10 * f + 20) / 30)
    assert result.as_dict()["rotation_error_mean_deg"] == pytest.approx(theta * 15 / 120, abs=1e-4)
    # The centres are untouched, so the alignment is exact and only camera k has a rotation error.
    assert result.rotation_errors[index] == pytest.approx(theta, abs=1e-6)
    assert np.delete(result.rotation_errors, index).max() < 1e-4
    assert np.nanmax(result.center_errors) < 1e-9


def test_unregistered_images_fail_their_pairs(gt_model):
    partial = pycolmap.Reconstruction(gt_model)
    for image_id in (2, 9, 14):
        partial.deregister_frame(partial.images[image_id].frame_id)
    result = evaluate(partial, gt_model)
    assert (result.num_registered, result.num_images) == (13, 16)
    failed = ~(result.registered[result.pairs[:, 0]] & result.registered[result.pairs[:, 1]])
    assert failed.sum() == 120 - 78
    assert np.all(result.pair_rotation_errors[failed] == 180.0)
    assert np.all(result.pair_translation_errors[failed] == 1e6)
    for value in result.auc.values():
        assert value == pytest.approx(78 / 120)
    assert np.isnan(result.center_errors[~result.registered]).all()
    assert "registered 13/16" in result.summary()


def test_predictions_and_prior_cameras_are_accepted(gt_model):
    gt = read_ground_truth(gt_model)
    doubled = gt.cam_from_world.copy()
    doubled[:, :, 3] *= 2.0  # a world scaled by 2: same errors
    K = gt.intrinsics.copy()
    K[:, :2, :2] *= 1.1
    K[:, :2, 2] -= 0.5  # predictions keep integer pixel centres
    predictions = Predictions(image_names=gt.image_names, cam_from_world=doubled, intrinsics=K)
    result = evaluate(predictions, GT_DIR)
    assert result.auc[1] == 1.0
    np.testing.assert_allclose(result.focal_errors, 0.1, atol=1e-9)
    prior = PriorCameras(gt.image_names[:8], gt.image_sizes[:8], gt.cam_from_world[:8], gt.intrinsics[:8])
    result = evaluate(prior, gt)
    assert result.num_registered == 8
    assert result.auc[30] == pytest.approx(28 / 120)


def test_one_lost_camera_does_not_spoil_the_alignment(gt_model):
    lost = pycolmap.Reconstruction(gt_model)
    image = lost.images[7]
    pose = image.cam_from_world().matrix()
    shift = np.array([3.0, -4.0, 12.0])  # 13 units, ~23 times the scene extent
    center = -pose[:, :3].T @ pose[:, 3] + shift
    lost.frames[image.frame_id].set_cam_from_world(
        image.camera_id, pycolmap.Rigid3d(pycolmap.Rotation3d(pose[:, :3]), -pose[:, :3] @ center)
    )
    result = evaluate(lost, gt_model)
    index = result.image_names.index(image.name)
    assert result.extras["num_alignment_inliers"] == 15
    assert result.center_errors[index] == pytest.approx(13.0, rel=1e-6)
    assert np.delete(result.center_errors, index).max() < 1e-9
    assert np.nanmax(result.rotation_errors) < 1e-4
