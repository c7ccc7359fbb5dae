"""Loader for data sets in the Kaggle BUSI layout.

``<root>/<class>/<class> (N).png`` with lesion masks ``<class> (N)_mask.png``,
``<class> (N)_mask_1.png``, ... (the lesion mask of an image is the union of its mask
files). Grayscale, RGB, RGBA, palette, 16-bit and 1-bit PNGs are all accepted; images
become uint8 grayscale. Every file under the root is accounted for in the summary:
read, or skipped with the reason, or the load stops with a message naming the file.
"""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from busynth.config import DataConfig
from busynth.data.records import Record
from busynth.errors import DataError
from busynth.io import write_png

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
# Files that operating systems drop into folders; skipped (and counted) rather than refused.
SYSTEM_FILES = {".DS_Store", "Thumbs.db", "desktop.ini"}
_NAME = re.compile(r"^(?P<cls>.+?) \((?P<num>\d+)\)(?P<mask>_mask(?:_(?P<k>\d+))?)?$")


@dataclass
class LoadSummary:
    """What happened to every file under the root."""

    root: str
    files_seen: int = 0
    images_read: int = 0
    masks_read: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    per_class: dict[str, int] = field(default_factory=dict)
    without_mask: list[str] = field(default_factory=list)
    # Lesion-class images whose mask files hold no lesion pixel (ids).
    empty_mask: list[str] = field(default_factory=list)
    multi_mask: int = 0
    modes: dict[str, int] = field(default_factory=dict)

    def skip(self, path: Path | str, reason: str) -> None:
        """Record a skipped file and why."""
        self.skipped.append({"path": str(path), "reason": reason})

    def to_dict(self) -> dict:
        """Plain-dict form for JSON."""
        skipped_by_reason = Counter(s["reason"].split(":")[0] for s in self.skipped)
        return {**self.__dict__, "skipped_count": len(self.skipped), "skipped_by_reason": dict(skipped_by_reason)}

    def format(self) -> str:
        """A readable multi-line summary."""
        lines = [
            f"data set: {self.root}",
            (f"  files seen: {self.files_seen}; images read: {self.images_read}; "
             f"mask files read: {self.masks_read}; skipped: {len(self.skipped)}"),
            "  per class: " + ", ".join(f"{c} {n}" for c, n in self.per_class.items()),
        ]
        if self.multi_mask:
            lines.append(f"  images with several mask files (union taken): {self.multi_mask}")
        if self.without_mask:
            lines.append(f"  lesion images without a mask (kept, mask unknown): {len(self.without_mask)}")
        if self.empty_mask:
            lines.append(f"  lesion images whose mask is empty (kept): {len(self.empty_mask)}")
        for s in self.skipped:
            lines.append(f"  skipped {s['path']}: {s['reason']}")
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        return "\n".join(lines)


@dataclass
class LoadResult:
    """Records in class order then number, and the summary of the load."""

    records: list[Record]
    summary: LoadSummary


def read_grayscale(path: Path, max_pixels: int) -> tuple[np.ndarray, dict]:
    """Read any supported image file as uint8 (H, W) plus facts about the original.

    Refuses, with a DataError naming the file, images above ``max_pixels`` (checked from the
    header before decoding), truncated or unreadable files. For colour files the facts
    include a histogram of the per-pixel channel spread (max - min over R, G, B), which the
    audit uses to find coloured overlays without re-reading the file.
    """
    return _read_image(path, max_pixels, _to_gray)


def read_mask(path: Path, max_pixels: int) -> np.ndarray:
    """The lesion of a mask file as bool (H, W): every pixel at least half as bright as the
    brightest one, brightness being the largest of R, G, B (so a mask drawn in any colour on
    black counts, not only white: pure red has a luminance of 76 and would vanish under a
    grey threshold). 0/255 and 0/1 masks alike; an all-black file gives an empty mask.
    Refuses bad files as :func:`read_grayscale` does."""
    value, _ = _read_image(path, max_pixels, _to_brightest_channel)
    top = int(value.max())
    if top == 0:
        return np.zeros(value.shape, dtype=bool)
    return value.astype(np.int32) * 2 > top


def _read_image(path: Path, max_pixels: int, convert) -> tuple[np.ndarray, dict]:
    try:
        with Image.open(path) as im:
            w, h = im.size
            # PIL only warns between its limit and twice that; refuse there too
            limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
            if w * h > limit:
                raise DataError(
                    f"{path}: {w}x{h} = {w * h} pixels exceeds the limit of {limit} "
                    "(data.max_pixels; possible decompression bomb)"
                )
            mode = im.mode
            im.load()
            info = {"mode": mode, "width": w, "height": h}
            gray = convert(im, info)
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: refused as a decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image file PIL can identify") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: unreadable or truncated image ({exc})") from None
    return gray, info


