"""The training engine: one loop (accelerate) for every model busynth trains from a stage.

A :class:`Stage` says *what* trains (``model``, ``trainable_parameters()``) and *how the loss
is computed* (``loss(batch, generator)``, reading ``stage.step`` when the loss depends on the
step); :func:`train_stage` does everything else: device placement and mixed precision,
gradient accumulation and optional clipping, the learning-rate schedule (:func:`learning_rate`,
a function of the step alone), an optional moving average of the weights, ``checkpoint-N/``
folders with a cap (``busynth.checkpoint``), resume from the latest one, progress
(``busynth.progress``: a bar on a terminal, a line every ~30 s elsewhere) and ``history.csv``.
The classifier (``classify/train.py``), the cVAE (``generators/cvae.py``) and the diffusion
stages (``generators/diffusion/train.py``) train through it; a stage adds per-step work (the
classifier's validation and model selection) in :meth:`Stage.end_step`.

Every random draw of optimizer step ``s`` -- the batch, noise, timesteps, prompt dropout,
crops -- comes from generators seeded by ``(seed, s)``, so a run resumed from
``checkpoint-s`` continues exactly as an uninterrupted run would.

Checkpoint folder ``checkpoint-N/``: ``weights.safetensors`` (the trainable parameters and the
buffers of the modules that own them, e.g. batch-norm statistics), ``optimizer.safetensors``
(optimizer tensors, param groups in the metadata), ``ema.safetensors`` (the moving average, when
one is kept) and ``state.json`` (step, seed, stage name, the stage config, ``identity`` of the
caller and the stage's own resume state).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from busynth.accel import broadcast_buffers, local_rows, make_accelerator, rank_and_world
from busynth.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    read_safetensors,
    save_checkpoint,
)
from busynth.errors import RunStateError
from busynth.io import changed_keys, derived_seed, fit_key, read_history_csv, read_json, write_rows_csv
from busynth.progress import log_fit, progress

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
EMA_FILE = "ema.safetensors"
HISTORY_FILE = "history.csv"
# Streams of per-step randomness: batch order (seeded by epoch) and everything else (by micro-step).
_STREAM_ORDER, _STREAM_STEP = 0, 1
# StageConfig fields that do not change what is trained: a run may resume with other values.
RESUME_FREE_FIELDS = frozenset({"checkpoint_every", "keep_checkpoints"})


class StageConfig(BaseModel):
    """Optimisation settings of one training stage."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=500, ge=0)
    batch_size: int = Field(default=8, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    lr: float = Field(default=1e-4, gt=0.0)
    # Linear warm-up, then cosine decay to lr * min_lr_ratio (Loshchilov & Hutter 2017), or constant.
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    weight_decay: float = Field(default=1e-2, ge=0.0)
    # Gradient-norm clipping threshold; None trains without clipping.
    max_grad_norm: float | None = Field(default=1.0, gt=0.0)
    # Min-SNR-gamma weighting of the denoising loss (Hang et al. 2023); None = plain MSE.
    snr_gamma: float | None = Field(default=None, gt=0.0)
    # Probability of replacing a prompt by the empty prompt (for classifier-free guidance).
    prompt_dropout: float = Field(default=0.1, ge=0.0, le=1.0)
    checkpoint_every: int = Field(default=250, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)


def stage_over_defaults(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """A ``mode="before"`` field validator for a model's ``StageConfig`` fields: a stage given in part (a
    mapping, as ``--set generators.sd-lora.autoencoder_training.steps=1600`` gives) keeps the field's own
    default for every setting it leaves out, not StageConfig's generic one (which would silently change, say,
    the autoencoder's learning rate from 1e-3 to 1e-4)."""
    if not isinstance(value, Mapping):
        return value
    default = cls.model_fields[info.field_name].get_default(call_default_factory=True)
    return {**default.model_dump(), **value}


# --- pure math ---------------------------------------------------------------------------------


def learning_rate(step: int, cfg: StageConfig) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warm-up to ``cfg.lr`` over
    ``warmup_steps``, then constant or half a cosine down to ``lr * min_lr_ratio`` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def batch_indices(n: int, batch_size: int, micro_step: int, seed: int) -> torch.Tensor:
    """Row indices of micro-batch ``micro_step``: consecutive slices of a permutation of ``n``
    rows drawn per epoch from (seed, epoch); returns an int64 tensor of min(batch_size, n) rows."""
    bs = min(batch_size, n)
    per_epoch = max(1, n // bs)
    epoch, pos = divmod(micro_step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(derived_seed(seed, epoch, _STREAM_ORDER)))
    return order[pos * bs:(pos + 1) * bs]


# --- stages --------------------------------------------------------------------------------------


class Stage:
    """What one training stage trains and how its loss is computed; ``train_stage`` runs it.

    ``model`` is the module whose parameters train (the loop hands it to ``accelerator.prepare``
    and stores the prepared module back); ``trainable_parameters`` are the parameters the
    optimizer updates and checkpoints hold.
    """

    name: str = "stage"
    model: nn.Module
    # The optimizer step whose loss is being computed (0-based): set by train_stage before each
    # call to ``loss``, for losses that change with the step (e.g. a KL warm-up).
    step: int = 0
    # True: under several processes every process gets the whole global batch and the generator of
    # process 0 (the single-process one); a stage that draws its randomness for the global batch and
    # computes the loss on its own rows (``busynth.accel.local_rows``) then trains under N processes
    # exactly as under one. False: each process gets its rows of the batch and its own generator.
    global_batch: bool = False
    # The moving average of ``model`` when train_stage keeps one (``ema_decay``), else None.
    ema: AveragedModel | None = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates (default: those of ``model`` that require grad)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """The optimizer's parameter groups (default: one group of the trainable parameters)."""
        return [{"params": self.trainable_parameters(), "weight_decay": weight_decay}]

    def loss(self, batch: Mapping[str, torch.Tensor],
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar loss of one micro-batch and extra numbers to log; draw randomness from ``generator``."""
        raise NotImplementedError

    def batch_rows(self, n: int, batch_size: int, micro_step: int, seed: int) -> torch.Tensor:
        """Row indices of micro-batch ``micro_step`` (default: :func:`batch_indices`)."""
        return batch_indices(n, batch_size, micro_step, seed)

    def end_step(self, step: int, row: dict[str, Any]) -> bool:
        """Called after optimizer step ``step`` on every process, before its checkpoint: may add
        numbers to the history ``row``; True stops training (the step is checkpointed as final)."""
        return False

    def resume_state(self) -> dict[str, Any]:
        """JSON state of the stage itself stored in each checkpoint (e.g. the best score so far)."""
        return {}

    def load_resume_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`resume_state` returned, when resuming from a checkpoint."""

    def fit_summary(self, history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Numbers for the one "fit done" log line."""
        return {"last_loss": float(history[-1]["loss"])}


# --- accelerator and checkpoints -------------------------------------------------------------------


def _trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: the trainable parameters and the persistent buffers of every module
    that owns one (batch-norm statistics); frozen modules' buffers are left out."""
    out = {k: p for k, p in model.named_parameters() if p.requires_grad}
    persistent = model.state_dict(keep_vars=True)
    for prefix, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            names = ((f"{prefix}.{k}" if prefix else k, b) for k, b in module.named_buffers(recurse=False))
            out.update({name: b for name, b in names if name in persistent})
    return out


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: t.detach().cpu().contiguous() for k, t in _trained_tensors(model).items()}


def _load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                     ema: AveragedModel | None) -> None:
    weights = load_checkpoint(folder, optimizer)
    targets = _trained_tensors(model)
    if set(weights) != set(targets):
        raise RunStateError(f"{folder}: trained tensors differ from this stage's "
                            f"({len(set(weights) ^ set(targets))} names differ)")
    with torch.no_grad():
        for k, v in weights.items():
            targets[k].copy_(v)
    if ema is not None:
        ema.load_state_dict(read_safetensors(folder / EMA_FILE)[0])


def _what_was_trained(state: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a run (or a checkpoint's ``state.json``) that decides the trained weights: stage,
    seed, rows, the config but its resume-free fields, and the caller's ``identity``."""
    config = {k: v for k, v in state.get("config", {}).items() if k not in RESUME_FREE_FIELDS}
    return {"stage": state.get("stage"), "seed": state.get("seed"), "rows": state.get("rows"), "config": config,
            **state.get("identity", {})}


def _differences(saved: Mapping[str, Any], run: Mapping[str, Any], defaults: Mapping[str, Any]) -> list[str]:
    """Names of what differs between a checkpoint's ``state.json`` and this run (none when their fit
    keys agree); an identity key the checkpoint lacks counts as its value in ``defaults`` (a setting
    added since)."""
    mine = _what_was_trained(run)
    if saved.get("fit_key") == fit_key(mine):
        return []
    return changed_keys(_what_was_trained(saved), mine, dict(defaults) or None)


def adamw(params: list[dict[str, Any]], **kwargs: Any) -> torch.optim.AdamW:
    """torch's AdamW, fused into one kernel per step where every parameter lives on the CPU or a
    CUDA device (measured on the demo classifier, 2 CPU threads: 5.3 s -> 5.0 s a fit); the
    per-tensor loop otherwise."""
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for group in params for p in group["params"])
    return torch.optim.AdamW(params, fused=fused, **kwargs)


def train_stage(stage: Stage, data: Mapping[str, torch.Tensor], cfg: StageConfig, out_dir: Path, seed: int = 0,
                mixed_precision: str = "no", identity: Mapping[str, Any] | None = None,
                cpu: bool = False, precision_field: str = "mixed_precision", ema_decay: float | None = None,
                identity_defaults: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Train ``stage`` for ``cfg.steps`` optimizer steps on ``data`` (tensors with equal first
    dimension; each micro-batch is a row subset) and return the history rows of the whole run.

    Resumes from the latest ``checkpoint-N`` in ``out_dir`` (refusing one written by a stage
    with another name, seed, config or ``identity``); writes checkpoints every
    ``cfg.checkpoint_every`` steps and at the end, keeping the newest ``cfg.keep_checkpoints``.
    A run that ``stage.end_step`` stopped early is finished: it is not continued. With
    ``ema_decay`` the stage keeps ``stage.ema``, an exponential moving average of ``stage.model``
    (parameters and buffers) updated after every optimizer step. On return ``stage.model`` holds
    the trained (unwrapped) module, in eval mode.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_rows = {len(v) for v in data.values()}
    if len(n_rows) != 1 or 0 in n_rows:
        raise ValueError(f"{stage.name}: training data must be non-empty tensors of equal length, got {n_rows}")
    n = n_rows.pop()
    run = {"version": CHECKPOINT_VERSION, "stage": stage.name, "seed": seed,
           "config": cfg.model_dump(mode="json"), "identity": dict(identity or {}), "rows": n}
    run["fit_key"] = fit_key(_what_was_trained(run))
    accelerator = make_accelerator(mixed_precision, cfg.grad_accum, cpu, field=precision_field)
    rank = rank_and_world()[0]
    groups = stage.param_groups(cfg.weight_decay)
    params = [p for group in groups for p in group["params"]]
    if not params:
        raise ValueError(f"{stage.name}: no trainable parameters")
    optimizer = adamw(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    stage.ema = None
    if ema_decay is not None:  # torch's own EMA wrapper; buffers (batch-norm statistics) are averaged too
        stage.ema = AveragedModel(stage.model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
    start, stopped = 0, False
    if found := list_checkpoints(out_dir):
        start, folder = found[-1]
        saved = read_json(folder / "state.json")
        differ = _differences(saved, run, identity_defaults or {})
        if saved.get("version") != CHECKPOINT_VERSION or differ:
            raise RunStateError(f"{folder} was written by a different {stage.name} run "
                                f"({', '.join(differ) or 'version'} differ); use a new folder or delete it")
        _load_checkpoint(folder, stage.model, optimizer, stage.ema)
        prune_checkpoints(out_dir, cfg.keep_checkpoints)  # a run killed while pruning left older ones
        stage.load_resume_state(saved.get("stage_state", {}))
        stopped = bool(saved.get("stopped"))
        if start < cfg.steps and not stopped:
            logger.info("%s: resuming from %s", stage.name, folder)
    stage.model, optimizer = accelerator.prepare(stage.model, optimizer)
    data = {k: v.to(accelerator.device) for k, v in data.items()}
    history = read_history_csv(out_dir / HISTORY_FILE, start)
    stage.model.train()
    end = start if stopped else cfg.steps
    bar = progress(end, stage.name, initial=start, enabled=accelerator.is_local_main_process, log=logger)
    for step in range(start, end):
        started = time.perf_counter()
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum, extras = 0.0, {}
        for micro in range(step * cfg.grad_accum, (step + 1) * cfg.grad_accum):
            # Every process draws the same global batch and computes its share of the rows, with
            # its own noise stream (process 0's is the single-process one), or, for a stage that
            # takes the global batch, process 0's stream; DDP averages the gradients.
            stream = _STREAM_STEP + (0 if stage.global_batch else 2 * rank)
            generator = torch.Generator().manual_seed(derived_seed(seed, micro, stream))
            torch.manual_seed(derived_seed(seed, micro, stream + 1))  # any dropout inside the model
            idx = stage.batch_rows(n, cfg.batch_size, micro, seed)
            if not stage.global_batch:
                idx = idx[local_rows(len(idx))]
            idx = idx.to(accelerator.device)
            batch = {k: v[idx] for k, v in data.items()}
            stage.step = step
            with accelerator.accumulate(stage.model), accelerator.autocast():
                loss, extras = stage.loss(batch, generator)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += float(accelerator.reduce(loss.detach(), "mean")) / cfg.grad_accum
        if stage.ema is not None:
            stage.ema.update_parameters(accelerator.unwrap_model(stage.model))
        row = {"step": step, "loss": loss_sum, **extras, "lr": lr, "seconds": round(time.perf_counter() - started, 4)}
        stopped = stage.end_step(step, row)
        history.append(row)
        bar.update(1, loss=loss_sum, **extras)
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.steps or stopped:  # the main process commits
            write_rows_csv(out_dir / HISTORY_FILE, history, fieldnames=_columns(history))
            extra = {EMA_FILE: stage.ema.state_dict()} if stage.ema is not None else {}
            save_checkpoint(out_dir, done, _trainable_state(accelerator.unwrap_model(stage.model)), optimizer,
                            {**run, "stage_state": stage.resume_state(), "stopped": stopped},
                            cfg.keep_checkpoints, extra_files=extra)
        if stopped:
            break
    bar.close()
    stage.model = accelerator.unwrap_model(stage.model)
    broadcast_buffers(stage.model)
    stage.model.eval()
    if history and bar.count:
        resumed = {"resumed_at_step": start} if start else {}
        log_fit(stage.name, bar.count, bar.elapsed, log=logger, **resumed, **stage.fit_summary(history))
    return history


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every key of the rows, in order of first appearance (some steps log more than others)."""
    return list(dict.fromkeys(k for row in rows for k in row))
