"""Tracks from verified matches: real SIFT matches on Strecha fountain, and the splitting of inconsistent tracks."""

import numpy as np
import pytest
from sfm_scenes import FOUNTAIN, scene  # noqa: F401 (fixture)

from vggt_sfm.matching import VerifiedMatches
from vggt_sfm.tracks import Tracks, TracksConfig, build_tracks


def _verified(pairs, matches) -> VerifiedMatches:
    return VerifiedMatches(
        np.array(pairs, dtype=int).reshape(-1, 2),
        [np.array(m, dtype=int).reshape(-1, 2) for m in matches],
        ["prior"] * len(pairs),
        np.array([len(m) for m in matches]),
    )


def _track_sets(tracks: Tracks) -> list[set[tuple[int, int]]]:
    offsets = tracks.offsets()
    return [
        set(zip(tracks.image_index[a:b].tolist(), tracks.keypoint_index[a:b].tolist()))
        for a, b in zip(offsets[:-1], offsets[1:])
    ]


def _assert_consistent(tracks: Tracks) -> None:
    assert np.all(np.diff(tracks.track_id) >= 0)
    assert np.all(tracks.lengths() >= 2)
    # One observation per image and track.
    keys = tracks.track_id * 10_000 + tracks.image_index
    assert len(np.unique(keys)) == tracks.num_observations


def test_tracks_from_real_matches_are_consistent(scene):
    counts = [len(f.keypoints) for f in scene.features]
    tracks = build_tracks(scene.verified, counts)
    _assert_consistent(tracks)
    assert tracks.num_tracks > 1000
    assert np.all(tracks.keypoint_index < np.array(counts)[tracks.image_index])
    # Every verified match whose keypoints are both in tracks joins two observations of the same track
    # (except across the few inconsistent components that were split).
    where = {(i, k): t for t, i, k in zip(tracks.track_id, tracks.image_index, tracks.keypoint_index)}
    together = total = 0
    for (i, j), matches in zip(scene.verified.pairs, scene.verified.matches):
        for a, b in matches:
            if (i, a) in where and (j, b) in where:
                total += 1
                together += where[(i, a)] == where[(j, b)]
    assert together / total > 0.98
    # Long tracks exist: features seen in every image.
    assert tracks.lengths().max() == len(FOUNTAIN[1])


def test_wrong_matches_that_repeat_an_image_are_split_off(scene):
    counts = [len(f.keypoints) for f in scene.features]
    clean = build_tracks(scene.verified, counts)
    long_tracks = [t for t in _track_sets(clean) if len(t) >= 4][:50]
    # Chain each long track to another one through one wrong match between images 0 and 1: the merged
    # component then sees images 0 and 1 twice.
    pairs = [tuple(p) for p in scene.verified.pairs.tolist()]
    matches = [m.copy() for m in scene.verified.matches]
    index01 = pairs.index((0, 1))
    wrong, chained = [], []
    for a, b in zip(long_tracks[0::2], long_tracks[1::2]):
        ka = dict(a).get(0)
        kb = dict(b).get(1)
        if ka is not None and kb is not None:
            wrong.append((ka, kb))
            chained += [a, b]
    assert len(wrong) >= 5
    matches[index01] = np.concatenate([matches[index01], np.array(wrong)])
    corrupted = VerifiedMatches(scene.verified.pairs, matches, scene.verified.method, scene.verified.num_raw)

    split = build_tracks(corrupted, counts, TracksConfig(conflicts="split"))
    _assert_consistent(split)
    split_sets = _track_sets(split)
    # The well-supported tracks come back intact; the wrong edges are the ones cut.
    for track in chained:
        assert track in split_sets

    dropped = build_tracks(corrupted, counts, TracksConfig(conflicts="drop"))
    _assert_consistent(dropped)
    assert dropped.num_tracks < split.num_tracks
    dropped_sets = _track_sets(dropped)
    assert not any(track in dropped_sets for track in chained)


def test_split_keeps_the_triangle_and_cuts_the_weak_edge():
    # Images 0,1,2 see one point (keypoints 1); a stray match ties keypoint 5 of image 0 to it as well.
    verified = _verified(
        [(0, 1), (1, 2), (0, 2), (1, 3)],
        [[(1, 1), (5, 1)], [(1, 1)], [(1, 1)], [(1, 0)]],
    )
    tracks = build_tracks(verified, [10, 10, 10, 10])
    assert _track_sets(tracks) == [{(0, 1), (1, 1), (2, 1), (3, 0)}]
    assert tracks.lengths().tolist() == [4]
    assert build_tracks(verified, [10, 10, 10, 10], TracksConfig(conflicts="drop")).num_tracks == 0


def test_min_track_length_and_bad_indices():
    verified = _verified([(0, 1), (1, 2)], [[(0, 0), (1, 1)], [(0, 0)]])
    assert build_tracks(verified, [2, 2, 2]).lengths().tolist() == [3, 2]
    assert build_tracks(verified, [2, 2, 2], TracksConfig(min_track_length=3)).lengths().tolist() == [3]
    empty = build_tracks(_verified([], []), [2, 2])
    assert empty.num_tracks == 0 and empty.num_observations == 0
    with pytest.raises(ValueError, match="index past"):
        build_tracks(_verified([(0, 1)], [[(0, 7)]]), [2, 2])
    with pytest.raises(ValueError):
        build_tracks(verified, [2, 2, 2], TracksConfig(conflicts="merge"))
