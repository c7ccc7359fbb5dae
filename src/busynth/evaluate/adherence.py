"""Control adherence: do images follow their lesion masks? Scored on generated and real pairs alike.

Breast lesions are mostly hypoechoic: darker than the tissue around them (BI-RADS
ultrasound lexicon, ACR 2013). For each image--mask pair the score is the signed
contrast-to-noise ratio between a ring of tissue just outside the mask and the mask itself,

    CNR = (mean_ring - mean_inside) / sqrt(var_inside + var_ring)

(the usual lesion CNR of ultrasound imaging, e.g. Patterson & Foster, "The improvement and
quantitative assessment of B-mode images produced by an annular array/cone hybrid",
Ultrasonic Imaging 1983), positive when the inside is darker. A generator whose images ignore
their masks can still score high if it draws a dark blob where lesions usually are, so every
summary also scores the same images against *shuffled* masks (each image paired with another
image's mask of the same set); ``gap`` = matched - shuffled is the part of the contrast that
follows the given mask. Real training pairs of the same fold are scored the same way for
reference. Images with an empty mask (normal) are counted, not scored.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from busynth.data.records import Record
from busynth.data.transforms import resize_image, resize_mask
from busynth.io import read_json, write_json
from busynth.registry import cell_folder, cell_key

logger = logging.getLogger(__name__)

ADHERENCE_JSON = "adherence.json"


@dataclass(frozen=True)
class AdherenceSettings:
    """How pairs are scored: working size, ring width (share of the side), decision threshold."""

    size: int = 128
    ring_fraction: float = 0.05
    min_pixels: int = 4  # fewer pixels inside the mask or in the ring: the pair is not scored
    threshold: float = 0.25  # CNR above this counts as "adherent" (inside clearly darker)
    seed: int = 0


def ring_around(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels outside ``mask`` within Euclidean distance ``width`` of it: bool, shaped like ``mask``."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.zeros_like(mask)
    return (ndimage.distance_transform_edt(~mask) <= width) & ~mask


def contrast_to_noise(image: np.ndarray, mask: np.ndarray, width: int, min_pixels: int = 4) -> float:
    """Signed CNR (mean of the ring minus mean inside, over the pooled std) of one pair; positive when
    the inside is darker. Returns NaN when the mask or its ring has fewer than ``min_pixels`` pixels."""
    mask = np.asarray(mask, dtype=bool)
    ring = ring_around(mask, width)
    if mask.sum() < min_pixels or ring.sum() < min_pixels:
        return float("nan")
    x = np.asarray(image, dtype=np.float64)
    inside, outside = x[mask], x[ring]
    noise = np.sqrt(inside.var() + outside.var())
    return float((outside.mean() - inside.mean()) / max(noise, 1e-6))


def _scores(images: np.ndarray, masks: np.ndarray, width: int, min_pixels: int) -> np.ndarray:
    return np.array([contrast_to_noise(im, m, width, min_pixels) for im, m in zip(images, masks, strict=True)])


def _stats(values: np.ndarray, threshold: float) -> dict[str, float]:
    v = values[np.isfinite(values)]
    if len(v) == 0:
        return {"cnr_mean": float("nan"), "cnr_sd": float("nan"), "cnr_median": float("nan"),
                "darker_share": float("nan"), "adherent_share": float("nan")}
    return {"cnr_mean": float(v.mean()), "cnr_sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "cnr_median": float(np.median(v)), "darker_share": float((v > 0).mean()),
            "adherent_share": float((v > threshold).mean())}


def control_adherence(images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None],
                      settings: AdherenceSettings | None = None) -> dict[str, Any]:
    """Score image--mask pairs (uint8 / bool (H, W), any sizes; resized to ``settings.size``).

    Returns ``{"n": pairs, "n_scored": pairs with a usable mask, "cnr_mean", "cnr_sd", "cnr_median",
    "darker_share" (CNR > 0), "adherent_share" (CNR > threshold), "shuffled_cnr_mean" (the same images
    against other pairs' masks), "gap" (cnr_mean - shuffled_cnr_mean)}``; NaN where nothing was scored.
    """
    s = settings or AdherenceSettings()
    width = max(2, round(s.ring_fraction * s.size))
    keep = [i for i, m in enumerate(masks) if m is not None and np.asarray(m).any()]
    out: dict[str, Any] = {"n": len(images)}
    ims = (np.stack([resize_image(np.asarray(images[i]), s.size) for i in keep]) if keep
           else np.zeros((0, s.size, s.size)))
    ms = np.stack([resize_mask(np.asarray(masks[i], dtype=bool), s.size) for i in keep]) if keep else ims.astype(bool)
    matched = _scores(ims, ms, width, s.min_pixels)
    out["n_scored"] = int(np.isfinite(matched).sum())
    out.update(_stats(matched, s.threshold))
    shuffled = np.full(0, np.nan)
    if len(keep) > 1:  # a cyclic shift by a random offset: no image keeps its own mask
        shift = int(np.random.default_rng(s.seed).integers(1, len(keep)))
        shuffled = _scores(ims, np.roll(ms, shift, axis=0), width, s.min_pixels)
    shuffled_mean = _stats(shuffled, s.threshold)["cnr_mean"]
    out["shuffled_cnr_mean"] = shuffled_mean
    out["gap"] = out["cnr_mean"] - shuffled_mean
    return out


def adherence_by_class(records: Sequence[Record], classes: Sequence[str],
                       settings: AdherenceSettings | None = None) -> dict[str, Any]:
    """:func:`control_adherence` of records (image + mask) overall and per class; returns
    ``{"overall": {...}, "per_class": {class: {...}}}``."""
    def score(rs: Sequence[Record]) -> dict[str, Any]:
        return control_adherence([r.image for r in rs], [r.mask for r in rs], settings)

    return {"overall": score(records), "per_class": {c: score([r for r in records if r.label == c]) for c in classes}}


def evaluate_adherence(run_dir: Path, method: str, fold: int, seed: int, classes: Sequence[str],
                       train: Sequence[Record], synthetic: Sequence[Record],
                       settings: AdherenceSettings | None = None) -> dict[str, Any] | None:
    """Write ``cells/<method>/fold<f>_seed<s>/adherence.json`` for a generator cell whose synthetic
    images carry masks: the generated pairs and, for reference, the fold's real training pairs, per
    class. Returns its content (an existing complete file is returned as is), or None (nothing
    written) when no synthetic image has a mask."""
    out_path = cell_folder(run_dir, method, cell_key(fold, seed)) / ADHERENCE_JSON
    if out_path.is_file() and (done := read_json(out_path)).get("status") == "ok":
        return done
    if not any(r.mask is not None for r in synthetic):
        return None
    s = settings or AdherenceSettings(seed=seed)
    result = {"method": method, "fold": fold, "seed": seed, "classes": list(classes), "status": "ok",
              "settings": asdict(s),
              "generated": adherence_by_class(synthetic, classes, s),
              "real_train": adherence_by_class([r for r in train if r.mask is not None], classes, s)}
    gen, real = result["generated"]["overall"], result["real_train"]["overall"]
    logger.info("control adherence of %s fold%d_seed%d: CNR %.3f (shuffled %.3f), real pairs %.3f (shuffled %.3f)",
                method, fold, seed, gen["cnr_mean"], gen["shuffled_cnr_mean"], real["cnr_mean"],
                real["shuffled_cnr_mean"])
    write_json(out_path, result)
    return result
