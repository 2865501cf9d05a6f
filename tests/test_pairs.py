"""Pair selection from the prior cameras, checked on ground-truth camera sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vggt_sfm.errors import UserError
from vggt_sfm.evaluation.metrics import read_ground_truth
from vggt_sfm.pairs import PairsConfig, median_depths, select_pairs, typical_depths
from vggt_sfm.prior import PriorCameras

# Ground-truth cameras only (text models of a few KB): those of shared/datasets/nerf_synthetic_lego, and data/.
LEGO_GT = Path(__file__).parent / "fixtures" / "gt" / "nerf_synthetic_lego"
FOUNTAIN_GT = Path(__file__).resolve().parents[1] / "data" / "fountain" / "gt"


def _connected(pairs: np.ndarray, num: int) -> bool:
    parent = list(range(num))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for i, j in pairs:
        parent[find(i)] = find(j)
    return len({find(i) for i in range(num)}) == 1


def _check_pair_array(pairs: np.ndarray, num: int) -> None:
    assert pairs.ndim == 2 and pairs.shape[1] == 2 and np.issubdtype(pairs.dtype, np.integer)
    assert np.all(pairs[:, 0] < pairs[:, 1]) and pairs.min() >= 0 and pairs.max() < num
    assert len({tuple(p) for p in pairs}) == len(pairs)


def test_lego_prior_pairs_hold_the_true_neighbours_and_grow_linearly():
    gt = read_ground_truth(LEGO_GT)  # 25 views around an object
    num, k = gt.num_images, 4
    pairs = select_pairs(gt, PairsConfig(method="prior", num_neighbors=k))
    _check_pair_array(pairs, num)
    assert len(pairs) <= num * k < num * (num - 1) // 2
    assert _connected(pairs, num)
    # The truly overlapping neighbours of a view on a sphere around the object are the views whose optical axes
    # are closest to its own: the two closest of every view must be paired with it.
    axes = gt.viewing_directions()
    cosines = axes @ axes.T
    np.fill_diagonal(cosines, -2)
    chosen = {tuple(p) for p in pairs}
    for i in range(num):
        for j in np.argsort(-cosines[i])[:2]:
            assert (min(i, j), max(i, j)) in chosen, f"view {i} lost its neighbour {j}"
    # Views whose axes differ by more than max_angle_deg (90) are never paired.
    assert np.all(cosines[pairs[:, 0], pairs[:, 1]] >= -1e-9)
    # The object sits at the origin, about 4 units from every camera: the depth guessed from the cameras.
    assert np.allclose(typical_depths(gt), np.linalg.norm(gt.centers(), axis=1), rtol=0.15)


def test_auto_is_exhaustive_for_small_sets_and_prior_beyond():
    gt = read_ground_truth(LEGO_GT)
    exhaustive = select_pairs(gt, PairsConfig())
    assert len(exhaustive) == 25 * 24 // 2
    _check_pair_array(exhaustive, 25)
    prior = select_pairs(gt, PairsConfig(exhaustive_max_images=10, num_neighbors=5))
    assert len(prior) <= 25 * 5


def test_forward_moving_sequence_pairs_consecutive_views():
    gt = read_ground_truth(FOUNTAIN_GT)  # 11 views along an arc, facing a wall
    pairs = select_pairs(gt, PairsConfig(method="prior", num_neighbors=3))
    chosen = {tuple(p) for p in pairs}
    assert all((i, i + 1) in chosen for i in range(gt.num_images - 1))
    assert len(pairs) <= 3 * gt.num_images
    # A depth from the predictions (here the true one, a uniform ~10 m) gives the same neighbours.
    with_depth = select_pairs(gt, PairsConfig(method="prior", num_neighbors=3), depths=np.full(gt.num_images, 10.0))
    assert all((i, i + 1) in {tuple(p) for p in with_depth} for i in range(gt.num_images - 1))


def _ring(num: int) -> PriorCameras:
    """`num` cameras on a circle of radius 4, looking at the origin."""
    angles = np.linspace(0, 2 * np.pi, num, endpoint=False)
    cam_from_world = []
    for a in angles:
        center = np.array([4 * np.cos(a), 4 * np.sin(a), 0.0])
        z = -center / np.linalg.norm(center)
        x = np.cross(z, [0.0, 0.0, 1.0])
        x /= np.linalg.norm(x)
        y = np.cross(z, x)
        R = np.stack([x, y, z])
        cam_from_world.append(np.concatenate([R, (-R @ center)[:, None]], axis=1))
    K = np.array([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]])
    return PriorCameras(
        image_names=[f"{i:04d}.jpg" for i in range(num)],
        image_sizes=np.tile([640, 480], (num, 1)),
        cam_from_world=np.array(cam_from_world),
        intrinsics=np.tile(K, (num, 1, 1)),
    )


def test_large_ring_gets_about_k_pairs_per_image():
    num, k = 300, 6
    ring = _ring(num)
    pairs = select_pairs(ring, PairsConfig(num_neighbors=k))  # auto: beyond 30 images, from the prior
    _check_pair_array(pairs, num)
    assert num * k / 2 <= len(pairs) <= num * k
    chosen = {tuple(p) for p in pairs}
    assert all((i, i + 1) in chosen for i in range(num - 1)) and (0, num - 1) in chosen
    assert _connected(pairs, num)
    # Only ring neighbours: at most k/2 + a few steps along the ring.
    steps = np.minimum(pairs[:, 1] - pairs[:, 0], num - (pairs[:, 1] - pairs[:, 0]))
    assert steps.max() <= k


def test_median_depths_and_errors():
    depth = np.stack([np.full((4, 5), 2.0), np.full((4, 5), 3.0)])
    depth[0, 0, 0] = 100.0
    confidence = np.ones_like(depth)
    confidence[0, 0, 0] = 0.0
    assert np.allclose(median_depths(depth, confidence), [2.0, 3.0])
    gt = _ring(5)
    with pytest.raises(UserError, match="unknown pairing method"):
        select_pairs(gt, PairsConfig(method="retrieval"))
    assert len(select_pairs(_ring(2), PairsConfig(method="prior"))) == 1
