"""Memorisation: how close is each synthetic image to its nearest real *training* image?

A generator that copies its training data can look excellent by FID while adding nothing.
For every synthetic image we find its nearest training image and call it *memorised* when
it is closer than real training images typically are to each other: below a low percentile
(default the 5th) of the leave-one-out nearest-neighbour distances among the training images
themselves (the idea of the train-train reference follows the "copy detection" checks of
Carlini et al. 2023, "Extracting Training Data from Diffusion Models", arXiv:2301.13188,
and the memorisation test of Meehan et al. 2020, arXiv:2004.05675).

Why pixel space is the primary space: an exact or near copy is a copy whatever a
classifier thinks of it, so the primary distance is computed on the images themselves,
downsampled (default 32x32, which removes speckle and resampling differences) and
normalised per image to zero mean and unit L2 norm. The distance between two such vectors
is ``sqrt(2 - 2 * r)`` with ``r`` the Pearson correlation of the pixels, so it ignores
brightness and contrast changes and lies in [0, 2]. The distance is taken to the training
image *or its left-right mirror* (mirroring is the cheapest way a generator can copy and
the classifier trains with flips anyway). The same test is also run in the classifier's
feature space as a second opinion (where distances track what the classifier cares about).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from busynth.data.transforms import resize_image

logger = logging.getLogger(__name__)

DEFAULT_PERCENTILE = 5.0
DEFAULT_PIXEL_SIZE = 32
_CHUNK = 1024  # query rows per distance block (keeps memory at chunk x reference)


def pixel_embedding(images: np.ndarray, size: int = DEFAULT_PIXEL_SIZE) -> np.ndarray:
    """float64 (N, size*size): each uint8 (H, W) image resized to size x size, centred and
    scaled to unit L2 norm (a constant image becomes the zero vector)."""
    if len(images) == 0:
        return np.zeros((0, size * size))
    flat = np.stack([resize_image(np.asarray(im, dtype=np.uint8), size).astype(np.float64).ravel() for im in images])
    flat -= flat.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    return np.divide(flat, norms, out=np.zeros_like(flat), where=norms > 1e-12)


def mirror_images(images: np.ndarray) -> np.ndarray:
    """The images (N, H, W) flipped left-right."""
    return np.ascontiguousarray(np.asarray(images)[:, :, ::-1])


def _distances(query: np.ndarray, reference: np.ndarray) -> torch.Tensor:
    return torch.cdist(torch.from_numpy(query).double(), torch.from_numpy(reference).double(),
                       compute_mode="donot_use_mm_for_euclid_dist")  # exact 0 for exact copies


def nearest_neighbours(query: np.ndarray, reference: np.ndarray,
                       exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(index, distance) of the nearest ``reference`` row for every ``query`` row (Euclidean).

    ``exclude`` (bool, len(query) x len(reference)) marks pairs that may not be chosen, e.g.
    an image and itself for leave-one-out distances. Returns int64 and float64 arrays.
    """
    if len(reference) == 0:
        raise ValueError("nearest_neighbours needs at least one reference vector")
    idx, dist = np.zeros(len(query), dtype=np.int64), np.zeros(len(query))
    for start in range(0, len(query), _CHUNK):
        d = _distances(query[start:start + _CHUNK], reference)
        if exclude is not None:
            d[torch.from_numpy(exclude[start:start + _CHUNK])] = float("inf")
        best = d.min(dim=1)
        idx[start:start + _CHUNK] = best.indices.numpy()
        dist[start:start + _CHUNK] = best.values.numpy()
    return idx, dist


@dataclass
class Memorization:
    """Nearest training image of every query and the train-train reference threshold.

    index: (Q,) index into the training set; distance: (Q,) distance to it; mirrored: (Q,)
    True when the nearest was the mirrored training image; threshold: the percentile of the
    training set's leave-one-out nearest-neighbour distances; flagged: distance <= threshold.
    """

    index: np.ndarray
    distance: np.ndarray
    mirrored: np.ndarray
    threshold: float
    train_nn: np.ndarray
    percentile: float

    @property
    def flagged(self) -> np.ndarray:
        """bool (Q,): queries closer to a training image than the threshold."""
        return self.distance <= self.threshold

    def share(self, subset: np.ndarray | None = None) -> float | None:
        """Share of (a boolean subset of) the queries that is flagged; None for no queries."""
        flagged = self.flagged if subset is None else self.flagged[subset]
        return float(flagged.mean()) if flagged.size else None


def nearest_training(query: np.ndarray, train: np.ndarray, train_mirrored: np.ndarray | None = None,
                     percentile: float = DEFAULT_PERCENTILE) -> Memorization:
    """Nearest training vector for every query vector, and the leave-one-out threshold.

    ``query`` (Q, D) and ``train`` (N, D) are embeddings (pixel or feature); with
    ``train_mirrored`` (N, D) the mirrored training images count as the same image: a
    query may match either, and in the train-train reference an image never matches its
    own mirror. Needs N >= 2. Returns a :class:`Memorization`.
    """
    n = len(train)
    if n < 2:
        raise ValueError(f"memorisation needs at least 2 training images, got {n}")
    reference = train if train_mirrored is None else np.concatenate([train, train_mirrored])
    copies = 1 if train_mirrored is None else 2
    self_pairs = np.zeros((n, copies * n), dtype=bool)
    for c in range(copies):
        self_pairs[np.arange(n), c * n + np.arange(n)] = True
    _, train_nn = nearest_neighbours(train, reference, exclude=self_pairs)
    threshold = float(np.percentile(train_nn, percentile))
    if len(query):
        idx, dist = nearest_neighbours(query, reference)
    else:
        idx, dist = np.zeros(0, dtype=np.int64), np.zeros(0)
    return Memorization(index=idx % n, distance=dist, mirrored=idx >= n, threshold=threshold,
                        train_nn=train_nn, percentile=percentile)


def closest_pairs(result: Memorization, k: int) -> list[tuple[int, int, float]]:
    """The ``k`` closest (query index, training index, distance) triples, closest first;
    each training image appears at most once (its closest query)."""
    pairs, seen = [], set()
    for q in np.argsort(result.distance, kind="stable"):
        t = int(result.index[q])
        if t in seen:
            continue
        seen.add(t)
        pairs.append((int(q), t, float(result.distance[q])))
        if len(pairs) == k:
            break
    return pairs
