"""Overlapping VGGT windows chained into one frame (`vggt_sfm.windows`), on the real cameras of LLFF fern.

Each window's predictions are the fern ground truth seen through `simulate_prior` (VGGT-like noise, depth of a
surface the cameras see) and then moved into a random similarity frame of its own, as VGGT puts every window in
its own frame. Chained, they must give the ground-truth cameras back as well as one pass over all frames does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pycolmap
import pytest
from surface_scenes import plane_model, random_frame, shaken

from vggt_sfm.errors import UserError
from vggt_sfm.evaluation.metrics import evaluate, rotation_errors_deg
from vggt_sfm.evaluation.simulate import NoiseLevel, simulate_prior
from vggt_sfm.predictions import Predictions
from vggt_sfm.windows import chain_windows, default_overlap, transform_predictions, window_ranges, window_similarity

FERN = Path(__file__).parent / "fixtures" / "gt" / "llff_fern"  # the ground-truth cameras of shared/datasets/llff_fern
EXACT = NoiseLevel(rotation_deg=0.0, center_fraction=0.0, focal_fraction=0.0)


def test_window_ranges():
    assert window_ranges(5, 8, 2) == [(0, 5)]
    assert window_ranges(10, 4, 1) == [(0, 4), (3, 7), (6, 10)]
    assert window_ranges(11, 4, 1) == [(0, 4), (3, 7), (6, 10), (7, 11)]  # the last window ends at the last frame
    for num, window, overlap in [(20, 6, 2), (100, 37, 9), (7, 2, 1), (30, 10, 9)]:
        ranges = window_ranges(num, window, overlap)
        assert ranges[0][0] == 0 and ranges[-1][1] == num
        assert all(stop - start == window for start, stop in ranges)
        assert all(prev[1] - cur[0] >= overlap for prev, cur in zip(ranges, ranges[1:]))
    assert default_overlap(2) == 1 and default_overlap(8) == 2 and default_overlap(40) == 10
    for window, overlap in [(1, 0), (4, 0), (4, 4)]:
        with pytest.raises(UserError, match="window"):
            window_ranges(10, window, overlap)


def _surface_model() -> pycolmap.Reconstruction:
    """The fern ground truth plus 3D points: a bumpy surface in front of the cameras, observed where in view."""
    return plane_model(FERN)


def _windowed(predictions: Predictions, ranges, seed: int, extra_rotation_deg: float = 0.0) -> list[Predictions]:
    """Each window of `predictions` in a random similarity frame, its cameras optionally perturbed further."""
    rng = np.random.default_rng(seed)
    windows = []
    for start, stop in ranges:
        window = predictions.subset(predictions.image_names[start:stop])
        if extra_rotation_deg:
            window = shaken(window, extra_rotation_deg, rng)
        windows.append(transform_predictions(window, random_frame(rng)))
    return windows


def test_exact_windows_chain_into_one_frame():
    predictions = simulate_prior(FERN, level=EXACT, seed=1, depth_from=_surface_model())
    assert predictions.depth is not None and (predictions.depth > 0).mean() > 0.9
    ranges = window_ranges(predictions.num_frames, 6, 2)
    merged = chain_windows(_windowed(predictions, ranges, seed=2))
    assert merged.image_names == predictions.image_names
    # One similarity maps the chained cameras onto the one-pass cameras: the relative poses are the same.
    rotations = merged.cam_from_world[:, :, :3] @ merged.cam_from_world[0, :, :3].T
    reference = predictions.cam_from_world[:, :, :3] @ predictions.cam_from_world[0, :, :3].T
    assert rotation_errors_deg(rotations, reference).max() < 1e-5
    centers = -np.einsum("sji,sj->si", merged.cam_from_world[:, :, :3], merged.cam_from_world[:, :, 3])
    truth = -np.einsum("sji,sj->si", predictions.cam_from_world[:, :, :3], predictions.cam_from_world[:, :, 3])
    scale = np.linalg.norm(centers - centers[0], axis=1)[1:] / np.linalg.norm(truth - truth[0], axis=1)[1:]
    assert np.ptp(scale) < 1e-5 * scale.mean()
    # Depth in the merged frame: scaled like the cameras.
    np.testing.assert_allclose(merged.depth, predictions.depth * scale.mean(), rtol=1e-4)
    result = evaluate(merged, FERN)
    assert result.num_registered == 20 and result.auc[1] == pytest.approx(1.0)


def test_noisy_windows_are_as_accurate_as_one_pass():
    """Every window sees its frames with VGGT-like noise of its own; the chain must not add drift beyond it."""
    predictions = simulate_prior(FERN, level="vggt", seed=3, depth_from=_surface_model())
    one_pass = evaluate(predictions, FERN)
    ranges = window_ranges(predictions.num_frames, 8, 2)
    merged = chain_windows(_windowed(predictions, ranges, seed=4, extra_rotation_deg=0.5))
    chained = evaluate(merged, FERN)
    assert chained.num_registered == 20
    # The windows' own noise (0.5 deg more per camera) shows; chaining three windows adds little on top.
    assert np.median(chained.rotation_errors) < np.median(one_pass.rotation_errors) + 1.0
    assert chained.auc[10] > 0.8 * one_pass.auc[10]


def test_windows_without_depth_or_shared_frames_are_refused():
    predictions = simulate_prior(FERN, level=EXACT, seed=1, depth_from=_surface_model())
    first, second = predictions.subset(predictions.image_names[:5]), predictions.subset(predictions.image_names[5:10])
    with pytest.raises(ValueError, match="share no frame"):
        window_similarity(first, second)
    with pytest.raises(ValueError, match="depth"):
        window_similarity(dataclasses.replace(first, depth=None), predictions.subset(predictions.image_names[4:9]))


def test_a_shared_frame_without_depth_leaves_the_others_to_align():
    predictions = simulate_prior(FERN, level=EXACT, seed=1, depth_from=_surface_model())
    depth = predictions.depth.copy()
    depth[4] = 0.0  # frame 4 is shared by the first two windows of 6/2 (frames 4 and 5)
    windows = _windowed(dataclasses.replace(predictions, depth=depth), window_ranges(20, 6, 2), seed=2)
    assert evaluate(chain_windows(windows), FERN).auc[1] == pytest.approx(1.0)
    depth[5] = 0.0
    windows = _windowed(dataclasses.replace(predictions, depth=depth), window_ranges(20, 6, 2), seed=2)
    with pytest.raises(UserError, match="fewer than 3 pixels"):
        chain_windows(windows)
