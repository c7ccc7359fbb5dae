"""Tiny, fast checks of the ControlNet method: zero-initialised control, what trains, sampling with
masks, the pretrained path, resume, the sampling-mask transforms, control adherence and the study.

Everything runs on 16-32 px images with a few steps on one torch thread; nothing is downloaded.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from helpers.tiny import CLASSES, TINY_MODEL

from busynth.cells import fit_or_load_generator
from busynth.checkpoint import list_checkpoints
from busynth.config import PhantomConfig
from busynth.data.phantom import make_phantom
from busynth.data.records import Record
from busynth.data.transforms import resize_mask
from busynth.engine import StageConfig, train_stage
from busynth.errors import ConfigError
from busynth.evaluate.adherence import contrast_to_noise, control_adherence, evaluate_adherence
from busynth.generators.base import read_generator_info
from busynth.generators.diffusion.components import build_tiny_components, freeze
from busynth.generators.diffusion.controlnet import ControlNetGenerator
from busynth.generators.diffusion.masks import MaskTransformConfig, elastic_masks, sampling_masks, transform_masks
from busynth.generators.diffusion.sd_lora import SDLoraGenerator
from busynth.generators.diffusion.settings import TinyModelConfig
from busynth.generators.diffusion.shapes import ShapeModel, outline, outline_mask, shape_features
from busynth.generators.diffusion.train import ControlNetStage
from busynth.presets import load_config

SD = {"image_size": 32, "tiny": TINY_MODEL, "autoencoder_crop": 16,
      "autoencoder_training": {"steps": 3, "batch_size": 4}, "base_training": {"steps": 3, "batch_size": 4},
      "lora_training": {"steps": 2, "batch_size": 4}, "lora": {"rank": 2, "alpha": 2.0}, "encode_batch_size": 8}
CN = {"training": {"steps": 4, "batch_size": 4, "lr": 1e-2, "warmup_steps": 0, "checkpoint_every": 2},
      "sampling_steps": 3,
      "guidance_scale": 2.0}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def records():
    """Twelve 32 px phantom records with masks, four per class."""
    return make_phantom(PhantomConfig(n_per_class={c: 4 for c in CLASSES}, size=32, near_duplicate_rate=0.0), CLASSES)


@pytest.fixture(scope="module")
def base(records, tmp_path_factory):
    """A tiny sd-lora fit to build on."""
    return SDLoraGenerator(SD, classes=CLASSES).fit(records, tmp_path_factory.mktemp("sdlora"), seed=0)


@pytest.fixture(scope="module")
def fitted(records, base, tmp_path_factory):
    """A tiny ControlNet fitted once on the module's sd-lora base, and its folder."""
    out = tmp_path_factory.mktemp("controlnet")
    gen = ControlNetGenerator({**CN, "base": str(base)}, classes=CLASSES)
    gen.fit(records, out, seed=0)
    return gen, out


def _stage(seed: int = 0, n: int = 8):
    """A ControlNetStage on fresh tiny parts (16 px images, 8x8 latents) with random moments and masks."""
    parts = build_tiny_components(TinyModelConfig(**TINY_MODEL), 16, ["a breast ultrasound image"], seed)
    freeze(parts.unet, parts.vae, parts.text_encoder)
    controlnet = ControlNetModel.from_unet(parts.unet, conditioning_embedding_out_channels=(8, 16),
                                           conditioning_channels=3)
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(2, 4, 16, generator=g)
    masks = torch.zeros(n, 1, 16, 16, dtype=torch.bool)
    masks[:, :, 4:12, 3:10] = True
    data = {"moments": torch.cat([torch.randn(n, 4, 8, 8, generator=g), torch.full((n, 4, 8, 8), -6.0)], 1),
            "prompt": torch.zeros(n, dtype=torch.long), "mask": masks}
    stage = ControlNetStage(controlnet, parts.unet, parts.noise_scheduler, emb, 1, 1.0)
    return parts, stage, data


