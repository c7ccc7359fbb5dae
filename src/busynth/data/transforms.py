"""Resizing records to the square working resolution of a model, and tensor conversion."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from busynth.accel import shard_map
from busynth.data.records import Record


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 (H, W) image to (size, size) with antialiased bilinear filtering."""
    if image.shape == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR, reducing_gap=None))


def resize_mask(mask: np.ndarray | None, size: int) -> np.ndarray | None:
    """Resize a bool (H, W) mask to (size, size) with nearest-neighbour filtering."""
    if mask is None or mask.shape == (size, size):
        return mask
    as_img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(as_img.resize((size, size), Image.NEAREST)) > 127


def stack_images(records: Sequence[Record], size: int) -> np.ndarray:
    """uint8 array (N, size, size) of the records' images resized to ``size``."""
    if not records:
        return np.zeros((0, size, size), dtype=np.uint8)
    return np.stack([resize_image(r.image, size) for r in records])


def stack_masks(records: Sequence[Record], size: int) -> np.ndarray:
    """bool array (N, size, size) of the records' masks resized to ``size`` (a missing mask is empty)."""
    empty = np.zeros((size, size), dtype=bool)
    return np.stack([resize_mask(r.mask, size) if r.mask is not None else empty for r in records]) \
        if records else np.zeros((0, size, size), dtype=bool)


def masks_and_flags(records: Sequence[Record], size: int) -> tuple[np.ndarray, np.ndarray]:
    """``stack_masks`` and a bool (N,) flag per record: True where its mask is known (possibly empty)."""
    return stack_masks(records, size), np.array([r.has_mask for r in records], dtype=bool)


def label_indices(records: Sequence[Record], classes: Sequence[str]) -> np.ndarray:
    """int64 array of class indices in ``classes`` order; unknown labels raise ValueError."""
    index = {c: i for i, c in enumerate(classes)}
    try:
        return np.array([index[r.label] for r in records], dtype=np.int64)
    except KeyError as exc:
        raise ValueError(f"label {exc.args[0]!r} is not one of {list(classes)}") from None


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) -> float32 (N, 1, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).float().div_(255.0)


def from_tensor(images: torch.Tensor) -> np.ndarray:
    """float (N, 1, H, W) in [0, 1] -> uint8 (N, H, W), clipping out-of-range values."""
    return images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).squeeze(1).cpu().numpy()


def map_batches(fn: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, batch_size: int,
                device: torch.device) -> list[torch.Tensor]:
    """``fn`` on each batch of uint8 images (N, S, S) as float tensors on ``device``, results on the
    CPU, in order; under ``accelerate launch`` each process computes its share of the batches and
    every process gets all of them (``accel.shard_map``)."""
    starts = range(0, len(images), batch_size)
    return shard_map(lambda k: fn(to_tensor(images[starts[k]:starts[k] + batch_size]).to(device)).cpu(), len(starts))
