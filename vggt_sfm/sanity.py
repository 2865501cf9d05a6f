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
import pycolmap

from .errors import param
from .prior import PriorCameras, rotation_angles_deg

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
    # Median, over pairs of refined images, of the angle between their relative rotation in the model and in the
    # prediction. VGGT is a few degrees off per frame and fails on a minority of frames; a model that turns most
    # pairs farther than this from it has converged to a wrong solution (a weak scene bent by wrong matches).
    # Measured on simulated priors (five sets, seeds 0-2, iid and every failure mode at once, the frames found
    # wrong excluded): the 29 sound runs 1.4-4.5 deg (the highest under drift plus focal bias, where the
    # prediction itself is that far off), the one bent run (templeSR seed 1, 6 deg off the truth) 6.0. The margin
    # is small both ways: a prediction worse than VGGT's usual can fail a sound model (it says why; the model is
    # still written), and a bend within the prediction's own error passes.
    max_prior_disagreement_deg: float = 5.0


def prior_disagreement_deg(
    reconstruction: pycolmap.Reconstruction, prior: PriorCameras, skip: list[str] = (), max_pairs: int = 5000
) -> float:
    """Median angle (degrees) between the model's and the prior's relative rotations over pairs of its refined
    images (a regular sample of at most `max_pairs` pairs); NaN with fewer than two such images."""
    index = {name: i for i, name in enumerate(prior.image_names)}
    skipped = set(skip)
    frames, rotations = [], []
    for image in reconstruction.images.values():
        if image.has_pose and image.name in index and image.name not in skipped:
            frames.append(index[image.name])
            rotations.append(image.cam_from_world().rotation.matrix())
    if len(frames) < 2:
        return float("nan")
    R_model = np.array(rotations)
    R_prior = prior.cam_from_world[frames, :, :3]
    first, second = np.triu_indices(len(frames), k=1)
    step = max(1, len(first) // max_pairs)
    first, second = first[::step], second[::step]
    model_rel = np.einsum("pij,pkj->pik", R_model[second], R_model[first])  # R_j R_i^T
    prior_rel = np.einsum("pij,pkj->pik", R_prior[second], R_prior[first])
    return float(np.median(rotation_angles_deg(model_rel, prior_rel)))


def check_run(
    num_images: int,
    num_points: int,
    mean_reprojection_error: float,
    not_refined: list[str],
    prior: PriorCameras | None = None,
    bundle_adjusted: bool = True,
    limits: SanityLimits = SanityLimits(),
    prior_disagreement: float = float("nan"),
) -> list[str]:
    """The reasons a run's result is not usable (empty when it passes every check).

    The reprojection limit applies only to a bundle-adjusted model: the initial one (`--no-ba`) keeps the
    prior's poses, whose errors of several pixels are expected there. `prior_disagreement` (degrees, see
    `prior_disagreement_deg`) fails a model that contradicts the prediction on most pairs.
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
    if prior_disagreement > limits.max_prior_disagreement_deg:  # NaN passes: nothing to compare
        reasons.append(
            f"the model turns its image pairs {prior_disagreement:.1f} degrees (median) from the predicted cameras: "
            "more than VGGT's errors, so it is most likely bent by wrong matches; inspect it before use (for a "
            f"prediction known to be worse, raise {param('sanity.max_prior_disagreement_deg')})"
        )
    return reasons


def status_of(reasons: list[str]) -> str:
    """"ok" without failure reasons, "FAILED" with any."""
    return STATUS_FAILED if reasons else STATUS_OK
