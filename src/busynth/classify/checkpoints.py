"""The classifier's run folder: checkpoints, resume state and the chosen weights.

``last.safetensors`` holds the model, EMA and optimizer tensors with the run state in its
metadata (the commit point of a checkpoint epoch); ``best.safetensors`` the weights kept (config in
its metadata); ``state.json`` and ``history.csv`` readable copies of the state, written after the
commit point. A run killed between checkpoints replays the epochs since the last one exactly.
Weights are read with safetensors only (never unpickled).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.optim.swa_utils import AveragedModel

from busynth.checkpoint import load_optimizer_tensors, optimizer_tensors, read_safetensors
from busynth.classify.models import build_classifier
from busynth.config import ClassifierConfig
from busynth.errors import RunStateError
from busynth.io import atomic_path, read_json, write_json, write_rows_csv

STATE_VERSION = 2  # 2: fixed budget on the real images, EMA, steps


# Config fields that do not change results, so they may differ when a run resumes.
RESUME_FREE_FIELDS = {"num_workers", "eval_every", "checkpoint_every"}


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)


def read_safetensors_json(path: Path, load_tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and JSON metadata; a pickle or any non-safetensors file raises RunStateError naming it."""
    tensors, meta = read_safetensors(path, load_tensors)
    return tensors, {k: json.loads(v) for k, v in meta.items()}


def save_last(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
               ema: AveragedModel | None = None) -> None:
    """Model, EMA and optimizer tensors under flat keys (``model.*``, ``ema.*``, ``optim.<param>.<name>``)."""
    optim, groups = optimizer_tensors(optimizer, prefix="optim.")
    tensors = {**{f"model.{k}": v for k, v in model.state_dict().items()}, **optim}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    save_safetensors(path, tensors, {"state": state, "optim_param_groups": json.loads(groups)})


def load_last(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema: AveragedModel | None = None) -> None:
    tensors, meta = read_safetensors_json(path)
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    if ema is not None:
        ema.load_state_dict({k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")})
    load_optimizer_tensors(optimizer, tensors, json.dumps(meta["optim_param_groups"]), prefix="optim.")


def load_resume_state(out_dir: Path) -> dict[str, Any] | None:
    """The state of the last finished epoch: state.json, or the copy inside last.safetensors
    when that is newer (a run killed between writing the two)."""
    state = read_json(out_dir / "state.json") if (out_dir / "state.json").exists() else None
    last = out_dir / "last.safetensors"
    if last.exists():
        embedded = read_safetensors_json(last, load_tensors=False)[1]["state"]
        if state is None or embedded["epoch"] > state["epoch"]:
            state = embedded
    return state


def check_same_run(state: dict[str, Any], run: dict[str, Any], out_dir: Path) -> None:
    if state.get("version") != STATE_VERSION:
        raise RunStateError(f"{out_dir}: checkpoint version {state.get('version')}, expected {STATE_VERSION}")
    changed = [k for k in ("seed", "n_classes", "data_hash", "n_real") if state["run"].get(k) != run[k]]
    old_cfg, new_cfg = state["run"]["config"], run["config"]
    defaults = ClassifierConfig().model_dump(mode="json")  # a field added since counts as its default
    changed += [
        f"classifier.{k}" for k in sorted(set(old_cfg) | set(new_cfg))
        if k not in RESUME_FREE_FIELDS and old_cfg.get(k, defaults.get(k)) != new_cfg.get(k, defaults.get(k))
    ]
    if changed:
        raise RunStateError(
            f"{out_dir} holds a classifier run with different {', '.join(changed)}; "
            "use a new folder or delete this one to start over"
        )


def finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def load_best_weights(model: nn.Module, out_dir: Path) -> nn.Module:
    """Load ``out_dir/best.safetensors`` into ``model``; returns it in eval mode."""
    path = Path(out_dir) / "best.safetensors"
    if not path.exists():
        raise RunStateError(f"{path} does not exist: no finished classifier epoch in {out_dir}")
    tensors, _ = read_safetensors_json(path)
    model.load_state_dict(tensors)
    return model.eval()


def load_classifier(out_dir: Path, cfg: ClassifierConfig, n_classes: int) -> nn.Module:
    """The best model of a classifier run folder (on CPU, eval mode); never downloads weights."""
    model = build_classifier(cfg.model_copy(update={"pretrained": False}), n_classes)
    return load_best_weights(model, Path(out_dir))


def save_epoch(out_dir: Path, kept: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
                state: dict[str, Any], improved: bool, epoch: int, score: float | None,
                ema: AveragedModel | None = None, checkpoint: bool = True) -> None:
    """Write best (the ``kept`` weights, if improved), then, at a ``checkpoint`` epoch, last (the
    commit point), history.csv and state.json. A run killed between checkpoints replays the
    epochs since the last one exactly (every epoch's randomness depends on (seed, epoch))."""
    if improved:
        meta = {"config": state["run"]["config"], "n_classes": state["run"]["n_classes"],
                "epoch": epoch, "score": finite_or_none(score)}
        save_safetensors(out_dir / "best.safetensors", kept.state_dict(), meta)
    if checkpoint:
        save_last(out_dir / "last.safetensors", model, optimizer, state, ema)
        write_epoch_records(out_dir, state)


def write_epoch_records(out_dir: Path, state: dict[str, Any]) -> None:
    """history.csv and state.json of the last finished epoch (written after last.safetensors)."""
    write_rows_csv(out_dir / "history.csv", state["history"])
    write_json(out_dir / "state.json", state)


def records_behind(out_dir: Path, state: dict[str, Any]) -> bool:
    """True when state.json is missing or older than ``state`` (the copy in last.safetensors): a run
    was killed between the commit point and these records, which a rerun must then complete."""
    path = out_dir / "state.json"
    return not path.exists() or read_json(path)["epoch"] < state["epoch"]
