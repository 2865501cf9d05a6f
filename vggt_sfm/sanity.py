"""Plain sanity checks of a finished run, so that a useless model never ends like a good one.

A run can complete every stage and still produce nothing usable: no 3D points (e.g. predictions whose camera
centres all coincide, so nothing can be triangulated), a mean reprojection error of many pixels, or most frames
left at their predicted pose. `check_run` names each such failure; the pipeline records them in the summary
(`status` "FAILED", `failure_reasons`), keeps the output for inspection, and the command line exits with
`EXIT_FAILED`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .prior import PriorCameras

EXIT_FAILED = 3  # the command line's exit status for a run that completed but failed these checks
STATUS_OK = "ok"
STATUS_FAILED = "FAILED"


@dataclass(frozen=True)
class SanityLimits:
    """What a usable model must reach."""

    min_points: int = 1
    max_mean_reprojection_error_px: float = 4.0  # after bundle adjustment a good model is well under 1 px
    max_not_refined_fraction: float = 0.5  # frames that kept their predicted pose, of all frames
    min_center_spread: float = 1e-9  # of the predicted camera centres, in the prediction's units


def check_run(
    num_images: int,
    num_points: int,
    mean_reprojection_error: float,
    not_refined: list[str],
    prior: PriorCameras | None = None,
    bundle_adjusted: bool = True,
    limits: SanityLimits = SanityLimits(),
) -> list[str]:
    """The reasons a run's result is not usable (empty when it passes every check).

    The reprojection limit applies only to a bundle-adjusted model: the initial one (`--no-ba`) keeps the
    prior's poses, whose errors of several pixels are expected there.
    """
    reasons = []
    if prior is not None and prior.num_images >= 2:
        centers = prior.centers()
        spread = float(np.max(np.linalg.norm(centers - centers.mean(axis=0), axis=1)))
        if not np.isfinite(spread) or spread < limits.min_center_spread:
            reasons.append(
                "the predicted camera centres all coincide (identity or zero-translation extrinsics?), so no point "
                "can be triangulated: check the predictions"
            )
    if num_points < limits.min_points:
        reasons.append("no 3D points were triangulated")
    elif bundle_adjusted and not mean_reprojection_error <= limits.max_mean_reprojection_error_px:  # NaN fails
        reasons.append(
            f"mean reprojection error {mean_reprojection_error:.2f} px is above "
            f"{limits.max_mean_reprojection_error_px:g} px"
        )
    if num_images and len(not_refined) > limits.max_not_refined_fraction * num_images:
        reasons.append(
            f"{len(not_refined)} of {num_images} images were not refined (too few triangulated observations; "
            "they kept their predicted pose)"
        )
    return reasons


def status_of(reasons: list[str]) -> str:
    """"ok" without failure reasons, "FAILED" with any."""
    return STATUS_FAILED if reasons else STATUS_OK
