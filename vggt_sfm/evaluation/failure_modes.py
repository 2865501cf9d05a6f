"""Structured errors of a simulated prior: the ways VGGT really fails, on top of the iid noise of `simulate`.

VGGT's errors are not independent per frame. These modes reproduce the ones users meet (each alone or together):

| mode | what the prior gets wrong |
|---|---|
| `focal-bias` | one focal-length factor exp(+-0.15) shared by every frame (the field of view off the same way for the whole scene) |
| `drift` | a rotation (5 degrees) and scale (exp(+-0.12)) drift growing smoothly along the sequence (name order), as between chained windows |
| `bad-frames` | 15 % of the frames 25-40 degrees off in rotation (and 5 % of the scene extent off in centre) |
| `flipped` | 10 % of the frames (at least one) turned around: alternately placed on the opposite side of the scene, looking back at it, and turned 180 degrees in the image plane |
| `depth` | depth scaled per frame by exp(N(0, 0.03)), and 5 % of each map wrong (0.3-3x) at the highest confidence (sky, reflections) |
| `all` | every mode above |

Each mode perturbs the true cameras in the true world (before the prior's random similarity frame) and draws its
randomness from a generator of its own, so the iid noise of a seed is the same with or without failure modes and
results compare draw for draw. `FailureReport` says which frames each mode touched, for tests and benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
from scipy.spatial.transform import Rotation

from ..errors import UserError

MODES = ("focal-bias", "drift", "bad-frames", "flipped", "depth")


@dataclass(frozen=True)
class FailureModes:
    """Which structured errors to add, and how strong they are (0 / empty disables a mode)."""

    focal_bias: float = 0.0  # shared factor on every focal: exp(+-focal_bias), the sign drawn per prior
    drift_rotation_deg: float = 0.0  # rotation of the last frame's world relative to the first's
    drift_scale: float = 0.0  # scale of the last frame's world relative to the first's: exp(+-drift_scale)
    bad_fraction: float = 0.0  # this fraction of the frames gets a rotation error in bad_rotation_deg
    bad_rotation_deg: tuple[float, float] = (25.0, 40.0)
    bad_center_fraction: float = 0.05  # ... and a centre error of this fraction of the scene extent
    flipped_fraction: float = 0.0  # this fraction (at least one) turned around: opposite side, then rolled 180 deg
    depth_scale: float = 0.0  # per-frame depth scale exp(N(0, depth_scale))
    depth_wrong_fraction: float = 0.0  # of each depth map's pixels: wrong depth with the highest confidence

    @classmethod
    def named(cls, names: str | list[str] | tuple[str, ...]) -> FailureModes:
        """The modes named (comma-separated or a list; `all` for every one) at their documented strength."""
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        chosen = set()
        for name in names:
            if name == "all":
                chosen.update(MODES)
            elif name in MODES:
                chosen.add(name)
            else:
                raise UserError(f"unknown failure mode {name!r}; choose from {', '.join(MODES + ('all',))}")
        values: dict = {}
        if "focal-bias" in chosen:
            values["focal_bias"] = 0.15
        if "drift" in chosen:
            values.update(drift_rotation_deg=5.0, drift_scale=0.12)
        # Together at most a quarter of the frames: VGGT fails on a few frames, and on 8 photos 2 + 2 would be half.
        if "bad-frames" in chosen:
            values["bad_fraction"] = 0.15
        if "flipped" in chosen:
            values["flipped_fraction"] = 0.1
        if "depth" in chosen:
            values.update(depth_scale=0.03, depth_wrong_fraction=0.05)
        return cls(**values)

    def is_empty(self) -> bool:
        return all(getattr(self, f.name) == f.default for f in fields(self))


@dataclass
class FailureReport:
    """What the failure modes did to one prior (frame names in sorted order)."""

    focal_factor: float = 1.0
    bad_frames: list[str] = field(default_factory=list)
    flipped_frames: list[str] = field(default_factory=list)
    drift_rotation_deg: float = 0.0
    drift_scale: float = 1.0
    frame_scales: np.ndarray | None = None  # (S,) the drift's scale of each frame's world (depth scales with it)

    @property
    def failed_frames(self) -> list[str]:
        """The frames whose prior is far off (bad or flipped)."""
        return sorted(set(self.bad_frames) | set(self.flipped_frames))


def _random_axes(rng: np.random.Generator, count: int) -> np.ndarray:
    axes = rng.normal(size=(count, 3))
    return axes / np.linalg.norm(axes, axis=1, keepdims=True)


def scene_center_and_up(R: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The point the cameras look at (closest to every optical axis; in front of the centroid when the axes are
    parallel) and the scene's up direction (the mean of the cameras' up, -y in OpenCV axes)."""
    axes = R[:, 2, :]
    projector = np.eye(3)[None] - axes[:, :, None] * axes[:, None, :]
    A, b = projector.sum(axis=0), np.einsum("sij,sj->i", projector, centers)
    centroid = centers.mean(axis=0)
    spread = float(np.median(np.linalg.norm(centers - centroid, axis=1))) or 1.0
    if np.linalg.eigvalsh(A)[0] > 0.05 * len(centers):
        target = np.linalg.solve(A, b)
    else:
        target = centroid + axes.mean(axis=0) * 3.0 * spread
    up = -R[:, 1, :].mean(axis=0)
    return target, up / (np.linalg.norm(up) or 1.0)


