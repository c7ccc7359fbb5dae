"""The record: one labelled image with its lesion mask, the unit every stage passes around."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from busynth.errors import DataError


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


def check_relative(relative: object, where: str) -> str:
    """Refuse, with a DataError naming ``where``, a path read from a file (a manifest, a split
    file) that could leave the folder it is relative to: a non-string, an empty or absolute path,
    a drive, a home folder or a ``..`` part. Returns ``relative``."""
    if not isinstance(relative, str) or not relative.strip() or "\0" in relative:
        raise DataError(f"{where}: {relative!r} is not a file path")
    posix, windows = PurePosixPath(relative), PureWindowsPath(relative)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or relative.startswith(("/", "\\", "~")):
        raise DataError(f"{where}: {relative!r} is an absolute path; only paths relative to the folder are allowed")
    if ".." in posix.parts or ".." in windows.parts:
        raise DataError(f"{where}: {relative!r} leaves its folder ('..' is not allowed)")
    return relative


def check_inside(folder: str | Path, relative: object, where: str) -> Path:
    """``folder / relative`` after :func:`check_relative`, also refusing a symbolic link that
    resolves outside ``folder``. Returns the path."""
    path = Path(folder) / check_relative(relative, where)
    if not path.resolve().is_relative_to(Path(folder).resolve()):
        raise DataError(f"{where}: {relative!r} resolves outside {folder}")
    return path


def lesion_pairs(records: Sequence[Record]) -> list[Record]:
    """The records whose mask marks a lesion: the image-mask pairs of segmentation (normal images and
    lesion images without a usable mask, which the loader reports, are not segmentation pairs)."""
    return [r for r in records if r.mask is not None and r.mask.any()]
