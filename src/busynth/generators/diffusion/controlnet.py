"""Method ``controlnet``: a ControlNet on lesion masks over the fold's Stable Diffusion + LoRA base.

ControlNet (Zhang, Rao & Agrawala, "Adding Conditional Control to Text-to-Image Diffusion
Models", ICCV 2023) is a trainable copy of the UNet's encoder and middle block whose outputs
enter the frozen UNet through zero-initialised 1x1 convolutions
(``down_block_additional_residuals``, ``mid_block_additional_residual``), so training starts
exactly at the base model. Here the base is the fold's ``sd-lora`` fit with its LoRA fused
into the UNet; the conditioning image is the lesion mask (repeated to the ControlNet's
input channels, 0 = background, 1 = lesion); UNet, VAE and text encoder stay frozen. Training
runs on the engine (``busynth.engine.train_stage``) with ``train.ControlNetStage``, which differs from
the LoRA stage only in its trainable module and in ``predict_noise``.

The base is, in this order: the folder in config ``base``; the same cell's ``sd-lora`` fit
next to this one (``<run>/generators/sd-lora/<cell>/``, as the study lays it out); else an
``sd-lora`` fit made here, into ``base/``, with config ``sd_lora``. Its training ids must be
this fit's, so no held-out image reaches the ControlNet through its base.

Artifact folder::

    generator.json            name, config, classes, train ids, seed, base (folder, config, identity),
                              base_model (the identity of the UNet the base's LoRA was trained on)
    base/                     only when the base was fitted here (sd-lora's own layout)
    model/                    tiny bases: the base pipeline, copied (save_pretrained)
    lora/                     the base's LoRA (diffusers' load_lora_weights format), copied
    controlnet/               ControlNetModel.save_pretrained
    masks.safetensors         the training masks per class at image_size (what sample() draws from)
    latents.safetensors       cached autoencoder posteriors of the training images (and mirrors)
    stages/controlnet/        checkpoint-N/ folders and history.csv
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from diffusers import (
    ControlNetModel,
    DDPMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from pydantic import BaseModel
from safetensors.torch import save_file

from busynth.checkpoint import from_pretrained, read_safetensors
from busynth.data.records import Record
from busynth.engine import train_stage
from busynth.errors import ConfigError, RunStateError
from busynth.generators.base import (
    Generator,
    Synthetic,
    read_generator_info,
    save_generator_info,
)
from busynth.generators.diffusion.components import (
    Components,
    freeze,
    move_to,
    weight_dtype,
)
from busynth.generators.diffusion.lora import (
    LORA_WEIGHT_NAME,
    check_same_base,
    load_lora_into,
    unet_fingerprint,
)
from busynth.generators.diffusion.masks import (
    resize_masks,
    sampling_masks,
)
from busynth.generators.diffusion.sample import sample_gray_with_masks, with_dpm_solver
from busynth.generators.diffusion.sd_lora import (
    SDLoraConfig,
    SDLoraGenerator,
    cached_moments,
    embed_prompts,
    encode_moments,
    records_to_pixels,
)
from busynth.generators.diffusion.settings import ControlNetConfig
from busynth.generators.diffusion.train import ControlNetStage
from busynth.io import atomic_path, fit_key, write_dir_atomic

logger = logging.getLogger(__name__)


def fused_base_pipeline(source: str | Path, lora_dir: Path, dtype: torch.dtype = torch.float32,
                        base_model: dict[str, Any] | None = None) -> StableDiffusionPipeline:
    """The Stable Diffusion pipeline in ``source`` with the LoRA of ``lora_dir`` fused into its UNet
    (peft layers removed afterwards, so the UNet is a plain UNet2DConditionModel); returns it.
    ``base_model`` is the identity recorded when the LoRA was trained: another base is refused."""
    pipe = from_pretrained(StableDiffusionPipeline, source, dtype=dtype, safety_checker=None, feature_extractor=None,
                           requires_safety_checker=False, what="controlnet base model")
    check_same_base(lora_dir, base_model, unet_fingerprint(pipe.unet, str(source)))
    load_lora_into(pipe, lora_dir, adapter_name="base", base=str(source))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return pipe


def conditioning_channels_for(vae_factor: int, pretrained: bool) -> tuple[int, ...]:
    """Default channels of the ControlNet's conditioning encoder for an autoencoder factor: diffusers'
    (16, 32, 96, 256) for SD's f8, else small ones (8, 16, 32, 64, ...); returns one entry per downsampling + 1."""
    k = int(np.log2(vae_factor)) + 1
    if 2 ** (k - 1) != vae_factor:
        raise ConfigError(f"controlnet: autoencoder factor {vae_factor} is not a power of two")
    if pretrained and k == 4:
        return (16, 32, 96, 256)
    return tuple(min(8 * 2**i, 64) for i in range(k))