def _predictions(stage, data):
    x, t, text = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 500]), \
        stage.prompt_embeddings[[0, 0]]
    with torch.no_grad():
        plain = stage.unet(x, t, encoder_hidden_states=text).sample
        controlled = stage.predict_noise({"mask": data["mask"][:2]}, x, t, text)
        empty = stage.predict_noise({"mask": torch.zeros_like(data["mask"][:2])}, x, t, text)
    return plain, controlled, empty


# --- the stage -------------------------------------------------------------------------------


def test_zero_convolutions_leave_the_unet_prediction_unchanged():
    _, stage, data = _stage()
    plain, controlled, _ = _predictions(stage, data)
    assert torch.equal(plain, controlled)


def test_training_changes_only_controlnet_parameters_and_then_the_prediction(tmp_path):
    parts, stage, data = _stage()
    frozen = {name: {k: v.clone() for k, v in m.state_dict().items()}
              for name, m in (("unet", parts.unet), ("vae", parts.vae), ("text", parts.text_encoder))}
    before = {k: v.clone() for k, v in stage.model.state_dict().items()}
    train_stage(stage, data, StageConfig(steps=3, batch_size=4, lr=1e-2, prompt_dropout=0.0), tmp_path, seed=0)
    for name, module in (("unet", parts.unet), ("vae", parts.vae), ("text", parts.text_encoder)):
        assert all(torch.equal(v, module.state_dict()[k]) for k, v in frozen[name].items()), name
    after = stage.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("controlnet_down_blocks") for k in changed)
    assert any(k.startswith("controlnet_mid_block") for k in changed)
    plain, controlled, empty = _predictions(stage, data)
    assert not torch.allclose(plain, controlled)
    assert not torch.allclose(controlled, empty)  # the mask itself now matters


# --- the generator ---------------------------------------------------------------------------


def test_fit_writes_controlnet_artifact_on_the_given_base(fitted, base, records):
    _, out = fitted
    info = read_generator_info(out)
    assert info["name"] == "controlnet" and info["train_ids"] == [r.id for r in records]
    assert info["base"]["folder"] == str(base.resolve())
    assert ((out / "controlnet" / "config.json").is_file()
            and (out / "lora" / "pytorch_lora_weights.safetensors").is_file())
    assert not (out / "base").exists()  # the given base was reused, not refitted
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    ControlNetModel.from_pretrained(out / "controlnet")  # diffusers' own loader reads it


def test_samples_are_image_mask_pairs_deterministic_and_reload(fitted):
    gen, out = fitted
    a = gen.sample("benign", 2, seed=4)
    assert all(s.image.shape == (32, 32) and s.image.dtype == np.uint8 for s in a)
    assert all(s.mask.dtype == bool and s.mask.shape == (32, 32) and s.mask.any() for s in a)
    assert not any(s.mask.any() for s in gen.sample("normal", 2, seed=4))
    again = ControlNetGenerator.load(out).sample("benign", 2, seed=4)
    assert all(np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask) for x, y in zip(a, again))


def test_shape_model_source_draws_new_masks_even_when_the_study_passes_some(fitted, records):
    gen, _ = fitted
    given = [r.mask for r in records if r.label == "benign"]  # as the study passes them: n for n images
    plain = gen.sampling_masks("benign", len(given), seed=1, masks=given)
    cfg = gen.config
    try:
        gen.config = cfg.model_copy(update={"masks": cfg.masks.model_copy(update={"source": "shape_model"})})
        shaped = gen.sampling_masks("benign", len(given), seed=1, masks=given)
    finally:
        gen.config = cfg
    assert shaped.shape == plain.shape and shaped.any(axis=(1, 2)).all()
    assert not np.array_equal(shaped, plain)


