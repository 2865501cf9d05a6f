"""The global merge of passes in frames of their own (`vggt_sfm.merge`), on the real cameras of the NeRF lego.

The 25 lego views, ordered by azimuth, are an orbit; chunks are arcs of it, each sharing frames with the next and
the last with the first (a loop). Each chunk's predictions are the ground truth (exact, or with noise of its own)
seen through `simulate_prior`, with depth of a synthetic surface the cameras see (`surface_scenes.sphere_model`),
then moved into a random similarity frame of its own: that frame is the truth the merge must recover.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pycolmap
import pytest
from scipy.spatial.transform import Rotation
from surface_scenes import look_at_point, random_frame, shaken, sphere_model

from vggt_sfm.errors import UserError
from vggt_sfm.evaluation.metrics import read_ground_truth, rotation_errors_deg
from vggt_sfm.evaluation.simulate import NoiseLevel, simulate_prior
from vggt_sfm.merge import MERGE_REPORT_KEY, merge_predictions, transform_predictions
from vggt_sfm.predictions import Predictions

LEGO = Path(__file__).parent / "fixtures" / "gt" / "nerf_synthetic_lego"  # ground-truth cameras only
EXACT = NoiseLevel(rotation_deg=0.0, center_fraction=0.0, focal_fraction=0.0)


def _orbit() -> list[str]:
    """The lego views by azimuth about the vertical axis (z) through the point they look at."""
    gt = read_ground_truth(LEGO)
    offsets = gt.centers() - look_at_point(pycolmap.Reconstruction(str(LEGO)))
    order = np.argsort(np.arctan2(offsets[:, 1], offsets[:, 0]))
    return [gt.image_names[i] for i in order]


def _ring(names: list[str], size: int, step: int) -> list[list[str]]:
    """Arcs of `size` frames every `step` frames around the orbit; the last wraps onto the first."""
    return [[names[(start + k) % len(names)] for k in range(size)] for start in range(0, len(names), step)]


def _turned(predictions: Predictions, names: list[str], degrees: float, axis: tuple[float, float, float]) -> Predictions:
    """The cameras of `names` turned by `degrees` about `axis` through the orbit's centre (a chunk whose
    geometry is wrong there); their depth maps go with them, so their surface turns too."""
    centre = look_at_point(pycolmap.Reconstruction(str(LEGO)))
    world_turn = Rotation.from_rotvec(np.radians(degrees) * np.asarray(axis) / np.linalg.norm(axis)).as_matrix()
    poses = predictions.cam_from_world.copy()
    for i in [predictions.index()[name] for name in names]:
        R, t = poses[i, :, :3], poses[i, :, 3]
        # x' = Q (x - o) + o, so cam_from_world' (x') = R Q^T (x' - o) + R o + t.
        poses[i, :, :3], poses[i, :, 3] = R @ world_turn.T, t + R @ centre - R @ world_turn.T @ centre
    return dataclasses.replace(predictions, cam_from_world=poses)


@pytest.fixture(scope="module")
def exact():
    """One exact prediction of every lego view, in the ground truth's frame (level EXACT keeps its world)."""
    return simulate_prior(LEGO, level=EXACT, seed=1, depth_from=sphere_model(LEGO))


def _chunks(one_pass: Predictions, chunks: list[list[str]], seed: int, turns: dict | None = None):
    """Each chunk of `one_pass` in a random frame of its own (and, per chunk index in `turns`, some of its frames
    turned first); returns the chunks and their true world_from_chunk placements (world: chunk 0's frame)."""
    rng = np.random.default_rng(seed)
    frames = [random_frame(rng) for _ in chunks]
    parts = []
    for c, names in enumerate(chunks):
        part = one_pass.subset(names)
        for turned, degrees, axis in (turns or {}).get(c, []):
            part = _turned(part, turned, degrees, axis)
        parts.append(transform_predictions(part, frames[c]))
    return parts, [frames[0] * frame.inverse() for frame in frames]


