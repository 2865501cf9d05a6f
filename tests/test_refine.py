"""Bundle-adjustment rounds on real images (Strecha fountain, SIFT, simulated VGGT-level prior): accuracy
against ground truth, a re-localised 20-degree-off frame, constant frames, re-triangulation, model files."""

import numpy as np
import pycolmap
import pytest
from sfm_scenes import scene, simulated_prior, tracks, without_image  # noqa: F401 (fixtures)

from vggt_sfm.evaluation import evaluate
from vggt_sfm.mapping import MappingConfig, initialize_reconstruction
from vggt_sfm.refine import RefineConfig, refine_reconstruction
from vggt_sfm.tracks import build_tracks

def test_refinement_is_far_more_accurate_than_the_prior(scene, tracks, tmp_path):
    prior = simulated_prior(scene)
    before = evaluate(prior, scene.gt)
    rec, _ = initialize_reconstruction(prior, scene.features, tracks, None)
    report = refine_reconstruction(rec, RefineConfig(), verified=scene.verified, features=scene.features)

    after = evaluate(rec, scene.gt)
    assert after.num_registered == prior.num_images
    assert np.median(before.pair_rotation_errors) > 1.5
    assert np.median(after.pair_rotation_errors) < 0.2  # measured 0.08
    assert np.max(after.pair_rotation_errors) < 0.5
    assert np.median(after.center_errors) / after.scene_extent < 0.005
    assert np.median(after.focal_errors) < 0.01  # the prior's focal is 5 % off

    # The principal point (true one off-centre, prior at the centre) moves to the truth.
    assert sorted(report.refined_intrinsics) == ["extra", "focal", "principal_point"]
    camera = rec.cameras[1]
    true_pp = scene.gt.intrinsics[0, :2, 2]
    refined_pp = np.array([camera.principal_point_x, camera.principal_point_y])
    assert np.linalg.norm(refined_pp - true_pp) < 0.5 * np.linalg.norm(prior.intrinsics[0, :2, 2] - true_pp)

    # The rounds: robust first, then squared error with the principal point, then settled.
    assert report.history[0].loss == "cauchy" and report.history[-1].loss == "trivial"
    assert report.history[-1].refine_principal_point
    assert report.rounds < RefineConfig().rounds
    assert all(r.num_residuals > 0 and r.time_s > 0 for r in report.history)
    assert report.mean_reprojection_error < 0.5
    assert report.num_points > 0.9 * tracks.num_tracks
    errors = np.array([p.error for p in rec.points3D.values()])
    assert errors.max() <= RefineConfig().max_reproj_error_px

    # A valid model that COLMAP reads back unchanged.
    assert rec.is_valid()
    rec.write(tmp_path)
    again = pycolmap.Reconstruction(tmp_path)
    assert again.num_reg_images() == rec.num_reg_images() and again.num_points3D() == rec.num_points3D()
    assert np.allclose(again.cameras[1].params, rec.cameras[1].params)
    for image_id, image in rec.images.items():
        assert np.allclose(again.images[image_id].cam_from_world().matrix(), image.cam_from_world().matrix())
        assert again.images[image_id].name == image.name


def test_implausible_or_unobservable_intrinsics_are_held(scene, tracks):
    prior = simulated_prior(scene)
    rec, _ = initialize_reconstruction(prior, scene.features, tracks, None)
    initial = rec.cameras[1].params.copy()
    # Any principal-point offset counts as implausible here, and the view counts as too narrow for distortion.
    config = RefineConfig(max_principal_point_offset=0.0, min_fov_extra_params_deg=90.0)
    report = refine_reconstruction(rec, config, verified=scene.verified)
    assert report.refined_intrinsics == ["focal"]
    camera = rec.cameras[1]
    assert camera.params[1:] == pytest.approx(initial[1:])  # principal point and k as initialised
    assert camera.params[0] != pytest.approx(initial[0])
    assert np.median(evaluate(rec, scene.gt).pair_rotation_errors) < 0.5


