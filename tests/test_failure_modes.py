"""VGGT's structured failure modes: the simulator makes each one as documented, and the pipeline survives them.

The simulator tests compare a prior with a failure mode against the same seed's iid prior (the iid draw is the
same with or without modes, so every difference is the mode's). The pipeline tests run the default preset on the
shipped templeSR ring (16 photos, weak texture: COLMAP's own pipeline reaches AUC@1 8.3 there and registers 13/16,
benchmarks/README.md) with frames VGGT got wrong, and check each broken frame: it ends near its true pose, or it
is named in the summary as not refined. Never silently wrong.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vggt_sfm.config import config_from_dict

from vggt_sfm import run
from vggt_sfm.cli import main
from vggt_sfm.errors import UserError
from vggt_sfm.evaluation import evaluate
from vggt_sfm.evaluation.failure_modes import FailureModes, FailureReport, apply_depth_failures
from vggt_sfm.evaluation.metrics import read_ground_truth
from vggt_sfm.evaluation.simulate import simulate_prior
from vggt_sfm.predictions import load_predictions

TEMPLE = Path(__file__).resolve().parents[1] / "data" / "templeSR"
COLMAP_AUC1_TEMPLE = 0.083  # COLMAP's own pipeline on this set (benchmarks/README.md, pipeline table)
RECOVERED_DEG = 2.0


def _angles_deg(R_a: np.ndarray, R_b: np.ndarray) -> np.ndarray:
    cosine = (np.einsum("sij,sij->s", R_a, R_b) - 1) / 2
    return np.degrees(np.arccos(np.clip(cosine, -1, 1)))


@pytest.fixture(scope="module")
def temple_gt():
    return read_ground_truth(TEMPLE / "gt")


def _pair(gt, modes: str | FailureModes, seed: int = 3):
    report = FailureReport()
    broken = simulate_prior(gt, seed=seed, failure_modes=modes, report=report)
    return simulate_prior(gt, seed=seed), broken, report


def test_focal_bias_is_one_factor_for_every_frame(temple_gt):
    iid, biased, report = _pair(temple_gt, "focal-bias")
    ratio = biased.intrinsics[:, 0, 0] / iid.intrinsics[:, 0, 0]
    assert np.allclose(ratio, report.focal_factor) and abs(abs(np.log(report.focal_factor)) - 0.15) < 1e-9
    assert np.allclose(biased.cam_from_world, iid.cam_from_world)  # only the intrinsics change


def test_bad_frames_are_tens_of_degrees_off_and_the_rest_untouched(temple_gt):
    iid, broken, report = _pair(temple_gt, "bad-frames")
    angles = _angles_deg(broken.cam_from_world[:, :, :3], iid.cam_from_world[:, :, :3])
    bad = np.isin(iid.image_names, report.bad_frames)
    assert bad.sum() == round(0.15 * len(bad))
    assert np.all((angles[bad] >= 25 - 1e-6) & (angles[bad] <= 40 + 1e-6))
    assert np.allclose(angles[~bad], 0, atol=1e-4)


def test_flipped_frames_are_turned_around(temple_gt):
    iid, flipped, report = _pair(temple_gt, "flipped")
    angles = _angles_deg(flipped.cam_from_world[:, :, :3], iid.cam_from_world[:, :, :3])
    turned = np.isin(iid.image_names, report.flipped_frames)
    assert turned.sum() == 2 and np.all(angles[turned] > 150) and np.allclose(angles[~turned], 0, atol=1e-4)


def test_drift_grows_along_the_sequence(temple_gt):
    iid, drifted, report = _pair(temple_gt, "drift")
    angles = _angles_deg(drifted.cam_from_world[:, :, :3], iid.cam_from_world[:, :, :3])
    assert angles[0] < 1e-6 and abs(angles[-1] - 5.0) < 1e-6 and np.all(np.diff(angles) > -1e-9)
    assert abs(abs(np.log(report.drift_scale)) - 0.12) < 1e-9


def test_depth_failures_scale_frames_and_paint_confident_wrong_patches():
    rng = np.random.default_rng(0)
    depth = np.full((3, 40, 50), 2.0, np.float32)
    confidence = (2.0 + np.random.default_rng(1).random((3, 40, 50))).astype(np.float32)
    out_depth, out_conf = apply_depth_failures(FailureModes.named("depth"), rng, depth, confidence)
    for k in range(3):
        scale = float(np.median(out_depth[k])) / 2.0
        assert 0.85 < scale < 1.15 and scale != 1.0  # a few percent, per frame
        wrong = ~np.isclose(out_depth[k], 2.0 * scale, rtol=1e-5)
        assert 0.02 < wrong.mean() < 0.08  # about 5 % of the pixels, at a wrong depth ...
        assert np.all(out_conf[k][wrong] == confidence[k].max())  # ... with the frame's highest confidence
        assert np.array_equal(out_conf[k][~wrong], confidence[k][~wrong])


def test_unknown_mode_is_one_clear_error(temple_gt):
    with pytest.raises(UserError, match="unknown failure mode 'sideways'"):
        simulate_prior(temple_gt, failure_modes="bad-frames,sideways")


def test_simulate_command_writes_failure_modes(tmp_path, capsys):
    out = tmp_path / "prior.npz"
    assert main(["simulate", "--gt", str(TEMPLE / "gt"), "--images", str(TEMPLE / "images"), "--output", str(out),
                 "--failure-modes", "all", "--seed", "3"]) == 0  # fmt: skip
    assert "failure modes all" in capsys.readouterr().out
    loaded = load_predictions(out)
    expected = simulate_prior(read_ground_truth(TEMPLE / "gt"), seed=3, failure_modes="all")
    assert np.allclose(loaded.cam_from_world, expected.cam_from_world)


def _reconstruct_with(gt, modes: str, seed: int):
    report = FailureReport()
    prior = simulate_prior(gt, seed=seed, failure_modes=modes, report=report)
    result = run(TEMPLE / "images", predictions=prior, progress=False)
    metrics = evaluate(result.reconstruction, TEMPLE / "gt")
    errors = {row["name"]: row["rotation_error_deg"] for row in metrics.per_image()}
    return result, metrics, errors, report


@pytest.mark.slow
@pytest.mark.parametrize("modes", ["bad-frames", "flipped", "all"])
def test_broken_frames_are_recovered_or_named(temple_gt, modes):
    result, metrics, errors, report = _reconstruct_with(temple_gt, modes, seed=0)
    assert report.failed_frames
    named = set(result.summary.not_refined)
    # Recovered: as accurate as the frames VGGT got right (within 3x the run's median, at least 2 deg).
    bound = max(RECOVERED_DEG, 3.0 * metrics.as_dict()["rotation_error_median_deg"])
    for name in report.failed_frames:
        assert errors[name] <= bound or name in named, (name, errors[name])
    # No sound frame is sacrificed (0001 and 0011, with too few observations at first, are registered late).
    assert not named - set(report.failed_frames)
    assert result.summary.status == "ok"
    # Measured on this seed: iid 1.23 deg; bad-frames 1.15, flipped 1.10, all 1.37 (the broken frames that PnP
    # cannot confirm near their repaired rotation are named, the others recovered).
    assert metrics.as_dict()["rotation_error_median_deg"] <= 1.5 * 1.24
    assert metrics.num_registered == metrics.num_images
    assert metrics.as_dict()["auc@1"] >= COLMAP_AUC1_TEMPLE
    if modes == "flipped":  # found by the view graph, not left to chance
        assert set(result.summary.details["view_graph"]["failed"]) == set(report.flipped_frames)


FOUNTAIN = Path(__file__).resolve().parents[1] / "data" / "fountain"
FOUNTAIN_IID_ROTATION_DEG = 0.0715  # the shipped fountain, default preset, seed 0 without failure modes


@pytest.mark.slow
@pytest.mark.parametrize("modes", ["focal-bias", "drift"])
def test_shared_focal_bias_and_drift_end_near_the_iid_result(modes):
    # Measured on the shipped fountain, seed 0: iid 0.0715 deg median rotation error; focal-bias 0.076 (0.107 without
    # the focal re-pass on the full-size photos), drift 0.076. (On the weak-texture templeSR the drift case varied
    # between identical runs, 1.1-3.0 deg; the cause is not yet found, so it is not the test's scene.)
    gt = read_ground_truth(FOUNTAIN / "gt")
    prior = simulate_prior(gt, seed=0, failure_modes=modes)
    result = run(FOUNTAIN / "images", predictions=prior, progress=False)
    metrics = evaluate(result.reconstruction, FOUNTAIN / "gt").as_dict()
    assert metrics["num_registered"] == 11 and metrics["auc@1"] == 1.0 and result.summary.status == "ok"
    assert metrics["rotation_error_median_deg"] <= 1.5 * FOUNTAIN_IID_ROTATION_DEG


@pytest.mark.slow
def test_a_focal_repass_that_bends_the_model_is_undone(temple_gt):
    # templeSR under every failure mode, seed 1: the first pass refined the focal 14 % from the prediction, the
    # repass with that focal bent the model (5.9 deg median rotation error, 7.6 deg from the prediction; reported
    # FAILED). The first pass, 1.9 deg, is kept instead.
    result, metrics, errors, report = _reconstruct_with(temple_gt, "all", seed=1)
    repass = result.summary.details["focal_repass"]
    assert repass["kept"] == "first", repass
    assert repass["prior_disagreement_deg"]["repass"] > repass["prior_disagreement_deg"]["first"] + 1.0
    assert result.summary.status == "ok" and metrics.num_registered == metrics.num_images
    assert metrics.as_dict()["auc@1"] >= COLMAP_AUC1_TEMPLE
    assert metrics.as_dict()["rotation_error_median_deg"] < 3.0


def test_a_model_that_contradicts_the_prediction_on_most_pairs_fails(temple_gt):
    # templeSR under every failure mode, seed 1: bundle adjustment converged (0.2 px) to a model 10 deg off the
    # truth, later 6 deg off (prior disagreement 6.0 deg), which the summary called a success. The prediction is a
    # few degrees off per frame; a model that turns most pairs far from it is not to be trusted.
    import pycolmap
    from scipy.spatial.transform import Rotation

    from vggt_sfm.sanity import SanityLimits, check_run, prior_disagreement_deg

    prior = temple_gt
    model = pycolmap.Reconstruction()
    camera = pycolmap.Camera(camera_id=1, model="SIMPLE_PINHOLE", width=640, height=480, params=[1500, 320, 240])
    model.add_camera_with_trivial_rig(camera)
    turns = Rotation.from_rotvec(np.random.default_rng(0).normal(size=(prior.num_images, 3)) * np.radians(2)).as_matrix()
    for i, name in enumerate(prior.image_names):
        pose = prior.cam_from_world[i].copy()
        pose[:, :3] = turns[i] @ pose[:, :3]  # 2 degrees per frame: as far as VGGT's iid error
        model.add_image_with_trivial_frame(pycolmap.Image(name=name, camera_id=1, image_id=i + 1), pycolmap.Rigid3d(pose))
    limit = SanityLimits().max_prior_disagreement_deg
    near = prior_disagreement_deg(model, prior)
    assert 1.0 < near < limit and not check_run(16, 100, 0.3, [], prior_disagreement=near)

    def turn_half(model: pycolmap.Reconstruction, degrees: float) -> pycolmap.Reconstruction:
        bent = pycolmap.Reconstruction(model)
        turn = Rotation.from_rotvec([0.0, np.radians(degrees), 0.0]).as_matrix()
        for i in range(0, prior.num_images, 2):
            image = bent.image(i + 1)
            pose = image.cam_from_world().matrix()
            pose[:, :3] = turn @ pose[:, :3]
            bent.frame(image.frame_id).rig_from_world = pycolmap.Rigid3d(pose)
        return bent

    for degrees in (8.0, 17.0):  # half the frames turned: a bent model (8 degrees: about the seed-1 run's 6.0)
        far = prior_disagreement_deg(turn_half(model, degrees), prior)
        assert far > limit, (degrees, far)
        (reason,) = check_run(16, 100, 0.3, [], prior_disagreement=far)
        assert "from the predicted cameras" in reason and "sanity.max_prior_disagreement_deg" in reason
    # A user whose prediction is known to be worse can raise the limit (a preset's [sanity] table, or --set).
    looser = config_from_dict({"sanity": {"max_prior_disagreement_deg": far + 1.0}}).sanity
    assert not check_run(16, 100, 0.3, [], limits=looser, prior_disagreement=far)
    model = turn_half(model, 17.0)
    # The frames the run found wrong do not count against it.
    assert prior_disagreement_deg(model, prior, skip=prior.image_names[::2]) == pytest.approx(near, abs=1.0)