def apply_camera_failures(
    modes: FailureModes, rng: np.random.Generator, names: list[str], R: np.ndarray, centers: np.ndarray,
    scene_scale: float,
) -> tuple[np.ndarray, np.ndarray, float, FailureReport]:
    """Cameras (S,3,3) world-to-camera rotations and (S,3) centres, in the true world, with the failures applied.

    Returns the new rotations, centres, the shared focal factor and the report. Frames are in `names` order,
    which is the sequence order of the drift.
    """
    R, centers = R.copy(), centers.copy()
    num = len(names)
    report = FailureReport()
    # Every mode draws from the generator even when disabled, so one mode's draws do not depend on another's.
    bias_sign = rng.choice([-1.0, 1.0])
    drift_axis = _random_axes(rng, 1)[0]
    drift_sign = rng.choice([-1.0, 1.0])
    order = rng.permutation(num)
    bad_angles = rng.uniform(*modes.bad_rotation_deg, size=num)
    bad_axes = _random_axes(rng, num)
    bad_offsets = rng.normal(size=(num, 3))

    focal_factor = float(np.exp(bias_sign * modes.focal_bias))
    report.focal_factor = focal_factor

    if modes.drift_rotation_deg or modes.drift_scale:
        # Frame k sees the world through a similarity that grows smoothly from the identity (first frame) to the
        # full drift (last frame), about the scene's centre: locally consistent, globally bent.
        target, _ = scene_center_and_up(R, centers)
        progress = np.linspace(0.0, 1.0, num) if num > 1 else np.zeros(1)
        drift = Rotation.from_rotvec(progress[:, None] * np.radians(modes.drift_rotation_deg) * drift_axis).as_matrix()
        scales = np.exp(drift_sign * modes.drift_scale * progress)
        centers = target + scales[:, None] * np.einsum("sij,sj->si", drift, centers - target)
        R = R @ drift.transpose(0, 2, 1)  # X' = D X: R' = R D^T
        report.drift_rotation_deg = modes.drift_rotation_deg
        report.drift_scale = float(scales[-1])
        report.frame_scales = scales

    count = int(round(modes.bad_fraction * num))
    flipped = max(1, int(round(modes.flipped_fraction * num))) if modes.flipped_fraction > 0 else 0
    flipped = min(flipped, num - count)
    bad, turned = order[:count], order[count : count + flipped]
    if count:
        delta = Rotation.from_rotvec(bad_axes[bad] * np.radians(bad_angles[bad])[:, None]).as_matrix()
        R[bad] = delta @ R[bad]
        centers[bad] += modes.bad_center_fraction * scene_scale * bad_offsets[bad]
        report.bad_frames = sorted(names[i] for i in bad)
    if flipped:
        target, up = scene_center_and_up(R, centers)
        half_turn = Rotation.from_rotvec(np.pi * up).as_matrix()
        roll = np.diag([-1.0, -1.0, 1.0])  # 180 degrees about the optical axis
        for k, i in enumerate(sorted(turned)):
            if k % 2 == 0:  # the opposite side of the scene, looking back at it
                centers[i] = target + half_turn @ (centers[i] - target)
                R[i] = R[i] @ half_turn.T
            else:
                R[i] = roll @ R[i]
        report.flipped_frames = sorted(names[i] for i in turned)
    return R, centers, focal_factor, report


def apply_depth_failures(
    modes: FailureModes, rng: np.random.Generator, depth: np.ndarray, confidence: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Depth (S,H,W) scaled per frame, and wrong-but-confident patches (sky, reflections) painted in."""
    depth, confidence = depth.copy(), confidence.copy()
    num, height, width = depth.shape
    scales = np.exp(rng.normal(0.0, modes.depth_scale, size=num))
    depth *= scales[:, None, None].astype(depth.dtype)
    if modes.depth_wrong_fraction > 0:
        for k in range(num):
            # A few square patches covering the fraction, each at a wrong depth (0.3x-3x the frame's median).
            valid = depth[k][depth[k] > 0]
            median = float(np.median(valid)) if valid.size else 1.0
            side = max(2, int(round(np.sqrt(modes.depth_wrong_fraction * height * width / 3))))
            for _ in range(3):
                top, left = rng.integers(0, max(1, height - side)), rng.integers(0, max(1, width - side))
                factor = float(np.exp(rng.uniform(np.log(0.3), np.log(3.0))))
                depth[k, top : top + side, left : left + side] = median * factor
                confidence[k, top : top + side, left : left + side] = confidence[k].max()
    return depth, confidence
