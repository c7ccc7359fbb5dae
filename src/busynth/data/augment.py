"""Batched random augmentation on tensors: one affine warp (flip, rotation, scale, shift)
and intensity changes (gamma, contrast, multiplicative noise).

Used twice with different strengths: by the ``classical`` generator to make augmented
copies (images and masks through the same warp), and by the classifier's on-the-fly
``light`` augmentation. Everything draws from an explicit ``torch.Generator`` so that a
seed fixes the result. Works on float tensors (N, C, H, W) in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentParams:
    """Ranges of the random transformations (angles in degrees, shift as a share of the size)."""

    hflip: bool = True
    max_rotation: float = 10.0
    max_translate: float = 0.06
    scale_range: tuple[float, float] = (0.9, 1.1)
    gamma_range: tuple[float, float] = (0.8, 1.25)
    contrast_range: tuple[float, float] = (0.85, 1.15)
    speckle_std: float = 0.08


# The classifier's on-the-fly "light" augmentation, applied to every method's training images alike.
LIGHT = AugmentParams(max_rotation=10.0, max_translate=0.05, scale_range=(0.9, 1.1),
                      gamma_range=(0.85, 1.18), contrast_range=(0.9, 1.1), speckle_std=0.0)
# "strong": wider ranges, in the spirit of nnU-Net's default augmentation (Isensee et al. 2021,
# Nat. Methods 18:203: scaling 0.7-1.4, gamma 0.7-1.5, contrast, noise) but without its large
# rotations, since an ultrasound probe stays at the top of the image.
STRONG = AugmentParams(max_rotation=15.0, max_translate=0.1, scale_range=(0.75, 1.33),
                       gamma_range=(0.7, 1.4), contrast_range=(0.75, 1.3), speckle_std=0.05)
# The on-the-fly augmentations a classifier or segmenter config may name.
ON_THE_FLY = {"light": LIGHT, "strong": STRONG}


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def random_affine_grid(n: int, size: int, params: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    """Sampling grids (N, size, size, 2) for ``F.grid_sample``: a random flip, rotation,
    scale and shift per image, about the image centre."""
    angle = torch.deg2rad(_uniform(n, -params.max_rotation, params.max_rotation, generator))
    scale = _uniform(n, *params.scale_range, generator)
    shift = _uniform(2 * n, -params.max_translate, params.max_translate, generator).view(n, 2) * 2.0
    flip = (torch.rand(n, generator=generator) < 0.5) if params.hflip else torch.zeros(n, dtype=torch.bool)
    sign = 1.0 - 2.0 * flip.float()
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # theta maps output coordinates to input coordinates (normalised to [-1, 1]).
    theta = torch.stack([
        torch.stack([sign * cos, sign * sin, -(cos * shift[:, 0] + sin * shift[:, 1]) * sign], dim=1),
        torch.stack([-sin, cos, sin * shift[:, 0] - cos * shift[:, 1]], dim=1),
    ], dim=1)
    return F.affine_grid(theta, [n, 1, size, size], align_corners=False)


def warp(x: torch.Tensor, grid: torch.Tensor, nearest: bool = False) -> torch.Tensor:
    """Resample images (bilinear) or masks (nearest) with the grids; outside is filled with 0."""
    mode = "nearest" if nearest else "bilinear"
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def jitter_intensity(x: torch.Tensor, params: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    """Random gamma and contrast per image, then multiplicative log-normal noise, a simple
    stand-in for speckle, which is multiplicative (Goodman, *Speckle Phenomena in Optics*, 2007).
    Returns a tensor clipped to [0, 1]."""
    n = x.shape[0]
    gamma = _uniform(n, *params.gamma_range, generator).view(n, 1, 1, 1)
    contrast = _uniform(n, *params.contrast_range, generator).view(n, 1, 1, 1)
    x = x.clamp(min=1e-6) ** gamma
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    if params.speckle_std > 0:
        noise = torch.randn(x.shape, generator=generator) * params.speckle_std
        x = x * torch.exp(noise)
    return x.clamp(0.0, 1.0)


def augment_batch(x: torch.Tensor, params: AugmentParams, generator: torch.Generator,
                  masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Warp and jitter a batch (N, 1, H, W) in [0, 1]; masks (N, 1, H, W) go through the same warp."""
    grid = random_affine_grid(x.shape[0], x.shape[-1], params, generator).to(x.device)
    out = jitter_intensity(warp(x, grid).cpu(), params, generator).to(x.device)
    out_masks = warp(masks.float(), grid, nearest=True) > 0.5 if masks is not None else None
    return out, out_masks
