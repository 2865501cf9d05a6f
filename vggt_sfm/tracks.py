"""Tracks: connected components of the verified-match graph, one per scene point.

A keypoint is a node, a verified match an edge. A component that contains two keypoints of the same image is
inconsistent (one scene point cannot appear twice in a view): it is rebuilt by joining its keypoints greedily
along the best-supported edges (those closing the most triangles) while no image repeats, or dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

if TYPE_CHECKING:
    from .matching import VerifiedMatches

logger = logging.getLogger(__name__)

CONFLICT_MODES = ("split", "drop")


@dataclass
class TracksConfig:
    min_track_length: int = 2
    conflicts: str = "split"  # "split": rebuild inconsistent components; "drop": discard them


@dataclass
class Tracks:
    """Observation-level arrays, sorted by track id, then by image index."""

    track_id: np.ndarray  # (O,) int
    image_index: np.ndarray  # (O,) int
    keypoint_index: np.ndarray  # (O,) int
    num_tracks: int

    @property
    def num_observations(self) -> int:
        return len(self.track_id)

    def lengths(self) -> np.ndarray:
        """(num_tracks,) number of observations of each track."""
        return np.bincount(self.track_id, minlength=self.num_tracks)

    def offsets(self) -> np.ndarray:
        """(num_tracks+1,) start of each track in the observation arrays."""
        return np.concatenate([[0], np.cumsum(self.lengths())])

    def observation_pairs(self, max_offset: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Pairs of observations of the same track, as (first, second) observation indices, with the first in
        the lower image (tracks are sorted by image): all pairs, or with `max_offset` only those at most that
        far apart within the track (bounds the count for long tracks)."""
        lengths = self.lengths()
        offsets = self.offsets()
        first, second = [], []
        for length in np.unique(lengths[lengths >= 2]):
            starts = offsets[:-1][lengths == length]
            a, b = np.triu_indices(length, 1)
            if max_offset is not None:
                near = b - a <= max_offset
                a, b = a[near], b[near]
            first.append((starts[:, None] + a[None]).ravel())
            second.append((starts[:, None] + b[None]).ravel())
        if not first:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(first), np.concatenate(second)

    def image_pair_matches(self) -> dict[tuple[int, int], np.ndarray]:
        """The correspondences the tracks imply: (i, j) with i < j -> (K,2) keypoint indices in i and j."""
        first, second = self.observation_pairs()
        images = np.stack([self.image_index[first], self.image_index[second]], axis=1)
        order = np.lexsort((images[:, 1], images[:, 0]))
        images, first, second = images[order], first[order], second[order]
        boundaries = np.flatnonzero(np.any(np.diff(images, axis=0) != 0, axis=1)) + 1
        out = {}
        for rows in np.split(np.arange(len(first)), boundaries):
            if len(rows):
                i, j = images[rows[0]]
                out[(int(i), int(j))] = np.stack(
                    [self.keypoint_index[first[rows]], self.keypoint_index[second[rows]]], axis=1
                )
        return out

    def select(self, keep: np.ndarray, min_track_length: int = 2) -> Tracks:
        """The tracks restricted to the observations in the boolean mask `keep`; short tracks are removed."""
        return _relabel(self.track_id[keep], self.image_index[keep], self.keypoint_index[keep], min_track_length)


def build_tracks(
    verified: VerifiedMatches, num_keypoints: list[int], config: TracksConfig | None = None
) -> Tracks:
    """Union the verified matches of all pairs into tracks (each image at most once per track)."""
    config = config or TracksConfig()
    if config.conflicts not in CONFLICT_MODES:
        raise ValueError(f"TracksConfig.conflicts must be one of {CONFLICT_MODES}, got {config.conflicts!r}")
    counts = np.asarray(num_keypoints, dtype=np.int64)
    node_offset = np.concatenate([[0], np.cumsum(counts)])
    edges = _match_edges(verified, counts, node_offset)
    if len(edges) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return Tracks(empty, empty.copy(), empty.copy(), 0)

    num_nodes = int(node_offset[-1])
    adjacency = sp.coo_matrix(
        (np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])), shape=(num_nodes, num_nodes)
    ).tocsr()
    _, labels = connected_components(adjacency, directed=False)

    nodes = np.flatnonzero(np.bincount(edges.ravel(), minlength=num_nodes))  # keypoints with a match
    component = labels[nodes]
    image = np.searchsorted(node_offset, nodes, side="right") - 1

    order = np.lexsort((image, component))
    component, image, nodes = component[order], image[order], nodes[order]
    repeated = (component[1:] == component[:-1]) & (image[1:] == image[:-1])
    conflicting = np.unique(component[1:][repeated])
    in_conflict = np.isin(component, conflicting)
    logger.info(
        "tracks: %d components, %d inconsistent (%s)", len(np.unique(component)), len(conflicting), config.conflicts
    )

    if config.conflicts == "split" and len(conflicting):
        sub_nodes = nodes[in_conflict]
        new_component = _split_components(adjacency, sub_nodes, image[in_conflict])
        # Fresh labels after the existing ones keep the split parts distinct from untouched components.
        component = component.copy()
        component[in_conflict] = labels.max() + 1 + new_component
        keep = np.ones(len(nodes), dtype=bool)
    else:
        keep = ~in_conflict

    keypoint = nodes - node_offset[image]
    return _relabel(component[keep], image[keep], keypoint[keep], config.min_track_length)


