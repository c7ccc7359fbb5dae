"""Tiny, fast checks of the diffusion stack (sd-lora): components, the training loop, LoRA, sampling.

Everything runs on 16-32 px images with a few steps; nothing is downloaded (HF_HUB_OFFLINE).
The module runs torch on one thread: these models are far too small to gain from two, and on
a shared, busy 2-core machine two OpenMP threads make each op wait for a descheduled thread.
"""

from __future__ import annotations

import csv
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers.tiny import CLASSES, TINY_MODEL

from busynth.checkpoint import list_checkpoints
from busynth.config import PhantomConfig
from busynth.data.phantom import make_phantom
from busynth.engine import StageConfig, batch_indices, learning_rate, train_stage
from busynth.errors import ConfigError, RunStateError
from busynth.generators.base import generator_class, read_generator_info
from busynth.generators.diffusion.components import build_tiny_components, word_level_clip_tokenizer
from busynth.generators.diffusion.lora import add_unet_lora, load_lora_into
from busynth.generators.diffusion.sample import sample_gray, with_dpm_solver
from busynth.generators.diffusion.sd_lora import SDLoraGenerator, records_to_pixels
from busynth.generators.diffusion.settings import LoraSettings, TinyModelConfig
from busynth.generators.diffusion.train import AutoencoderStage, NoisePredictionStage, min_snr_weights
from busynth.presets import load_config

TINY = {"image_size": 32, "tiny": TINY_MODEL, "autoencoder_crop": 16,
        "autoencoder_training": {"steps": 4, "batch_size": 4, "checkpoint_every": 2},
        "base_training": {"steps": 3, "batch_size": 4}, "lora_training": {"steps": 3, "batch_size": 4},
        "lora": {"rank": 2, "alpha": 2.0}, "sampling_steps": 3, "guidance_scale": 2.0, "encode_batch_size": 8}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def records():
    """Twelve 32 px phantom records, four per class."""
    return make_phantom(PhantomConfig(n_per_class={c: 4 for c in CLASSES}, size=32, near_duplicate_rate=0.0), CLASSES)


@pytest.fixture(scope="module")
def fitted(records, tmp_path_factory):
    """A tiny sd-lora generator fitted once for the module, and its artifact folder."""
    out = tmp_path_factory.mktemp("sdlora")
    gen = SDLoraGenerator(TINY, classes=CLASSES)
    gen.fit(records, out, seed=3)
    return gen, out


def _tiny_parts(image_size: int = 16, seed: int = 0):
    return build_tiny_components(TinyModelConfig(**TINY_MODEL), image_size, ["a breast ultrasound image"], seed)


def _noise_stage(parts, unet, n: int = 8, dropout: float = 0.0, snr_gamma: float | None = None):
    """A denoising stage over random cached moments at 2x2 latents, with two random prompts + empty."""
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(3, 4, parts.text_encoder.config.hidden_size, generator=generator)
    data = {"moments": torch.cat([torch.randn(n, 4, 2, 2, generator=generator), torch.full((n, 4, 2, 2), -6.0)], 1),
            "prompt": torch.arange(n) % 2}
    stage = NoisePredictionStage("base", unet, unet, parts.noise_scheduler, embeddings, 2, 1.0, dropout, snr_gamma)
    return stage, data


# --- pure functions --------------------------------------------------------------------------


def test_min_snr_weights_pinned():
    snr = torch.tensor([0.5, 5.0, 20.0])
    assert torch.allclose(min_snr_weights(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.25]))
    assert torch.allclose(min_snr_weights(snr, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5.0 / 6.0, 5.0 / 21.0]))
    with pytest.raises(ValueError):
        min_snr_weights(snr, 5.0, "sample")


def test_learning_rate_schedule_pinned():
    cfg = StageConfig(steps=11, lr=1e-3, warmup_steps=2, min_lr_ratio=0.1)
    assert learning_rate(0, cfg) == pytest.approx(5e-4)
    assert learning_rate(1, cfg) == pytest.approx(1e-3)
    assert learning_rate(2, cfg) == pytest.approx(1e-3)
    assert learning_rate(10, cfg) == pytest.approx(1e-4)
    assert learning_rate(5, cfg.model_copy(update={"lr_schedule": "constant"})) == 1e-3


def test_batch_indices_cover_an_epoch_without_repeats():
    rows = torch.cat([batch_indices(10, 3, k, seed=1) for k in range(3)])
    assert len(set(rows.tolist())) == 9
    assert torch.equal(batch_indices(10, 3, 4, seed=1), batch_indices(10, 3, 4, seed=1))


