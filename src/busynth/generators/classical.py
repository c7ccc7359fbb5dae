"""Classical augmentation: randomly transformed copies of training images (the baseline).

Each sample picks a training image of the requested class and applies a horizontal flip,
a small rotation, translation and scale (one affine warp), then a gamma and contrast change
and multiplicative log-normal noise, a simple stand-in for speckle, whose intensity is
multiplicative (Goodman, "Speckle Phenomena in Optics", 2007). The lesion mask goes through
the same warp, so the copies are image-mask pairs too. Its "model" is the training images
themselves, stored in the artifact folder so that ``load`` needs nothing else.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from busynth.config import ClassicalConfig
from busynth.data.records import Record
from busynth.data.transforms import resize_mask, stack_images
from busynth.generators.base import Generator, Synthetic, read_generator_info, save_generator_info
from busynth.io import atomic_path

log = logging.getLogger(__name__)


def affine_matrix(size: int, angle_deg: float, shift: tuple[float, float], scale: float, flip: bool) -> tuple:
    """PIL's inverse affine coefficients for flip, rotate, scale about the centre, then shift (pixels)."""
    c = (size - 1) / 2.0
    a = math.radians(angle_deg)
    cos, sin = math.cos(a) / scale, math.sin(a) / scale
    fx = -1.0 if flip else 1.0
    # output (x, y) -> input: flip(rotate^-1(scale^-1((x, y) - c - shift))) + c
    dx, dy = -c - shift[0], -c - shift[1]
    row0 = (fx * cos, fx * sin, fx * (cos * dx + sin * dy) + c)
    row1 = (-sin, cos, -sin * dx + cos * dy + c)
    return (*row0, *row1)


def augment_pair(image: np.ndarray, mask: np.ndarray | None, cfg: ClassicalConfig,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """One random augmented copy of a uint8 square image (and its bool mask)."""
    size = image.shape[0]
    flip = bool(cfg.hflip and rng.random() < 0.5)
    angle = rng.uniform(-cfg.max_rotation, cfg.max_rotation)
    shift = tuple(rng.uniform(-cfg.max_translate, cfg.max_translate, size=2) * size)
    scale = rng.uniform(*cfg.scale_range)
    coeffs = affine_matrix(size, angle, shift, scale, flip)
    warped = Image.fromarray(image).transform((size, size), Image.AFFINE, coeffs, resample=Image.BILINEAR)
    x = np.asarray(warped, dtype=np.float32) / 255.0
    x = x ** rng.uniform(*cfg.gamma_range)
    mean = float(x.mean())
    x = (x - mean) * rng.uniform(*cfg.contrast_range) + mean
    if cfg.speckle_std > 0:
        x = x * np.exp(rng.normal(0.0, cfg.speckle_std, size=x.shape)).astype(np.float32)
    out = np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)
    out_mask = None
    if mask is not None:
        m = Image.fromarray(mask.astype(np.uint8) * 255).transform(
            (size, size), Image.AFFINE, coeffs, resample=Image.NEAREST
        )
        out_mask = np.asarray(m) > 127
    return out, out_mask


class ClassicalAugmenter(Generator):
    """Method ``classical``: augmented copies of the fold's training images."""

    name = "classical"
    config_model = ClassicalConfig

    def fit(self, train_records: Sequence[Record], out_dir: Path, seed: int = 0) -> Path:
        """Store the training images at ``image_size``; returns the artifact folder."""
        self._remember_training_ids(train_records)
        size = self.config.image_size
        self.images = stack_images(train_records, size)
        self.masks = np.stack([
            resize_mask(r.mask, size) if r.mask is not None else np.zeros((size, size), bool) for r in train_records
        ])
        self.has_mask = np.array([r.mask is not None for r in train_records])
        self.labels = [r.label for r in train_records]
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {
            "images": torch.from_numpy(self.images),
            "masks": torch.from_numpy(self.masks),
            "has_mask": torch.from_numpy(self.has_mask),
            "labels": torch.tensor([self.classes.index(lab) for lab in self.labels]),
        }
        with atomic_path(out_dir / "train.safetensors") as tmp:
            save_file(tensors, str(tmp))
        save_generator_info(out_dir, self.name, self.config, {"classes": self.classes, "train_ids": self.train_ids})
        return out_dir

    @classmethod
    def load(cls, directory: Path) -> "ClassicalAugmenter":
        """Rebuild from ``generator.json`` and ``train.safetensors``."""
        info = read_generator_info(directory)
        gen = cls(info["config"], classes=info["classes"])
        tensors = load_file(str(Path(directory) / "train.safetensors"))
        gen.images = tensors["images"].numpy()
        gen.masks = tensors["masks"].numpy()
        gen.has_mask = tensors["has_mask"].numpy()
        gen.labels = [gen.classes[i] for i in tensors["labels"].tolist()]
        gen.train_ids = info["train_ids"]
        return gen

    def sample(self, label: str, n: int, seed: int = 0, masks: Sequence[np.ndarray] | None = None) -> list[Synthetic]:
        """``n`` augmented copies of random training images of ``label``; deterministic for a seed."""
        pool = [i for i, lab in enumerate(self.labels) if lab == label]
        if not pool:
            raise ValueError(f"classical: no training images of class {label!r} (classes: {sorted(set(self.labels))})")
        rng = np.random.default_rng([seed, self.classes.index(label)])
        out = []
        for _ in range(n):
            i = pool[int(rng.integers(len(pool)))]
            image, mask = augment_pair(self.images[i], self.masks[i] if self.has_mask[i] else None, self.config, rng)
            out.append(Synthetic(image=image, label=label, mask=mask, seed=seed))
        return out
