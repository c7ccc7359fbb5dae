"""Shared fixtures: a tiny BUSI-layout folder, small phantom data, and the real BUSI copy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from busynth.config import PhantomConfig
from busynth.data.records import Record

BUSI_ROOT = (Path(__file__).parents[1].parent / "shared/data/Dataset_BUSI_with_GT").resolve()
TINY_SIZE = 8  # 8x8 px: 64 pixels, so data.max_pixels=100 refuses a 20x20 file but not these
TINY_COUNTS = {"normal": 2, "benign": 3, "malignant": 2}
# Images with more than one mask file in the tiny tree: (class, number) -> number of mask files.
TINY_MULTI_MASK = {("benign", 2): 2}


def save_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    """Write ``array`` as a PNG (optionally converted to ``mode`` first); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if mode is not None and image.mode != mode:
        image = image.convert(mode)
    image.save(path, format="PNG")
    return path


def tiny_image(cls: str, num: int, size: int = TINY_SIZE) -> np.ndarray:
    """Distinct, reproducible uint8 content for image ``num`` of ``cls``."""
    seed = [len(cls), sum(map(ord, cls)), num]
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


def tiny_mask(num: int, k: int, size: int = TINY_SIZE) -> np.ndarray:
    """A rectangular lesion mask; mask file k of an image covers a different block."""
    mask = np.zeros((size, size), dtype=bool)
    top = (num + 2 * k) % (size - 3)
    mask[top : top + 3, 1 + 3 * k : 4 + 3 * k] = True
    return mask


@dataclass
class TinyBusi:
    """A BUSI-layout folder written into tmp_path, with the arrays it was written from."""

    root: Path
    images: dict[str, np.ndarray] = field(default_factory=dict)  # id -> image
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # id -> union of its mask files
    n_mask_files: int = 0

    @property
    def n_files(self) -> int:
        return len(self.images) + self.n_mask_files

    def path(self, cls: str, name: str) -> Path:
        return self.root / cls / name


def write_tiny_busi(root: Path, counts: dict[str, int] | None = None) -> TinyBusi:
    """``root/<class>/<class> (N).png`` plus ``_mask.png`` (and ``_mask_1.png`` for TINY_MULTI_MASK).

    Normal images get no mask file (the loader must give them empty masks); lesion images
    get one rectangle per mask file.
    """
    counts = counts or TINY_COUNTS
    tiny = TinyBusi(root=root)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for num in range(1, n + 1):
            rid = f"{cls}_{num}"
            tiny.images[rid] = tiny_image(cls, num)
            save_png(root / cls / f"{cls} ({num}).png", tiny.images[rid])
            if cls == "normal":
                tiny.masks[rid] = np.zeros((TINY_SIZE, TINY_SIZE), dtype=bool)
                continue
            union = np.zeros((TINY_SIZE, TINY_SIZE), dtype=bool)
            for k in range(TINY_MULTI_MASK.get((cls, num), 1)):
                mask = tiny_mask(num, k)
                suffix = "_mask" if k == 0 else f"_mask_{k}"
                save_png(root / cls / f"{cls} ({num}){suffix}.png", mask.astype(np.uint8) * 255, mode="1")
                union |= mask
                tiny.n_mask_files += 1
            tiny.masks[rid] = union
    return tiny


@pytest.fixture
def tiny_busi(tmp_path: Path) -> TinyBusi:
    """A fresh tiny BUSI-layout folder (7 images, 5 of them with masks) for each test."""
    return write_tiny_busi(tmp_path / "busi")


@pytest.fixture
def png_writer() -> Callable[..., Path]:
    """``save_png(path, array, mode=None)`` for tests that add their own files."""
    return save_png


@pytest.fixture(scope="session")
def busi_root() -> Path:
    """The shared BUSI copy; tests using it skip with a clear reason when it is absent."""
    if not (BUSI_ROOT / "benign").is_dir():
        pytest.skip(f"BUSI data set not found at {BUSI_ROOT} (see shared/README.md)")
    return BUSI_ROOT


@pytest.fixture(scope="session")
def busi_loaded(busi_root: Path):
    """load_dataset on the shared BUSI copy, once per session (about 10 s on 2 cores)."""
    from busynth.data.busi import load_dataset

    return load_dataset(busi_root)


@pytest.fixture(scope="session")
def busi_audit(busi_loaded):
    """The default audit of the shared BUSI copy, once per session."""
    from busynth.data.audit import audit_records

    return audit_records(busi_loaded.records)


SMALL_PHANTOM = PhantomConfig(
    n_per_class={"normal": 15, "benign": 25, "malignant": 20}, size=64, seed=0, near_duplicate_rate=0.1
)


@pytest.fixture(scope="session")
def phantom_records() -> list[Record]:
    """60 phantom records at 64 px with 7 near-duplicate twins (meta['near_duplicate_of'])."""
    from busynth.data.phantom import make_phantom

    return make_phantom(SMALL_PHANTOM)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's torch ops on one thread (tiny models are faster so), restoring the setting afterwards.
    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