def test_a_loaded_fit_samples_with_the_studys_sampling_settings(fitted, tmp_path):
    _, out = fitted
    study = load_config("smoke", ["generators.controlnet.masks.source=shape_model",
                                  "generators.controlnet.guidance_scale=1.5"])
    loaded = fit_or_load_generator("controlnet", study, [], out, seed=0)
    assert loaded.cfg.masks.source == "shape_model" and loaded.cfg.guidance_scale == 1.5
    assert loaded.cfg.training == ControlNetGenerator.load(out).cfg.training  # what was trained stays


def test_different_masks_give_different_images_for_the_same_seed(fitted):
    gen, _ = fitted
    left, right = np.zeros((32, 32), bool), np.zeros((32, 32), bool)
    left[6:20, 2:14], right[12:28, 16:30] = True, True
    a = gen.sample("malignant", 1, seed=9, masks=[left])
    b = gen.sample("malignant", 1, seed=9, masks=[right])
    assert not np.array_equal(a[0].mask, b[0].mask)
    assert not np.array_equal(a[0].image, b[0].image)
    assert np.array_equal(a[0].image, gen.sample("malignant", 1, seed=9, masks=[left])[0].image)


def test_base_trained_on_other_images_is_refused(records, base, tmp_path):
    with pytest.raises(ConfigError, match="other images"):
        ControlNetGenerator({**CN, "base": str(base)}, classes=CLASSES).fit(records[1:], tmp_path, seed=0)


def test_resume_continues_the_step_count(records, base, tmp_path, monkeypatch):
    cfg = {**CN, "base": str(base)}
    full = ControlNetGenerator(cfg, classes=CLASSES)
    full.fit(records, tmp_path / "full", seed=0)
    real_loss, calls = ControlNetStage.loss, [0]

    def crashing(self, batch, generator):
        calls[0] += 1
        if calls[0] > 3:
            raise KeyboardInterrupt("simulated kill")
        return real_loss(self, batch, generator)

    monkeypatch.setattr(ControlNetStage, "loss", crashing)
    with pytest.raises(KeyboardInterrupt):
        ControlNetGenerator(cfg, classes=CLASSES).fit(records, tmp_path / "resumed", seed=0)
    assert [s for s, _ in list_checkpoints(tmp_path / "resumed" / "stages" / "controlnet")] == [2]
    monkeypatch.setattr(ControlNetStage, "loss", real_loss)
    resumed = ControlNetGenerator(cfg, classes=CLASSES)
    resumed.fit(records, tmp_path / "resumed", seed=0)
    assert [s for s, _ in list_checkpoints(tmp_path / "resumed" / "stages" / "controlnet")][-1] == 4
    a, b = full.pipe.controlnet.state_dict(), resumed.pipe.controlnet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pretrained_path_on_a_saved_tiny_pipeline_and_controlnet(records, tmp_path):
    """Pretrained SD folder + pretrained ControlNet folder (as the sd15 preset would use): the base is
    fitted here (2 LoRA steps), the ControlNet trains 2 steps, 1 image is sampled."""
    section = load_config("sd15").generators["controlnet"]
    assert section["mixed_precision"] in ("fp16", "bf16") and "pretrained_controlnet" in section
    parts = build_tiny_components(TinyModelConfig(**TINY_MODEL), 32, ["a breast ultrasound image"], seed=0)
    parts.pipeline().save_pretrained(tmp_path / "sd")
    ControlNetModel.from_unet(parts.unet, conditioning_embedding_out_channels=(8, 16)).save_pretrained(tmp_path / "cn")
    sd = {"source": "pretrained", "pretrained_model": str(tmp_path / "sd"), "image_size": 32,
          "lora": {"rank": 2, "alpha": 2.0}, "lora_training": {"steps": 2, "batch_size": 4}}
    cfg = {**section, "sd_lora": sd, "pretrained_controlnet": str(tmp_path / "cn"), "mixed_precision": "no",
           "gradient_checkpointing": False, "training": {"steps": 2, "batch_size": 4}, "sampling_steps": 2,
           "sample_batch_size": 1}
    out = ControlNetGenerator(cfg, classes=CLASSES).fit(records, tmp_path / "fit", seed=0)
    assert (out / "base" / "generator.json").is_file() and not (out / "model").exists()
    assert [s for s, _ in list_checkpoints(out / "stages" / "controlnet")][-1] == 2
    [sample] = ControlNetGenerator.load(out).sample("benign", 1, seed=0)
    assert sample.image.shape == (32, 32) and sample.mask.any()


