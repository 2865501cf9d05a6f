"""Predictions for more frames than one VGGT pass can hold, for sequences: overlapping windows in name order.

VGGT predicts every window in a frame of its own (the window's first camera at the origin, its own scale).
Consecutive windows share `overlap` frames. The windows are merged into the frame of the first window by
`vggt_sfm.merge` (each pair of windows that shares frames is aligned by a robust similarity of those frames'
confident depth, and all placements are solved at once; for windows the graph is a path). A shared frame keeps
the earlier window's prediction.

Windows follow the sorted image order, so they suit captures whose neighbours in name order see the same
scene (video frames, walk-throughs, orbits taken in order). For an unordered collection, chunks of similar
views (`vggt_sfm.chunks`) do what windows do here. The placement of a path leaves some drift over many windows;
the matches and bundle adjustment of the reconstruction correct it.
"""

from __future__ import annotations

from collections.abc import Iterable

import pycolmap

from .errors import UserError
from .merge import WINDOWS, align_pair, merge_predictions, transform_predictions
from .predictions import Predictions

__all__ = ["chain_windows", "default_overlap", "transform_predictions", "window_ranges", "window_similarity"]


def default_overlap(window: int) -> int:
    """Frames shared by consecutive windows when none is given: a quarter of the window, at least one."""
    return min(max(window // 4, 1), window - 1)


def window_ranges(num_frames: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """[start, stop) frame ranges of `window` frames, consecutive ones sharing at least `overlap` frames.

    The last window ends at the last frame (it may share more than `overlap`). One window when all frames fit.
    """
    if window < 2:
        raise UserError(f"a window needs at least 2 frames, got {window}")
    if not 1 <= overlap < window:
        raise UserError(f"the window overlap must be between 1 and the window size - 1 ({window - 1}), got {overlap}")
    if num_frames <= window:
        return [(0, num_frames)]
    step = window - overlap
    starts = list(range(0, num_frames - window, step)) + [num_frames - window]
    return [(start, start + window) for start in starts]


def window_similarity(reference: Predictions, current: Predictions) -> pycolmap.Sim3d:
    """reference_from_current similarity, fitted on the frames both hold (`merge.align_pair`)."""
    return align_pair(reference, current, WINDOWS).a_from_b


def chain_windows(windows: Iterable[Predictions]) -> Predictions:
    """One Predictions of all frames, in the first window's frame (`merge.merge_predictions` over the windows,
    whose graph is a path); a frame shared by two windows keeps the earlier one's prediction."""
    merged, _ = merge_predictions(list(windows), passes=WINDOWS)
    return merged
