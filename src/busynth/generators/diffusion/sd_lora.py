"""Method ``sd-lora``: Stable Diffusion adapted with LoRA on class prompts.

Two sources, one code path (see components.py): ``pretrained`` adapts Stable Diffusion v1.5
(or any diffusers SD folder) with LoRA only, VAE and text encoder frozen; ``tiny`` builds the
same classes small and first trains them on the fold's training images -- autoencoder,
latents cached once, base UNet on a generic prompt -- then adapts the base with the same
LoRA stage. Every stage runs ``train.train_stage``.

Artifact folder::

    generator.json                 name, config, classes, train ids, seed, scaling factor, and
                                   base_model: the identity of the UNet the LoRA was trained on
    model/                         tiny only: the base pipeline (save_pretrained; vae, unet, text encoder,
                                   tokenizer, scheduler)
    lora/pytorch_lora_weights.safetensors          one LoRA for all classes (lora_mode=shared), or
    lora/<class>/pytorch_lora_weights.safetensors  one per class (lora_mode=per_class)
    latents.safetensors            the cached autoencoder posteriors of the training images
    stages/<stage>/                checkpoint-N/ folders and history.csv of each training stage
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from pydantic import BaseModel
from safetensors.torch import save_file

from busynth.checkpoint import from_pretrained, read_safetensors
from busynth.data.records import Record
from busynth.data.transforms import stack_images
from busynth.engine import StageConfig, train_stage
from busynth.errors import ConfigError, RunStateError
from busynth.generators.base import Generator, Synthetic, read_generator_info, save_generator_info
from busynth.generators.diffusion.components import (
    Components,
    freeze,
    load_components,
    load_pretrained_components,
    move_to,
    weight_dtype,
)
from busynth.generators.diffusion.lora import (
    LORA_WEIGHT_NAME,
    add_unet_lora,
    check_same_base,
    load_lora_into,
    save_unet_lora,
    unet_fingerprint,
)
from busynth.generators.diffusion.sample import sample_gray, with_dpm_solver
from busynth.generators.diffusion.settings import SDLoraConfig
from busynth.generators.diffusion.train import AutoencoderStage, NoisePredictionStage
from busynth.io import atomic_path, fit_key, write_dir_atomic

logger = logging.getLogger(__name__)

def records_to_pixels(records: Sequence[Record], size: int) -> torch.Tensor:
    """Records -> float32 (N, 3, size, size) in [-1, 1], the gray image repeated on 3 channels."""
    x = torch.from_numpy(stack_images(records, size)).float().div_(127.5).sub_(1.0)
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


@torch.no_grad()
def encode_moments(vae: torch.nn.Module, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The autoencoder's posterior (mean, logvar) of every image: float32 (N, 2 * latent_channels, h, w)."""
    device, dtype = vae.device, vae.dtype
    chunks = [vae.encode(pixels[i:i + batch_size].to(device, dtype)).latent_dist
              for i in range(0, len(pixels), batch_size)]
    return torch.cat([torch.cat([d.mean, d.logvar], dim=1).float().cpu() for d in chunks]).contiguous()