# --- sampling masks --------------------------------------------------------------------------


IDENTITY = MaskTransformConfig(hflip=False, max_rotation=0.0, scale_range=(1.0, 1.0), elastic_alpha=0.0)


def _lesion(size: int = 32) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return ((yy - 12) / 6.0) ** 2 + ((xx - 18) / 9.0) ** 2 <= 1.0


@pytest.mark.parametrize("cfg", [
    IDENTITY.model_copy(update={"elastic_alpha": 0.05}),
    IDENTITY.model_copy(update={"scale_range": (1.3, 1.4)}),
    IDENTITY.model_copy(update={"max_rotation": 60.0}),
    MaskTransformConfig(),
], ids=["elastic", "scale", "rotate", "all"])
def test_mask_transforms_keep_masks_binary_change_them_and_are_seeded(cfg):
    masks = np.stack([_lesion()] * 3)
    out = transform_masks(masks, cfg, seed=1)
    assert out.dtype == bool and out.shape == masks.shape and out.any(axis=(1, 2)).all()
    assert all(not np.array_equal(o, m) for o, m in zip(out, masks))
    assert np.array_equal(out, transform_masks(masks, cfg, seed=1))
    assert not np.array_equal(out, transform_masks(masks, cfg, seed=2))


def test_flip_mirrors_and_identity_copies():
    flipped = transform_masks(np.stack([_lesion()] * 8), IDENTITY.model_copy(update={"hflip": True}), seed=0)
    assert any(np.array_equal(f, _lesion()[:, ::-1]) for f in flipped)
    assert np.array_equal(transform_masks(_lesion()[None], IDENTITY, seed=0)[0], _lesion())


def test_normal_masks_stay_empty_and_pool_is_resized():
    empty = sampling_masks([np.zeros((40, 40), bool)], 3, 32, MaskTransformConfig(), seed=0)
    assert empty.shape == (3, 32, 32) and not empty.any()
    assert not sampling_masks([], 2, 16, MaskTransformConfig(), seed=0).any()
    assert not elastic_masks(np.zeros((1, 16, 16), bool), 0.1, 0.1, seed=0).any()
    drawn = sampling_masks([_lesion(64)], 2, 32, IDENTITY, seed=0)
    assert drawn.shape == (2, 32, 32) and all(np.array_equal(d, resize_mask(_lesion(64), 32)) for d in drawn)


def test_sampling_masks_use_a_pool_of_n_in_order_and_seed_each_mask_alone():
    pool = [_lesion(), np.roll(_lesion(), 8, axis=1), None]
    as_given = sampling_masks(pool, 3, 32, IDENTITY, seed=0)
    assert np.array_equal(as_given[0], pool[0]) and np.array_equal(as_given[1], pool[1]) and not as_given[2].any()
    # Mask i is transformed with a seed of its own: the first two of three are the two of two.
    cfg = MaskTransformConfig()
    three = sampling_masks(pool, 3, 32, cfg, seed=4, stream=1)
    assert np.array_equal(three[:2], sampling_masks(pool[:2], 2, 32, cfg, seed=4, stream=1))
    assert not np.array_equal(three[:2], sampling_masks(pool[:2], 2, 32, cfg, seed=4, stream=2))