def _placement_errors(report, truths, parts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per chunk: rotation (degrees) and scale (relative) errors of its placement, and how far it puts the chunk's
    cameras from where they belong (relative to the orbit's radius)."""
    radius = None
    rotation, scale, position = [], [], []
    for placed, truth, part in zip(report.placements, truths, parts):
        estimate = pycolmap.Sim3d(placed[0], pycolmap.Rotation3d(np.array(placed[1:5])), np.array(placed[5:]))
        rotation.append(np.degrees(estimate.rotation.angle_to(truth.rotation)))
        scale.append(abs(estimate.scale / truth.scale - 1.0))
        centres = np.array([pycolmap.Rigid3d(pose).inverse().translation for pose in part.cam_from_world])
        true_centres = truth * centres
        if radius is None:
            radius = np.median(np.linalg.norm(true_centres - true_centres.mean(axis=0), axis=1))
        position.append(np.linalg.norm(estimate * centres - true_centres, axis=1).max() / radius)
    return np.array(rotation), np.array(scale), np.array(position)


def _rotation_errors_deg(merged: Predictions, truth: Predictions) -> np.ndarray:
    """Per frame of `merged`: its rotation error against `truth` once chunk 0's frame is taken out (the merged
    predictions are in chunk 0's frame, `truth` in the ground truth's)."""
    index = truth.index()
    reference = merged.image_names[0]
    R = merged.cam_from_world[:, :, :3] @ merged.cam_from_world[0, :, :3].T
    R_true = truth.cam_from_world[[index[n] for n in merged.image_names], :, :3] @ truth.cam_from_world[index[reference], :, :3].T
    return rotation_errors_deg(R, R_true)


def test_exact_chunks_are_placed_at_their_true_frames(exact):
    chunks = _ring(_orbit(), 7, 5)
    assert len(chunks) == 5 and set(chunks[-1]) & set(chunks[0])  # a loop
    parts, truths = _chunks(exact, chunks, seed=2)
    merged, report = merge_predictions(parts, order=exact.image_names)
    assert merged.image_names == exact.image_names and merged.depth.shape == exact.depth.shape
    rotation, scale, position = _placement_errors(report, truths, parts)
    assert rotation.max() < 1e-5 and scale.max() < 1e-6 and position.max() < 1e-6  # float32 depth
    assert [edge["status"] for edge in report.edges] == ["used"] * 5 and max(e["residual"] for e in report.edges) < 1e-6
    assert _rotation_errors_deg(merged, exact).max() < 1e-5
    # The first chunk is the gauge: its frames keep their predictions exactly; the report is in the extras.
    first = merged.subset(chunks[0])
    np.testing.assert_array_equal(first.cam_from_world, parts[0].cam_from_world)
    assert json.loads(str(merged.extras[MERGE_REPORT_KEY]))["dropped"] == []


def test_noisy_chunks_are_placed_within_their_noise(exact):
    """Each chunk's cameras get 1 degree of noise of their own, as independent VGGT passes disagree: each edge,
    fitted on two shared frames noisy in both chunks, is then off by about 1 degree, and every placement stays
    within 1.5 degrees and 2 % of scale of the truth, its cameras within 10 % of the orbit's
    radius (a degree of rotation about the surface moves cameras 4 radii away); no chunk is an outlier."""
    chunks = _ring(_orbit(), 7, 5)
    rng = np.random.default_rng(3)
    parts, truths = _chunks(exact, chunks, seed=4)
    parts = [shaken(part, 1.0, rng) for part in parts]
    merged, report = merge_predictions(parts, order=exact.image_names)
    rotation, scale, position = _placement_errors(report, truths, parts)
    assert rotation.max() < 1.5 and scale.max() < 0.02 and position.max() < 0.10
    assert all(edge["status"] == "used" for edge in report.edges)
    assert np.median(_rotation_errors_deg(merged, exact)) < 2.0


def test_a_loop_closes_instead_of_drifting(exact):
    """Each chunk's frames shared with the next are turned 2 degrees about the orbit's axis (VGGT's drift within a
    chunk): every edge is off by that much. A chain places each chunk on the one before and ends 4 edges (8 degrees)
    off; the global solve spreads the loop and places every chunk where it belongs."""
    orbit = _orbit()
    chunks = _ring(orbit, 7, 5)
    turns = {c: [(sorted(set(chunks[c]) & set(chunks[(c + 1) % 5])), 2.0, (0.0, 0.0, 1.0))] for c in range(5)}
    parts, truths = _chunks(exact, chunks, seed=5, turns=turns)
    merged, report = merge_predictions(parts, order=exact.image_names)
    assert all(edge["status"] == "used" for edge in report.edges)  # 2 degrees is noise, not an outlier
    rotation, _, _ = _placement_errors(report, truths, parts)
    assert rotation.max() < 0.05
    # The chain: the same chunks without the last one's frames of the first, so that they form a path.
    open_parts = parts[:-1] + [parts[-1].subset([n for n in chunks[-1] if n not in set(chunks[0])])]
    _, chain_report = merge_predictions(open_parts, order=exact.image_names)
    chain_rotation, _, _ = _placement_errors(chain_report, truths, parts)
    assert chain_rotation[-1] == pytest.approx(8.0, abs=0.1)
    # Closed: the last chunk's own view of the frames it shares with the first, placed, is one edge's error
    # (2 degrees) from the first chunk's, not five.
    shared = sorted(set(chunks[-1]) & set(chunks[0]))
    for chunk_report, expected in ((report, 2.0), (chain_report, 10.0)):
        placed = chunk_report.placements[-1]
        sim = pycolmap.Sim3d(placed[0], pycolmap.Rotation3d(np.array(placed[1:5])), np.array(placed[5:]))
        last = transform_predictions(parts[-1].subset(shared), sim)
        first = parts[0].subset(shared)
        gap = rotation_errors_deg(last.cam_from_world[:, :, :3], first.cam_from_world[:, :, :3])
        assert gap.max() == pytest.approx(expected, abs=0.1)


def _with_extra_edge(orbit: list[str]) -> list[list[str]]:
    """The ring of five chunks, chunk 2 also holding two frames of chunk 4's own (a third edge for chunk 2)."""
    chunks = _ring(orbit, 7, 5)
    chunks[2] = chunks[2] + chunks[4][2:4]
    return chunks


def test_an_edge_that_disagrees_is_left_out_and_bends_nothing(exact, caplog):
    orbit = _orbit()
    chunks = _with_extra_edge(orbit)
    parts, truths = _chunks(exact, chunks, seed=6, turns={2: [(chunks[4][2:4], 20.0, (1.0, 0.0, 0.0))]})
    with caplog.at_level(logging.WARNING, logger="vggt_sfm"):
        merged, report = merge_predictions(parts, order=exact.image_names)
    statuses = {(e["a"], e["b"]): e["status"] for e in report.edges}
    assert statuses.pop((2, 4)) == "inconsistent" and set(statuses.values()) == {"used"}
    # Chunks 2 and 4 each disagree on one of their three pairs: nothing tells which is wrong, only the pair goes.
    assert "chunk 2 and 4 disagree with the other chunks" in caplog.text
    assert report.dropped == [] and report.replaced == []
    rotation, scale, position = _placement_errors(report, truths, parts)
    assert rotation.max() < 1e-5 and scale.max() < 1e-6 and position.max() < 1e-6  # float32 depth
    assert merged.num_frames == 25


def _ring_with_chords(orbit: list[str]) -> list[list[str]]:
    """Six chunks around 24 views, each sharing two frames with the next and holding two frames of the one after
    that (of its own, shared with no other): every chunk has four neighbours, in loops of three."""
    return [[orbit[(4 * c + k) % 24] for k in range(6)] + [orbit[(4 * c + 10 + k) % 24] for k in range(2)] for c in range(6)]


def _shared(chunks: list[list[str]], a: int, b: int) -> list[str]:
    return sorted(set(chunks[a]) & set(chunks[b]))


def test_a_chunk_that_disagrees_with_some_neighbours_is_placed_by_the_others(exact, caplog):
    """Chunk 2's views of what chunks 0 and 4 hold are turned 20 degrees (each about another axis): it is
    placed from the two neighbours it agrees with, and bends no other chunk."""
    chunks = _ring_with_chords(_orbit())
    turns = {2: [(_shared(chunks, 2, 0), 20.0, (0.0, 0.0, 1.0)), (_shared(chunks, 2, 4), 20.0, (0.0, 1.0, 0.0))]}
    parts, truths = _chunks(exact, chunks, seed=8, turns=turns)
    with caplog.at_level(logging.WARNING, logger="vggt_sfm"):
        merged, report = merge_predictions(parts, order=exact.image_names)
    left_out = sorted((e["a"], e["b"]) for e in report.edges if e["status"] != "used")
    assert left_out == [(0, 2), (2, 4)] and report.replaced == [2] and report.dropped == []
    assert "chunk 2 (" in caplog.text and "disagrees with 2 of its 4 neighbouring chunks (0, 4): placed from the other 2" in caplog.text
    rotation, scale, position = _placement_errors(report, truths, parts)
    assert rotation.max() < 1e-5 and scale.max() < 1e-6 and position.max() < 1e-6
    assert merged.num_frames == 24


def test_a_chunk_that_disagrees_with_every_neighbour_is_dropped_and_reported(exact, caplog):
    """Chunk 2's views of what chunks 0, 3 and 4 hold are turned 20 degrees, each about another axis: its four
    placements disagree with each other. It is dropped (its frames all come from other chunks), and bends nothing."""
    chunks = _ring_with_chords(_orbit())
    turns = {2: [(_shared(chunks, 2, other), 20.0, axis) for other, axis in ((0, (0, 0, 1)), (3, (1, 0, 0)), (4, (0, 1, 0)))]}
    parts, truths = _chunks(exact, chunks, seed=9, turns=turns)
    with caplog.at_level(logging.WARNING, logger="vggt_sfm"):
        merged, report = merge_predictions(parts, order=exact.image_names)
    assert report.dropped == [2] and report.replaced == [] and report.dropped_frames == []
    assert report.placements[2] is None
    assert {e["status"] for e in report.edges if 2 in (e["a"], e["b"])} == {"outlier"}
    assert {e["status"] for e in report.edges if 2 not in (e["a"], e["b"])} == {"used"}
    assert "chunk 2 (" in caplog.text and "disagrees with 4 of its 4 neighbouring chunks (0, 1, 3, 4): it is left out" in caplog.text
    assert json.loads(str(merged.extras[MERGE_REPORT_KEY]))["dropped"] == [2]
    # Its frames are those of the chunks that hold them too.
    assert merged.num_frames == 24
    for other in (0, 1, 3, 4):
        np.testing.assert_allclose(_rotation_errors_deg(merged.subset([merged.image_names[0], *_shared(chunks, 2, other)]), exact), 0, atol=1e-5)
    kept = [c for c in range(6) if c != 2]
    rotation, scale, position = _placement_errors(
        dataclasses.replace(report, placements=[report.placements[c] for c in kept]), [truths[c] for c in kept],
        [parts[c] for c in kept],
    )
    assert rotation.max() < 1e-5 and scale.max() < 1e-6 and position.max() < 1e-6


def test_chunks_that_cannot_be_tied_together_are_refused(exact):
    orbit = _orbit()
    parts, _ = _chunks(exact, [orbit[:8], orbit[8:16]], seed=8)
    with pytest.raises(ValueError, match="do not share frames"):
        merge_predictions(parts)
    parts, _ = _chunks(exact, [orbit[:8], orbit[7:16]], seed=8)
    depth = parts[1].depth.copy()
    depth[0] = 0.0  # the one shared frame has no depth in the second chunk
    with pytest.raises(UserError, match=r"chunks sharing .* fewer than 3 pixels .* larger `chunk_overlap`"):
        merge_predictions([parts[0], dataclasses.replace(parts[1], depth=depth)])


def test_shared_frames_can_take_the_mean_of_their_placed_cameras(exact):
    """With `average_shared` (as chunks merge), a frame two chunks hold gets the mean of its two placed cameras:
    exact chunks stay exact, and with noise of their own the shared frames come out nearer the truth."""
    chunks = _ring(_orbit(), 7, 5)
    shared = sorted({n for a in range(5) for n in set(chunks[a]) & set(chunks[(a + 1) % 5])})
    parts, _ = _chunks(exact, chunks, seed=10)
    merged, _ = merge_predictions(parts, order=exact.image_names, average_shared=True)
    assert _rotation_errors_deg(merged, exact).max() < 1e-5
    rng = np.random.default_rng(11)
    parts = [shaken(part, 1.0, rng) for part in parts]
    # The truth in chunk 0's frame (the merged predictions' frame): the first frame `_chunks` drew.
    truth = transform_predictions(exact, random_frame(np.random.default_rng(10))).subset(shared)
    errors = {}
    for average in (False, True):
        merged, _ = merge_predictions(parts, order=exact.image_names, average_shared=average)
        estimate = merged.subset(shared)
        errors[average] = np.mean(rotation_errors_deg(estimate.cam_from_world[:, :, :3], truth.cam_from_world[:, :, :3]))
    assert errors[True] < 0.95 * errors[False]  # measured: 0.94 vs 1.08 degrees (the placements share some error)
