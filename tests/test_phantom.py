"""Tests of the built-in simulated breast ultrasound data (busynth.data.phantom)."""

from __future__ import annotations

from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from busynth.config import AuditConfig, PhantomConfig
from busynth.data.busi import write_busi_layout
from busynth.data.phantom import lesion_mask, make_phantom, speckle, twin_plan
from busynth.data.records import Record


def small(seed: int = 0, rate: float = 0.0, n: int = 4, size: int = 64) -> PhantomConfig:
    return PhantomConfig(n_per_class={"normal": n, "benign": n, "malignant": n}, size=size, seed=seed,
                         near_duplicate_rate=rate)


@pytest.fixture(scope="module")
def sample() -> list[Record]:
    """Enough lesions at 96 px for class averages to be stable, no twins."""
    return make_phantom(PhantomConfig(n_per_class={"normal": 10, "benign": 30, "malignant": 30}, size=96,
                                      seed=3, near_duplicate_rate=0.0))


def of(records: list[Record], label: str) -> list[Record]:
    return [r for r in records if r.label == label]


def phash(image: np.ndarray) -> imagehash.ImageHash:
    return imagehash.phash(Image.fromarray(image), hash_size=AuditConfig().hash_size)


def test_same_seed_gives_identical_records_and_other_seed_differs() -> None:
    a, b, c = make_phantom(small(0, 0.25)), make_phantom(small(0, 0.25)), make_phantom(small(1, 0.25))
    assert [r.id for r in a] == [r.id for r in b] == [r.id for r in c]
    for ra, rb in zip(a, b):
        assert ra.image.tobytes() == rb.image.tobytes()
        assert np.array_equal(ra.mask, rb.mask)
        assert ra.meta == rb.meta
    assert all(not np.array_equal(ra.image, rc.image) for ra, rc in zip(a, c))


def test_an_image_does_not_depend_on_how_many_others_are_made() -> None:
    few = {r.id: r for r in make_phantom(small(n=2))}
    many = {r.id: r for r in make_phantom(small(n=5))}
    for rid, record in few.items():
        assert np.array_equal(record.image, many[rid].image)


def test_shapes_dtypes_ids_paths_and_meta() -> None:
    config = PhantomConfig(n_per_class={"normal": 2, "benign": 3, "malignant": 1}, size=48, near_duplicate_rate=0)
    records = make_phantom(config)
    assert [r.id for r in records] == ["normal_1", "normal_2", "benign_1", "benign_2", "benign_3", "malignant_1"]
    for r in records:
        assert r.image.shape == r.mask.shape == (48, 48)
        assert r.image.dtype == np.uint8 and r.mask.dtype == bool
        n = r.id.rsplit("_", 1)[1]
        assert r.path == f"phantom:{r.label}/{r.label} ({n}).png"
        assert r.meta["source"] == "phantom"
        assert 20 < r.image.mean() < 200 and r.image.std() > 10  # neither blank nor saturated


def test_classes_argument_orders_classes_and_unknown_counts_are_refused() -> None:
    config = PhantomConfig(n_per_class={"benign": 2, "malignant": 2}, size=32)
    assert ([r.label for r in make_phantom(config, classes=("malignant", "benign"))]
            == ["malignant"] * 2 + ["benign"] * 2)
    with pytest.raises(ValueError, match="malignant"):
        make_phantom(config, classes=("normal", "benign"))
    with pytest.raises(ValueError, match="cyst"):
        make_phantom(PhantomConfig(n_per_class={"cyst": 1}, size=32), classes=("cyst",))


def test_normal_masks_are_empty_and_lesion_masks_are_not(sample: list[Record]) -> None:
    assert all(not r.mask.any() for r in of(sample, "normal"))
    areas = [r.mask.mean() for r in sample if r.label != "normal"]
    assert min(areas) > 0 and max(areas) < 0.35


def test_lesions_are_darker_than_the_ring_around_them(sample: list[Record]) -> None:
    ratios = []
    for r in sample:
        if r.label == "normal":
            continue
        ring = ndimage.binary_dilation(r.mask, iterations=5) & ~r.mask
        ratios.append(r.image[r.mask].mean() / r.image[ring].mean())
    ratios = np.array(ratios)
    assert ratios.mean() < 0.75
    assert (ratios < 1).mean() > 0.9


def bbox_log_aspect(mask: np.ndarray) -> float:
    rows, cols = np.nonzero(mask)
    return float(np.log((np.ptp(rows) + 1) / (np.ptp(cols) + 1)))


def test_malignant_is_taller_than_wide_and_benign_wider_than_tall(sample: list[Record]) -> None:
    benign = np.array([bbox_log_aspect(r.mask) for r in of(sample, "benign")])
    malignant = np.array([bbox_log_aspect(r.mask) for r in of(sample, "malignant")])
    assert benign.mean() < -0.1 < 0.1 < malignant.mean()
    # Overlap on purpose: the orientation alone must not separate the classes perfectly.
    assert malignant.min() < benign.max()