def _match_edges(verified: VerifiedMatches, counts: np.ndarray, node_offset: np.ndarray) -> np.ndarray:
    """(E,2) global node ids of all verified matches; pairs within one image are ignored."""
    pairs = np.asarray(verified.pairs, dtype=np.int64).reshape(-1, 2)
    if len(pairs) != len(verified.matches):
        raise ValueError(f"verified matches: {len(pairs)} pairs but {len(verified.matches)} match arrays")
    if len(pairs) and (pairs.min() < 0 or pairs.max() >= len(counts)):
        raise ValueError(f"verified matches refer to image {pairs.max()} but only {len(counts)} images have features")
    edges = []
    for (i, j), matches in zip(pairs, verified.matches):
        matches = np.asarray(matches, dtype=np.int64).reshape(-1, 2)
        if i == j or len(matches) == 0:
            continue
        if matches.min() < 0 or matches[:, 0].max() >= counts[i] or matches[:, 1].max() >= counts[j]:
            raise ValueError(f"verified matches of pair ({i}, {j}) index past the keypoints of those images")
        edges.append(np.stack([node_offset[i] + matches[:, 0], node_offset[j] + matches[:, 1]], axis=1))
    return np.concatenate(edges) if edges else np.zeros((0, 2), dtype=np.int64)


def _split_components(adjacency: sp.csr_matrix, nodes: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Greedy image-consistent grouping of `nodes` (members of inconsistent components).

    Edges are taken in order of support (number of common neighbours, i.e. triangles through the edge), and two
    groups are joined only when they share no image. Returns a group label per node.
    """
    local = adjacency[nodes][:, nodes]
    local = ((local + local.T) > 0).astype(np.int32).tocsr()
    edges = sp.triu(local, k=1).tocoo()
    common = local @ local  # common neighbours of two nodes = triangles through their edge
    support = np.asarray(common[edges.row, edges.col]).ravel()
    order = np.argsort(-support, kind="stable")
    edge_list = zip(edges.row[order].tolist(), edges.col[order].tolist())

    parent = list(range(len(nodes)))
    images: list[set[int] | None] = [{int(i)} for i in image]

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in edge_list:
        ra, rb = find(a), find(b)
        if ra == rb or not images[ra].isdisjoint(images[rb]):
            continue
        if len(images[ra]) < len(images[rb]):
            ra, rb = rb, ra
        parent[rb] = ra
        images[ra] |= images[rb]
        images[rb] = None
    return np.array([find(a) for a in range(len(nodes))], dtype=np.int64)


def _relabel(component: np.ndarray, image: np.ndarray, keypoint: np.ndarray, min_track_length: int) -> Tracks:
    """Dense track ids (in order of the component labels), short tracks removed, sorted by (track, image)."""
    _, track, length = np.unique(component, return_inverse=True, return_counts=True)
    long_enough = length >= max(min_track_length, 1)
    keep = long_enough[track]
    new_id = np.cumsum(long_enough) - 1
    track = new_id[track[keep]]
    image, keypoint = image[keep], keypoint[keep]
    order = np.lexsort((image, track))
    return Tracks(
        track_id=track[order].astype(np.int64),
        image_index=image[order].astype(np.int64),
        keypoint_index=keypoint[order].astype(np.int64),
        num_tracks=int(long_enough.sum()),
    )
