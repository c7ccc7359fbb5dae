"""LoRA on the UNet's attention projections (peft), saved in the format diffusers' ``load_lora_weights`` reads.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022): a frozen weight
W is adapted as W + (alpha / r) B A with A (r x k), B (d x r); B starts at zero so training
begins from the base model. Here the adapted layers are the query/key/value/output
projections of every attention block of the UNet (``to_q``, ``to_k``, ``to_v``,
``to_out.0``), as in diffusers' text-to-image LoRA example.

A LoRA only means something on the base it was trained on. :func:`unet_fingerprint` records
that base (architecture and a sample of its weights) in the artifact's ``generator.json``;
:func:`load_lora_into` refuses, with a RunStateError naming the folder and both bases, a
LoRA whose recorded base differs from the pipeline's or whose layers do not fit its UNet.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError, safe_open

from busynth.checkpoint import read_safetensors
from busynth.errors import RunStateError
from busynth.generators.diffusion.settings import LoraSettings
from busynth.io import write_dir_atomic

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default file name


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
    logger.info("LoRA rank %d on %s: %d trainable parameters", settings.rank, "/".join(settings.target_modules),
                n_train)
    return config


def unet_lora_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The LoRA weights of ``unet`` under diffusers' key names (what ``save_lora_weights`` writes)."""
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_unet_lora(unet: UNet2DConditionModel, directory: Path) -> Path:
    """Write ``directory/pytorch_lora_weights.safetensors`` with the rank and alpha in its
    metadata, loadable by ``pipeline.load_lora_weights(directory)``; returns the file path.

    The folder is written atomically (``io.write_dir_atomic``): a killed process never leaves a
    half-written weight file that a rerun would take for a finished LoRA."""
    directory = Path(directory)
    config = unet.peft_config["default"]
    metadata = {**config.to_dict(), "base_model_name_or_path": None}
    metadata["target_modules"] = sorted(metadata["target_modules"])
    layers = unet_lora_state_dict(unet)
    write_dir_atomic(directory, lambda tmp: StableDiffusionPipeline.save_lora_weights(
        save_directory=str(tmp), unet_lora_layers=layers, weight_name=LORA_WEIGHT_NAME,
        safe_serialization=True, unet_lora_adapter_metadata=metadata,
    ))
    return directory / LORA_WEIGHT_NAME


# --- which base a LoRA belongs to ------------------------------------------------------------


def unet_fingerprint(unet: torch.nn.Module, model: str) -> dict[str, Any]:
    """The identity of a base UNet (without adapters) as recorded next to a LoRA: ``model`` (where it
    came from, for messages), ``architecture`` (a digest of every tensor's name and shape) and
    ``weights`` (a digest of the first 8 values of every tensor rounded to float16, so float32 and
    float16 copies of one model agree; None for a bfloat16 model, which cannot be compared so)."""
    arch, weights = hashlib.sha256(), hashlib.sha256()
    comparable = True
    for name, tensor in sorted(unet.state_dict().items()):
        arch.update(f"{name}:{tuple(tensor.shape)};".encode())
        comparable = comparable and tensor.dtype != torch.bfloat16
        if comparable:
            head = tensor.detach().reshape(-1)[:8].to("cpu", torch.float16)
            weights.update(name.encode() + head.numpy().tobytes())
    return {"model": str(model), "architecture": arch.hexdigest()[:16],
            "weights": weights.hexdigest()[:16] if comparable else None}


def _describe(base: dict[str, Any]) -> str:
    return f"{base.get('model')} (architecture {base.get('architecture')}, weights {base.get('weights')})"


def check_same_base(directory: Path, recorded: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Refuse (RunStateError naming ``directory`` and both bases) when the base a LoRA recorded at
    training time differs from ``current`` in architecture or, where both are known, in weights.
    Nothing is checked when nothing was recorded (artifacts of older versions)."""
    if not recorded:
        return
    differ = recorded.get("architecture") != current["architecture"] or (
        recorded.get("weights") is not None and current["weights"] is not None
        and recorded["weights"] != current["weights"])
    if differ:
        raise RunStateError(f"the LoRA in {directory} was made for another base model: trained on "
                            f"{_describe(recorded)}, but the base now is {_describe(current)}. Point the config "
                            "at the model it was trained on, or fit the LoRA again in a new folder.")


def lora_fit_problems(unet: torch.nn.Module, lora_file: Path, limit: int = 3) -> list[str]:
    """Up to ``limit`` reasons why the LoRA layers in ``lora_file`` (diffusers' key names) do not fit
    ``unet``: a layer the UNet lacks, or a rank-decomposition shape that does not match its
    in/out features. Reads only the file's header (shapes). Returns [] when they fit."""
    problems: list[str] = []
    with safe_open(str(lora_file), framework="pt") as f:
        names = f.keys()
        shapes = {k: f.get_slice(k).get_shape() for k in names}
    for key, shape in sorted(shapes.items()):
        if not key.startswith("unet."):
            continue
        for suffix, side in ((".lora.down.weight", "in"), (".lora_A.weight", "in"),
                             (".lora.up.weight", "out"), (".lora_B.weight", "out")):
            if key.endswith(suffix):
                break
        else:
            continue
        path = key[len("unet."):-len(suffix)]
        try:
            layer = unet.get_submodule(path)
        except AttributeError:
            if f"the base has no layer {path}" not in problems:
                problems.append(f"the base has no layer {path}")
        else:
            layer = getattr(layer, "base_layer", layer)
            size = getattr(layer, f"{side}_features", None) or getattr(layer, f"{side}_channels", None)
            have = shape[1] if side == "in" else shape[0]
            if size is not None and len(shape) >= 2 and have != size:
                problems.append(f"{path} has {size} {side}put features, the LoRA {have}")
        if len(problems) >= limit:
            break
    return problems


def load_lora_into(pipe: StableDiffusionPipeline, directory: Path, adapter_name: str,
                   base: str | None = None) -> None:
    """Load a LoRA saved by :func:`save_unet_lora` into ``pipe`` under ``adapter_name`` (diffusers'
    loader, safetensors only). A missing or unreadable file, or layers that do not fit the pipeline's
    UNet, raise RunStateError naming ``directory`` (and ``base``, the pipeline's source)."""
    directory = Path(directory)
    lora_file = directory / LORA_WEIGHT_NAME
    read_safetensors(lora_file, load_tensors=False)  # refuses a missing file or a pickle under this name
    on_base = f" on the base model {base}" if base else ""
    try:
        problems = lora_fit_problems(pipe.unet, lora_file)
    except SafetensorError as exc:
        raise RunStateError(f"{lora_file}: not a readable safetensors file ({exc})") from None
    if problems:
        raise RunStateError(f"the LoRA in {directory} was made for another base model: it does not fit the UNet"
                            f"{on_base} ({'; '.join(problems)})")
    try:
        pipe.load_lora_weights(str(directory), weight_name=LORA_WEIGHT_NAME, adapter_name=adapter_name,
                               use_safetensors=True)
    except (RuntimeError, ValueError, KeyError) as exc:  # size mismatch and the like, raised by peft
        detail = " ".join(str(exc).split())[:400]
        raise RunStateError(f"the LoRA in {directory} cannot be loaded{on_base}: {detail}") from None