class ControlNetGenerator(Generator):
    """ControlNet on lesion masks over the fold's sd-lora base; ``sample`` returns image--mask pairs."""

    name = "controlnet"
    config_model = ControlNetConfig
    needs_masks = True
    sampling_fields = frozenset({"masks", "conditioning_scale", "sampling_steps", "guidance_scale",
                                 "sample_batch_size", "empty_mask_classes"})

    def __init__(self, config: BaseModel | dict | None = None, classes: Sequence[str] = ()):
        super().__init__(config, classes)
        self.pipe: StableDiffusionControlNetPipeline | None = None
        self.base_config: SDLoraConfig | None = None
        self.mask_pool: dict[str, np.ndarray] = {}
        self.seed = 0

    @property
    def cfg(self) -> ControlNetConfig:
        """The validated config."""
        return self.config  # type: ignore[return-value]

    @property
    def image_size(self) -> int:
        """Side of generated images and masks (the base's image_size)."""
        return (self.base_config or self.cfg.sd_lora).image_size

    def prompt(self, label: str) -> str:
        """The base's prompt of class ``label``."""
        return SDLoraGenerator(self.base_config or self.cfg.sd_lora, self.classes).prompt(label)

    # --- the base ----------------------------------------------------------------------------

    def resolve_base(self, train_records: Sequence[Record], out_dir: Path, seed: int) -> Path:
        """The sd-lora folder this ControlNet builds on (config ``base``, the sibling sd-lora cell, or
        a fit made now into ``out_dir/base``); refuses a base trained on other images. Returns it."""
        if self.cfg.base is not None:
            base = Path(self.cfg.base)
        else:
            sibling = out_dir.parent.parent / SDLoraGenerator.name / out_dir.name
            if (sibling / "generator.json").is_file():
                base = sibling
            else:
                logger.info("controlnet: no sd-lora fit at %s; fitting the base into %s", sibling, out_dir / "base")
                base = SDLoraGenerator(self.cfg.sd_lora, self.classes).fit(train_records, out_dir / "base", seed)
        info = read_generator_info(base)
        if info.get("name") != SDLoraGenerator.name:
            raise ConfigError(f"controlnet: base {base} is a {info.get('name')!r} fit, not sd-lora")
        if info.get("train_ids") != self.train_ids:
            raise ConfigError(f"controlnet: base {base} was trained on other images than this fit; "
                              "use the same fold's sd-lora fit (or base: null to fit one)")
        if info.get("lora_groups", [""]) != [""]:
            raise ConfigError(f"controlnet: base {base} has per-class LoRAs; the ControlNet needs lora_mode: shared")
        logger.info("controlnet: building on the sd-lora fit in %s", base)
        return base

    def _copy_base(self, base: Path, out_dir: Path) -> None:
        """Copy what sampling needs from the base (its LoRA; tiny: its pipeline) into the artifact."""
        if not (out_dir / "lora" / LORA_WEIGHT_NAME).is_file():
            write_dir_atomic(out_dir / "lora", lambda tmp: shutil.copy2(base / "lora" / LORA_WEIGHT_NAME, tmp))
        if self.base_config.source == "tiny" and not (out_dir / "model" / "model_index.json").is_file():
            write_dir_atomic(out_dir / "model", lambda tmp: shutil.copytree(base / "model", tmp, dirs_exist_ok=True))

    def _base_source(self, out_dir: Path) -> str | Path:
        return out_dir / "model" if self.base_config.source == "tiny" else self.base_config.pretrained_model

    # --- fit ---------------------------------------------------------------------------------

    def fit(self, train_records: Sequence[Record], out_dir: Path, seed: int = 0) -> Path:
        """Train the ControlNet on the training images that have masks (resuming its latest checkpoint);
        return ``out_dir`` (see the module docstring)."""
        cfg, out_dir = self.cfg, Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self._remember_training_ids(train_records)
        if self.reuse_finished_fit(out_dir, seed):
            return out_dir
        base = self.resolve_base(train_records, out_dir, seed)
        base_info = read_generator_info(base)
        self.base_config = SDLoraGenerator.parse_config(base_info["config"])
        self._copy_base(base, out_dir)
        device, dtype = PartialState().device, weight_dtype(cfg.mixed_precision)
        pipe = fused_base_pipeline(self._base_source(out_dir), out_dir / "lora", base_model=base_info.get("base_model"))
        comps = Components(pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer,
                           DDPMScheduler.from_config(pipe.scheduler.config))
        freeze(comps.vae, comps.unet, comps.text_encoder)
        for module in (comps.vae, comps.unet, comps.text_encoder):
            move_to(module, device, dtype)
        scaling = float(base_info.get("scaling_factor") or comps.vae.config.scaling_factor)

        with_masks = [r for r in train_records if r.mask is not None]
        if len(with_masks) < len(train_records):
            logger.warning("controlnet: %d training image(s) without a mask are left out of ControlNet training",
                           len(train_records) - len(with_masks))
        size = self.image_size
        masks = torch.from_numpy(resize_masks([r.mask for r in with_masks], size))[:, None]
        pixels = records_to_pixels(with_masks, size)
        labels = [r.label for r in with_masks]
        if cfg.random_flip:
            pixels, masks, labels = torch.cat([pixels, pixels.flip(-1)]), torch.cat([masks, masks.flip(-1)]), labels * 2
        identity = {"train": fit_key(self.train_ids), "classes": self.classes, "seed": seed,
                    "base": fit_key({k: base_info.get(k)
                                         for k in ("config", "train_ids", "seed", "scaling_factor")}),
                    "config": fit_key(cfg.model_dump(mode="json", include={"pretrained_controlnet", "random_flip",
                                                                               "conditioning_embedding_channels"}))}
        moments = cached_moments(out_dir / "latents.safetensors", fit_key(identity), len(pixels),
                                 lambda: encode_moments(comps.vae, pixels, cfg.encode_batch_size))
        prompts = [*(self.prompt(c) for c in self.classes), ""]
        embeddings = embed_prompts(comps, prompts)
        data = {"moments": moments, "prompt": torch.tensor([self.classes.index(lab) for lab in labels]), "mask": masks}

        with torch.random.fork_rng(devices=[]):  # its random layers depend on the seed alone, so that a
            torch.manual_seed(seed)  # fit restarted in a new process begins from the same weights
            controlnet = self._initial_controlnet(comps.unet)
        if cfg.gradient_checkpointing:
            controlnet.enable_gradient_checkpointing()
            comps.unet.enable_gradient_checkpointing()
        stage = ControlNetStage(controlnet, comps.unet, comps.noise_scheduler, embeddings, len(prompts) - 1, scaling,
                                cfg.training.prompt_dropout, cfg.training.snr_gamma)
        train_stage(stage, data, cfg.training, out_dir / "stages" / "controlnet", seed, cfg.mixed_precision,
                    {**identity, "training": cfg.training.model_dump(mode="json")})
        write_dir_atomic(out_dir / "controlnet", lambda tmp: stage.model.save_pretrained(tmp))
        self._save_mask_pool(with_masks, out_dir / "masks.safetensors")
        self.seed = seed
        save_generator_info(out_dir, self.name, cfg, {
            **self.fit_identity(seed), "scaling_factor": scaling, "base_model": base_info.get("base_model"),
            "base": {"folder": str(base.resolve()), "config": base_info["config"], "seed": base_info.get("seed")}})
        self._load_artifact(out_dir, read_generator_info(out_dir))
        return out_dir

    def _initial_controlnet(self, unet: UNet2DConditionModel) -> ControlNetModel:
        """A pretrained ControlNet (config ``pretrained_controlnet``) or ``ControlNetModel.from_unet``
        (encoder weights copied from the base UNet, zero convolutions), in float32 and trainable."""
        cfg = self.cfg
        if cfg.pretrained_controlnet:
            controlnet = from_pretrained(ControlNetModel, cfg.pretrained_controlnet, dtype=torch.float32,
                                         what="generators.controlnet.pretrained_controlnet", error=ConfigError)
            if tuple(controlnet.config.block_out_channels) != tuple(unet.config.block_out_channels):
                raise ConfigError(f"controlnet: {cfg.pretrained_controlnet} does not fit the base UNet "
                                  f"(block_out_channels {controlnet.config.block_out_channels} vs "
                                  f"{unet.config.block_out_channels})")
        else:
            vae_factor = 2 ** (len(self.base_config.tiny.vae_channels) - 1) if self.base_config.source == "tiny" else 8
            channels = cfg.conditioning_embedding_channels or conditioning_channels_for(
                vae_factor, self.base_config.source == "pretrained")
            controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(channels),
                                                   conditioning_channels=3)
        controlnet.to(unet.device)
        if controlnet.dtype != torch.float32:  # from_unet copies a half-precision UNet's dtype
            controlnet.to(dtype=torch.float32)
        controlnet.requires_grad_(True)
        controlnet.train()
        return controlnet

    def _save_mask_pool(self, records: Sequence[Record], path: Path) -> None:
        """Write the training masks per class at image_size (uint8) for sampling without given masks."""
        pool = {c: torch.from_numpy(resize_masks([r.mask for r in records if r.label == c], self.image_size)
                                    .astype(np.uint8)) for c in self.classes}
        with atomic_path(path) as tmp:
            save_file({c: m.contiguous() for c, m in pool.items() if len(m)}, str(tmp))

    # --- load and sample ---------------------------------------------------------------------

    def _load_artifact(self, directory: Path, info: dict[str, Any]) -> None:
        """Build the sampling pipeline: base + fused LoRA, the saved ControlNet, DPM-Solver++."""
        directory = Path(directory)
        self.train_ids = list(info.get("train_ids", []))
        self.seed = int(info.get("seed", 0))
        self.base_config = SDLoraGenerator.parse_config(info["base"]["config"])
        dtype = weight_dtype(self.cfg.mixed_precision)
        base = fused_base_pipeline(self._base_source(directory), directory / "lora", dtype, info.get("base_model"))
        controlnet = from_pretrained(ControlNetModel, directory / "controlnet", dtype=dtype, what="controlnet folder")
        for key in ("block_out_channels", "cross_attention_dim", "in_channels"):
            if controlnet.config.get(key) != base.unet.config.get(key):
                raise RunStateError(f"the ControlNet in {directory / 'controlnet'} was made for another base model: "
                                    f"its {key} is {controlnet.config.get(key)}, the base UNet's "
                                    f"({self._base_source(directory)}) {base.unet.config.get(key)}")
        pipe = StableDiffusionControlNetPipeline(
            vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
            controlnet=controlnet, scheduler=base.scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        self.pipe = with_dpm_solver(pipe).to(PartialState().device)
        stored = (read_safetensors(directory / "masks.safetensors")[0]
                  if (directory / "masks.safetensors").is_file() else {})
        self.mask_pool = {c: m.numpy().astype(bool) for c, m in stored.items()}

    @classmethod
    def load(cls, directory: Path) -> ControlNetGenerator:
        """Rebuild a fitted generator from ``generator.json``, ``model/`` (tiny), ``lora/`` and ``controlnet/``."""
        info = read_generator_info(directory, expected=cls.name)
        gen = cls(cls.parse_config(info["config"], fit_inputs=False), classes=info["classes"])
        gen._load_artifact(Path(directory), info)
        return gen

    def sampling_masks(self, label: str, n: int, seed: int, masks: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """The ``n`` masks images of ``label`` are generated with: ``masks`` (n of them are used in order;
        another count is drawn from), else the stored training masks, each transformed with its own seed;
        with ``masks.source: shape_model``, new outlines from a shape model of the stored training masks
        (``masks`` is then ignored: the study passes a draw of the same training masks); empty for
        ``empty_mask_classes``. Returns bool (n, image_size, image_size)."""
        if label in self.cfg.empty_mask_classes:
            return np.zeros((n, self.image_size, self.image_size), dtype=bool)
        stored = list(self.mask_pool.get(label, []))
        use_stored = masks is None or (self.cfg.masks.source == "shape_model" and stored)
        pool = stored if use_stored else list(masks)
        return sampling_masks(pool, n, self.image_size, self.cfg.masks, seed, stream=self.classes.index(label))

    def sample(self, label: str, n: int, seed: int = 0, masks: Sequence[np.ndarray] | None = None) -> list[Synthetic]:
        """``n`` uint8 (S, S) images of class ``label``, each with the bool mask it was generated with
        (see :meth:`sampling_masks`); DPM-Solver++ with guidance, deterministic for (seed, masks)."""
        if self.pipe is None:
            raise RuntimeError("controlnet: call fit() or load() before sample()")
        if label not in self.classes:
            raise ValueError(f"controlnet: unknown class {label!r} (classes: {self.classes})")
        chosen = self.sampling_masks(label, n, seed, masks)
        images = sample_gray_with_masks(self.pipe, self.prompt(label), chosen, seed, self.classes.index(label),
                                        steps=self.cfg.sampling_steps, guidance_scale=self.cfg.guidance_scale,
                                        batch_size=self.cfg.sample_batch_size,
                                        conditioning_scale=self.cfg.conditioning_scale)
        return [Synthetic(image=im, label=label, mask=m, seed=seed) for im, m in zip(images, chosen, strict=True)]