def cached_moments(path: Path, key: str, n: int, encode: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The autoencoder posteriors cached in ``path`` when it holds ``n`` of them under ``key`` (the
    identity of the images and the autoencoder), else ``encode()``'s, saved there with the key.
    Returns float32 (n, 2 * latent_channels, h, w)."""
    if path.is_file():
        cached, _ = read_safetensors(path)
        if "key" in cached and "moments" in cached and cached["key"].numpy().tobytes().decode() == key \
                and len(cached["moments"]) == n:
            return cached["moments"]
    moments = encode()
    with atomic_path(path) as tmp:
        save_file({"moments": moments, "key": torch.frombuffer(bytearray(key.encode()), dtype=torch.uint8)}, str(tmp))
    return moments


@torch.no_grad()
def embed_prompts(components: Components, prompts: Sequence[str]) -> torch.Tensor:
    """Frozen text-encoder outputs (P, max_length, D) of ``prompts``, as the pipeline computes them."""
    tok = components.tokenizer
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    enc = components.text_encoder
    return enc(ids.to(enc.device), attention_mask=None)[0].float().cpu()


class SDLoraGenerator(Generator):
    """Stable Diffusion + LoRA on class prompts: ``fit`` trains, ``sample`` runs DPM-Solver++ with guidance."""

    name = "sd-lora"
    config_model = SDLoraConfig
    sampling_fields = frozenset({"sampling_steps", "guidance_scale", "sample_batch_size", "sampling_precision"})

    def __init__(self, config: BaseModel | dict | None = None, classes: Sequence[str] = ()):
        super().__init__(config, classes)
        self.pipe: StableDiffusionPipeline | None = None
        self.seed = 0
        self.scaling_factor: float | None = None
        self.base_model: dict[str, Any] | None = None  # identity of the UNet the LoRA adapts

    # --- small helpers -----------------------------------------------------------------------

    @property
    def cfg(self) -> SDLoraConfig:
        """The validated config."""
        return self.config  # type: ignore[return-value]

    def prompt(self, label: str) -> str:
        """The prompt of class ``label`` (config ``prompts``, else the generic prompt plus the class name)."""
        return self.cfg.prompts.get(label, f"{self.cfg.generic_prompt} of class {label}")

    def _stage_identity(self, seed: int, *fields: str) -> dict[str, Any]:
        dump = self.cfg.model_dump(mode="json")
        return {"train": fit_key(self.train_ids), "classes": self.classes, "seed": seed,
                "config": fit_key({k: dump[k] for k in ("source", "pretrained_model", "image_size", "tiny",
                                                            *fields)})}

    # --- fit ---------------------------------------------------------------------------------

    def fit(self, train_records: Sequence[Record], out_dir: Path, seed: int = 0) -> Path:
        """Train on ``train_records`` (training part only), resuming finished stages and the latest
        checkpoint of an unfinished one; return ``out_dir`` (see the module docstring)."""
        cfg, out_dir = self.cfg, Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self._remember_training_ids(train_records)
        if self.reuse_finished_fit(out_dir, seed):
            return out_dir

        prompts = [cfg.generic_prompt, *(self.prompt(c) for c in self.classes), ""]
        if cfg.source == "tiny" and (out_dir / "model" / "model_index.json").is_file():
            comps = load_pretrained_components(out_dir / "model")  # base stage finished earlier
        else:
            comps = load_components(cfg.source, pretrained_model=cfg.pretrained_model, tiny=cfg.tiny,
                                    image_size=cfg.image_size, prompts=prompts, seed=seed,
                                    field=f"generators.{self.name}.pretrained_model")
        device, dtype = PartialState().device, weight_dtype(cfg.mixed_precision)
        freeze(comps.text_encoder)
        move_to(comps.text_encoder, device, dtype)
        pixels = records_to_pixels(train_records, cfg.image_size)
        if cfg.source == "tiny":
            self._fit_autoencoder(comps, pixels, out_dir, seed)
        freeze(comps.vae)
        move_to(comps.vae, device, dtype)
        moments = self._cached_moments(comps, pixels, out_dir, seed)
        if cfg.source == "tiny":
            self.scaling_factor = float(1.0 / moments[:, : moments.shape[1] // 2].std())
            comps.vae.register_to_config(scaling_factor=self.scaling_factor)
        else:
            self.scaling_factor = float(comps.vae.config.scaling_factor)
        embeddings = embed_prompts(comps, prompts)
        labels = [r.label for r in train_records] * (2 if cfg.random_flip else 1)
        class_prompt = torch.tensor([1 + self.classes.index(lab) for lab in labels])

        if cfg.source == "tiny":
            base_prompt = class_prompt if cfg.base_prompt == "class" else torch.zeros(len(labels), dtype=torch.long)
            self._fit_base(comps, {"moments": moments, "prompt": base_prompt}, embeddings, out_dir, seed)

        groups = {"": np.arange(len(labels))} if cfg.lora_mode == "shared" else {
            c: np.flatnonzero(np.array(labels) == c) for c in self.classes if c in labels}
        for group, rows in groups.items():
            self._fit_lora(comps, {"moments": moments[rows], "prompt": class_prompt[rows]}, embeddings,
                           out_dir, group, seed)
        self.seed = seed
        if self.base_model is None:  # every LoRA was saved by an earlier, interrupted fit
            self.base_model = unet_fingerprint(self._base_unet(out_dir), self._base_label(out_dir))
        save_generator_info(out_dir, self.name, cfg, {**self.fit_identity(seed), "scaling_factor": self.scaling_factor,
                                                      "lora_groups": list(groups), "base_model": self.base_model})
        self._load_artifact(out_dir, read_generator_info(out_dir))
        return out_dir

    def _fit_autoencoder(self, comps: Components, pixels: torch.Tensor, out_dir: Path, seed: int) -> None:
        """Train the tiny autoencoder (or load it from ``model/vae`` when that stage finished)."""
        cfg, final = self.cfg, out_dir / "model" / "vae"
        if (final / "config.json").is_file():
            comps.vae = from_pretrained(type(comps.vae), final, what="autoencoder stage")
            return
        stage = AutoencoderStage(comps.vae, crop=cfg.autoencoder_crop, kl_weight=cfg.autoencoder_kl_weight)
        train_stage(stage, {"pixels": pixels}, cfg.autoencoder_training, out_dir / "stages" / "autoencoder", seed,
                    cfg.mixed_precision, self._stage_identity(seed, "autoencoder_training", "autoencoder_crop",
                                                              "autoencoder_kl_weight"))
        comps.vae = stage.vae
        write_dir_atomic(final, comps.vae.save_pretrained)  # config.json never without its weights

    def _cached_moments(self, comps: Components, pixels: torch.Tensor, out_dir: Path, seed: int) -> torch.Tensor:
        """Posterior moments of the training images (and their mirror images), encoded once and
        cached in ``latents.safetensors``; returns float32 (N or 2N, 2C, h, w)."""
        key = fit_key(self._stage_identity(seed, "autoencoder_training", "autoencoder_crop",
                                               "autoencoder_kl_weight", "random_flip"))
        if self.cfg.random_flip:
            pixels = torch.cat([pixels, pixels.flip(-1)])
        return cached_moments(out_dir / "latents.safetensors", key, len(pixels),
                              lambda: encode_moments(comps.vae, pixels, self.cfg.encode_batch_size))

    def _noise_stage(self, name: str, unet: UNet2DConditionModel, comps: Components, embeddings: torch.Tensor,
                     stage_cfg: StageConfig) -> NoisePredictionStage:
        return NoisePredictionStage(name, unet, unet, comps.noise_scheduler, embeddings, len(embeddings) - 1,
                                    self.scaling_factor, stage_cfg.prompt_dropout, stage_cfg.snr_gamma)

    def _fit_base(self, comps: Components, data: dict[str, torch.Tensor], embeddings: torch.Tensor,
                  out_dir: Path, seed: int) -> None:
        """Pre-train the tiny UNet on every training image (with the generic or its class prompt), then save the
        base pipeline to ``model/`` (or load it when that stage finished)."""
        cfg, final = self.cfg, out_dir / "model"
        if (final / "model_index.json").is_file():
            return
        if cfg.gradient_checkpointing:
            comps.unet.enable_gradient_checkpointing()
        stage = self._noise_stage("base", comps.unet, comps, embeddings, cfg.base_training)
        train_stage(stage, data, cfg.base_training, out_dir / "stages" / "base", seed, cfg.mixed_precision,
                    self._stage_identity(seed, "autoencoder_training", "autoencoder_crop", "random_flip",
                                         "base_training", "generic_prompt", "prompts", "base_prompt",
                                         "base_ema_decay"), ema_decay=cfg.base_ema_decay)
        comps.unet = stage.model if stage.ema is None else stage.ema.module.eval()
        comps.unet.disable_gradient_checkpointing()
        write_dir_atomic(final, comps.pipeline().save_pretrained)  # model_index.json never without the parts

    def _base_label(self, directory: Path) -> str:
        """Where the base model comes from, for messages: ``directory/model`` (tiny) or ``pretrained_model``."""
        return str(Path(directory) / "model") if self.cfg.source == "tiny" else self.cfg.pretrained_model

    def _base_unet(self, out_dir: Path) -> UNet2DConditionModel:
        """A fresh copy of the base UNet the LoRA adapts (tiny: ``model/unet``; else the pretrained one)."""
        if self.cfg.source == "tiny":
            return from_pretrained(UNet2DConditionModel, out_dir / "model", subfolder="unet", what="base model")
        return from_pretrained(UNet2DConditionModel, self.cfg.pretrained_model, subfolder="unet",
                               what=f"generators.{self.name}.pretrained_model", error=ConfigError)

    def _fit_lora(self, comps: Components, data: dict[str, torch.Tensor], embeddings: torch.Tensor,
                  out_dir: Path, group: str, seed: int) -> None:
        """Train one LoRA adapter on ``data`` and save it to ``lora/<group>`` (skipped when already saved)."""
        cfg, lora_dir = self.cfg, out_dir / "lora" / group
        if (lora_dir / LORA_WEIGHT_NAME).is_file():
            return
        unet = self._base_unet(out_dir)
        self.base_model = unet_fingerprint(unet, self._base_label(out_dir))
        with torch.random.fork_rng(devices=[]):  # the LoRA's random init depends on the seed alone, so that a
            torch.manual_seed(seed)  # stage restarted in a new process begins from the same weights
            add_unet_lora(unet, cfg.lora, weight_dtype(self.cfg.mixed_precision), cfg.gradient_checkpointing)
        name = f"lora-{group}" if group else "lora"
        stage = self._noise_stage(name, unet, comps, embeddings, cfg.lora_training)
        train_stage(stage, data, cfg.lora_training, out_dir / "stages" / name, seed, cfg.mixed_precision,
                    self._stage_identity(seed, "base_training", "random_flip", "lora", "lora_training",
                                         "lora_mode", "generic_prompt", "prompts", "base_prompt", "base_ema_decay"))
        save_unet_lora(stage.model, lora_dir)

    # --- load and sample ---------------------------------------------------------------------

    def _load_artifact(self, directory: Path, info: dict[str, Any]) -> None:
        """Build the sampling pipeline: base model, then the saved LoRA(s) via ``load_lora_weights``."""
        cfg, directory = self.cfg, Path(directory)
        self.train_ids = list(info.get("train_ids", []))
        self.seed = int(info.get("seed", 0))
        self.scaling_factor = info.get("scaling_factor")
        self.base_model = info.get("base_model")
        dtype = weight_dtype(self.cfg.mixed_precision)
        source = self._base_label(directory)
        pipe = from_pretrained(StableDiffusionPipeline, source,
                               dtype=dtype, safety_checker=None, feature_extractor=None,
                               requires_safety_checker=False, what=f"{self.name} base model",
                               error=RunStateError if cfg.source == "tiny" else ConfigError)
        check_same_base(directory / "lora", self.base_model, unet_fingerprint(pipe.unet, source))
        for group in info.get("lora_groups", [""]):
            load_lora_into(pipe, directory / "lora" / group, adapter_name=group or "sd-lora", base=source)
        self.pipe = with_dpm_solver(pipe).to(PartialState().device)

    @classmethod
    def load(cls, directory: Path) -> SDLoraGenerator:
        """Rebuild a fitted generator from ``generator.json``, ``model/`` (tiny) and ``lora/`` in ``directory``."""
        info = read_generator_info(directory, expected=cls.name)
        gen = cls(info["config"], classes=info["classes"])
        gen._load_artifact(Path(directory), info)
        return gen

    def sample(self, label: str, n: int, seed: int = 0, masks: Sequence[np.ndarray] | None = None) -> list[Synthetic]:
        """``n`` uint8 (image_size, image_size) images of class ``label`` (mask None) from its prompt,
        DPM-Solver++ with classifier-free guidance; deterministic for a seed, image i independent of n."""
        if self.pipe is None:
            raise RuntimeError("sd-lora: call fit() or load() before sample()")
        if label not in self.classes:
            raise ValueError(f"sd-lora: unknown class {label!r} (classes: {self.classes})")
        if self.cfg.lora_mode == "per_class":
            if label not in self.pipe.get_list_adapters().get("unet", []):
                raise ValueError(f"sd-lora: no LoRA for class {label!r}: it had no training images")
            self.pipe.set_adapters([label])
        images = sample_gray(self.pipe, self.prompt(label), n, seed, self.classes.index(label),
                             size=self.cfg.image_size, steps=self.cfg.sampling_steps,
                             guidance_scale=self.cfg.guidance_scale, batch_size=self.cfg.sample_batch_size,
                             autocast=torch.bfloat16 if self.cfg.sampling_precision == "bf16" else None)
        return [Synthetic(image=im, label=label, seed=seed) for im in images]