def posterior_ratio(record: Record) -> float:
    """Mean gray below the lesion over the mean of the same rows beside it."""
    rows, cols = np.nonzero(record.mask)
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    band = slice(bottom + 1, min(bottom + 1 + (bottom - top + 1), record.image.shape[0]))
    below = record.image[band, left + (right - left) // 4: right + 1 - (right - left) // 4]
    beside = np.concatenate([record.image[band, : max(left - 4, 0)], record.image[band, right + 5:]], axis=1)
    if below.size == 0 or beside.size == 0:
        return float("nan")
    return float(below.mean() / beside.mean())


def test_shadowing_behind_malignant_and_enhancement_behind_benign(sample: list[Record]) -> None:
    benign = np.nanmean([posterior_ratio(r) for r in of(sample, "benign")])
    malignant = np.nanmean([posterior_ratio(r) for r in of(sample, "malignant")])
    assert malignant < 0.9
    assert benign > 1.05


def test_near_duplicate_twins_have_the_configured_rate_and_match_their_source() -> None:
    rate, n = 0.1, 20
    records = make_phantom(small(rate=rate, n=n, size=96))
    ids = {r.id: r for r in records}
    threshold = AuditConfig().near_duplicate_distance
    for label in ("normal", "benign", "malignant"):
        members = of(records, label)
        twins = [r for r in members if "near_duplicate_of" in r.meta]
        assert len(twins) == round(rate * n)
        sources = [ids[t.meta["near_duplicate_of"]] for t in twins]
        assert len({s.id for s in sources}) == len(sources)
        for twin, source in zip(twins, sources):
            assert source.label == label and "near_duplicate_of" not in source.meta
            assert not np.array_equal(twin.image, source.image)
            assert phash(twin.image) - phash(source.image) <= threshold
            diff = np.abs(twin.image.astype(int) - source.image.astype(int)).mean()
            assert diff < 25
            union = (twin.mask | source.mask).sum()
            assert union == 0 or (twin.mask & source.mask).sum() / union > 0.6
        # Independent images are not near duplicates of each other (no false groups for the audit).
        plain = [phash(r.image) for r in members if "near_duplicate_of" not in r.meta]
        close = sum(a - b <= threshold for i, a in enumerate(plain) for b in plain[i + 1:])
        assert close == 0


def test_no_twins_when_rate_is_zero_and_twin_plan_is_consistent() -> None:
    assert all("near_duplicate_of" not in r.meta for r in make_phantom(small(rate=0.0)))
    plan = twin_plan(0, "benign", 9, 0.5)
    assert len(plan) == 4 and not set(plan) & set(plan.values())
    assert len(set(plan.values())) == len(plan)


def test_write_busi_layout_round_trip(tmp_path: Path) -> None:
    records = make_phantom(small(n=2, size=32, rate=0.0))
    root = write_busi_layout(records, tmp_path / "busi")
    written = sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))
    expected = sorted(f"{c}/{c} ({n}){s}.png" for c in ("normal", "benign", "malignant") for n in (1, 2)
                      for s in ("", "_mask"))
    assert written == expected
    for r in records:
        n = r.id.rsplit("_", 1)[1]
        image = np.asarray(Image.open(root / r.label / f"{r.label} ({n}).png"))
        mask = np.asarray(Image.open(root / r.label / f"{r.label} ({n})_mask.png"))
        assert np.array_equal(image, r.image)
        assert set(np.unique(mask)) <= {0, 255}
        assert np.array_equal(mask == 255, r.mask)
    assert not any(p.name.startswith(".") for p in root.rglob("*"))  # no temporary files left


def test_write_busi_layout_refuses_ids_it_cannot_name(tmp_path: Path) -> None:
    record = make_phantom(small(n=1, size=16))[0]
    bad = Record(id="scan-7", label=record.label, image=record.image, mask=record.mask, path="x")
    with pytest.raises(ValueError, match="scan-7"):
        write_busi_layout([bad], tmp_path)
    with pytest.raises(ValueError, match="both"):
        write_busi_layout([record, record], tmp_path)


def test_speckle_is_rayleigh_like() -> None:
    amplitude = speckle(np.random.default_rng(0), (128, 128), (1.0, 2.0))
    assert amplitude.min() >= 0
    assert np.mean(amplitude**2) == pytest.approx(1.0)
    # Rayleigh: mean / rms = sqrt(pi) / 2 ~ 0.886 (a constant field would give 1).
    assert np.mean(amplitude) / np.sqrt(np.mean(amplitude**2)) == pytest.approx(np.sqrt(np.pi) / 2, abs=0.03)


def test_lesion_mask_of_a_plain_ellipse() -> None:
    mask, depth = lesion_mask((41, 41), (20.0, 20.0), (5.0, 10.0), 0.0, np.zeros(0), np.zeros(0), np.zeros((0, 3)))
    rows, cols = np.nonzero(mask)
    assert np.ptp(rows) + 1 in (9, 10, 11) and np.ptp(cols) + 1 in (19, 20, 21)
    assert depth[20, 20] == pytest.approx(1.0) and depth[0, 0] < 0