def test_a_diverging_adjustment_is_undone(scene, tracks, caplog):
    prior = simulated_prior(scene)
    rec, _ = initialize_reconstruction(prior, scene.features, tracks, None)
    poses = {i: image.cam_from_world().matrix() for i, image in rec.images.items()}
    points = {i: p.xyz.copy() for i, p in rec.points3D.items()}
    # Any change of the relative rotations counts as divergence here: the first adjustment is undone.
    report = refine_reconstruction(rec, RefineConfig(max_rotation_change_deg=1e-3), verified=scene.verified)
    assert report.diverged and report.rounds == 0
    assert "diverged" in caplog.text
    assert all(np.allclose(rec.images[i].cam_from_world().matrix(), pose) for i, pose in poses.items())
    assert all(np.allclose(rec.points3D[i].xyz, xyz) for i, xyz in points.items())


def test_a_relocalized_frame_ends_as_accurate_as_the_others(scene, tracks):
    bad = 2
    prior = simulated_prior(scene, seed=2, outliers=[bad])
    rec, mapping = initialize_reconstruction(prior, scene.features, tracks, None)
    assert mapping.relocalized == [prior.image_names[bad]]
    refine_reconstruction(rec, RefineConfig(), verified=scene.verified)
    result = evaluate(rec, scene.gt)
    involved = (result.pairs == bad).any(axis=1)
    assert result.num_registered == prior.num_images
    assert np.median(result.pair_rotation_errors[involved]) < 0.5
    assert np.median(result.pair_rotation_errors) < 0.2


def test_constant_images_keep_their_pose(scene):
    lonely = 5
    verified = without_image(scene.verified, lonely)
    tracks = build_tracks(verified, [len(f.keypoints) for f in scene.features])
    prior = simulated_prior(scene)
    rec, mapping = initialize_reconstruction(prior, scene.features, tracks, None)
    assert mapping.not_refined == [prior.image_names[lonely]]
    report = refine_reconstruction(rec, RefineConfig(), verified=verified, constant_images=[lonely + 1])
    assert report.constant_images == [prior.image_names[lonely]]

    image = rec.images[lonely + 1]
    assert np.allclose(image.cam_from_world().matrix(), prior.cam_from_world[lonely], atol=1e-9)
    # The others are refined and stay in the prior's frame, so the held image is as good as its prior.
    result = evaluate(rec, scene.gt)
    involved = (result.pairs == lonely).any(axis=1)
    assert np.median(result.pair_rotation_errors[~involved]) < 0.2
    prior_result = evaluate(prior, scene.gt)
    assert np.median(result.pair_rotation_errors[involved]) < 1.5 * np.median(
        prior_result.pair_rotation_errors[involved]
    ) + 0.5
    assert result.center_errors[lonely] < 2 * prior_result.center_errors[lonely] + 0.05 * result.scene_extent


def test_a_frame_held_for_few_observations_is_registered_late(scene):
    """A frame whose observations the initial model lost (here: its tracks left out) is held at its prior, then
    placed by PnP on the refined model from its verified matches and refined with the rest."""
    lonely = 5
    partial = build_tracks(without_image(scene.verified, lonely), [len(f.keypoints) for f in scene.features])
    prior = simulated_prior(scene)
    rec, mapping = initialize_reconstruction(prior, scene.features, partial, None)
    assert mapping.few_observations == mapping.not_refined == [prior.image_names[lonely]]
    held = evaluate(rec, scene.gt)
    involved = (held.pairs == lonely).any(axis=1)
    report = refine_reconstruction(
        rec, RefineConfig(), verified=scene.verified, constant_images=[lonely + 1], late_images=[lonely + 1]
    )
    assert report.registered_late == [prior.image_names[lonely]]
    assert report.constant_images == []
    result = evaluate(rec, scene.gt)
    assert rec.images[lonely + 1].num_points3D > 100
    # As accurate as the other frames (the prior's pairs with it: about 2-3 deg).
    assert np.median(result.pair_rotation_errors[involved]) < 0.3
    assert np.median(result.pair_rotation_errors[involved]) < np.median(held.pair_rotation_errors[involved]) / 5
    assert np.median(result.pair_rotation_errors) < 0.2


