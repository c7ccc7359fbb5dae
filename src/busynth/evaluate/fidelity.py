"""Fidelity and diversity of synthetic images, in a feature space that exists offline.

Features are the penultimate layer of the real-only classifier of the same fold and seed
(``model.features(x) -> (N, D)``), extracted once per image and handed to torchmetrics
through :class:`PrecomputedFeatures` (an identity ``feature`` module), so the Fréchet and
kernel maths are torchmetrics', not ours:

- classifier-feature FID (the Fréchet distance of Heusel et al. 2017, "GANs Trained by a Two
  Time-Scale Update Rule Converge to a Local Nash Equilibrium", arXiv:1706.08500, in the
  classifier's feature space, not Inception's) -- biased for small sets and undefined in
  practice for N <= D (reported as None then), so compare it between methods evaluated on
  sets of the same size, never against published Inception FIDs.
- KID (Bińkowski et al. 2018, "Demystifying MMD GANs", arXiv:1801.01401): unbiased MMD with
  the cubic polynomial kernel, mean ± std over random subsets of half the smaller set (at most
  1000), so that small classes still get a value and the std is not trivially 0.
- Precision / recall on k-NN manifolds (Kynkäänniemi et al. 2019, "Improved Precision and
  Recall Metric for Assessing Generative Models", arXiv:1904.06991).
- Diversity: mean pairwise MS-SSIM within a class (Wang, Simoncelli & Bovik 2003,
  "Multiscale structural similarity for image quality assessment"); lower = more diverse.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from busynth.data.transforms import map_batches, to_tensor

# torchmetrics is imported inside the functions that use it: importing it takes seconds, paid by
# every process that imports the study code (each Ray worker too) and needed only when scoring.

logger = logging.getLogger(__name__)

# Wang et al. 2003, Table 1: the weights of scales 1..5 (finest first).
WANG_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


@dataclass(frozen=True)
class FidelitySettings:
    """Knobs of the fidelity and memorisation scores (saved into every fidelity.json)."""

    nn_k: int = 3  # k of the k-NN manifolds (Kynkäänniemi et al. use 3)
    kid_subsets: int = 100
    kid_max_subset: int = 1000  # Bińkowski et al.'s subset size; smaller sets use their own size
    # random pairs per class for mean pairwise MS-SSIM (Odena et al. 2017, arXiv:1610.09585, use 100)
    diversity_pairs: int = 200
    memorization_percentile: float = 5.0
    pixel_size: int = 32  # side of the downsampled images for pixel-space memorisation
    n_closest: int = 8  # closest synthetic-training pairs kept as PNGs
    seed: int = 0

    def to_dict(self) -> dict:
        """The settings as a plain dict."""
        return asdict(self)


class PrecomputedFeatures(nn.Module):
    """Identity ``feature`` module for torchmetrics: the 'images' passed are already features."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The input (N, D), unchanged."""
        return x


