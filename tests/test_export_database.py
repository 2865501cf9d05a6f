"""The COLMAP database export: contents read back with pycolmap, and COLMAP's own mappers started from it."""

from __future__ import annotations

import shutil

import numpy as np
import pycolmap
import pytest
from export_scene import (
    PRIOR_ROTATION,
    PRIOR_SCALE,
    PRIOR_TRANSLATION,
    temple_database,
    temple_scene,
    temporary_folder,
)

from vggt_sfm.errors import UserError
from vggt_sfm.evaluation import evaluate
from vggt_sfm.evaluation.metrics import read_ground_truth
from vggt_sfm.export.database import write_database
from vggt_sfm.log import quiet_pycolmap
from vggt_sfm.matching import fundamental_from_cameras


def _skew(v: np.ndarray) -> np.ndarray:
    return np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])


def _copy_of_database():
    folder = temporary_folder()
    shutil.copyfile(temple_database(), folder / "database.db")
    return folder, folder / "database.db"


def test_database_holds_our_features_matches_and_priors():
    scene = temple_scene()
    gt = scene.ground_truth
    true_cameras = read_ground_truth(gt)
    with pycolmap.Database.open(str(temple_database())) as db:
        assert db.num_images() == len(scene.names)
        assert db.num_rigs() == db.num_frames() == len(scene.names)
        for image_id, (name, features) in enumerate(zip(scene.names, scene.features), start=1):
            image = db.read_image(image_id)
            assert image.name == name and image.camera_id == gt.images[image_id].camera_id
            camera = db.read_camera(image.camera_id)
            assert camera.has_prior_focal_length
            np.testing.assert_allclose(camera.params, gt.cameras[image.camera_id].params)
            np.testing.assert_allclose(db.read_keypoints(image_id), features.keypoints, atol=1e-3)

        assert db.num_matched_image_pairs() == len(scene.raw.pairs)
        for (i, j), matches in zip(scene.raw.pairs, scene.raw.matches):
            np.testing.assert_array_equal(db.read_matches(i + 1, j + 1), matches)

        assert db.num_verified_image_pairs() == len(scene.verified.pairs)
        panoramic = 0
        for (i, j), inliers in zip(scene.verified.pairs, scene.verified.matches):
            geometry = db.read_two_view_geometry(i + 1, j + 1)
            np.testing.assert_array_equal(geometry.inlier_matches, inliers)
            truth = gt.images[j + 1].cam_from_world() * gt.images[i + 1].cam_from_world().inverse()
            if np.linalg.norm(truth.translation) < 1e-9:
                # templeSR0001 and templeSR0011 were taken from the same pose: no baseline, no E or F.
                assert geometry.config == int(pycolmap.TwoViewGeometryConfiguration.PANORAMIC)
                assert geometry.cam2_from_cam1.rotation.angle_to(truth.rotation) < 1e-9
                panoramic += 1
                continue
            assert geometry.config == int(pycolmap.TwoViewGeometryConfiguration.CALIBRATED)
            # The relative pose is the true one (translation to unit length, as COLMAP stores it).
            assert geometry.cam2_from_cam1.rotation.angle_to(truth.rotation) < 1e-9
            direction = truth.translation / np.linalg.norm(truth.translation)
            np.testing.assert_allclose(geometry.cam2_from_cam1.translation, direction, atol=1e-9)
            # E and F are the true ones, up to scale.
            E_true = _skew(direction) @ truth.rotation.matrix()
            assert min(np.abs(geometry.E - E_true).max(), np.abs(geometry.E + E_true).max()) < 1e-9
            F_true = fundamental_from_cameras(true_cameras, i, j)
            F = geometry.F / np.linalg.norm(geometry.F)
            assert min(np.abs(F - F_true).max(), np.abs(F + F_true).max()) < 1e-9

        assert panoramic == 1

        # Pose priors: the predicted centres, brought back into the model's frame by the similarity.
        priors = db.read_all_pose_priors()
        assert len(priors) == len(scene.names)
        for prior in priors:
            image_id = prior.corr_data_id.id
            assert prior.coordinate_system == pycolmap.PosePriorCoordinateSystem.CARTESIAN
            error = np.linalg.norm(prior.position - gt.images[image_id].projection_center())
            assert error < 0.02  # the simulated centre noise is 0.005 per axis