def test_a_late_pose_far_from_the_prior_is_refused(scene):
    """The late PnP only confirms a held frame near its pose: one 20 degrees off stays held (and named)."""
    lonely = 5
    partial = build_tracks(without_image(scene.verified, lonely), [len(f.keypoints) for f in scene.features])
    prior = simulated_prior(scene, outliers=[lonely])
    rec, mapping = initialize_reconstruction(prior, scene.features, partial, None)
    assert mapping.few_observations == [prior.image_names[lonely]]
    report = refine_reconstruction(
        rec, RefineConfig(), verified=scene.verified, constant_images=[lonely + 1], late_images=[lonely + 1]
    )
    assert report.registered_late == []
    assert report.constant_images == [prior.image_names[lonely]]
    assert np.allclose(rec.images[lonely + 1].cam_from_world().matrix(), prior.cam_from_world[lonely], atol=1e-9)


def test_retriangulation_restores_points_from_the_matches(scene, tracks):
    prior = simulated_prior(scene)
    # Start from a third of the tracks: the verified matches hold the rest.
    keep = tracks.track_id % 3 == 0
    partial = tracks.select(keep)
    config = MappingConfig(extract_colors=False)
    rec, mapping = initialize_reconstruction(prior, scene.features, partial, None, config)
    report = refine_reconstruction(rec, RefineConfig(), verified=scene.verified)
    assert sum(r.added for r in report.history) > mapping.num_observations
    # COLMAP's triangulator leaves two-view correspondences alone; every longer track comes back.
    long_tracks = int((tracks.lengths() >= 3).sum())
    assert report.num_points > max(0.9 * long_tracks, 2 * mapping.num_points)
    assert np.median(evaluate(rec, scene.gt).pair_rotation_errors) < 0.2

    # The tracks alone serve too; without any correspondences nothing is added.
    rec_tracks, _ = initialize_reconstruction(prior, scene.features, partial, None, config)
    from_tracks = refine_reconstruction(rec_tracks, RefineConfig(max_iterations=30), tracks=tracks)
    assert from_tracks.num_points > max(0.9 * long_tracks, 2 * mapping.num_points)
    rec_alone, _ = initialize_reconstruction(prior, scene.features, partial, None, config)
    alone = refine_reconstruction(rec_alone, RefineConfig(max_iterations=30))
    assert all(r.added == 0 for r in alone.history)
    assert alone.num_points <= partial.num_tracks


def test_groups_the_matches_do_not_connect_are_placed_by_the_prior(scene):
    """Two groups of images without a match between them: inside each the matches decide (accurate), between
    them only the prior can (about as accurate as the prior, never pulled apart by the free gauge)."""
    first = 3  # images 0..2 against 3..5
    pairs = scene.verified.pairs
    keep = (pairs < first).all(axis=1) | (pairs >= first).all(axis=1)
    verified = type(scene.verified)(
        pairs[keep], [m for m, k in zip(scene.verified.matches, keep) if k],
        [m for m, k in zip(scene.verified.method, keep) if k], scene.verified.num_raw[keep],
    )  # fmt: skip
    split_tracks = build_tracks(verified, [len(f.keypoints) for f in scene.features])
    prior = simulated_prior(scene)
    rec, _ = initialize_reconstruction(prior, scene.features, split_tracks, None)
    refine_reconstruction(rec, RefineConfig(), verified=verified)

    result, before = evaluate(rec, scene.gt), evaluate(prior, scene.gt)
    across = (result.pairs < first).sum(axis=1) == 1
    assert np.median(result.pair_rotation_errors[~across]) < 0.2
    # Each group is placed by the prior's poses of its own images (a mean over them): no worse than the prior.
    assert np.median(result.pair_rotation_errors[across]) < np.median(before.pair_rotation_errors[across]) + 0.5
    assert np.max(result.pair_rotation_errors[across]) < np.max(before.pair_rotation_errors) + 1.0
