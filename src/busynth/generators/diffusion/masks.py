"""Lesion masks to sample a mask-conditioned generator (ControlNet) with: new layouts from training masks.

The masks of a fold's training part are drawn (seeded, with replacement) and transformed so
that generated image--mask pairs are not copies of training layouts:

* a random affine warp -- horizontal flip, rotation and scale about the image centre --
  reusing the batched warp of :mod:`busynth.data.augment` (nearest-neighbour resampling);
* an elastic deformation (Simard, Steinkraus & Platt, "Best Practices for Convolutional
  Neural Networks Applied to Visual Document Analysis", ICDAR 2003): a random displacement
  field, smoothed with a Gaussian of standard deviation ``sigma`` and scaled by ``alpha``.
  Unlike the paper, the smoothed field is normalised to unit standard deviation first, so
  ``alpha`` is the root-mean-square displacement and means the same for every ``sigma``;
  both are given as shares of the image side, so a setting means the same at 128 and 512 px.

With ``source: shape_model`` the masks are instead new outlines drawn from a statistical shape
model of the class's training masks (:mod:`busynth.generators.diffusion.shapes`), used as drawn.

Everything is a pure function of its inputs and a seed. Empty masks (normal images) stay
empty under every transform; a lesion mask that a warp would push out of the image is kept
untransformed instead, so a lesion class never gets an empty mask by accident.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from scipy import ndimage

from busynth.config import positive_range
from busynth.data.augment import AugmentParams, random_affine_grid, warp
from busynth.data.transforms import resize_mask
from busynth.generators.diffusion.shapes import ShapeModel
from busynth.io import derived_seed

logger = logging.getLogger(__name__)

_MASK_STREAM = 1_000_003  # seeds of the mask draws and transforms, apart from the images' noise streams


class MaskTransformConfig(BaseModel):
    """Where sampling masks come from, and their random transforms (all off: training masks are used
    as they are)."""

    model_config = ConfigDict(extra="forbid")

    # training: a class's training masks, drawn and transformed; shape_model: new outlines drawn from
    # a shape model fitted to them (position, size, orientation, outline; the transforms are not applied).
    source: Literal["training", "shape_model"] = "training"

    hflip: bool = True
    max_rotation: float = Field(default=15.0, ge=0.0, le=180.0)  # degrees, uniform in [-max, max]
    scale_range: tuple[float, float] = (0.85, 1.15)
    # Elastic deformation (Simard et al. 2003): rms displacement and smoothness, shares of the side.
    elastic_alpha: float = Field(default=0.02, ge=0.0)
    elastic_sigma: float = Field(default=0.08, gt=0.0)

    @field_validator("scale_range")
    @classmethod
    def _positive_scales(cls, v: tuple[float, float]) -> tuple[float, float]:
        return positive_range(v)

    @property
    def is_identity(self) -> bool:
        """True when no setting changes a mask."""
        return (self.source == "training" and not self.hflip and self.max_rotation == 0.0
                and tuple(self.scale_range) == (1.0, 1.0)
                and self.elastic_alpha == 0.0)


def resize_masks(masks: Sequence[np.ndarray | None], size: int) -> np.ndarray:
    """Masks (each bool (H, W), None for an unknown mask = empty) as bool (N, size, size), nearest-neighbour."""
    out = np.zeros((len(masks), size, size), dtype=bool)
    for i, mask in enumerate(masks):
        if mask is not None:
            out[i] = resize_mask(np.asarray(mask, dtype=bool), size)
    return out


def affine_masks(masks: np.ndarray, cfg: MaskTransformConfig, seed: int) -> np.ndarray:
    """Random flip, rotation and scale about the centre of each mask (N, S, S); returns bool (N, S, S)."""
    if len(masks) == 0:
        return masks.astype(bool)
    params = AugmentParams(hflip=cfg.hflip, max_rotation=cfg.max_rotation, max_translate=0.0,
                           scale_range=tuple(cfg.scale_range))
    generator = torch.Generator().manual_seed(int(seed))
    grid = random_affine_grid(len(masks), masks.shape[-1], params, generator)
    x = torch.from_numpy(masks.astype(np.float32))[:, None]
    return (warp(x, grid, nearest=True)[:, 0] > 0.5).numpy()


def elastic_masks(masks: np.ndarray, alpha: float, sigma: float, seed: int) -> np.ndarray:
    """Elastic deformation (Simard et al. 2003) of each mask (N, S, S): a per-mask random
    displacement field smoothed by a Gaussian of ``sigma * S`` px and scaled to an rms of
    ``alpha * S`` px; bilinear resampling, threshold 0.5. Returns bool (N, S, S)."""
    if alpha == 0.0 or len(masks) == 0:
        return masks.astype(bool)
    n, h, w = masks.shape
    rng = np.random.default_rng([int(seed), 1])
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    out = np.empty_like(masks, dtype=bool)
    for i in range(n):
        field = ndimage.gaussian_filter(rng.uniform(-1.0, 1.0, (2, h, w)), (0, sigma * h, sigma * w), mode="reflect")
        field /= field.std(axis=(1, 2), keepdims=True) + 1e-12
        field *= alpha * np.array([h, w], dtype=np.float64)[:, None, None]
        coords = np.stack([rows + field[0], cols + field[1]])
        out[i] = ndimage.map_coordinates(masks[i].astype(np.float32), coords, order=1, mode="constant") > 0.5
    return out


def transform_masks(masks: np.ndarray, cfg: MaskTransformConfig, seed: int) -> np.ndarray:
    """Affine warp then elastic deformation of bool masks (N, S, S), deterministic for ``seed``;
    returns bool (N, S, S). A lesion mask left empty by the warp is returned unchanged."""
    masks = np.asarray(masks, dtype=bool)
    if cfg.is_identity or len(masks) == 0:
        return masks.copy()
    out = affine_masks(masks, cfg, seed)
    out = elastic_masks(out, cfg.elastic_alpha, cfg.elastic_sigma, seed)
    lost = masks.any(axis=(1, 2)) & ~out.any(axis=(1, 2))
    if lost.any():
        logger.debug("%d mask(s) left the image under the transform; kept untransformed", int(lost.sum()))
        out[lost] = masks[lost]
    return out


def draw_masks(pool: Sequence[np.ndarray | None], n: int, seed: int) -> list[np.ndarray | None]:
    """``n`` masks drawn from ``pool`` with replacement (seeded); an empty pool gives ``n`` Nones (empty masks)."""
    if not pool:
        return [None] * n
    idx = np.random.default_rng([int(seed), 0]).integers(len(pool), size=n)
    return [pool[i] for i in idx]


def sampling_masks(pool: Sequence[np.ndarray | None], n: int, size: int, cfg: MaskTransformConfig,
                   seed: int, stream: int = 0) -> np.ndarray:
    """``n`` masks for sampling at ``size`` px: ``pool`` itself, in order, when it holds ``n`` masks,
    else ``n`` drawn from it (a class's training masks) with replacement; resized, and mask i transformed
    with its own seed, derived from (``seed``, ``stream`` (e.g. the class), i). With ``cfg.source``
    ``shape_model`` (and a pool with a lesion), ``n`` new outlines from a shape model fitted to the pool
    instead. Returns bool (n, size, size); empty masks (normal images, or an empty pool) stay all False."""
    if cfg.source == "shape_model" and any(m is not None and m.any() for m in pool):
        model = ShapeModel.fit([m for m in pool if m is not None])
        return model.sample(n, size, np.random.default_rng([derived_seed(seed, _MASK_STREAM, stream), 2]))
    chosen = list(pool) if len(pool) == n else draw_masks(pool, n, derived_seed(seed, _MASK_STREAM, stream))
    resized = resize_masks(chosen, size)
    if not n:
        return resized
    return np.stack([transform_masks(m[None], cfg, derived_seed(seed, _MASK_STREAM + 1 + stream, i))[0]
                     for i, m in enumerate(resized)])
