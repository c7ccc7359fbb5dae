"""Tiny, fast checks of the class-conditional VAE generator (16-32 px images, a few steps)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from busynth.config import PhantomConfig
from busynth.data.phantom import make_phantom
from busynth.data.records import Record
from busynth.engine import StageConfig, learning_rate
from busynth.errors import ConfigError, RunStateError
from busynth.generators import cvae
from busynth.generators.base import read_generator_info
from busynth.generators.cvae import CVAE, CVAEConfig, CVAEGenerator, kl_weight

CLASSES = ["normal", "benign", "malignant"]
TINY = {"image_size": 16, "channels": [8, 16], "latent_dim": 4, "class_embed_dim": 4,
        "batch_size": 4, "steps": 6, "kl_warmup_steps": 3, "checkpoint_every": 3, "keep_checkpoints": 1}


@pytest.fixture(scope="module")
def records():
    """Twelve 24 px phantom records (four per class), resized to 16 px by the generator."""
    cfg = PhantomConfig(n_per_class={c: 4 for c in CLASSES}, size=24, near_duplicate_rate=0.0)
    return make_phantom(cfg, CLASSES)


def _history(folder):
    """history.csv rows without the wall-clock column."""
    with (folder / "history.csv").open() as fh:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]


def test_encoder_decoder_shapes():
    cfg = CVAEConfig(image_size=32, channels=[8, 16, 16], latent_dim=5, class_embed_dim=3)
    model = CVAE(cfg, n_classes=3)
    x, y = torch.rand(2, 1, 32, 32), torch.tensor([0, 2])
    mu, logvar = model.encode(x, y)
    assert mu.shape == logvar.shape == (2, 5)
    assert model.decode(mu, y).shape == (2, 1, 32, 32)
    logits, mu2, _ = model(x, y, torch.zeros(2, 5))
    assert logits.shape == (2, 1, 32, 32) and torch.allclose(mu, mu2)


def test_kl_weight_pinned_values():
    assert kl_weight(0, 100, 1.0) == 0.0
    assert kl_weight(25, 100, 1.0) == 0.25
    assert kl_weight(50, 100, 2.0) == 1.0
    assert kl_weight(100, 100, 0.5) == 0.5
    assert kl_weight(10_000, 100, 1.0) == 1.0
    assert kl_weight(0, 0, 0.7) == 0.7  # no warm-up: full weight from the start


def test_learning_rate_cosine_endpoints():
    cfg = StageConfig(steps=11, lr=1e-3, min_lr_ratio=0.1)  # the cVAE trains through the engine
    assert learning_rate(0, cfg) == pytest.approx(1e-3)
    assert learning_rate(5, cfg) == pytest.approx(0.55e-3)
    assert learning_rate(10, cfg) == pytest.approx(1e-4)


def test_bad_config_raises_config_error():
    with pytest.raises(ConfigError, match="divisible by 2\\*\\*len\\(channels\\) = 8"):
        CVAEGenerator({"image_size": 20, "channels": [8, 8, 8]})
    with pytest.raises(ConfigError, match="not_a_field"):
        CVAEGenerator({"not_a_field": 1})


def _disc_records(n_per_class: int = 4, size: int = 16) -> list[Record]:
    """Black images with one white disc whose position depends on the class: easy to reconstruct."""
    yy, xx = np.mgrid[:size, :size]
    out = []
    for ci, label in enumerate(CLASSES):
        for k in range(n_per_class):
            cy, cx = 4 + 4 * ci, 4 + 2 * k
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= 6
            out.append(Record(id=f"{label}_{k}", label=label, image=mask.astype(np.uint8) * 255,
                              mask=mask, path=f"disc:{label}_{k}"))
    return out


def test_loss_decreases_on_simple_data(tmp_path):
    gen = CVAEGenerator({**TINY, "steps": 40, "checkpoint_every": 40, "lr": 3e-3}, classes=CLASSES)
    gen.fit(_disc_records(), tmp_path / "run", seed=0)
    recon = [float(r["recon"]) for r in _history(tmp_path / "run")]
    assert len(recon) == 40
    assert np.mean(recon[-5:]) < 0.6 * np.mean(recon[:5])


def test_fit_artifacts_train_ids_and_reload(records, tmp_path):
    train = records[:9]
    gen = CVAEGenerator(TINY, classes=CLASSES)
    out = gen.fit(train, tmp_path / "run", seed=1)
    info = read_generator_info(out)
    assert info["name"] == "cvae" and info["step"] == 6
    assert info["train_ids"] == [r.id for r in train] == gen.train_ids
    assert info["classes"] == CLASSES and info["config"]["image_size"] == 16
    assert [int(r["step"]) for r in _history(out)] == list(range(6))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6"]  # cap of 1

    a = gen.sample("benign", 5, seed=3)
    assert len(a) == 5 and all(s.image.shape == (16, 16) and s.image.dtype == np.uint8 for s in a)
    assert all(s.mask is None and s.label == "benign" for s in a)
    reloaded = CVAEGenerator.load(out)
    assert reloaded.train_ids == gen.train_ids
    b = reloaded.sample("benign", 5, seed=3)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))

    # A finished folder is not trained again: fit returns at once with the same model.
    again = CVAEGenerator(TINY, classes=CLASSES)
    again.fit(train, out, seed=1)
    assert np.array_equal(again.sample("benign", 1, seed=3)[0].image, a[0].image)


def test_sampling_deterministic_per_seed(records, tmp_path):
    gen = CVAEGenerator({**TINY, "sample_batch_size": 2}, classes=CLASSES)
    gen.fit(records, tmp_path / "run", seed=0)
    first = np.stack([s.image for s in gen.sample("malignant", 5, seed=7)])
    assert np.array_equal(first, np.stack([s.image for s in gen.sample("malignant", 5, seed=7)]))
    assert not np.array_equal(first, np.stack([s.image for s in gen.sample("malignant", 5, seed=8)]))
    assert np.array_equal(first[:3], np.stack([s.image for s in gen.sample("malignant", 3, seed=7)]))
    with pytest.raises(ValueError, match="'cyst'.*normal.*benign.*malignant"):
        gen.sample("cyst", 1)


def test_resume_matches_uninterrupted_run(records, tmp_path, monkeypatch):
    full = CVAEGenerator(TINY, classes=CLASSES).fit(records, tmp_path / "full", seed=2)

    real_kl_weight = cvae.kl_weight

    def crash_at_step_4(step, warmup, beta):
        if step == 4:
            raise KeyboardInterrupt("simulated kill")
        return real_kl_weight(step, warmup, beta)

    monkeypatch.setattr(cvae, "kl_weight", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        CVAEGenerator(TINY, classes=CLASSES).fit(records, tmp_path / "cut", seed=2)
    assert [p.name for p in (tmp_path / "cut").glob("checkpoint-*")] == ["checkpoint-3"]
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    monkeypatch.setattr(cvae, "kl_weight", real_kl_weight)

    resumed = CVAEGenerator(TINY, classes=CLASSES)
    cut = resumed.fit(records, tmp_path / "cut", seed=2)
    assert resumed.step == 6 and read_generator_info(cut)["step"] == 6
    assert [int(r["step"]) for r in _history(cut)] == list(range(6))
    a, b = load_file(str(full / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _history(full) == _history(cut)


def test_folder_of_another_fit_is_refused(records, tmp_path):
    CVAEGenerator(TINY, classes=CLASSES).fit(records[:9], tmp_path / "run", seed=0)
    with pytest.raises(RunStateError, match="different cvae fit.*train_ids"):
        CVAEGenerator(TINY, classes=CLASSES).fit(records, tmp_path / "run", seed=0)
    with pytest.raises(RunStateError, match="config.lr"):
        CVAEGenerator({**TINY, "lr": 1e-4}, classes=CLASSES).fit(records[:9], tmp_path / "run", seed=0)
    # Sampling-only settings may change: the finished model is reused with the new temperature.
    cold = CVAEGenerator({**TINY, "temperature": 0.0}, classes=CLASSES)
    cold.fit(records[:9], tmp_path / "run", seed=0)
    a, b = cold.sample("normal", 2, seed=0), cold.sample("normal", 2, seed=1)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))  # z = 0 for every seed
