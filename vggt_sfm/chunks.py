"""Chunks for unordered collections: VGGT passes over sets of images formed by what the images show.

When all images do not fit in one VGGT pass, `predict --chunks N` runs it on chunks of at most N frames. Windows
(`vggt_sfm.windows`) take the images in name order, which suits sequences; a collection whose names say nothing
about the views (photos from several cameras, renamed, shuffled) needs chunks of images that see the same scene.

How they are formed (`form_chunks`):
1. The image graph: SIFT features of every image (`features.extract_features`), one VLAD global descriptor each
   (`retrieval.global_descriptors`, on a vocabulary trained on the collection), each image paired with its most
   similar images (`retrieval.retrieval_pairs`), and the pairs matched and verified by RANSAC (`matching`). An
   image pair's weight is its number of verified matches: how much of the scene the two views share.
2. Groups: images joined by verified matches form groups. More than one group of two or more images is refused
   (one line naming the groups: they are separate scenes, to be predicted apart). An image with no verified match
   at all is kept, with a warning, and cut with the images it looks most like (by its global descriptor).
3. Cores: the images are split into P disjoint cores of at most N - 2K images (N - K when N < 3K) by recursive
   spectral bisection of the weighted graph (each cut splits the images where they share least, into sizes
   proportional to the chunks each side gets).
4. Overlaps: cores joined by the most verified matches form a maximum spanning tree; along each of its edges one
   chunk takes K frames of the other's core, one by one the frame with the most matches to the chunk's frames so
   far (fewer than K when no other frame of that core matches them). Further pairs of cores
   that share many matches (loops: an orbit's last chunk sees its first) get K shared frames too, where a chunk
   has room for them. The room left in a chunk goes to more frames of the cores it already shares with (the
   most matched first). Every chunk thus holds its core plus shared frames, at most N; the chunks are connected.
5. Each chunk's first frame, the one VGGT takes as its reference, is the core image with the most matches to the
   rest of the chunk.

The result does not depend on the names: everything is computed in an order given by the images' content (a hash
of each file), so renaming or shuffling the files gives the same chunks. Each image's prediction is taken from
the chunk whose core holds it (`ChunkPlan.owners`); `vggt_sfm.merge` places the chunks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.sparse.csgraph import connected_components, minimum_spanning_tree

from .errors import UserError, param
from .executor import Executor
from .features import FeatureConfig
from .predictions import shown_names
from .retrieval import RetrievalConfig

logger = logging.getLogger(__name__)

MAX_DEFAULT_OVERLAP = 8  # shared frames beyond this add VGGT time more than accuracy to the merge
GLUE_NEIGHBOURS = 5  # an image is glued by appearance to this many images it looks most like


@dataclass
class ChunkConfig:
    """How the image graph that chunks are formed on is built."""

    # Retrieval and verification only need to tell which images overlap: fewer, smaller keypoints than matching.
    features: FeatureConfig = field(
        default_factory=lambda: FeatureConfig(extractor="sift", max_keypoints=1024, resize_max=640, sift_backend="opencv")
    )
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    num_neighbors: int = 8  # candidate pairs per image, by global-descriptor similarity
    min_inliers: int = 15  # verified matches for two images to count as seeing the same scene
    # A pair of cores outside the spanning tree shares frames when its matches reach this fraction of the median
    # spanning-tree pair's.
    loop_fraction: float = 0.5


@dataclass
class ChunkPlan:
    """The chunks of a collection. `chunks[c]` lists chunk c's frames, its reference frame first; `cores[c]`
    the images whose prediction comes from chunk c (each image in exactly one core)."""

    names: list[str]
    chunks: list[list[str]]
    cores: list[list[str]]
    attached: list[str] = field(default_factory=list)  # images without verified matches, placed by appearance
    # (S,S) verified matches of every two images, in the order of `names` (for inspection; not in `as_dict`)
    matches: np.ndarray | None = field(default=None, repr=False, compare=False)

    def owners(self) -> dict[str, int]:
        """The chunk each image's prediction comes from."""
        return {name: c for c, core in enumerate(self.cores) for name in core}

    def edges(self) -> list[tuple[int, int, list[str]]]:
        """(a, b, shared frames) of every two chunks that share frames, a < b."""
        held = [set(chunk) for chunk in self.chunks]
        return [
            (a, b, [name for name in self.chunks[b] if name in held[a]])
            for a in range(len(self.chunks))
            for b in range(a + 1, len(self.chunks))
            if held[a] & held[b]
        ]

    def num_frames(self) -> int:
        """Frames over all chunks, shared ones counted in each (what VGGT runs on)."""
        return sum(len(chunk) for chunk in self.chunks)

    def as_dict(self) -> dict:
        return {key: value for key, value in dataclasses.asdict(self).items() if key != "matches"}