@torch.no_grad()
def extract_features(model: nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """float64 (N, D) penultimate features of uint8 images (N, S, S) from ``model.features``."""
    model.eval()
    device = next(model.parameters()).device
    chunks = map_batches(lambda x: model.features(x).double(), images, batch_size, device)
    if not chunks:
        return np.zeros((0, int(getattr(model, "feature_dim", 0))))
    return torch.cat(chunks).numpy()


def fid(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N >= 2 each), computed
    by torchmetrics' FrechetInceptionDistance on precomputed features (float64)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), reset_real_features=True)
    metric.update(torch.from_numpy(np.asarray(real, dtype=np.float64)), real=True)
    metric.update(torch.from_numpy(np.asarray(fake, dtype=np.float64)), real=False)
    return float(metric.compute())


def kid(real: np.ndarray, fake: np.ndarray, subsets: int = 100, max_subset: int = 1000,
        seed: int = 0) -> tuple[float, float, int]:
    """KID (mean, std over ``subsets`` random subsets, subset size) via torchmetrics'
    KernelInceptionDistance. The subset size is min(max_subset, half the smaller set, at least
    2): proper subsets, so the std says how much KID varies with the images drawn (a subset as
    large as the set would repeat the same value). Needs >= 2 per set."""
    size = int(min(max_subset, max(2, min(len(real), len(fake)) // 2)))
    with warnings.catch_warnings():  # "will save all extracted features": they are ours already
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        from torchmetrics.image.kid import KernelInceptionDistance

        metric = KernelInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), subsets=subsets,
                                         subset_size=size, reset_real_features=True)
    metric.update(torch.from_numpy(np.asarray(real, dtype=np.float64)), real=True)
    metric.update(torch.from_numpy(np.asarray(fake, dtype=np.float64)), real=False)
    with torch.random.fork_rng(devices=[]), _one_thread():  # subsets come from torch's global RNG
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std), size


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch single-threaded inside: KID is hundreds of small matrix products, for which
    thread start-up costs more than the work (and far more on a busy, shared CPU)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _kth_neighbour_radii(points: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(points, points)
    return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is its own 0-th neighbour


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): precision is the share of fake
    samples inside the real manifold (union of balls reaching each real sample's k-th nearest
    real neighbour), recall the share of real samples inside the fake manifold. Each set needs
    more than ``k`` samples. Returns (precision, recall).

    Written here on purpose: torchmetrics has no precision/recall for generative models, and the
    libraries that have it (torch-fidelity's ``calculate_precision_recall_part``, piq) require
    torchvision, whose install would replace the project's pinned CPU torch build; prdc has not
    been released since 2020. The method is a few lines of ``torch.cdist``.
    """
    r = torch.from_numpy(np.asarray(real, dtype=np.float64))
    f = torch.from_numpy(np.asarray(fake, dtype=np.float64))
    if len(r) <= k or len(f) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, got {len(r)} and {len(f)}")
    cross = torch.cdist(f, r)  # (F, R)
    precision = (cross <= _kth_neighbour_radii(r, k)[None, :]).any(dim=1).double().mean()
    recall = (cross.T <= _kth_neighbour_radii(f, k)[None, :]).any(dim=1).double().mean()
    return float(precision), float(recall)


def ms_ssim_params(size: int, sigma: float = 1.0) -> tuple[float, int, tuple[float, ...]]:
    """(sigma, window, betas) for MS-SSIM on size x size images. Wang et al. use an 11-px window
    (sigma 1.5) and 5 scales for images of ~256 px; for 32-128 px images we use sigma 1.0 (a 9-px
    window under torchmetrics' 3.5-sigma rule) and as many of Wang's scales as keep the coarsest
    scale at least one window wide (4 at 128 px, 3 at 64 px, 2 at 32 px), with Wang's weights
    renormalised to sum 1. Raises ValueError when not even 2 scales fit (below 18 px)."""
    window = int(3.5 * sigma + 0.5) * 2 + 1
    scales = 1
    while scales < len(WANG_BETAS) and size / 2**scales >= window:
        scales += 1
    if scales < 2:
        raise ValueError(f"MS-SSIM needs images of at least {2 * window} px, got {size}")
    betas = WANG_BETAS[:scales]
    return sigma, window, tuple(b / sum(betas) for b in betas)


def ms_ssim_pairs(a: np.ndarray, b: np.ndarray, chunk: int = 64) -> np.ndarray:
    """float64 (N,): MS-SSIM of image a[i] vs b[i] for uint8 images (N, S, S) (1 = identical),
    computed in float32 chunks (CPU convolution memory grows with the batch)."""
    if len(a) == 0:
        return np.zeros(0)
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    sigma, window, betas = ms_ssim_params(min(a.shape[1:]))
    values = [
        multiscale_structural_similarity_index_measure(
            to_tensor(a[k:k + chunk]), to_tensor(b[k:k + chunk]), data_range=1.0, sigma=sigma,
            kernel_size=window, betas=betas, reduction="none", normalize="relu",
        )
        for k in range(0, len(a), chunk)
    ]
    return torch.cat(values).double().numpy()


def diversity(images: np.ndarray, max_pairs: int = 200, seed: int = 0) -> float | None:
    """Mean pairwise MS-SSIM of uint8 images (N, S, S), over all pairs or ``max_pairs`` distinct
    random ones; lower = more diverse. None for fewer than 2 images."""
    n = len(images)
    if n < 2:
        return None
    total = n * (n - 1) // 2
    if total <= max_pairs:
        i, j = np.triu_indices(n, k=1)
    else:
        picks = np.random.default_rng(seed).choice(total, size=max_pairs, replace=False)
        i, j = _pair_from_index(picks, n)
    return float(np.mean(ms_ssim_pairs(images[i], images[j])))


def _pair_from_index(k: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Map linear indices of the upper triangle (row-major, no diagonal) to (i, j)."""
    i, j = np.triu_indices(n, k=1)
    return i[k], j[k]


def compare_feature_sets(real: np.ndarray, fake: np.ndarray, settings: FidelitySettings) -> dict:
    """FID, KID (mean, std, subset size), precision and recall of ``fake`` against ``real``
    features; a score the set sizes do not allow is None and explained under 'notes'."""
    out: dict = {"n_real": len(real), "n_fake": len(fake), "fid": None, "kid_mean": None,
                 "kid_std": None, "kid_subset_size": None, "precision": None, "recall": None}
    notes = []
    dim = real.shape[1] if real.ndim == 2 else 0
    if min(len(real), len(fake)) > dim:
        out["fid"] = _finite(fid(real, fake))
    else:  # the covariance of fewer points than dimensions is singular: FID would mostly measure N
        notes.append(f"FID needs more images per set than feature dimensions ({dim})")
    if min(len(real), len(fake)) >= 2:
        out["kid_mean"], out["kid_std"], out["kid_subset_size"] = kid(
            real, fake, settings.kid_subsets, settings.kid_max_subset, settings.seed)
    else:
        notes.append("KID needs at least 2 images per set")
    if min(len(real), len(fake)) > settings.nn_k:
        out["precision"], out["recall"] = precision_recall(real, fake, settings.nn_k)
    else:
        notes.append(f"precision/recall need more than k={settings.nn_k} images per set")
    if notes:
        out["notes"] = notes
    return out


def compare_by_class(real: np.ndarray, real_labels: Sequence[str], fake: np.ndarray,
                     fake_labels: Sequence[str], classes: Sequence[str], settings: FidelitySettings) -> dict:
    """``{"per_class": {class: scores}, "overall": scores}`` of :func:`compare_feature_sets`."""
    real_labels, fake_labels = np.asarray(real_labels), np.asarray(fake_labels)
    per_class = {c: compare_feature_sets(real[real_labels == c], fake[fake_labels == c], settings) for c in classes}
    return {"per_class": per_class, "overall": compare_feature_sets(real, fake, settings)}


def diversity_by_class(images: np.ndarray, labels: Sequence[str], classes: Sequence[str],
                       settings: FidelitySettings) -> dict:
    """``{class: mean pairwise MS-SSIM or None}`` plus ``"overall"``: the mean of the classes' values."""
    labels = np.asarray(labels)
    out = {c: diversity(images[labels == c], settings.diversity_pairs, settings.seed) for c in classes}
    values = [v for v in out.values() if v is not None]
    out["overall"] = float(np.mean(values)) if values else None
    return out


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None
