"""Image pairs to match: every pair for small sets, otherwise the pairs that the prior cameras say overlap.

With the prior, each image is paired with the `num_neighbors` images whose views share the most of its visible
volume: rays through a grid of its pixels are sampled at the scene's typical depth (a few depths around it) and
projected into the other camera; the overlap of two images is the fraction of each one's samples that the other
sees, averaged both ways, and weighted by how close their viewing directions are. The k best of every image are
kept, symmetrised and deduplicated, and a maximum spanning tree of the overlap graph is added so that the pairs
always connect all images. The number of pairs grows as S*k rather than S^2.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.sparse.csgraph import minimum_spanning_tree

from .errors import UserError
from .prior import PriorCameras

logger = logging.getLogger(__name__)

METHODS = ("auto", "exhaustive", "prior")


@dataclass
class PairsConfig:
    """Which image pairs to match."""

    method: str = "auto"  # "auto" (exhaustive up to exhaustive_max_images, then prior) | "exhaustive" | "prior"
    exhaustive_max_images: int = 30
    num_neighbors: int = 10  # per image, from the prior
    max_angle_deg: float = 90.0  # never pair views whose optical axes differ by more than this
    grid_size: int = 8  # rays per image side sampled for the overlap test
    depth_factors: tuple[float, ...] = (0.5, 0.71, 1.0, 1.41, 2.0)  # sampled depths, relative to the typical one
    connect: bool = True  # add a maximum spanning tree of the overlap graph



# Named configurations (hloc style): PairsConfig(**presets[name]).
presets: dict[str, dict] = {
    "auto": {},
    "exhaustive": {"method": "exhaustive"},
    "prior-10": {"method": "prior", "num_neighbors": 10},
    "prior-20": {"method": "prior", "num_neighbors": 20},
}


def exhaustive_pairs(num_images: int) -> np.ndarray:
    """(P,2) all pairs i<j of `num_images` images."""
    i, j = np.triu_indices(num_images, k=1)
    return np.stack([i, j], axis=1).astype(np.int64)


def typical_depths(prior: PriorCameras) -> np.ndarray:
    """(S,) a depth at which each camera sees the scene, from the cameras alone.

    Where the optical axes converge (object-centric captures) it is the depth of the point closest to all axes;
    elsewhere (forward-facing captures, parallel axes) the median of the other cameras' depths, or, when none
    converges, a multiple of the camera spread.
    """
    centers = prior.centers()
    axes = prior.viewing_directions()
    num = len(centers)
    projector = np.eye(3)[None] - axes[:, :, None] * axes[:, None, :]  # removes the along-axis component
    A = projector.sum(axis=0)
    b = np.einsum("sij,sj->i", projector, centers)
    eigenvalues = np.linalg.eigvalsh(A)
    depths = np.full(num, np.nan)
    # A nearly singular A means (nearly) parallel axes: their "intersection" is meaningless.
    if eigenvalues[0] > 0.05 * num:
        target = np.linalg.solve(A, b)
        depths = np.einsum("si,si->s", target[None] - centers, axes)
        distance = np.linalg.norm(target[None] - centers, axis=1)
        # A camera looking away from the common point, or past it, gets the fallback below.
        depths[(depths <= 0.25 * distance)] = np.nan
    valid = np.isfinite(depths)
    if valid.any():
        depths[~valid] = np.median(depths[valid])
        return depths
    spread = prior.scene_scale()
    return np.full(num, 5.0 * spread)


def overlap_scores(prior: PriorCameras, config: PairsConfig, depths: np.ndarray | None = None) -> np.ndarray:
    """(S,S) symmetric overlap of every two views in [0, 1] (0 on the diagonal), weighted by axis agreement.

    `depths` (S,) are typical scene depths per image (e.g. the median predicted depth); estimated from the
    cameras when None.
    """
    num = prior.num_images
    if depths is None:
        depths = typical_depths(prior)
    depths = np.asarray(depths, dtype=np.float64)
    R = prior.cam_from_world[:, :, :3]
    t = prior.cam_from_world[:, :, 3]
    K = prior.intrinsics
    sizes = prior.image_sizes.astype(np.float64)

    # Rays through a grid of pixel centres of each image, at a few depths around the typical one.
    u = (np.arange(config.grid_size) + 0.5) / config.grid_size
    grid = np.stack(np.meshgrid(u, u, indexing="xy"), axis=-1).reshape(-1, 2)
    factors = np.asarray(config.depth_factors, dtype=np.float64)
    samples = []
    for i in range(num):
        pixels = grid * sizes[i]
        rays = np.linalg.solve(K[i], np.concatenate([pixels, np.ones((len(pixels), 1))], axis=1).T).T
        rays /= rays[:, 2:3]  # unit z, so that the factor times the depth is the z-depth
        points_cam = (rays[None] * (depths[i] * factors)[:, None, None]).reshape(-1, 3)
        samples.append((points_cam - t[i]) @ R[i])  # world = R^T (X_cam - t)
    samples = np.stack(samples)  # (S, n, 3)

    axes = prior.viewing_directions()
    cosines = np.clip(axes @ axes.T, -1.0, 1.0)
    candidates = cosines >= np.cos(np.deg2rad(config.max_angle_deg))
    samples = samples.astype(np.float32)
    visible = np.zeros((num, num))  # visible[i, j]: fraction of i's samples that j sees
    for j in range(num):
        sources = np.flatnonzero(candidates[:, j])
        cam = samples[sources] @ R[j].T.astype(np.float32) + t[j].astype(np.float32)  # (c, n, 3)
        z = cam[..., 2]
        in_front = z > 0
        z = np.where(in_front, z, 1.0)
        x = (K[j, 0, 0] * cam[..., 0] + K[j, 0, 1] * cam[..., 1]) / z + K[j, 0, 2]
        y = K[j, 1, 1] * cam[..., 1] / z + K[j, 1, 2]
        inside = in_front & (x >= 0) & (x <= sizes[j, 0]) & (y >= 0) & (y <= sizes[j, 1])
        visible[sources, j] = inside.mean(axis=1)
    overlap = 0.5 * (visible + visible.T)
    overlap *= np.clip(cosines, 0.0, 1.0) ** 0.5
    overlap[~candidates] = 0.0
    np.fill_diagonal(overlap, 0.0)
    return overlap


def pairs_from_scores(scores: np.ndarray, num_neighbors: int, connect: bool = True) -> np.ndarray:
    """(P,2) i<j: the `num_neighbors` best-scoring partners of every image, symmetrised, plus a spanning tree."""
    num = len(scores)
    k = min(num_neighbors, num - 1)
    chosen = set()
    if k > 0:
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        for i in range(num):
            for j in best[i]:
                if scores[i, j] > 0:
                    chosen.add((min(i, j), max(i, j)))
    if connect and num > 1:
        # Maximum spanning tree = minimum spanning tree of (big - score); zero scores still connect, last.
        cost = (scores.max() + 1.0) - scores
        np.fill_diagonal(cost, 0.0)
        tree = minimum_spanning_tree(np.triu(cost, k=1)).tocoo()
        for i, j in zip(tree.row, tree.col):
            chosen.add((min(i, j), max(i, j)))
    if not chosen:
        return np.zeros((0, 2), dtype=np.int64)
    return np.array(sorted(chosen), dtype=np.int64)


def select_pairs(prior: PriorCameras, config: PairsConfig, depths: np.ndarray | None = None) -> np.ndarray:
    """(P,2) int pairs of frame indices, i<j, unique, sorted.

    `method="auto"` matches every pair up to `exhaustive_max_images` images and uses the prior beyond.
    `depths` (S,), optional: a typical scene depth per image (e.g. `median_depths(predictions)`), which makes
    the overlap test more faithful than the depth guessed from the cameras.
    """
    if config.method not in METHODS:
        raise UserError(f"unknown pairing method {config.method!r} (choose one of: {', '.join(METHODS)})")
    if config.num_neighbors < 1:
        raise UserError(f"num_neighbors must be at least 1, got {config.num_neighbors}")
    num = prior.num_images
    method = config.method
    if method == "auto":
        method = "exhaustive" if num <= config.exhaustive_max_images else "prior"
    if method == "exhaustive" or num <= 2:
        pairs = exhaustive_pairs(num)
    else:
        pairs = pairs_from_scores(overlap_scores(prior, config, depths), config.num_neighbors, config.connect)
    logger.info("%d pairs of %d images (%s)", len(pairs), num, method)
    return pairs


def median_depths(depth: np.ndarray, confidence: np.ndarray | None = None) -> np.ndarray:
    """(S,) median of each frame's depth map (S,H,W), over the more confident half of its pixels when given."""
    depth = np.asarray(depth, dtype=np.float64).reshape(len(depth), -1)
    result = np.empty(len(depth))
    for i, values in enumerate(depth):
        keep = np.isfinite(values) & (values > 0)
        if confidence is not None:
            conf = np.asarray(confidence[i], dtype=np.float64).reshape(-1)
            if keep.any():
                keep &= conf >= np.median(conf[keep])
        result[i] = np.median(values[keep]) if keep.any() else np.nan
    if np.isfinite(result).any():
        result[~np.isfinite(result)] = np.nanmedian(result)
    return result