def default_chunk_overlap(size: int) -> int:
    """Frames neighbouring chunks share when none is given: a fifth of the chunk, at least 1, at most 8."""
    return min(max(size // 5, 1), MAX_DEFAULT_OVERLAP, size - 1)


def check_chunk_options(size: int, overlap: int) -> int:
    """The overlap to use (the default for 0); UserError for a size below 2 or an overlap not below the size."""
    if size < 2:
        raise UserError(f"a chunk needs at least 2 frames, got {param('chunks', size)}")
    overlap = overlap or default_chunk_overlap(size)
    if not 1 <= overlap < size:
        raise UserError(
            f"the chunk overlap must be between 1 and the chunk size - 1 ({size - 1}), got "
            f"{param('chunk_overlap', overlap)}"
        )
    return overlap


def core_size(size: int, overlap: int) -> int:
    """Images of its own per chunk: room for two overlaps (a spanning-tree edge and a loop) when the chunk is at
    least three overlaps large, else one."""
    return size - 2 * overlap if size >= 3 * overlap else size - overlap


# ---------------------------------------------------------------------------------------------------------------
# Chunks from an image graph


def _groups_message(groups: list[list[str]], singletons: int) -> str:
    listed = "; ".join(f"group {k + 1}: {len(g)} images ({shown_names(g)})" for k, g in enumerate(groups))
    also = f", and {singletons} image(s) match nothing" if singletons else ""
    return (
        f"the images fall into {len(groups)} groups that share no verified matches ({listed}{also}): they show "
        "different scenes; predict each group from a folder of its own"
    )


def _fiedler_order(affinity: np.ndarray) -> np.ndarray:
    """The nodes sorted along the second eigenvector of the normalised graph Laplacian (ties by index)."""
    degree = affinity.sum(axis=1)
    scale = 1.0 / np.sqrt(np.maximum(degree, 1e-300))
    laplacian = np.eye(len(affinity)) - scale[:, None] * affinity * scale[None, :]
    _, vectors = np.linalg.eigh(laplacian)
    fiedler = vectors[:, 1] * scale
    # An eigenvector's sign is arbitrary: fix it so that the same graph is always cut the same way round.
    if fiedler[np.argmax(np.abs(fiedler))] < 0:
        fiedler = -fiedler
    return np.lexsort((np.arange(len(fiedler)), np.round(fiedler, 12)))


def _bisect(nodes: np.ndarray, affinity: np.ndarray, parts: int, capacity: int) -> list[np.ndarray]:
    """`nodes` split into `parts` cores of at most `capacity`, by recursive spectral bisection."""
    if parts == 1:
        return [nodes]
    left_parts = parts // 2
    right_parts = parts - left_parts
    n = len(nodes)
    target = round(n * left_parts / parts)
    left_size = min(max(target, n - right_parts * capacity, left_parts), left_parts * capacity, n - right_parts)
    order = nodes[_fiedler_order(affinity[np.ix_(nodes, nodes)])]
    return _bisect(order[:left_size], affinity, left_parts, capacity) + _bisect(
        order[left_size:], affinity, right_parts, capacity
    )


def plan_chunks(
    names: list[str], weights: np.ndarray, similarity: np.ndarray, size: int, overlap: int = 0,
    loop_fraction: float = ChunkConfig.loop_fraction,
) -> ChunkPlan:  # fmt: skip
    """Chunks of at most `size` frames of the images `names`, from their pair `weights` (S,S; verified matches,
    0 for none) and global-descriptor `similarity` (S,S, cosine), as the module docstring says. Ties are broken by
    the order of `names`. UserError for bad options or images that fall into unconnected groups."""
    overlap = check_chunk_options(size, overlap)
    num = len(names)
    weights = np.asarray(weights, dtype=np.float64)
    if num <= size:
        order = np.argsort(-weights.sum(axis=1), kind="stable")
        return ChunkPlan(list(names), [[names[i] for i in order]], [list(names)], matches=weights)

    count, labels = connected_components(weights > 0, directed=False)
    groups = [np.flatnonzero(labels == k) for k in range(count)]
    groups.sort(key=lambda g: (-len(g), g[0]))
    big = [g for g in groups if len(g) >= 2]
    singletons = [int(g[0]) for g in groups if len(g) == 1]
    if not big:
        raise UserError(f"no two of the {num} images share verified matches: there is nothing to chunk them by")
    if len(big) > 1:
        raise UserError(_groups_message([sorted(names[i] for i in g) for g in big], len(singletons)))
    attached = [names[i] for i in singletons]
    if attached:
        logger.warning(
            "%d image(s) share no verified matches with any other: %s; each goes into a chunk of the images it "
            "looks most like, and its prediction is VGGT's guess", len(attached), shown_names(attached),
        )  # fmt: skip

    # Appearance glues the images the matches leave apart, far more weakly than any verified pair: each image to
    # the images it looks most like (so that one without matches is cut with them), and faintly to all (so that
    # every cut is well posed).
    similarity = np.asarray(similarity, dtype=np.float64)
    looks = 0.5 * (similarity + 1.0)
    np.fill_diagonal(looks, 0.0)
    nearest = np.argsort(-looks, axis=1, kind="stable")[:, :GLUE_NEIGHBOURS]
    glue = np.zeros_like(looks)
    np.put_along_axis(glue, nearest, np.take_along_axis(looks, nearest, axis=1), axis=1)
    glue = np.maximum(glue, glue.T) + 1e-3 * looks
    affinity = weights + 1e-3 * max(weights.max(), 1.0) / max(glue.max(), 1e-12) * glue
    capacity = core_size(size, overlap)
    parts = math.ceil(num / capacity)
    cores = _bisect(np.arange(num), affinity, parts, capacity)
    core_of = np.empty(num, dtype=int)
    for c, core in enumerate(cores):
        core_of[core] = c

    # The cores' graph: matches between them (glue where there are none), its maximum spanning tree.
    between = np.zeros((parts, parts))
    np.add.at(between, (core_of[:, None], core_of[None, :]), affinity)
    np.fill_diagonal(between, 0.0)
    # The glue makes every pair of cores positive: as costs 2 max - w, the minimum spanning tree is the maximum one.
    cost = np.where(between > 0, 2.0 * between.max() - between, 0.0)
    tree = minimum_spanning_tree(cost).toarray() != 0
    tree = tree | tree.T
    members = [list(core) for core in cores]

    def borrow(into: int, sources: list[int], count: int, first_unmatched: bool = True) -> None:
        """Chunk `into` takes up to `count` frames of the cores `sources`, one at a time: the one with the most
        matches to the chunk's frames so far (so that VGGT sees each in context), while any has matches (the
        first regardless, with `first_unmatched`: a spanning-tree edge must share a frame)."""
        pool = [int(i) for q in sources for i in cores[q]]
        for taken in range(count):
            candidates = np.array([i for i in pool if i not in members[into]], dtype=int)
            if not len(candidates):
                return
            score = weights[np.ix_(candidates, members[into])].sum(axis=1)
            if score.max() <= 0 and (taken or not first_unmatched):
                return
            look = affinity[np.ix_(candidates, members[into])].sum(axis=1)
            members[into].append(int(candidates[np.lexsort((candidates, -look, -score))[0]]))

    # Along the tree from its heaviest core: each chunk takes `overlap` frames of its parent's core.
    root = int(np.argmax((between * tree).sum(axis=1)))
    seen, queue = {root}, [root]
    tree_weights = []
    while queue:
        parent = queue.pop(0)
        for child in map(int, np.flatnonzero(tree[parent])):
            if child not in seen:
                seen.add(child)
                queue.append(child)
                borrow(child, [parent], overlap)
                tree_weights.append(between[parent, child])
    # Loops: the strongest other pairs of cores, where one of the two chunks has room for at least half an overlap.
    least = loop_fraction * float(np.median(tree_weights)) if tree_weights else np.inf
    pairs = [(between[a, b], a, b) for a in range(parts) for b in range(a + 1, parts) if not tree[a, b] and between[a, b] >= least]
    for _, a, b in sorted(pairs, key=lambda p: (-p[0], p[1], p[2])):
        if set(members[a]) & set(members[b]):
            continue  # they already share frames (taken from a third core)
        room_a, room_b = size - len(members[a]), size - len(members[b])
        into, source = (a, b) if room_a >= room_b else (b, a)
        count = min(overlap, max(room_a, room_b))
        if count >= math.ceil(overlap / 2):
            borrow(into, [source], count)

    # The room left goes to more frames shared with the chunks a chunk already shares with: each placement is then
    # fitted on more frames (a pass's error per frame averages out over them).
    for c in range(parts):
        sharing = [q for q in range(parts) if q != c and (set(members[c]) & set(cores[q]) or set(members[q]) & set(cores[c]))]
        borrow(c, sharing, size - len(members[c]), first_unmatched=False)

    chunks = []
    for core, members_c in zip(cores, members):
        own = np.array(members_c, dtype=int)  # the core first, then the frames taken from other cores
        links = weights[np.ix_(own, own)].sum(axis=1)[: len(core)]
        reference = int(own[: len(core)][np.lexsort((own[: len(core)], -links))[0]])
        ordered = [reference] + sorted(int(i) for i in own if i != reference)
        chunks.append([names[i] for i in ordered])
    plan = ChunkPlan(list(names), chunks, [[names[i] for i in sorted(core)] for core in cores], attached, weights)
    logger.info(
        "%d images in %d chunks of at most %d frames (%d frames in all, %d chunk pairs share frames)",
        num, len(chunks), size, plan.num_frames(), len(plan.edges()),
    )  # fmt: skip
    return plan


# ---------------------------------------------------------------------------------------------------------------
# The image graph of a folder


def content_order(images_dir: Path, names: list[str]) -> list[int]:
    """Indices of `names` sorted by a hash of each file's bytes (then by name): an order the names do not set."""
    digests = [hashlib.sha1((images_dir / name).read_bytes()).hexdigest() for name in names]
    return sorted(range(len(names)), key=lambda i: (digests[i], names[i]))


def image_graph(
    images_dir: Path, names: list[str], config: ChunkConfig | None = None, progress: bool = True,
    executor: Executor | None = None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(S,S) verified matches and (S,S) global-descriptor similarity of the images `names` (step 1 of the module
    docstring), in the order given."""
    from .features import extract_features
    from .matching import MatchingConfig, match_pairs, verify_matches
    from .retrieval import global_descriptors, retrieval_pairs, similarities

    config = config or ChunkConfig()
    features = extract_features(images_dir, names, config.features, progress=progress, executor=executor)
    vectors = global_descriptors([f.descriptors for f in features], config.retrieval)
    pairs = retrieval_pairs(vectors, config.num_neighbors)
    matching = MatchingConfig(matcher="nn-ratio", verification="ransac", min_inliers=config.min_inliers)
    raw = match_pairs(features, pairs, matching, progress=progress, executor=executor)
    verified = verify_matches(features, raw, None, matching, progress=progress, executor=executor)
    weights = np.zeros((len(names), len(names)))
    for (i, j), matches in zip(verified.pairs, verified.matches):
        weights[i, j] = weights[j, i] = len(matches)
    return weights, similarities(vectors)


def form_chunks(
    images_dir: Path | str, names: list[str], size: int, overlap: int = 0, config: ChunkConfig | None = None,
    progress: bool = True, executor: Executor | None = None,
) -> ChunkPlan:  # fmt: skip
    """Chunks of at most `size` frames of the images `names` of `images_dir`, neighbouring chunks sharing
    `overlap` frames (0: `default_chunk_overlap`); see the module docstring. UserError for bad options or images
    that fall into groups sharing no matches."""
    images_dir = Path(images_dir)
    check_chunk_options(size, overlap)
    config = config or ChunkConfig()
    if len(names) <= size:
        return plan_chunks(names, np.zeros((len(names), len(names))), np.zeros((len(names), len(names))), size, overlap)
    order = content_order(images_dir, names)
    ordered = [names[i] for i in order]
    weights, similarity = image_graph(images_dir, ordered, config, progress, executor)
    plan = plan_chunks(ordered, weights, similarity, size, overlap, config.loop_fraction)
    back = np.argsort(order)  # the matches in the order of `names`
    plan.names, plan.matches = list(names), weights[np.ix_(back, back)]
    return plan