def test_pose_priors_can_stay_in_the_prediction_frame():
    scene = temple_scene()
    path = temporary_folder() / "raw_priors.db"
    report = write_database(
        path, scene.ground_truth, scene.features, None, scene.verified, scene.prior,
        align_pose_priors=False, pose_prior_std=0.01,
    )
    assert report.num_matched_pairs == 0 and not report.pose_priors_aligned
    with pycolmap.Database.open(str(path)) as db:
        for prior in db.read_all_pose_priors():
            center = scene.ground_truth.images[prior.corr_data_id.id].projection_center()
            expected = PRIOR_SCALE * PRIOR_ROTATION @ center + PRIOR_TRANSLATION
            assert np.linalg.norm(prior.position - expected) < 0.1
            np.testing.assert_allclose(prior.position_covariance, np.eye(3) * 1e-4)


def test_existing_database_is_kept_unless_overwrite():
    scene = temple_scene()
    path = temporary_folder() / "database.db"
    path.write_bytes(b"someone else's file")
    with pytest.raises(UserError, match="already exists"):
        write_database(path, scene.ground_truth, scene.features, None, scene.verified)
    assert path.read_bytes() == b"someone else's file"
    write_database(path, scene.ground_truth, scene.features, None, scene.verified, overwrite=True)
    with pycolmap.Database.open(str(path)) as db:
        assert db.num_images() == len(scene.names)
    assert sorted(p.name for p in path.parent.iterdir()) == ["database.db"]


def test_image_missing_from_the_model_gets_a_prior_camera():
    scene = temple_scene()
    model = pycolmap.Reconstruction(scene.ground_truth)
    model.deregister_frame(model.images[16].frame_id)
    partial = pycolmap.Reconstruction()
    for camera in model.cameras.values():
        if camera.camera_id != 16:
            partial.add_camera_with_trivial_rig(camera)
    for image_id in range(1, 16):
        image = model.images[image_id]
        partial.add_image_with_trivial_frame(
            pycolmap.Image(name=image.name, camera_id=image.camera_id, image_id=image_id), image.cam_from_world()
        )
    path = temporary_folder() / "partial.db"
    write_database(path, partial, scene.features, scene.raw, scene.verified, scene.prior)
    with pycolmap.Database.open(str(path)) as db:
        image = db.read_image(16)
        assert image.name == scene.names[15]
        camera = db.read_camera(image.camera_id)
        assert camera.model == pycolmap.CameraModelId.PINHOLE
        np.testing.assert_allclose(camera.calibration_matrix(), scene.prior.intrinsics[15])
        assert db.num_frames() == 16 and db.num_pose_priors() == 16


def _known_intrinsics_incremental() -> pycolmap.IncrementalPipelineOptions:
    return pycolmap.IncrementalPipelineOptions(
        num_threads=2, random_seed=0, ba_refine_focal_length=False, ba_refine_extra_params=False
    )


def _known_intrinsics_global() -> pycolmap.GlobalPipelineOptions:
    options = pycolmap.GlobalPipelineOptions(num_threads=2, random_seed=0)
    options.mapper.bundle_adjustment.refine_focal_length = False
    options.mapper.bundle_adjustment.refine_extra_params = False
    return options


@pytest.mark.parametrize("mapper", ["incremental", "global"])
def test_colmap_mappers_register_every_image_from_our_database(mapper):
    scene = temple_scene()
    folder, database = _copy_of_database()
    output = folder / "sparse"
    output.mkdir()
    with quiet_pycolmap():
        if mapper == "incremental":
            models = pycolmap.incremental_mapping(
                str(database), str(scene.images_dir), str(output), _known_intrinsics_incremental()
            )
        else:
            models = pycolmap.global_mapping(str(database), str(scene.images_dir), str(output), _known_intrinsics_global())
    assert len(models) == 1
    model = models[0]
    assert model.num_reg_images() == len(scene.names)
    result = evaluate(model, scene.ground_truth)
    assert result.num_registered == len(scene.names)
    assert np.max(result.rotation_errors) < 1.0  # degrees, after the similarity alignment
    assert np.median(result.pair_rotation_errors) < 0.5


def test_triangulate_points_with_our_model_and_database():
    scene = temple_scene()
    folder, database = _copy_of_database()
    output = folder / "triangulated"
    output.mkdir()
    with quiet_pycolmap():
        model = pycolmap.triangulate_points(scene.ground_truth, str(database), str(scene.images_dir), str(output))
    assert model.num_points3D() > 1000
    assert model.compute_mean_reprojection_error() < 1.0
    for image_id, image in model.images.items():
        truth = scene.ground_truth.images[image_id].cam_from_world()
        assert image.cam_from_world().rotation.angle_to(truth.rotation) < 1e-9
        np.testing.assert_allclose(image.cam_from_world().translation, truth.translation, atol=1e-9)
    assert pycolmap.Reconstruction(str(output)).num_points3D() == model.num_points3D()
