"""Predictions made in several frames (VGGT windows or chunks) merged into one, by one global solve.

VGGT predicts every pass in a frame of its own (its first camera at the origin, its own scale). Two passes that
hold the same frames see them alike: the ratio of the shared frames' confident depth in the two passes is their
relative scale, and each shared frame's camera in both passes, at that scale, is a relative placement; their robust
average is the pair's `a_from_b` (`align_pair`). The shared pixels, unprojected with their depth and camera in both
passes, are corresponding surface points: how many of them the placement brings together weighs the pair. Every pair of passes that shares frames
gives one such edge; the passes and their edges form a graph (a path for windows, any connected graph for chunks).

The placements `world_from_pass` are then solved jointly, so that one edge's error spreads over the graph instead
of passing on to everything placed after it, and a loop (an orbit whose last chunk sees its first) closes:
- rotations: chordal L2 averaging (linear least squares on the rotation matrices, projected onto SO(3)), then
  iterative refinement in the tangent space (Govindu's Lie-algebraic averaging) with Huber weights (IRLS);
- scales: least squares on their logarithms, with Huber weights;
- translations: linear least squares at each edge's shared surface (where the edge was measured, so that a
  rotation error does not read as a translation one far from it), in units of that surface's depth.
Pass 0 (the first that is not an outlier) is the gauge: its placement is the identity, its predictions are
kept unchanged.

Edges whose measurement disagrees with the robustly solved placements (a residual above `OUTLIER_RESIDUAL`, or
`OUTLIER_SPREAD` times the edges' robust spread) are left out of the final solve, so that they cannot bend the
model. A disagreeing edge is blamed on the pass with the larger share of disagreeing edges (on neither in a lone
loop, where nothing tells which side is wrong): a pass blamed for some of its edges is placed from the others
(`replaced` in the report); a pass blamed for most of them is an outlier (a failed prediction), all its edges are
left out, and it is placed again from those of its edges that agree with each other (at least two), or dropped
when none do. Both are logged as warnings and listed in the `MergeReport` (which `predict` keeps in the
predictions file, `MERGE_REPORT_KEY`).

A frame held by several passes keeps the depth of one (its owner: the first pass that holds it, unless the caller
names one), and its camera too, or (`average_shared`, as chunks do) the mean of its placed cameras in every pass:
less noise where the passes meet, and a frame consistent with both sides of the seam.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import pycolmap
from scipy.spatial.transform import Rotation

from .errors import UserError, param
from .model.geometry import unproject_depth_map_to_point_map
from .predictions import OPTIONAL_MAPS, Predictions, shown_names

logger = logging.getLogger(__name__)

MAX_POINTS_PER_FRAME = 4096  # confident pixels of a shared frame used to measure the scale and check the fit
FRAME_DEVIATION_RAD = np.radians(3.0)  # a shared frame whose relative rotation is further from the others' is left out
INLIER_DEPTH_FRACTION = 0.05  # a correspondence is an inlier within this fraction of the shared frames' median depth
# Robust weights (Huber) start beyond this residual: radians of rotation, log-scale, or fractions of the shared
# surface's depth (all about the same: a rotation of r radians moves the surface by r of its depth).
HUBER_RESIDUAL = 0.03
# An edge disagrees with the solved placements when its residual exceeds this (about 6 degrees, 10 % of scale or
# of the depth), or OUTLIER_SPREAD times the edges' robust spread when that is larger.
OUTLIER_RESIDUAL = 0.1
OUTLIER_SPREAD = 5.0
MAX_ITERATIONS = 50
MERGE_REPORT_KEY = "merge_report"  # extras key of the report in a predictions file (a JSON string)


@dataclass(frozen=True)
class Passes:
    """How messages name the passes being merged and the option that sets their overlap."""

    noun: str = "chunks"  # plural: "windows" | "chunks"
    overlap_option: str = "chunk_overlap"


WINDOWS = Passes("windows", "window_overlap")
CHUNKS = Passes("chunks", "chunk_overlap")


# ---------------------------------------------------------------------------------------------------------------
# One pair of passes


def pixel_points(predictions: Predictions, frame: int, pixels: np.ndarray) -> np.ndarray:
    """World points (N,3) float64 of a frame's depth at the flat pixel indices `pixels`."""
    points = unproject_depth_map_to_point_map(  # copies: arrays a Ray task returned are read-only
        predictions.depth[frame][None].astype(np.float64),
        predictions.cam_from_world[frame][None].copy(),
        predictions.intrinsics[frame][None].copy(),
    )[0]
    return points.reshape(-1, 3)[pixels]