def test_tokenizer_built_offline_roundtrips(tmp_path):
    tok = word_level_clip_tokenizer(["a benign lesion: oval, hypoechoic"], max_length=16)
    pieces = tok.convert_ids_to_tokens(tok("a benign lesion").input_ids)
    assert pieces == ["<|startoftext|>", "a</w>", "benign</w>", "lesion</w>", "<|endoftext|>"]
    assert len(tok("zebra crossing").input_ids) > 2  # unseen words fall back to pieces, never fail
    tok.save_pretrained(tmp_path)
    again = type(tok).from_pretrained(tmp_path)
    assert again("a benign lesion, oval").input_ids == tok("a benign lesion, oval").input_ids
    assert again.model_max_length == 16


# --- the training loop -----------------------------------------------------------------------


def test_denoising_loss_decreases_on_phantom(records, tmp_path):
    parts = _tiny_parts(32)
    pixels = records_to_pixels(records, 32)
    ae = AutoencoderStage(parts.vae, crop=16)
    ae_hist = train_stage(ae, {"pixels": pixels}, StageConfig(steps=60, batch_size=6, lr=2e-3, checkpoint_every=100),
                          tmp_path / "ae", seed=0)
    l1 = [r["l1"] for r in ae_hist]
    assert np.mean(l1[-10:]) < 0.8 * np.mean(l1[:10])
    with torch.no_grad():
        dist = ae.vae.encode(pixels).latent_dist
    moments = torch.cat([dist.mean, dist.logvar], 1)
    stage = NoisePredictionStage("base", parts.unet, parts.unet, parts.noise_scheduler,
                                 torch.zeros(2, 4, 16), 1, float(1 / dist.mean.std()), 0.0, 5.0)
    hist = train_stage(stage, {"moments": moments, "prompt": torch.zeros(len(records), dtype=torch.long)},
                       StageConfig(steps=40, batch_size=12, lr=2e-3, checkpoint_every=100), tmp_path / "base", 0)
    losses = [r["loss"] for r in hist]
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])


def test_lora_step_changes_only_lora_parameters(tmp_path):
    parts = _tiny_parts()
    add_unet_lora(parts.unet, LoraSettings(rank=2, alpha=2.0))
    before = {k: v.detach().clone() for k, v in parts.unet.state_dict().items()}
    stage, data = _noise_stage(parts, parts.unet)
    trainable = {n for n, p in parts.unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    train_stage(stage, data, StageConfig(steps=1, batch_size=4, lr=1e-2), tmp_path, seed=0)
    after = parts.unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("lora_B" in k for k in changed)  # B starts at zero and must move


def test_resume_continues_step_count_and_matches_uninterrupted(tmp_path):
    cfg = StageConfig(steps=4, batch_size=4, lr=1e-2, grad_accum=2, checkpoint_every=2, keep_checkpoints=1,
                      snr_gamma=5.0, prompt_dropout=0.3)

    def run(folder, crash_at=None):
        parts = _tiny_parts(seed=1)
        stage, data = _noise_stage(parts, parts.unet, dropout=0.3, snr_gamma=5.0)
        if crash_at is not None:
            calls, real_loss = [0], stage.loss

            def crashing(batch, generator):
                calls[0] += 1
                if calls[0] > crash_at:
                    raise KeyboardInterrupt("simulated kill")
                return real_loss(batch, generator)

            stage.loss = crashing
        history = train_stage(stage, data, cfg, folder, seed=5)
        return stage.model, history

    full_model, full_hist = run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", crash_at=5)  # dies in optimizer step 3, after checkpoint-2
    assert [s for s, _ in list_checkpoints(tmp_path / "resumed")] == [2]
    resumed_model, resumed_hist = run(tmp_path / "resumed")
    assert [int(r["step"]) for r in resumed_hist] == [0, 1, 2, 3]
    assert [s for s, _ in list_checkpoints(tmp_path / "resumed")] == [4]
    for (name, a), (_, b) in zip(full_model.named_parameters(), resumed_model.named_parameters()):
        assert torch.equal(a, b), name
    assert [float(r["loss"]) for r in resumed_hist] == pytest.approx([float(r["loss"]) for r in full_hist], rel=1e-6)
    with (tmp_path / "resumed" / "history.csv").open() as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [0, 1, 2, 3]


def test_resume_refuses_a_different_run(tmp_path):
    parts = _tiny_parts()
    stage, data = _noise_stage(parts, parts.unet)
    train_stage(stage, data, StageConfig(steps=1, batch_size=4), tmp_path, seed=0)
    with pytest.raises(RunStateError, match="different"):
        train_stage(stage, data, StageConfig(steps=1, batch_size=4), tmp_path, seed=1)


# --- the generator ---------------------------------------------------------------------------


def test_fit_writes_artifact_and_records_train_ids(fitted, records):
    gen, out = fitted
    info = read_generator_info(out)
    assert info["name"] == "sd-lora" and info["seed"] == 3
    assert info["train_ids"] == [r.id for r in records] == gen.train_ids
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "model" / "model_index.json").is_file()
    assert {p.name for p in (out / "stages").iterdir()} == {"autoencoder", "base", "lora"}
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))


