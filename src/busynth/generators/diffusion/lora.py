"""LoRA on the UNet's attention projections (peft), saved in the format diffusers' ``load_lora_weights`` reads.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022): a frozen weight
W is adapted as W + (alpha / r) B A with A (r x k), B (d x r); B starts at zero so training
begins from the base model. Here the adapted layers are the query/key/value/output
projections of every attention block of the UNet (``to_q``, ``to_k``, ``to_v``,
``to_out.0``), as in diffusers' text-to-image LoRA example.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default file name
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


class LoraSettings(BaseModel):
    """Rank, scale and placement of the LoRA adapter."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(default=8, ge=1)
    # alpha / rank scales the update; alpha = rank gives scale 1.
    alpha: float = Field(default=8.0, gt=0.0)
    target_modules: list[str] = Field(default_factory=lambda: list(ATTENTION_PROJECTIONS), min_length=1)


def add_unet_lora(unet: UNet2DConditionModel, settings: LoraSettings, weight_dtype: torch.dtype = torch.float32,
                  gradient_checkpointing: bool = False) -> LoraConfig:
    """Freeze ``unet`` (cast to ``weight_dtype``), add a trainable LoRA adapter (kept in float32
    so mixed precision updates it in full precision) and return its peft LoraConfig.

    Afterwards exactly the LoRA parameters require gradients.
    """
    unet.requires_grad_(False)
    if unet.dtype != weight_dtype:
        unet.to(dtype=weight_dtype)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, init_lora_weights="gaussian",
                        target_modules=list(settings.target_modules))
    unet.add_adapter(config)
    if weight_dtype != torch.float32:
        cast_training_params(unet, dtype=torch.float32)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    n_train = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    logger.info("LoRA rank %d on %s: %d trainable parameters", settings.rank, "/".join(settings.target_modules), n_train)
    return config


def unet_lora_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The LoRA weights of ``unet`` under diffusers' key names (what ``save_lora_weights`` writes)."""
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_unet_lora(unet: UNet2DConditionModel, directory: Path) -> Path:
    """Write ``directory/pytorch_lora_weights.safetensors`` with the rank and alpha in its
    metadata, loadable by ``pipeline.load_lora_weights(directory)``; returns the file path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = unet.peft_config["default"]
    metadata = {**config.to_dict(), "base_model_name_or_path": None}
    metadata["target_modules"] = sorted(metadata["target_modules"])
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(directory), unet_lora_layers=unet_lora_state_dict(unet), weight_name=LORA_WEIGHT_NAME,
        safe_serialization=True, unet_lora_adapter_metadata=metadata,
    )
    return directory / LORA_WEIGHT_NAME


def load_lora_into(pipe: StableDiffusionPipeline, directory: Path, adapter_name: str) -> None:
    """Load a LoRA saved by :func:`save_unet_lora` into ``pipe`` under ``adapter_name`` (diffusers' loader)."""
    pipe.load_lora_weights(str(directory), weight_name=LORA_WEIGHT_NAME, adapter_name=adapter_name)