def _ellipse(size: int, cy: float, cx: float, a: float, b: float, angle: float = 0.0) -> np.ndarray:
    """An ellipse with semi-axes ``a`` along direction ``angle`` (from the column axis towards rows) and ``b``."""
    yy, xx = np.mgrid[:size, :size]
    y, x = yy - cy, xx - cx
    u = (x * np.cos(angle) + y * np.sin(angle)) / a
    v = (-x * np.sin(angle) + y * np.cos(angle)) / b
    return u * u + v * v <= 1.0


def _star(size: int, r: float, phase: float) -> np.ndarray:
    """A six-pointed lesion about the centre: an irregular margin."""
    yy, xx = np.mgrid[:size, :size] - size / 2
    return np.hypot(yy, xx) <= r * (1 + 0.35 * np.cos(6 * np.arctan2(yy, xx) + phase))


def test_outline_recovers_a_lesion_and_its_long_axis():
    lesion = _ellipse(128, 60, 70, 30, 12, angle=np.pi / 6)
    cy, cx, orientation, radius = outline(lesion)
    assert (cy, cx) == pytest.approx((60, 70), abs=0.5)
    assert orientation == pytest.approx(np.pi / 6, abs=0.02)
    assert radius.max() == pytest.approx(30, abs=1) and radius.min() == pytest.approx(12, abs=1)
    redrawn = outline_mask(cy, cx, orientation, radius, 128)
    assert (redrawn & lesion).sum() / (redrawn | lesion).sum() > 0.9
    # Of two lesions the larger one is the outline.
    both = lesion | _ellipse(128, 10, 10, 4, 4)
    assert outline(both)[:2] == pytest.approx((cy, cx))


def test_shape_model_draws_new_masks_with_the_class_statistics():
    rng = np.random.default_rng(0)
    oval = [_ellipse(128, 64 + rng.normal(0, 3), 64 + rng.normal(0, 3), 24 + rng.normal(0, 2), 12,
                     angle=rng.normal(0, 0.1)) for _ in range(30)]
    spiky = [_star(128, 20 + rng.normal(0, 2), rng.uniform(0, 2 * np.pi)) for _ in range(30)]
    features = {}
    for name, pool in (("oval", oval), ("spiky", spiky)):
        drawn = ShapeModel.fit(pool).sample(40, 128, np.random.default_rng(1))
        assert drawn.shape == (40, 128, 128) and drawn.any(axis=(1, 2)).all()
        assert not any(np.array_equal(d, m) for d in drawn for m in pool)  # new outlines, not copies
        features[name] = {k: (np.mean([shape_features(m)[k] for m in pool]),
                              np.mean([shape_features(m)[k] for m in drawn]))
                          for k in ("area", "elongation", "irregularity")}
        assert features[name]["area"][1] == pytest.approx(features[name]["area"][0], rel=0.15)
        orientations = [outline(m)[2] for m in drawn]
        if name == "oval":  # wide lesions stay wide: the long axis near the column axis
            assert np.median(np.minimum(orientations, np.pi - np.array(orientations))) < 0.2
    assert features["oval"]["elongation"][1] == pytest.approx(2.0, abs=0.2)
    assert features["spiky"]["elongation"][1] < 1.3
    assert features["spiky"]["irregularity"][1] > 2 * features["oval"]["irregularity"][1]


def test_shape_model_sampling_masks_are_seeded_and_keep_empty_classes_empty():
    cfg = MaskTransformConfig(source="shape_model")
    pool = [_lesion(64), _ellipse(64, 30, 30, 12, 8), _ellipse(64, 34, 28, 14, 7, 0.3), None]
    drawn = sampling_masks(pool, 5, 32, cfg, seed=3, stream=1)
    assert drawn.shape == (5, 32, 32) and drawn.any(axis=(1, 2)).all()
    assert np.array_equal(drawn, sampling_masks(pool, 5, 32, cfg, seed=3, stream=1))
    assert not np.array_equal(drawn, sampling_masks(pool, 5, 32, cfg, seed=4, stream=1))
    assert not sampling_masks([np.zeros((32, 32), bool)], 3, 32, cfg, seed=0).any()
    assert not sampling_masks([], 2, 32, cfg, seed=0).any()
    # a pool of exactly n masks (as the study passes a draw of the training masks) gives new outlines too
    drawn = sampling_masks(pool[:3], 3, 64, IDENTITY.model_copy(update={"source": "shape_model"}), seed=0)
    assert drawn.any(axis=(1, 2)).all() and not any(np.array_equal(d, m) for d in drawn for m in pool[:3])
    assert not cfg.is_identity
    with pytest.raises(ValueError, match="no non-empty mask"):
        ShapeModel.fit([np.zeros((8, 8), bool)])


