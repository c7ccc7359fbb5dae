"""The settings of the diffusion generators (``sd-lora``, ``controlnet``) and what validating them needs.

Kept apart from the models so that a study's configuration is checked without importing diffusers,
transformers and peft (seconds at every ``busynth run`` start); the generator modules import them
from here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from busynth.config import MixedPrecision, SamplingPrecision
from busynth.engine import StageConfig, stage_over_defaults
from busynth.generators.diffusion.masks import MaskTransformConfig
from busynth.io import check_model_source

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


class LoraSettings(BaseModel):
    """Rank, scale and placement of the LoRA adapter."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(default=8, ge=1)
    # alpha / rank scales the update; alpha = rank gives scale 1.
    alpha: float = Field(default=8.0, gt=0.0)
    target_modules: list[str] = Field(default_factory=lambda: list(ATTENTION_PROJECTIONS), min_length=1)


class TinyModelConfig(BaseModel):
    """Sizes of the ``tiny`` Stable Diffusion built from scratch (defaults: 128 px, 16x16 latents)."""

    model_config = ConfigDict(extra="forbid")

    # One entry per encoder block; len - 1 downsamplings, so 4 entries make an f8 autoencoder.
    vae_channels: list[int] = Field(default_factory=lambda: [16, 32, 64, 64], min_length=2)
    vae_layers_per_block: int = Field(default=1, ge=1)
    latent_channels: int = Field(default=4, ge=1)
    unet_channels: list[int] = Field(default_factory=lambda: [32, 64, 64], min_length=2)
    unet_layers_per_block: int = Field(default=1, ge=1)
    # Cross-attention (and so LoRA) only in UNet blocks whose latent side is <= this; 8 keeps
    # the 16x16 block attention-free, which more than halves a CPU step (0.17 s vs 0.40 s, batch 16).
    attention_max_resolution: int = Field(default=8, ge=1)
    # diffusers' name; for SD 1.x UNets it is the number of heads. 2 heads of dimension 32 (at 64 channels)
    # instead of 8 of dimension 8: the same FLOPs, 0.70-0.84x the time of a base-UNet step on a 2-core EPYC, and on
    # BUSI fold 0 the same label fidelity and FID (README, "Tiny diffusion"; bench/bench_flops.py --ab).
    attention_head_dim: int = Field(default=2, ge=1)
    norm_num_groups: int = Field(default=16, ge=1)
    text_hidden_size: int = Field(default=64, ge=8)
    text_layers: int = Field(default=2, ge=1)
    text_heads: int = Field(default=2, ge=1)
    max_prompt_tokens: int = Field(default=32, ge=4)

    @model_validator(mode="after")
    def _groups_divide_channels(self) -> TinyModelConfig:
        if any(c < 1 for c in [*self.vae_channels, *self.unet_channels]):
            raise ValueError(f"channel counts must be positive, got vae_channels={self.vae_channels}, "
                             f"unet_channels={self.unet_channels}")
        bad = [c for c in [*self.vae_channels, *self.unet_channels] if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every channel count, not {bad}")
        if self.text_hidden_size % self.text_heads:
            raise ValueError("text_hidden_size must be divisible by text_heads")
        return self

    @property
    def vae_factor(self) -> int:
        """Downsampling factor of the autoencoder (2 ** (blocks - 1))."""
        return 2 ** (len(self.vae_channels) - 1)


def local_vae_factor(source: str | Path) -> int | None:
    """The downsampling factor (2 ** (len(block_out_channels) - 1)) of the autoencoder in a local
    pipeline folder, or None when ``source`` is not such a folder (a hub id)."""
    path = Path(source).expanduser() / "vae" / "config.json"
    try:
        channels = json.loads(path.read_text())["block_out_channels"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return 2 ** (len(channels) - 1)


DEFAULT_PROMPTS = {
    "normal": "a breast ultrasound image of normal breast tissue: skin, fat, fibroglandular layer and muscle, no mass",
    "benign": "a breast ultrasound image of a benign lesion: oval, circumscribed, hypoechoic mass",
    "malignant": "a breast ultrasound image of a malignant lesion: irregular, spiculated, hypoechoic mass "
                 "with posterior acoustic shadowing",
}


class SDLoraConfig(BaseModel):
    """Settings of ``sd-lora``; defaults are the tiny CPU preset (128 px, fits a BUSI fold in minutes)."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["tiny", "pretrained"] = "tiny"
    pretrained_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    image_size: int = Field(default=128, ge=8)
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    prompts: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_PROMPTS))
    generic_prompt: str = "a breast ultrasound image"
    # tiny only: what the base UNet is pre-trained on. "class": each image with its class prompt
    # (prompt_dropout still teaches the unconditional model that guidance needs); "generic": every image
    # with generic_prompt, so the class reaches the UNet only through the LoRA stage. On BUSI (cpu
    # preset, fold 0) "class" raised label fidelity from 0.01/0.33/0.70 to 0.19/0.61/0.97
    # (normal/benign/malignant) at the same cost (README, "Tiny diffusion").
    base_prompt: Literal["generic", "class"] = "class"
    # tiny only: keep an exponential moving average of the base UNet's weights with this decay and use
    # it as the base (as diffusers' training scripts do with --use_ema); None: the last weights.
    base_ema_decay: float | None = Field(default=None, gt=0.0, lt=1.0)
    lora_mode: Literal["shared", "per_class"] = "shared"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    autoencoder_training: StageConfig = Field(default_factory=lambda: StageConfig(
        steps=400, batch_size=8, lr=1e-3, warmup_steps=20, prompt_dropout=0.0, checkpoint_every=200))
    autoencoder_crop: int = Field(default=64, ge=8)
    autoencoder_kl_weight: float = Field(default=1e-6, ge=0.0)
    base_training: StageConfig = Field(default_factory=lambda: StageConfig(
        steps=1600, batch_size=16, lr=1e-3, warmup_steps=50, prompt_dropout=0.1, snr_gamma=5.0))
    lora_training: StageConfig = Field(default_factory=lambda: StageConfig(
        steps=400, batch_size=16, lr=1e-3, warmup_steps=20, prompt_dropout=0.1, snr_gamma=5.0))
    # Also cache latents of the left-right mirrored images (a flip of the latent is not one of the image).
    random_flip: bool = True
    mixed_precision: MixedPrecision = "no"
    gradient_checkpointing: bool = False
    encode_batch_size: int = Field(default=16, ge=1)
    sampling_steps: int = Field(default=20, ge=1)
    guidance_scale: float = Field(default=3.0, ge=0.0)
    sample_batch_size: int = Field(default=32, ge=1)
    # bf16 autocast while sampling (weights stay in their dtype). On this CPU (AVX-512 BF16) ~0.76x the
    # time of fp32, images within a grey level or two (bench/bench_speed.py); training under bf16 is slower.
    sampling_precision: SamplingPrecision = "no"

    _stages_keep_their_defaults = field_validator("autoencoder_training", "base_training", "lora_training",
                                                  mode="before")(classmethod(stage_over_defaults))

    @field_validator("pretrained_model")
    @classmethod
    def _pretrained_model_exists(cls, v: str, info: ValidationInfo) -> str:
        return check_model_source(v, "model_index.json") if info.data.get("source") == "pretrained" else v

    @model_validator(mode="after")
    def _check_sizes(self) -> SDLoraConfig:
        if self.source == "tiny":
            factor = self.tiny.vae_factor * 2 ** (len(self.tiny.unet_channels) - 1)
            if self.image_size % factor:
                raise ValueError(f"image_size {self.image_size} must be divisible by {factor} for the tiny model "
                                 f"(autoencoder factor {self.tiny.vae_factor} times the UNet's "
                                 f"{2 ** (len(self.tiny.unet_channels) - 1)})")
            crop = min(self.autoencoder_crop, self.image_size)
            if crop % self.tiny.vae_factor:
                raise ValueError(f"autoencoder_crop {self.autoencoder_crop} must be divisible by the autoencoder "
                                 f"factor {self.tiny.vae_factor}")
        else:
            factor = max(8, local_vae_factor(self.pretrained_model) or 8)
            if self.image_size % factor:
                raise ValueError(f"image_size {self.image_size} must be divisible by {factor}, the downsampling "
                                 f"factor of the autoencoder of {self.pretrained_model}")
        stages = ("autoencoder_training", "base_training", "lora_training") if self.source == "tiny" \
            else ("lora_training",)
        for stage in stages:
            if getattr(self, stage).steps < 1:
                raise ValueError(f"{stage}.steps must be at least 1, got {getattr(self, stage).steps}")
        return self


def _checks_fit_inputs(info: ValidationInfo) -> bool:
    """False when a fitted artifact's config is being reloaded (see ``Generator.parse_config``)."""
    return not isinstance(info.context, dict) or info.context.get("fit_inputs", True)


class ControlNetConfig(BaseModel):
    """Settings of ``controlnet``; defaults are the tiny CPU preset (the base decides size and prompts)."""

    model_config = ConfigDict(extra="forbid")

    # An sd-lora artifact folder to build on; None = the sibling sd-lora cell, else fit one into base/.
    base: str | None = None
    sd_lora: SDLoraConfig = Field(default_factory=SDLoraConfig)  # only used when the base is fitted here
    # A pretrained ControlNet (hub id or folder, e.g. lllyasviel/control_v11p_sd15_seg) instead of from_unet.
    pretrained_controlnet: str | None = None
    # Channels of the conditioning encoder (one entry per 2x downsampling + 1); None: sized to the base.
    conditioning_embedding_channels: list[int] | None = None
    training: StageConfig = Field(default_factory=lambda: StageConfig(
        steps=1200, batch_size=8, lr=5e-4, warmup_steps=50, prompt_dropout=0.1, snr_gamma=5.0, checkpoint_every=200))
    random_flip: bool = True
    mixed_precision: MixedPrecision = "no"
    gradient_checkpointing: bool = False
    encode_batch_size: int = Field(default=16, ge=1)
    # Classes sampled with empty masks whatever masks are passed (images without a lesion).
    empty_mask_classes: list[str] = Field(default_factory=lambda: ["normal"])
    masks: MaskTransformConfig = Field(default_factory=MaskTransformConfig)
    conditioning_scale: float = Field(default=1.0, ge=0.0)
    sampling_steps: int = Field(default=20, ge=1)
    guidance_scale: float = Field(default=3.0, ge=0.0)
    sample_batch_size: int = Field(default=32, ge=1)

    @field_validator("base")
    @classmethod
    def _base_is_a_fit(cls, v: str | None, info: ValidationInfo) -> str | None:
        if not _checks_fit_inputs(info):
            return v  # a fitted artifact holds what it needs of its base
        if v is not None and not (Path(v) / "generator.json").is_file():
            problem = "not an sd-lora fit (no generator.json)" if Path(v).is_dir() else "no such folder"
            raise ValueError(f"{v!r}: {problem}")
        return v

    @field_validator("pretrained_controlnet")
    @classmethod
    def _pretrained_controlnet_exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        return v if v is None or not _checks_fit_inputs(info) else check_model_source(v, "config.json")

    @field_validator("conditioning_embedding_channels")
    @classmethod
    def _positive_channels(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(c < 1 for c in v)):
            raise ValueError(f"must list positive channel counts, got {v}")
        return v

    _training_keeps_its_defaults = field_validator("training", mode="before")(classmethod(stage_over_defaults))

    @field_validator("training")
    @classmethod
    def _trains(cls, v: StageConfig) -> StageConfig:
        if v.steps < 1:
            raise ValueError(f"steps must be at least 1, got {v.steps}")
        return v
