"""Image retrieval without a prior: which images of an unordered collection look alike.

Each image's local descriptors are summarised in one global vector by VLAD (vector of locally aggregated
descriptors): a small visual vocabulary is trained by k-means on descriptors sampled from the collection itself
(nothing to download, nothing that depends on another data set), every descriptor is assigned to its nearest
word, and the residuals to the word are summed per word. Per-word (intra) normalisation, a signed square root and
a final L2 norm keep bursts of repeated texture from dominating, so the dot product of two vectors is a usable
similarity. Images that share a lot of scene come out as each other's nearest neighbours.

`global_descriptors` (descriptors in, one vector per image out) and `nearest_neighbors` are the building blocks;
`retrieval_pairs` turns the vectors into image pairs to match.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from .errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class RetrievalConfig:
    """The vocabulary and the pairs drawn from the global vectors."""

    num_words: int = 64  # k-means centres; the vector has num_words x descriptor-size entries
    max_training_descriptors: int = 100_000  # sampled evenly over the images to train the vocabulary
    iterations: int = 25  # k-means (Lloyd) iterations
    seed: int = 0  # sampling and initialisation: the same collection gives the same pairs


def _sample_descriptors(descriptors: list[np.ndarray], limit: int, rng: np.random.Generator) -> np.ndarray:
    """Up to `limit` descriptors, the same share from every image (so that no image dominates the vocabulary)."""
    per_image = max(1, limit // max(len(descriptors), 1))
    parts = []
    for d in descriptors:
        if len(d) > per_image:
            d = d[np.sort(rng.choice(len(d), per_image, replace=False))]
        parts.append(np.asarray(d, dtype=np.float32))
    return np.concatenate(parts, axis=0)


def _assign(points: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centre of every point (squared Euclidean distance), in blocks to bound memory."""
    labels = torch.empty(len(points), dtype=torch.long)
    centre_norms = centres.square().sum(dim=1)
    for start in range(0, len(points), 65536):
        block = points[start : start + 65536]
        distances = centre_norms[None] - 2.0 * block @ centres.T  # |x|^2 is the same for every centre
        labels[start : start + len(block)] = distances.argmin(dim=1)
    return labels


def _sum_by_label(points: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """(L,D) sum of the points of each label, as a one-hot product (much faster than index_add_ on CPU)."""
    one_hot = torch.nn.functional.one_hot(labels, num_labels).to(points.dtype)
    return one_hot.T @ points


def train_vocabulary(descriptors: list[np.ndarray], config: RetrievalConfig | None = None) -> np.ndarray:
    """(K,D) float32 visual words: k-means (k-means++ start, Lloyd iterations) on descriptors of the collection."""
    config = config or RetrievalConfig()
    rng = np.random.default_rng(config.seed)
    sample = _sample_descriptors(descriptors, config.max_training_descriptors, rng)
    num_words = min(config.num_words, len(sample))
    if num_words < 1:
        raise UserError("no keypoints were found in any image: nothing to retrieve images by")
    points = torch.from_numpy(sample)
    with torch.inference_mode():
        # k-means++: each new centre drawn with probability proportional to the squared distance to the nearest.
        norms = points.square().sum(dim=1)

        def squared_distances(index: int) -> torch.Tensor:
            return (norms - 2.0 * points @ points[index] + norms[index]).clamp(min=0)

        first = int(rng.integers(len(points)))
        chosen, nearest = [first], squared_distances(first)
        for _ in range(1, num_words):
            weights = nearest.double().numpy()
            total = weights.sum()
            index = int(rng.choice(len(points), p=weights / total)) if total > 0 else int(rng.integers(len(points)))
            chosen.append(index)
            nearest = torch.minimum(nearest, squared_distances(index))
        centres = points[chosen]
        for _ in range(config.iterations):
            labels = _assign(points, centres)
            sums = _sum_by_label(points, labels, num_words)
            counts = torch.bincount(labels, minlength=num_words).float()
            moved = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
            if torch.allclose(moved, centres):
                break
            centres = moved
    return centres.numpy().astype(np.float32)


def vlad(descriptors: np.ndarray, vocabulary: np.ndarray) -> np.ndarray:
    """(K*D,) float32 VLAD vector of one image's descriptors (N,D): intra-normalised, signed root, unit L2."""
    words = torch.from_numpy(np.ascontiguousarray(vocabulary, dtype=np.float32))
    vector = torch.zeros_like(words)
    if len(descriptors):
        points = torch.from_numpy(np.require(descriptors, dtype=np.float32, requirements=["C", "W"]))  # a Ray result is read-only
        with torch.inference_mode():
            labels = _assign(points, words)
            vector = _sum_by_label(points - words[labels], labels, len(words))
    vector = vector / vector.norm(dim=1, keepdim=True).clamp(min=1e-12)
    vector = vector.sign() * vector.abs().sqrt()
    vector = vector.reshape(-1)
    return (vector / vector.norm().clamp(min=1e-12)).numpy().astype(np.float32)


def global_descriptors(
    descriptors: list[np.ndarray], config: RetrievalConfig | None = None, vocabulary: np.ndarray | None = None
) -> np.ndarray:
    """(S, K*D) float32 unit global vectors of S images from their local descriptors (each (N_i, D)).

    The vocabulary is trained on these descriptors unless one is given (e.g. to add images to a collection).
    """
    if vocabulary is None:
        vocabulary = train_vocabulary(descriptors, config)
    return np.stack([vlad(d, vocabulary) for d in descriptors]) if descriptors else np.zeros((0, vocabulary.size))


def similarities(vectors: np.ndarray) -> np.ndarray:
    """(S,S) cosine similarity of global vectors, with 0 on the diagonal (an image is not its own neighbour)."""
    scores = np.asarray(vectors, dtype=np.float64) @ np.asarray(vectors, dtype=np.float64).T
    np.fill_diagonal(scores, 0.0)
    return scores


def nearest_neighbors(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(S,k') indices and similarities of each image's k most similar other images, best first (k' = min(k, S-1))."""
    scores = similarities(vectors)
    np.fill_diagonal(scores, -np.inf)
    k = min(k, len(scores) - 1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, : max(k, 0)]
    return order, np.take_along_axis(scores, order, axis=1)


def retrieval_pairs(vectors: np.ndarray, num_neighbors: int) -> np.ndarray:
    """(P,2) pairs i<j from global vectors (`global_descriptors`): every image with its `num_neighbors` most
    similar images, plus a maximum spanning tree of the similarities so that the pairs connect all images."""
    from .pairs import pairs_from_scores

    # Shifted into (0, 1]: pairs_from_scores keeps only positive scores, and every image pair is a candidate.
    scores = 0.5 * (similarities(vectors) + 1.0) + 1e-6
    np.fill_diagonal(scores, 0.0)
    pairs = pairs_from_scores(scores, num_neighbors, connect=True)
    logger.info("%d pairs of %d images (retrieval, %d neighbours)", len(pairs), len(vectors), num_neighbors)
    return pairs