# --- control adherence -----------------------------------------------------------------------


def test_cnr_pinned_by_hand():
    image = np.full((16, 16), 110, np.uint8)
    mask = np.zeros((16, 16), bool)
    mask[6:10, 6:10] = True
    image[mask] = 50
    ring = (~mask) & (np.abs(np.mgrid[:16, :16] - 7.5).max(0) < 4.5 + 2)
    image[ring & (np.add(*np.mgrid[:16, :16]) % 2 == 0)] = 100
    image[ring & (np.add(*np.mgrid[:16, :16]) % 2 == 1)] = 120
    # ring width 1: the 4-neighbourhood ring of a 4x4 square has 16 pixels, 8 at 100 and 8 at 120.
    assert contrast_to_noise(image, mask, width=1) == pytest.approx((110 - 50) / 10.0)


def test_darker_inside_is_adherent_random_is_not():
    rng = np.random.default_rng(0)
    masks = [np.roll(_lesion(), k, axis=1) for k in range(-6, 6, 2)]
    dark = [np.where(m, 40, 140).astype(np.uint8) + rng.integers(0, 30, (32, 32)).astype(np.uint8) for m in masks]
    noise = [rng.integers(0, 256, (32, 32)).astype(np.uint8) for _ in masks]
    good, bad = control_adherence(dark, masks), control_adherence(noise, masks)
    assert good["adherent_share"] == 1.0 and good["cnr_mean"] > 2 and good["gap"] > 0
    assert bad["adherent_share"] <= 1 / len(masks) and abs(bad["cnr_mean"]) < 0.25
    normal = control_adherence(noise[:2], [np.zeros((32, 32), bool), None])
    assert normal["n"] == 2 and normal["n_scored"] == 0 and np.isnan(normal["cnr_mean"])


# --- the study -------------------------------------------------------------------------------


def test_study_writes_mask_files_next_to_controlnet_images(tmp_path):
    from busynth.cells import read_synthetic
    from busynth.experiment import run_study

    config = load_config("smoke", ["run.methods=[real,controlnet]", "split.folds=2"])
    run_study(config, tmp_path, build_html=False)
    folder = tmp_path / "synthetic" / "controlnet" / "fold0_seed0"
    images = [p for p in folder.glob("*/*.png") if not p.name.endswith("_mask.png")]
    assert images and all(p.with_name(p.stem + "_mask.png").is_file() for p in images)
    assert (tmp_path / "generators" / "controlnet" / "fold0_seed0" / "base" / "generator.json").is_file()
    synthetic = read_synthetic(folder, "controlnet")
    train = [Record(id=f"r{i}", label=s.label, image=s.image, mask=s.mask, path="x.png")
             for i, s in enumerate(synthetic)]
    result = evaluate_adherence(tmp_path, "controlnet", 0, 0, config.data.classes, train, synthetic)
    assert result["generated"]["per_class"]["normal"]["n_scored"] == 0
    assert result["generated"]["per_class"]["benign"]["n_scored"] > 0
    assert (tmp_path / "cells" / "controlnet" / "fold0_seed0" / "adherence.json").is_file()
    from busynth.report import build_report

    page = build_report(tmp_path).read_text()
    assert "Control adherence" in page and "mask outlines on generated images" in page