def _flatten_modes(im: Image.Image) -> Image.Image | np.ndarray:
    """16/32-bit integer images scaled to uint8 by their maximum (an array); transparent pixels
    composited onto black; other images unchanged."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        top = arr.max() if arr.max() > 0 else 1.0
        return np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        background = Image.new("RGBA", im.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, im.convert("RGBA"))
    return im


def _to_brightest_channel(im: Image.Image, info: dict) -> np.ndarray:
    im = _flatten_modes(im)
    if isinstance(im, np.ndarray):
        return im
    if im.mode in ("L", "1"):
        return np.asarray(im.convert("L"), dtype=np.uint8)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).max(axis=2)


def _to_gray(im: Image.Image, info: dict) -> np.ndarray:
    im = _flatten_modes(im)
    if isinstance(im, np.ndarray):
        return im
    if im.mode not in ("L", "1"):
        rgb = np.asarray(im.convert("RGB"))
        spread = rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2)
        info["channel_spread_hist"] = np.bincount(spread.ravel(), minlength=256).tolist()
    return np.asarray(im.convert("L"), dtype=np.uint8)


def _parse_name(path: Path) -> tuple[str, int, bool] | None:
    match = _NAME.match(path.stem)
    if match is None:
        return None
    return match["cls"], int(match["num"]), match["mask"] is not None


def _fail_or_skip(config: DataConfig, summary: LoadSummary, path: Path, reason: str) -> None:
    if config.on_bad_file == "refuse":
        raise DataError(f"{path}: {reason} (set data.on_bad_file=skip to skip such files and list them)")
    log.warning("skipping %s: %s", path, reason)
    summary.skip(path, reason)


def _scan_class_folder(
    folder: Path, cls: str, config: DataConfig, summary: LoadSummary
) -> tuple[dict[int, Path], dict[int, list[Path]]]:
    """Sort a class folder into images and masks by number; refuse or skip everything else."""
    images: dict[int, Path] = {}
    masks: dict[int, list[Path]] = defaultdict(list)
    for path in sorted(folder.iterdir()):
        summary.files_seen += 1
        if path.name in SYSTEM_FILES or path.name.startswith("._"):
            summary.skip(path, "system file")
            continue
        if path.is_dir():
            _fail_or_skip(config, summary, path, "unexpected sub-folder in a class folder")
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            _fail_or_skip(config, summary, path, "not an image file (unexpected suffix)")
            continue
        parsed = _parse_name(path)
        if parsed is None:
            _fail_or_skip(
                config, summary, path, f"file name does not parse as '{cls} (N).png' or '{cls} (N)_mask.png'"
            )
            continue
        name_cls, num, is_mask = parsed
        if name_cls != cls:
            _fail_or_skip(config, summary, path, f"file name says class '{name_cls}' but it is in folder '{cls}'")
            continue
        if is_mask:
            masks[num].append(path)
        elif num in images:
            _fail_or_skip(config, summary, path, f"second image numbered {num} (also {images[num].name})")
        else:
            images[num] = path
    return images, masks


def _load_one(
    cls: str, num: int, image_path: Path, mask_paths: list[Path], root: Path, config: DataConfig
) -> tuple[Record | None, str | None]:
    """Read one image and its masks; return (record, None) or (None, reason) for a bad file."""
    try:
        image, info = read_grayscale(image_path, config.max_pixels)
        mask = None
        for mpath in mask_paths:
            lesion = read_mask(mpath, config.max_pixels)
            if lesion.shape != image.shape:
                raise DataError(
                    f"{mpath}: mask is {lesion.shape[1]}x{lesion.shape[0]} but its image {image_path.name} is "
                    f"{image.shape[1]}x{image.shape[0]}"
                )
            mask = lesion if mask is None else (mask | lesion)
    except DataError as exc:
        return None, str(exc)
    if mask is None and cls in config.normal_classes:
        mask = np.zeros(image.shape, dtype=bool)
    meta = {**info, "mask_files": [str(p.relative_to(root)) for p in mask_paths], "number": num}
    rec = Record(id=f"{cls}_{num}", label=cls, image=image, mask=mask, path=str(image_path.relative_to(root)),
                 meta=meta)
    return rec, None


def load_dataset(root: str | Path, config: DataConfig | None = None, workers: int = 4) -> LoadResult:
    """Load every image and mask under ``root`` (Kaggle BUSI layout) into records.

    Returns a LoadResult whose summary accounts for every file. Raises DataError naming
    the file or folder for: a missing root, a folder that is not a configured class, a
    configured class with no images, and (with ``on_bad_file=refuse``, the default) any
    unreadable, truncated, oversized, mis-named or non-image file, a mask without its image,
    or a mask whose size differs from its image. ``missing_mask=refuse`` also refuses a
    lesion-class image without any mask file; ``warn`` keeps it with ``mask=None``.
    """
    config = config or DataConfig()
    root = Path(root)
    if not root.exists():
        raise DataError(f"data set root {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data set root {root} is not a folder")
    summary = LoadSummary(root=str(root))
    folders = {p.name: p for p in sorted(root.iterdir()) if p.is_dir()}
    for path in sorted(root.iterdir()):
        if not path.is_dir():
            summary.files_seen += 1
            summary.skip(path, "file at the root, not in a class folder")
    unknown = sorted(set(folders) - set(config.classes))
    if unknown:
        raise DataError(
            f"{root}: folder(s) {', '.join(repr(u) for u in unknown)} are not configured classes "
            f"{config.classes} (set data.classes to include them, or move them out)"
        )
    jobs = []
    for cls in config.classes:
        if cls not in folders:
            raise DataError(f"{root}: class '{cls}' has no folder {root / cls}")
        images, masks = _scan_class_folder(folders[cls], cls, config, summary)
        for num in sorted(set(masks) - set(images)):
            for mpath in masks[num]:
                _fail_or_skip(config, summary, mpath, f"mask without its image '{cls} ({num}).png'")
        if not images:
            raise DataError(f"{folders[cls]}: class '{cls}' has no images")
        for num in sorted(images):
            ordered = sorted(masks.get(num, []), key=lambda p: (len(p.name), p.name))
            jobs.append((cls, num, images[num], ordered))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(lambda job: _load_one(*job, root, config), jobs))
    records: list[Record] = []
    for (cls, num, image_path, mask_paths), (rec, reason) in zip(jobs, results, strict=True):
        if rec is None:
            assert reason is not None
            if config.on_bad_file == "refuse":
                raise DataError(f"{reason} (set data.on_bad_file=skip to skip such files and list them)")
            summary.skip(image_path, reason.removeprefix(f"{image_path}: "))
            for mpath in mask_paths:
                summary.skip(mpath, f"mask of skipped image: {image_path.name}")
            continue
        summary.images_read += 1
        summary.masks_read += len(mask_paths)
        summary.multi_mask += len(mask_paths) > 1
        summary.modes[rec.meta["mode"]] = summary.modes.get(rec.meta["mode"], 0) + 1
        if rec.mask is None:
            if config.missing_mask == "refuse":
                raise DataError(
                    f"{image_path}: lesion-class image has no mask file '{cls} ({num})_mask.png' "
                    "(set data.missing_mask=warn to keep it without a mask)"
                )
            summary.without_mask.append(rec.id)
            summary.warnings.append(f"{image_path}: no mask file; kept with an unknown mask")
        elif cls not in config.normal_classes and not rec.mask.any():
            summary.empty_mask.append(rec.id)
            summary.warnings.append(f"{image_path}: its mask file(s) {', '.join(p.name for p in mask_paths)} "
                                    "hold no lesion pixel; kept with an empty mask")
        records.append(rec)
    summary.per_class = {c: sum(r.label == c for r in records) for c in config.classes}
    empty = [c for c, n in summary.per_class.items() if n == 0]
    if empty:
        raise DataError(f"{root}: class(es) {empty} have no readable images left after skipping bad files")
    log.info("loaded %d images from %s (%d skipped)", len(records), root, len(summary.skipped))
    return LoadResult(records=records, summary=summary)


# A record id as write_busi_layout names files: '<label>_<n>' -> '<label> (<n>).png'.
_RECORD_ID = re.compile(r"^(?P<label>.+)_(?P<n>[1-9][0-9]*)$")


def write_busi_layout(records: Sequence[Record], root: Path) -> Path:
    """Write records as ``<root>/<class>/<class> (n).png`` plus ``..._mask.png``; returns root.

    n comes from the record id ``<label>_<n>``. Masks are 0/255 PNGs; an empty mask (normal
    images) is written as an all-black file, as in BUSI; a record without a mask gets none.
    """
    root = Path(root)
    seen: set[str] = set()
    for record in records:
        match = _RECORD_ID.match(record.id)
        if match is None or match["label"] != record.label:
            raise ValueError(f"record id {record.id!r} is not '<label>_<n>' with label {record.label!r}")
        name = f"{record.label} ({match['n']})"
        if name in seen:
            raise ValueError(f"two records would both be written as {record.label}/{name}.png")
        seen.add(name)
        write_png(root / record.label / f"{name}.png", record.image)
        if record.mask is not None:
            write_png(root / record.label / f"{name}_mask.png", record.mask)
    log.info("wrote %d records in BUSI layout under %s", len(records), root)
    return root