def test_samples_are_gray_uint8_deterministic_and_prefix_stable(fitted):
    gen, _ = fitted
    a = gen.sample("benign", 3, seed=7)
    assert [s.image.shape for s in a] == [(32, 32)] * 3 and a[0].image.dtype == np.uint8
    assert all(s.label == "benign" and s.mask is None for s in a)
    b = gen.sample("benign", 2, seed=7)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert not np.array_equal(gen.sample("benign", 1, seed=8)[0].image, a[0].image)
    with pytest.raises(ValueError, match="unknown class"):
        gen.sample("cyst", 1)


def test_saved_lora_reloads_through_diffusers_and_gives_identical_samples(fitted):
    gen, out = fitted
    expected = gen.sample("malignant", 2, seed=11)
    pipe = StableDiffusionPipeline.from_pretrained(out / "model", safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.load_lora_weights(str(out / "lora"))  # diffusers' own loader, default file name
    images = sample_gray(with_dpm_solver(pipe), gen.prompt("malignant"), 2, 11, CLASSES.index("malignant"),
                         size=32, steps=3, guidance_scale=2.0)
    assert all(np.array_equal(im, s.image) for im, s in zip(images, expected))
    again = SDLoraGenerator.load(out)
    assert again.train_ids == gen.train_ids
    assert all(np.array_equal(x.image, y.image) for x, y in zip(again.sample("malignant", 2, seed=11), expected))
    # The LoRA changes the output: the base pipeline alone samples something else.
    base = StableDiffusionPipeline.from_pretrained(out / "model", safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    plain = sample_gray(with_dpm_solver(base), gen.prompt("malignant"), 1, 11, 2, size=32, steps=3, guidance_scale=2.0)
    assert not np.array_equal(plain[0], expected[0].image)


def test_refit_reuses_finished_fit_and_refuses_other_data(fitted, records):
    _, out = fitted
    again = SDLoraGenerator({**TINY, "guidance_scale": 4.0}, classes=CLASSES)  # sampling-only change: reuse
    again.fit(records, out, seed=3)
    assert again.pipe is not None
    with pytest.raises(RunStateError, match="train_ids"):
        SDLoraGenerator(TINY, classes=CLASSES).fit(records[:-1], out, seed=3)


def test_bf16_sampling_precision_is_close_to_fp32_and_reuses_the_fit(fitted, records):
    gen, out = fitted
    expected = np.stack([s.image for s in gen.sample("benign", 2, seed=5)])
    bf16 = SDLoraGenerator({**TINY, "sampling_precision": "bf16"}, classes=CLASSES)
    bf16.fit(records, out, seed=3)  # a sampling-only change: the finished fit is reused
    autocast_seen = []
    bf16.pipe.unet.register_forward_hook(lambda *_: autocast_seen.append(torch.is_autocast_enabled("cpu")))
    images = np.stack([s.image for s in bf16.sample("benign", 2, seed=5)])
    assert autocast_seen and all(autocast_seen)
    assert images.dtype == np.uint8 and images.shape == expected.shape
    assert np.abs(images.astype(int) - expected.astype(int)).mean() < 2.0  # grey levels out of 255


def test_config_is_strict():
    with pytest.raises(ConfigError):
        SDLoraGenerator({"guidence_scale": 3.0})
    with pytest.raises(ConfigError, match="divisible"):
        SDLoraGenerator({"image_size": 100})


@pytest.mark.parametrize("generator", ["sd-lora", "controlnet"])
def test_a_stage_given_in_part_keeps_the_generators_defaults_for_the_rest(generator):
    """``--set generators.sd-lora.autoencoder_training.steps=1600`` changes the steps alone: the autoencoder keeps
    its own learning rate (1e-3), warm-up and prompt dropout, not StageConfig's generic ones (1e-4, 0, 0.1)."""
    cls = generator_class(generator)
    stages = ["autoencoder_training", "base_training", "lora_training"] if generator == "sd-lora" else ["training"]
    defaults = cls({}, classes=CLASSES).cfg
    for stage in stages:
        own = getattr(defaults, stage)
        assert own != StageConfig(steps=own.steps)  # the field's defaults differ from the generic ones
        changed = getattr(cls({stage: {"steps": own.steps + 7}}, classes=CLASSES).cfg, stage)
        assert changed == own.model_copy(update={"steps": own.steps + 7})
    with pytest.raises(ConfigError, match="stepz"):
        cls({stages[0]: {"stepz": 3}}, classes=CLASSES)


def test_sd15_preset_pretrained_path_on_a_saved_tiny_pipeline(tmp_path, records):
    """The sd15 preset's sd-lora section, pointed at a tiny SD folder: fit 2 LoRA steps, sample 1 image."""
    study = load_config("sd15")
    section = study.generators["sd-lora"]
    assert section["source"] == "pretrained" and section["image_size"] == 512
    assert section["mixed_precision"] in ("fp16", "bf16") and section["gradient_checkpointing"] is True
    parts = build_tiny_components(TinyModelConfig(**TINY_MODEL), 32, ["a breast ultrasound image"], seed=0)
    parts.pipeline().save_pretrained(tmp_path / "sd")
    cpu_section = {**section, "pretrained_model": str(tmp_path / "sd"), "image_size": 32, "mixed_precision": "no",
                   "lora_training": {**section.get("lora_training", {}), "steps": 2, "batch_size": 4},
                   "sampling_steps": 2, "sample_batch_size": 1}
    gen = SDLoraGenerator(cpu_section, classes=CLASSES)
    out = gen.fit(records, tmp_path / "fit", seed=0)
    assert not (out / "model").exists()  # the pretrained model is referenced, never copied
    assert [s for s, _ in list_checkpoints(out / "stages" / "lora")][-1] == 2
    [sample] = SDLoraGenerator.load(out).sample("normal", 1, seed=0)
    assert sample.image.shape == (32, 32) and sample.image.dtype == np.uint8


def test_per_class_lora_mode(records, tmp_path):
    cfg = {**TINY, "lora_mode": "per_class", "lora_training": {"steps": 1, "batch_size": 4},
           "base_training": {"steps": 1, "batch_size": 4}, "autoencoder_training": {"steps": 1, "batch_size": 4}}
    gen = SDLoraGenerator(cfg, classes=CLASSES)
    out = gen.fit([r for r in records if r.label != "normal"], tmp_path, seed=0)
    assert sorted(p.name for p in (out / "lora").iterdir()) == ["benign", "malignant"]
    assert gen.sample("benign", 1, seed=0)[0].image.shape == (32, 32)
    with pytest.raises(ValueError, match="no LoRA"):
        gen.sample("normal", 1)
    again = SDLoraGenerator.load(out)
    assert np.array_equal(again.sample("malignant", 1, seed=2)[0].image, gen.sample("malignant", 1, seed=2)[0].image)


def test_load_lora_into_named_adapter(fitted):
    _, out = fitted
    pipe = StableDiffusionPipeline.from_pretrained(out / "model", safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    load_lora_into(pipe, out / "lora", adapter_name="x")
    assert pipe.get_list_adapters()["unet"] == ["x"]


def test_class_prompted_base_with_moving_average(records, tmp_path, monkeypatch):
    """base_prompt=class trains the base UNet on each image's class prompt (rows 1..C of the prompt
    table, the mirrored copies too); base_ema_decay saves the moving average as the base, not the
    last weights."""
    from busynth.generators.diffusion import sd_lora

    seen = {}
    real_train_stage = sd_lora.train_stage

    def spy(stage, data, cfg, out_dir, *args, **kwargs):
        history = real_train_stage(stage, data, cfg, out_dir, *args, **kwargs)
        if stage.name == "base":
            seen.update(prompt=data["prompt"].clone(), ema=kwargs.get("ema_decay"),
                        last={k: v.clone() for k, v in stage.model.state_dict().items()},
                        average={k: v.clone() for k, v in stage.ema.module.state_dict().items()})
        return history

    monkeypatch.setattr(sd_lora, "train_stage", spy)
    cfg = {**TINY, "base_prompt": "class", "base_ema_decay": 0.5, "lora_training": {"steps": 1, "batch_size": 4}}
    out = SDLoraGenerator(cfg, classes=CLASSES).fit(records, tmp_path, seed=0)
    expected = torch.tensor([1 + CLASSES.index(r.label) for r in records] * 2)  # random_flip doubles the rows
    assert torch.equal(seen["prompt"], expected) and seen["ema"] == 0.5
    saved = sd_lora.UNet2DConditionModel.from_pretrained(out / "model", subfolder="unet").state_dict()
    assert all(torch.equal(saved[k], seen["average"][k]) for k in saved)
    assert any(not torch.equal(saved[k], seen["last"][k]) for k in saved)
    with pytest.raises(ConfigError, match="generators.sd-lora.base_ema_decay"):
        SDLoraGenerator({**TINY, "base_ema_decay": 1.0}, classes=CLASSES)
