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
from safetensors.torch import save_file

from busynth.checkpoint import read_safetensors
from busynth.config import ClassicalConfig
from busynth.data.augment import AugmentParams, augment_batch
from busynth.data.records import Record
from busynth.data.transforms import from_tensor, resize_mask, stack_images, to_tensor
from busynth.generators.base import Generator, Synthetic, read_generator_info, save_generator_info
from busynth.io import atomic_path

log = logging.getLogger(__name__)


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