def usable_pixels(predictions: Predictions, frame: int) -> np.ndarray:
    """(H*W,) bool: pixels with a positive finite depth, at or above the frame's median confidence."""
    depth = predictions.depth[frame]
    usable = np.isfinite(depth) & (depth > 0)
    if predictions.depth_conf is not None and usable.any():
        conf = predictions.depth_conf[frame]
        usable &= conf >= np.median(conf[usable])
    return usable.reshape(-1)


def shared_points(
    reference: Predictions, current: Predictions, names: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Corresponding surface points (N,3) of the frames `names` that both predictions hold, from the pixels both
    predict with confidence: (in current's frame, in reference's frame, their depth (N,) in reference, and in
    current)."""
    ref_index, cur_index = reference.index(), current.index()
    src, tgt, depth, current_depth = [], [], [], []
    for name in names:
        i, j = ref_index[name], cur_index[name]
        if reference.depth[i].shape != current.depth[j].shape:
            raise ValueError(f"{name}: the two predictions' depth maps differ in size")
        pixels = np.flatnonzero(usable_pixels(reference, i) & usable_pixels(current, j))
        if len(pixels) > MAX_POINTS_PER_FRAME:
            pixels = pixels[np.linspace(0, len(pixels) - 1, MAX_POINTS_PER_FRAME).astype(int)]
        src.append(pixel_points(current, j, pixels))
        tgt.append(pixel_points(reference, i, pixels))
        depth.append(reference.depth[i].reshape(-1)[pixels])
        current_depth.append(current.depth[j].reshape(-1)[pixels])
    return np.concatenate(src), np.concatenate(tgt), np.concatenate(depth), np.concatenate(current_depth)


@dataclass
class PairAlignment:
    """The relative placement of two passes, measured on the frames they share."""

    a: int
    b: int
    a_from_b: pycolmap.Sim3d
    shared: list[str]
    centre: np.ndarray  # (3,) centroid of the inlier surface points, in b's frame: where the edge was measured
    depth: float  # median depth of the shared points in a's frame
    num_points: int
    num_inliers: int

    @property
    def weight(self) -> float:
        """Inverse variance, about: the error of a fitted placement comes from each shared frame's own pose
        error, so it falls with the number of shared frames; a poor inlier share lowers it."""
        return len(self.shared) * self.num_inliers / max(self.num_points, 1)


def _camera_similarity(
    reference: Predictions, current: Predictions, names: list[str], depth: np.ndarray, current_depth: np.ndarray
) -> pycolmap.Sim3d | None:
    """reference_from_current from the shared frames: the scale is the ratio of their depth at the same pixels,
    and each frame's camera in both passes, at that scale, gives a rotation and a translation; the frames whose
    rotation disagrees with the others' chordal mean are left out, the rest averaged. None when degenerate.

    Why not a similarity fitted to the unprojected surface points: those move with each frame's camera-centre
    error (a few percent of the scene), which tilts a fit on a small shared surface far more than the cameras'
    own rotation errors; the depth ratio does not depend on the poses at all.
    """
    ratios = np.log(depth / current_depth)
    scale = float(np.exp(np.median(ratios[np.isfinite(ratios)]))) if np.isfinite(ratios).any() else np.nan
    if not np.isfinite(scale) or scale <= 0:
        return None
    ref_index, cur_index = reference.index(), current.index()
    ref_poses = reference.cam_from_world[[ref_index[n] for n in names]]
    cur_poses = current.cam_from_world[[cur_index[n] for n in names]]
    rotations = np.einsum("sji,sjk->sik", ref_poses[:, :, :3], cur_poses[:, :, :3])  # R_ref^T R_cur per frame
    mean = _project_rotation(rotations.sum(axis=0))
    deviation = Rotation.from_matrix(np.einsum("ij,skj->sik", mean, rotations)).magnitude()
    keep = deviation <= max(FRAME_DEVIATION_RAD, 3.0 * float(np.median(deviation)))
    rotation = _project_rotation(rotations[keep].sum(axis=0))
    ref_centres = -np.einsum("sji,sj->si", ref_poses[:, :, :3], ref_poses[:, :, 3])
    cur_centres = -np.einsum("sji,sj->si", cur_poses[:, :, :3], cur_poses[:, :, 3])
    translation = (ref_centres[keep] - scale * cur_centres[keep] @ rotation.T).mean(axis=0)
    return pycolmap.Sim3d(scale, pycolmap.Rotation3d(rotation), translation)


def align_pair(
    reference: Predictions, current: Predictions, passes: Passes = CHUNKS, a: int = 0, b: int = 1
) -> PairAlignment:
    """reference_from_current placement, fitted on the frames both hold (see the module docstring).

    ValueError when they share no frame or lack depth (a caller's mistake); UserError when the shared frames
    have too little confident depth to fit it (the user's overlap is too small).
    """
    if reference.depth is None or current.depth is None:
        raise ValueError(f"aligning {passes.noun} needs their depth maps")
    ref_names = set(reference.image_names)
    names = [name for name in current.image_names if name in ref_names]
    if not names:
        raise ValueError(f"the {passes.noun} share no frame")
    src, tgt, depth, current_depth = shared_points(reference, current, names)
    if len(src) < 3:
        raise UserError(
            f"{passes.noun} sharing {shown_names(names)} have fewer than 3 pixels with a confident depth in both; "
            f"use a larger {param(passes.overlap_option)}"
        )
    median_depth = float(np.median(depth))
    inlier_distance = INLIER_DEPTH_FRACTION * median_depth
    sim = _camera_similarity(reference, current, names, depth, current_depth)
    if sim is None:
        raise UserError(
            f"{passes.noun} sharing {shown_names(names)} cannot be aligned (degenerate depth); use a larger "
            f"{param(passes.overlap_option)}"
        )
    inliers = np.linalg.norm(sim * src - tgt, axis=1) <= inlier_distance
    num_inliers = int(np.count_nonzero(inliers))
    centre = (src[inliers] if inliers.any() else src).mean(axis=0)
    logger.debug(
        "%s %d and %d aligned on %d frames, %d of %d points inliers, scale %.4g",
        passes.noun, a, b, len(names), num_inliers, len(src), sim.scale,
    )  # fmt: skip
    return PairAlignment(a, b, sim, names, centre, median_depth, len(src), num_inliers)


def transform_predictions(predictions: Predictions, sim: pycolmap.Sim3d) -> Predictions:
    """The same predictions in the frame `sim` maps into: cameras, depth (scaled) and point maps."""
    cam_from_world = np.stack(
        [sim.transform_camera_world(pycolmap.Rigid3d(pose)).matrix() for pose in predictions.cam_from_world]
    )
    world_points = predictions.world_points
    if world_points is not None:
        world_points = (sim * world_points.reshape(-1, 3).astype(np.float64)).reshape(world_points.shape)
        world_points = world_points.astype(predictions.world_points.dtype)
    depth = predictions.depth
    if depth is not None:
        depth = (depth * sim.scale).astype(depth.dtype)
    return Predictions(
        image_names=list(predictions.image_names),
        cam_from_world=cam_from_world,
        intrinsics=predictions.intrinsics,
        grid_from_image=predictions.grid_from_image,
        depth=depth,
        depth_conf=predictions.depth_conf,
        world_points=world_points,
        world_points_conf=predictions.world_points_conf,
    )


# ---------------------------------------------------------------------------------------------------------------
# The joint solve


@dataclass
class Placements:
    """world_from_pass similarities x_world = scale R x_pass + t, for passes 0..n-1."""

    scales: np.ndarray  # (n,)
    rotations: np.ndarray  # (n,3,3)
    translations: np.ndarray  # (n,3)

    def sim(self, index: int) -> pycolmap.Sim3d:
        return pycolmap.Sim3d(
            float(self.scales[index]), pycolmap.Rotation3d(self.rotations[index]), self.translations[index]
        )

    def apply(self, index: int, points: np.ndarray) -> np.ndarray:
        return self.scales[index] * points @ self.rotations[index].T + self.translations[index]


def _sim_parts(sim: pycolmap.Sim3d) -> tuple[float, np.ndarray, np.ndarray]:
    return float(sim.scale), np.asarray(sim.rotation.matrix(), dtype=np.float64), np.asarray(sim.translation, dtype=np.float64)


def _project_rotation(matrix: np.ndarray) -> np.ndarray:
    """The rotation nearest to a 3x3 matrix (Frobenius norm)."""
    u, _, vt = np.linalg.svd(matrix)
    d = np.sign(np.linalg.det(u @ vt))
    return u @ np.diag([1.0, 1.0, d]) @ vt


def _huber(residuals: np.ndarray, threshold: float = HUBER_RESIDUAL) -> np.ndarray:
    """IRLS weights of the Huber loss: 1 within `threshold`, threshold / |r| beyond."""
    return np.minimum(1.0, threshold / np.maximum(np.abs(residuals), 1e-300))


def _graph_least_squares(n: int, a: np.ndarray, b: np.ndarray, values: np.ndarray, weights: np.ndarray, gauge: int) -> np.ndarray:
    """x (n,k) minimising sum_e w_e |x_b - x_a - v_e|^2 with x[gauge] = 0 (edges a -> b, values (E,k))."""
    incidence = np.zeros((len(a), n))
    incidence[np.arange(len(a)), a] -= 1.0
    incidence[np.arange(len(a)), b] += 1.0
    root = np.sqrt(weights)[:, None]
    free = np.array([c for c in range(n) if c != gauge], dtype=int)
    solution = np.zeros((n, values.shape[1]))
    if len(free):
        solution[free] = np.linalg.lstsq(root * incidence[:, free], root * values, rcond=None)[0]
    return solution


def _chordal_rotations(n: int, edges: list[PairAlignment], weights: np.ndarray, gauge: int) -> np.ndarray:
    """Chordal L2 rotation averaging: min sum_e w_e |R_b - R_a R_ab|_F^2 over 3x3 matrices, R_gauge = I, then each
    projected onto SO(3). With X = R^T the constraint is X_b = R_ab^T X_a, the same for each of X's columns."""
    free = [c for c in range(n) if c != gauge]
    column = {c: k for k, c in enumerate(free)}
    rows = np.zeros((3 * len(edges), 3 * len(free)))
    rhs = np.zeros((3 * len(edges), 3))
    for e, (edge, w) in enumerate(zip(edges, weights)):
        R_ab = _sim_parts(edge.a_from_b)[1]
        block = slice(3 * e, 3 * e + 3)
        root = np.sqrt(w)
        # X_b - R_ab^T X_a = 0: the gauge's X is the identity, moved to the right-hand side.
        if edge.b == gauge:
            rhs[block] -= root * np.eye(3)
        else:
            rows[block, 3 * column[edge.b] : 3 * column[edge.b] + 3] += root * np.eye(3)
        if edge.a == gauge:
            rhs[block] += root * R_ab.T
        else:
            rows[block, 3 * column[edge.a] : 3 * column[edge.a] + 3] -= root * R_ab.T
    rotations = np.tile(np.eye(3), (n, 1, 1))
    if free:
        X = np.linalg.lstsq(rows, rhs, rcond=None)[0]
        for c in free:
            rotations[c] = _project_rotation(X[3 * column[c] : 3 * column[c] + 3].T)
    return rotations


def _rotation_residuals(rotations: np.ndarray, edges: list[PairAlignment]) -> np.ndarray:
    """(E,3) log(R_a R_ab R_b^T), in the world frame: zero when the placements agree with the edge."""
    errors = np.stack([rotations[e.a] @ _sim_parts(e.a_from_b)[1] @ rotations[e.b].T for e in edges])
    return Rotation.from_matrix(errors).as_rotvec()


def _solve_rotations(n: int, edges: list[PairAlignment], weights: np.ndarray, gauge: int) -> np.ndarray:
    """Chordal initialisation, then Gauss-Newton steps on the tangent space with Huber weights (IRLS):
    with R_c <- exp(w_c) R_c, log(R_a R_ab R_b^T) changes by w_a - w_b to first order."""
    rotations = _chordal_rotations(n, edges, weights, gauge)
    a = np.array([e.a for e in edges])
    b = np.array([e.b for e in edges])
    for _ in range(MAX_ITERATIONS):
        residuals = _rotation_residuals(rotations, edges)
        robust = weights * _huber(np.linalg.norm(residuals, axis=1))
        step = _graph_least_squares(n, a, b, residuals, robust, gauge)
        rotations = Rotation.from_rotvec(step).as_matrix() @ rotations
        if np.abs(step).max() < 1e-13:
            break
    return rotations


def _translation_terms(placements: Placements, edges: list[PairAlignment]) -> tuple[np.ndarray, np.ndarray]:
    """Per edge, what t_b - t_a must be for both placements to put its surface centre at the same world point,
    and that surface's depth in the world (the unit of its residual)."""
    values, depths = [], []
    for e in edges:
        in_a = e.a_from_b * e.centre
        values.append(placements.apply(e.a, in_a[None])[0] - placements.translations[e.a]
                      - (placements.apply(e.b, e.centre[None])[0] - placements.translations[e.b]))  # fmt: skip
        depths.append(placements.scales[e.a] * e.depth)
    return np.array(values), np.array(depths)


def solve_placements(n: int, edges: list[PairAlignment], gauge: int = 0) -> Placements:
    """world_from_pass placements of n passes from their pairwise placements (the edges must connect them all),
    pass `gauge` at the identity; see the module docstring."""
    placements = Placements(np.ones(n), np.tile(np.eye(3), (n, 1, 1)), np.zeros((n, 3)))
    if n == 1 or not edges:
        return placements
    weights = np.array([e.weight for e in edges], dtype=np.float64)
    a = np.array([e.a for e in edges])
    b = np.array([e.b for e in edges])
    placements.rotations = _solve_rotations(n, edges, weights, gauge)

    log_scales = np.log([e.a_from_b.scale for e in edges])[:, None]
    robust = weights
    for _ in range(MAX_ITERATIONS):
        x = _graph_least_squares(n, a, b, log_scales, robust, gauge)
        residuals = (x[b] - x[a] - log_scales)[:, 0]
        updated = weights * _huber(residuals)
        if np.allclose(updated, robust, rtol=1e-9, atol=0):
            break
        robust = updated
    placements.scales = np.exp(x[:, 0])

    robust = weights.copy()
    for _ in range(MAX_ITERATIONS):
        values, depths = _translation_terms(placements, edges)
        t = _graph_least_squares(n, a, b, values, robust / depths**2, gauge)
        residuals = np.linalg.norm(t[b] - t[a] - values, axis=1) / depths
        updated = weights * _huber(residuals)
        if np.allclose(updated, robust, rtol=1e-9, atol=0):
            break
        robust = updated
    placements.translations = t
    return placements


def edge_residuals(placements: Placements, edges: list[PairAlignment]) -> np.ndarray:
    """(E,) how far each edge's measurement is from the solved placements: the largest of its rotation (radians),
    log-scale and surface-centre (fraction of the surface's depth) discrepancies."""
    if not edges:
        return np.zeros(0)
    rotation = np.linalg.norm(_rotation_residuals(placements.rotations, edges), axis=1)
    scale = np.abs(np.log(placements.scales[[e.b for e in edges]] / placements.scales[[e.a for e in edges]])
                   - np.log([e.a_from_b.scale for e in edges]))  # fmt: skip
    values, depths = _translation_terms(placements, edges)
    a, b = [e.a for e in edges], [e.b for e in edges]
    centre = np.linalg.norm(placements.translations[b] - placements.translations[a] - values, axis=1) / depths
    return np.maximum.reduce([rotation, scale, centre])


# ---------------------------------------------------------------------------------------------------------------
# Outliers, and the merged predictions


@dataclass
class MergeReport:
    """What the merge did, for the log and the predictions file."""

    passes: list[list[str]]  # the frames of each pass, as given
    gauge: int = 0  # the pass whose frame the merged predictions are in
    # world_from_pass of each pass: [scale, qx, qy, qz, qw, tx, ty, tz] (quaternion xyzw); None when dropped
    placements: list[list[float] | None] = field(default_factory=list)
    edges: list[dict] = field(default_factory=list)  # a, b, shared, residual, status: used | inconsistent | failed
    replaced: list[int] = field(default_factory=list)  # outlier passes placed again from their consistent edges
    dropped: list[int] = field(default_factory=list)  # outlier passes left out
    dropped_frames: list[str] = field(default_factory=list)  # frames that only dropped passes held

    def as_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.as_dict())


def _connected(n: int, edges: list[tuple[int, int]], start: int = 0) -> set[int]:
    """The passes reachable from `start` along `edges`."""
    neighbours: dict[int, list[int]] = {c: [] for c in range(n)}
    for a, b in edges:
        neighbours[a].append(b)
        neighbours[b].append(a)
    seen, todo = {start}, [start]
    while todo:
        for other in neighbours[todo.pop()]:
            if other not in seen:
                seen.add(other)
                todo.append(other)
    return seen


def _outlier_threshold(residuals: np.ndarray) -> float:
    spread = 1.4826 * float(np.median(residuals)) if len(residuals) else 0.0
    return max(OUTLIER_RESIDUAL, OUTLIER_SPREAD * spread)


def _placement_distance(first: tuple, second: tuple, depth: float) -> float:
    """How far two placements of one pass are apart, in the residual's units, at a point `depth` in front."""
    (s1, R1, t1), (s2, R2, t2) = first, second
    rotation = Rotation.from_matrix(R1 @ R2.T).magnitude()
    probe = np.array([0.0, 0.0, depth])
    centre = np.linalg.norm((s1 * R1 @ probe + t1) - (s2 * R2 @ probe + t2)) / (max(s1, s2) * depth)
    return max(rotation, abs(np.log(s1 / s2)), centre)


def _replace(
    chunk: int, edges: list[PairAlignment], placements: Placements, placed: set[int], threshold: float
) -> tuple[float, np.ndarray, np.ndarray] | None:
    """A placement of an outlier pass from its edges to placed passes that agree with each other (at least two,
    or its only edge), averaged; None when no two agree."""
    candidates, depths = [], []
    for e in edges:
        if chunk not in (e.a, e.b) or (e.b if e.a == chunk else e.a) not in placed:
            continue
        s, R, t = _sim_parts(e.a_from_b)
        if e.b == chunk:  # world_from_b = world_from_a a_from_b
            other, (cs, cR, ct), depth = e.a, (s, R, t), e.depth / s
        else:  # world_from_a = world_from_b (a_from_b)^-1
            other, (cs, cR, ct), depth = e.b, (1.0 / s, R.T, -(R.T @ t) / s), e.depth
        ws, wR, wt = placements.scales[other], placements.rotations[other], placements.translations[other]
        candidates.append((ws * cs, wR @ cR, ws * wR @ ct + wt))
        depths.append(depth)
    if not candidates:
        return None
    depth = float(np.median(depths))
    agree = [[j for j in range(len(candidates)) if _placement_distance(candidates[i], candidates[j], depth) <= threshold]
             for i in range(len(candidates))]  # fmt: skip
    best = max(agree, key=len)
    if len(best) < 2 and len(candidates) > 1:
        return None
    chosen = [candidates[j] for j in best]
    scale = float(np.exp(np.mean([np.log(c[0]) for c in chosen])))
    rotation = _project_rotation(np.sum([c[1] for c in chosen], axis=0))
    translation = np.mean([c[2] for c in chosen], axis=0)
    return scale, rotation, translation


def _pairwise_edges(parts: list[Predictions], passes: Passes, report: MergeReport) -> list[PairAlignment]:
    """An alignment of every two passes that share frames; raises the first failure that leaves them apart."""
    n = len(parts)
    edges: list[PairAlignment] = []
    failures: list[UserError] = []
    for a in range(n):
        names_a = set(parts[a].image_names)
        for b in range(a + 1, n):
            shared = [name for name in parts[b].image_names if name in names_a]
            if not shared:
                continue
            try:
                edges.append(align_pair(parts[a], parts[b], passes, a, b))
            except UserError as error:
                failures.append(error)
                report.edges.append({"a": a, "b": b, "shared": shared, "residual": None, "status": "failed"})
    if len(_connected(n, [(e.a, e.b) for e in edges])) < n:
        if failures:
            raise failures[0]
        raise ValueError(f"the {passes.noun} do not share frames enough to connect them all")
    for error in failures:
        logger.warning("%s; merged without that pair", error)
    return edges


def place_passes(
    n: int, edges: list[PairAlignment], report: MergeReport, passes: Passes = CHUNKS
) -> tuple[Placements, int, set[int]]:
    """Placements of n passes from their edges, outliers left out (see the module docstring): the placements,
    the gauge pass (the first that is not an outlier), and the passes placed. Fills the report's edges,
    `replaced` and `dropped`."""
    # A robust solve over every edge, to find the edges that disagree with the rest.
    residuals = edge_residuals(solve_placements(n, edges), edges)
    threshold = _outlier_threshold(residuals)
    bad = residuals > threshold
    degree = np.bincount([c for e in edges for c in (e.a, e.b)], minlength=n)
    bad_degree = np.bincount([c for e, x in zip(edges, bad) if x for c in (e.a, e.b)], minlength=n)
    # A pair that disagrees is blamed on the pass with the larger share of disagreeing pairs (none on a tie: in a
    # lone loop nothing tells which side is wrong); a pass blamed for most of its pairs is an outlier.
    share = bad_degree / np.maximum(degree, 1)
    blamed = sorted({e.a if share[e.a] > share[e.b] else e.b for e, x in zip(edges, bad) if x and share[e.a] != share[e.b]})
    outliers = {c for c in blamed if 2 * bad_degree[c] > degree[c]}
    gauge = min(set(range(n)) - outliers)
    kept = [k for k, e in enumerate(edges) if not bad[k] and e.a not in outliers and e.b not in outliers]
    # Edges left out that join otherwise separate parts cannot bend anything: they come back, best first.
    reached = _connected(n, [(edges[k].a, edges[k].b) for k in kept], start=gauge)
    for k in np.argsort(residuals, kind="stable"):
        e = edges[k]
        if k not in kept and e.a not in outliers and e.b not in outliers and (e.a in reached) != (e.b in reached):
            kept.append(int(k))
            reached = _connected(n, [(edges[j].a, edges[j].b) for j in kept], start=gauge)

    renumber = {c: i for i, c in enumerate(sorted(reached))}
    local = [dataclasses.replace(edges[k], a=renumber[edges[k].a], b=renumber[edges[k].b]) for k in kept]
    solved = solve_placements(len(renumber), local, gauge=renumber[gauge])
    final = Placements(np.ones(n), np.tile(np.eye(3), (n, 1, 1)), np.zeros((n, 3)))
    for c, i in renumber.items():
        final.scales[c], final.rotations[c], final.translations[c] = solved.scales[i], solved.rotations[i], solved.translations[i]
    # Outliers, and the passes only they connect, are placed from the placed passes they agree with.
    placed = set(reached)
    waiting = sorted(set(range(n)) - placed)
    progress = True
    while waiting and progress:
        progress = False
        for c in list(waiting):
            placement = _replace(c, edges, final, placed, threshold)
            if placement is not None:
                final.scales[c], final.rotations[c], final.translations[c] = placement
                placed.add(c)
                waiting.remove(c)
                report.replaced.append(c)
                progress = True
    report.dropped = waiting
    report.replaced = sorted(report.replaced + [c for c in blamed if c not in outliers])

    final_residuals = edge_residuals(final, edges)
    for k, e in enumerate(edges):
        status = "used" if k in kept else "outlier" if e.a in outliers or e.b in outliers else "inconsistent"
        report.edges.append({"a": e.a, "b": e.b, "shared": e.shared, "residual": float(final_residuals[k]), "status": status})
        if status == "inconsistent" and e.a not in blamed and e.b not in blamed:
            logger.warning(
                "%s %d and %d disagree with the other %s on their shared frames (%s; residual %.2f, limit %.2f): "
                "that pair is left out of the merge", passes.noun[:-1], e.a, e.b, passes.noun, shown_names(e.shared),
                residuals[k], threshold,
            )  # fmt: skip
    for c in blamed:
        others = [e.b if e.a == c else e.a for e, x in zip(edges, bad) if x and c in (e.a, e.b)]
        placed_by = "it is left out" if c in report.dropped else (
            "placed again from those that agree with each other" if c in outliers
            else f"placed from the other {degree[c] - len(others)}")  # fmt: skip
        logger.warning(
            "%s %d (%s) disagrees with %d of its %d neighbouring %s (%s): %s", passes.noun[:-1], c,
            shown_names(report.passes[c]) if c < len(report.passes) else "", len(others), degree[c], passes.noun,
            ", ".join(map(str, others)), placed_by,
        )  # fmt: skip
    report.edges.sort(key=lambda item: (item["a"], item["b"]))
    return final, gauge, placed


def merge_predictions(
    parts: list[Predictions],
    owners: dict[str, int] | None = None,
    order: list[str] | None = None,
    passes: Passes = CHUNKS,
    average_shared: bool = False,
) -> tuple[Predictions, MergeReport]:
    """One Predictions of every frame of `parts` (passes in frames of their own), in the frame of `parts[0]`
    (of the first pass that is not an outlier).

    `owners` names the pass whose prediction a shared frame keeps (default: the first that holds it); with
    `average_shared` its camera is the mean of every placed pass's instead (its depth stays the owner's). `order`
    the frame order of the result (default: by first appearance). Raises UserError when the passes' shared frames
    cannot tie them all together. See the module docstring.
    """
    if not parts:
        raise ValueError(f"no {passes.noun} to merge")
    n = len(parts)
    report = MergeReport(passes=[list(p.image_names) for p in parts])
    if n == 1:
        report.placements = [[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]]
        return parts[0], report
    edges = _pairwise_edges(parts, passes, report)
    placements, gauge, placed = place_passes(n, edges, report, passes)
    report.gauge = gauge
    report.placements = [
        [float(placements.scales[c]), *Rotation.from_matrix(placements.rotations[c]).as_quat().tolist(),
         *placements.translations[c].tolist()] if c in placed else None
        for c in range(n)
    ]  # fmt: skip

    # Each frame from its owner, or from the first placed pass that holds it.
    chosen: dict[int, list[str]] = {c: [] for c in range(n)}
    held = [set(part.image_names) for part in parts]
    seen: set[str] = set()
    for part in parts:
        for name in part.image_names:
            if name in seen:
                continue
            seen.add(name)
            holders = [d for d in range(n) if d in placed and name in held[d]]
            preferred = (owners or {}).get(name)
            if preferred in placed and name in held[preferred]:
                chosen[preferred].append(name)
            elif holders:
                chosen[holders[0]].append(name)
            else:
                report.dropped_frames.append(name)
    if report.dropped_frames:
        logger.warning(
            "%d frame(s) only the %s left out held are not in the merged predictions: %s",
            len(report.dropped_frames), passes.noun, shown_names(report.dropped_frames),
        )  # fmt: skip

    pieces = []
    for c in range(n):
        if chosen[c]:
            part = parts[c] if chosen[c] == parts[c].image_names else parts[c].subset(chosen[c])
            pieces.append(part if c == gauge else transform_predictions(part, placements.sim(c)))
    merged = _concatenate(pieces)
    if average_shared:
        merged = _average_shared(merged, parts, placements, placed, gauge)
    if order is not None:
        wanted = [name for name in order if name in set(merged.image_names)]
        if wanted != merged.image_names:
            merged = merged.subset(wanted)
    merged = dataclasses.replace(merged, extras={**merged.extras, MERGE_REPORT_KEY: np.asarray(report.to_json())})
    return merged, report


def _average_shared(
    merged: Predictions, parts: list[Predictions], placements: Placements, placed: set[int], gauge: int
) -> Predictions:
    """Each frame that several placed passes hold gets the mean of their placed cameras (rotation: chordal mean;
    centre, intrinsics: mean); its depth stays its owner's."""
    index = merged.index()
    views: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for c in sorted(placed):
        part = parts[c] if c == gauge else transform_predictions(parts[c], placements.sim(c))
        for k, name in enumerate(part.image_names):
            views.setdefault(name, []).append((part.cam_from_world[k], part.intrinsics[k]))
    poses, intrinsics = merged.cam_from_world.copy(), merged.intrinsics.copy()
    for name, held in views.items():
        if len(held) < 2 or name not in index:
            continue
        cameras = np.array([pose for pose, _ in held])
        rotation = _project_rotation(cameras[:, :, :3].sum(axis=0))
        centre = (-np.einsum("sji,sj->si", cameras[:, :, :3], cameras[:, :, 3])).mean(axis=0)
        poses[index[name]] = np.concatenate([rotation, (-rotation @ centre)[:, None]], axis=1)
        intrinsics[index[name]] = np.mean([K / K[2, 2] for _, K in held], axis=0)
    return dataclasses.replace(merged, cam_from_world=poses, intrinsics=intrinsics)


def _concatenate(parts: list[Predictions]) -> Predictions:
    if len(parts) == 1:
        return parts[0]

    def join(key: str) -> np.ndarray | None:
        values = [getattr(part, key) for part in parts]
        return None if any(v is None for v in values) else np.concatenate(values)

    return Predictions(
        image_names=[name for part in parts for name in part.image_names],
        cam_from_world=join("cam_from_world"),
        intrinsics=join("intrinsics"),
        grid_from_image=join("grid_from_image"),
        **{key: join(key) for key in OPTIONAL_MAPS},
    )
