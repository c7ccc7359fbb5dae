"""The classifier's chosen weights: ``best.safetensors`` (config, epoch and score in its metadata).

Checkpoints, resume and history are the training engine's (``busynth.engine``). Weights are read
with safetensors only (never unpickled).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from busynth.checkpoint import list_checkpoints, read_safetensors
from busynth.classify.models import build_classifier
from busynth.config import ClassifierConfig
from busynth.errors import RunStateError
from busynth.io import atomic_path

BEST = "best.safetensors"


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write tensors (contiguous, on the CPU) with JSON metadata, atomically."""
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)


def read_safetensors_json(path: Path, load_tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and JSON metadata; a pickle or any non-safetensors file raises RunStateError naming it."""
    tensors, meta = read_safetensors(path, load_tensors)
    return tensors, {k: json.loads(v) for k, v in meta.items()}


def finite_or_none(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def has_own_weights(out_dir: Path) -> bool:
    """Whether a training folder holds weights of its own (a step checkpoint, or the kept weights of a
    finished fit): a model built for it then needs no pretrained weights, which it would overwrite."""
    return (Path(out_dir) / BEST).exists() or bool(list_checkpoints(Path(out_dir)))


def load_best_weights(model: nn.Module, out_dir: Path) -> nn.Module:
    """Load ``out_dir/best.safetensors`` into ``model``; returns it in eval mode."""
    path = Path(out_dir) / BEST
    if not path.exists():
        raise RunStateError(f"{path} does not exist: {out_dir} holds no finished training (no kept weights)")
    tensors, _ = read_safetensors_json(path)
    model.load_state_dict(tensors)
    return model.eval()


def load_classifier(out_dir: Path, cfg: ClassifierConfig, n_classes: int) -> nn.Module:
    """The best model of a classifier run folder (on CPU, eval mode); never downloads weights."""
    model = build_classifier(cfg, n_classes, load_weights=False)  # a pretrained one keeps its normalisation
    return load_best_weights(model, Path(out_dir))
