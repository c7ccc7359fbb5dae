"""The record: one labelled image with its lesion mask, the unit every stage passes around."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, eq=False)
class Record:
    """One image of the data set.

    image: uint8 (H, W) grayscale.
    mask: bool (H, W) lesion mask (union of all mask files; all False for normal images),
        or None for a lesion-class image that has no mask file (kept, never dropped).
    label: class name; id: stable identifier such as ``benign_433``;
    path: source file (relative to the data set root) or ``phantom:<id>``.
    meta: extra facts from loading (original mode and size, mask files, overlay flag).
    """

    id: str
    label: str
    image: np.ndarray
    mask: np.ndarray | None
    path: str
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.image.ndim != 2 or self.image.dtype != np.uint8:
            raise ValueError(f"{self.id}: image must be uint8 (H, W), got {self.image.dtype} {self.image.shape}")
        if self.mask is not None and (self.mask.shape != self.image.shape or self.mask.dtype != bool):
            raise ValueError(f"{self.id}: mask must be bool with the image's shape")

    @property
    def has_mask(self) -> bool:
        """True when a lesion mask is known (possibly empty)."""
        return self.mask is not None


def class_counts(records: Iterable[Record], classes: Sequence[str] | None = None) -> dict[str, int]:
    """Number of records per class, in the given class order when one is given."""
    counts = Counter(r.label for r in records)
    if classes is None:
        return dict(sorted(counts.items()))
    return {c: counts.get(c, 0) for c in classes}


def by_id(records: Iterable[Record]) -> dict[str, Record]:
    """Map id -> record, refusing duplicate ids."""
    out: dict[str, Record] = {}
    for r in records:
        if r.id in out:
            raise ValueError(f"duplicate record id {r.id!r} ({out[r.id].path} and {r.path})")
        out[r.id] = r
    return out
