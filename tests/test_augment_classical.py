"""Batched augmentation and the classical generator built on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from busynth.config import PhantomConfig, StudyConfig, SynthesisConfig
from busynth.data.augment import LIGHT, ON_THE_FLY, STRONG, AugmentParams, augment_batch, random_affine_grid, warp
from busynth.data.phantom import make_phantom
from busynth.generators import build_generator
from busynth.generators.base import synthetic_counts, write_samples
from busynth.generators.classical import ClassicalAugmenter

STILL = AugmentParams(hflip=False, max_rotation=0.0, max_translate=0.0, scale_range=(1.0, 1.0),
                      gamma_range=(1.0, 1.0), contrast_range=(1.0, 1.0), speckle_std=0.0)


def _blobs(n: int = 6, size: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand((n, 1, size, size), generator=g)


def test_identity_parameters_leave_images_unchanged():
    x = _blobs()
    out, _ = augment_batch(x, STILL, torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_flip_only_gives_the_image_or_its_mirror_and_both_occur():
    x = _blobs(n=16)
    params = AugmentParams(hflip=True, max_rotation=0.0, max_translate=0.0, scale_range=(1.0, 1.0))
    out = warp(x, random_affine_grid(16, 24, params, torch.Generator().manual_seed(3)))
    same = [torch.allclose(o, i, atol=1e-5) for o, i in zip(out, x, strict=True)]
    mirrored = [torch.allclose(o, i.flip(-1), atol=1e-5) for o, i in zip(out, x, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True))
    assert any(same) and any(mirrored)


def test_shift_moves_content_by_the_expected_pixels():
    x = torch.zeros(1, 1, 20, 20)
    x[0, 0, 10, 5] = 1.0
    params = AugmentParams(hflip=False, max_rotation=0.0, max_translate=0.25, scale_range=(1.0, 1.0))
    g = torch.Generator().manual_seed(5)
    grid = random_affine_grid(1, 20, params, g)
    shift_x = float(grid[0, 0, 0, 0] - (-1 + 1 / 20)) * 20 / 2  # input x read at output x=0, in pixels
    out = warp(x, grid, nearest=True)
    (row, col), = torch.nonzero(out[0, 0] > 0.5).tolist()
    assert row == 10 - round(float(grid[0, 0, 0, 1] - (-1 + 1 / 20)) * 10)
    assert col == round(5 - shift_x)


def test_masks_follow_the_image_warp():
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    masks = (((yy - 12) ** 2 + (xx - 20) ** 2) < 30).float().expand(8, 1, 32, 32).contiguous()
    params = AugmentParams(gamma_range=(1.0, 1.0), contrast_range=(1.0, 1.0), speckle_std=0.0, max_rotation=25)
    images, warped = augment_batch(masks.clone(), params, torch.Generator().manual_seed(2), masks=masks)
    for img, m in zip(images, warped, strict=True):
        inter = ((img > 0.5) & m).sum().item()
        union = ((img > 0.5) | m).sum().item()
        assert inter / union > 0.85


def test_augmentation_is_deterministic_for_a_generator_seed():
    x = _blobs()
    a, _ = augment_batch(x, AugmentParams(), torch.Generator().manual_seed(9))
    b, _ = augment_batch(x, AugmentParams(), torch.Generator().manual_seed(9))
    c, _ = augment_batch(x, AugmentParams(), torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1


def test_strong_augmentation_moves_images_further_than_light_and_configs_can_name_both():
    yy, xx = torch.meshgrid(torch.arange(48), torch.arange(48), indexing="ij")
    x = (((yy - 20) ** 2 + (xx - 26) ** 2) < 80).float().expand(64, 1, 48, 48).contiguous() * 0.8 + 0.1

    def moved(params: AugmentParams) -> float:
        out, _ = augment_batch(x, params, torch.Generator().manual_seed(4))
        return float((out - x).abs().mean())

    assert moved(STRONG) > 1.3 * moved(LIGHT) > 0
    assert ON_THE_FLY == {"light": LIGHT, "strong": STRONG}
    assert StudyConfig.model_validate({"classifier": {"augment": "strong"},
                                       "segmenter": {"augment": "strong"}}).segmenter.augment == "strong"


@pytest.fixture(scope="module")
def records():
    return make_phantom(PhantomConfig(n_per_class={"normal": 4, "benign": 5, "malignant": 4}, size=32))


def test_classical_copies_come_from_training_images_with_masks(tmp_path, records):
    gen = build_generator("classical", StudyConfig(generators={"classical": {"image_size": 32}}))
    gen.fit(records, tmp_path / "gen", seed=0)
    samples = gen.sample("benign", 7, seed=3)
    assert len(samples) == 7 and all(s.label == "benign" for s in samples)
    assert all(s.image.shape == (32, 32) and s.image.dtype == np.uint8 for s in samples)
    assert all(s.mask is not None and s.mask.any() for s in samples)  # benign lesions keep their masks
    normal = gen.sample("normal", 3, seed=3)
    assert all(not s.mask.any() for s in normal)
    reloaded = ClassicalAugmenter.load(tmp_path / "gen")
    again = reloaded.sample("benign", 7, seed=3)
    assert all(np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
               for a, b in zip(samples, again, strict=True))
    assert not np.array_equal(samples[0].image, gen.sample("benign", 7, seed=4)[0].image)
    assert reloaded.train_ids == [r.id for r in records]
    with pytest.raises(ValueError, match="no training images of class 'cyst'"):
        gen.sample("cyst", 1)


def test_synthetic_counts_ratio_and_balance(records):
    assert synthetic_counts(records, ["normal", "benign", "malignant"], SynthesisConfig(ratio=0.5)) == \
        {"normal": 2, "benign": 3, "malignant": 2}
    assert synthetic_counts(records, ["normal", "benign", "malignant"], SynthesisConfig(balance=True)) == \
        {"normal": 1, "benign": 0, "malignant": 1}


def test_write_samples_uses_the_data_set_layout_and_continues_numbering(tmp_path, records):
    gen = build_generator("classical", StudyConfig(generators={"classical": {"image_size": 32}}))
    gen.fit(records, tmp_path / "gen")
    write_samples(gen.sample("benign", 2, seed=0), tmp_path / "out", "classical", tmp_path / "gen")
    write_samples(gen.sample("benign", 1, seed=1), tmp_path / "out", "classical", tmp_path / "gen")
    names = sorted(p.name for p in (tmp_path / "out" / "benign").iterdir())
    assert names == ["benign (1).png", "benign (1)_mask.png", "benign (2).png", "benign (2)_mask.png",
                     "benign (3).png", "benign (3)_mask.png"]
    lines = (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 3 and '"seed": 1' in lines[2] and '"generator": "classical"' in lines[0]
