"""Classical augmentation: randomly transformed copies of training images (the baseline).

Each sample picks a training image of the requested class and applies a horizontal flip,
a small rotation, translation and scale (one affine warp), then a gamma and contrast change
and multiplicative noise (``busynth.data.augment``). The lesion mask goes through the same
warp, so the copies are image-mask pairs too. Its "model" is the training images
themselves, stored in the artifact folder so that ``load`` needs nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors.torch import save_file

from busynth.checkpoint import read_safetensors
from busynth.config import positive_range
from busynth.data.augment import AugmentParams, augment_batch
from busynth.data.records import Record
from busynth.data.transforms import from_tensor, resize_mask, stack_images, to_tensor
from busynth.generators.base import Generator, Synthetic, read_generator_info, save_generator_info
from busynth.io import atomic_path

log = logging.getLogger(__name__)


class ClassicalConfig(BaseModel):
    """Settings of method ``classical`` (``generators.classical``): augmented copies of training images."""

    model_config = ConfigDict(extra="forbid")

    # Resolution of the copies; keep it equal to classifier.image_size (larger only costs time).
    image_size: int = Field(default=128, ge=8)
    hflip: bool = True
    max_rotation: float = Field(default=10.0, ge=0.0, le=180.0)
    max_translate: float = Field(default=0.06, ge=0.0, le=0.5)
    scale_range: tuple[float, float] = (0.9, 1.1)
    gamma_range: tuple[float, float] = (0.8, 1.25)
    contrast_range: tuple[float, float] = (0.85, 1.15)
    speckle_std: float = Field(default=0.08, ge=0.0)

    @field_validator("scale_range", "gamma_range", "contrast_range")
    @classmethod
    def _positive_ranges(cls, v: tuple[float, float]) -> tuple[float, float]:
        return positive_range(v)


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
    def load(cls, directory: Path) -> ClassicalAugmenter:
        """Rebuild from ``generator.json`` and ``train.safetensors``."""
        info = read_generator_info(directory, expected=cls.name)
        gen = cls(info["config"], classes=info["classes"])
        tensors, _ = read_safetensors(Path(directory) / "train.safetensors")
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
        generator = torch.Generator().manual_seed(seed * 100 + self.classes.index(label))
        picks = torch.randint(len(pool), (n,), generator=generator).numpy()
        chosen = np.array(pool)[picks]
        params = AugmentParams(**self.config.model_dump(exclude={"image_size"}))
        images, masks = augment_batch(to_tensor(self.images[chosen]), params, generator,
                                      masks=torch.from_numpy(self.masks[chosen]).unsqueeze(1))
        images = from_tensor(images)
        return [
            Synthetic(image=images[k], label=label, mask=masks[k, 0].numpy() if self.has_mask[i] else None, seed=seed)
            for k, i in enumerate(chosen)
        ]
