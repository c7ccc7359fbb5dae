"""One training loop for the classifier (accelerate), with checkpoints, resume and model selection.

A run folder holds ``last.safetensors`` (model + optimizer tensors, the run state
in its metadata), ``best.safetensors`` (the weights chosen on the real validation
set, config in its metadata), ``state.json`` (a readable copy of the run state) and
``history.csv`` (one row per epoch). Everything random in epoch ``e`` -- data
order, flips, dropout -- is seeded from ``(seed, e)``, so a run resumed after epoch
``e`` continues exactly as an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from sklearn.metrics import balanced_accuracy_score
from sklearn.utils.class_weight import compute_class_weight
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from busynth.accel import broadcast_buffers, local_rows, make_accelerator
from busynth.classify.checkpoints import (
    STATE_VERSION,
    check_same_run,
    finite_or_none,
    load_best_weights,
    load_classifier,
    load_last,
    load_resume_state,
    records_behind,
    save_epoch,
    write_epoch_records,
)
from busynth.classify.metrics import macro_auc
from busynth.classify.models import build_classifier
from busynth.config import ClassifierConfig
from busynth.data.augment import LIGHT, augment_batch
from busynth.data.transforms import to_tensor
from busynth.engine import adamw
from busynth.errors import DataError
from busynth.io import derived_seed
from busynth.progress import Progress, log_fit, progress

logger = logging.getLogger(__name__)

# Independent random streams derived from (seed, epoch).
_STREAM_ORDER, _STREAM_FLIP, _STREAM_DROPOUT, _STREAM_SYNTHETIC, _STREAM_MIX = 0, 1, 2, 3, 4
# The validation scores of one epoch (None in an epoch that was not scored; see eval_every).
VAL_KEYS = ("val_loss", "val_accuracy", "val_balanced_accuracy", "val_macro_auc")


@dataclass
class FitResult:
    """A trained classifier: best weights loaded, in eval mode, and how it got there."""

    model: nn.Module
    best_epoch: int
    best_score: float
    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0  # optimizer steps taken (the training budget actually spent)


def cyclic_indices(n: int, seed: int, stream: int, start: int, count: int) -> np.ndarray:
    """Positions ``[start, start + count)`` of an endless stream of indices ``0..n-1``: the
    concatenation of permutations ``perm_0, perm_1, ...``, permutation ``j`` drawn from
    ``(seed, j, stream)`` alone, so any stretch of the stream is reproducible on its own."""
    if n <= 0 or count <= 0:
        return np.zeros(0, dtype=np.int64)
    first, last = start // n, (start + count - 1) // n
    perms = [
        torch.randperm(n, generator=torch.Generator().manual_seed(derived_seed(seed, j, stream))).numpy()
        for j in range(first, last + 1)
    ]
    flat = np.concatenate(perms)
    offset = start - first * n
    return flat[offset : offset + count].astype(np.int64)


def steps_per_epoch(n_real: int, batch_size: int) -> int:
    """Optimizer batches in one epoch of the training budget: one pass over the *real*
    training images (the last batch is filled from the next pass), whatever synthetic
    images are added, so every method trains the same number of steps."""
    return max(1, math.ceil(n_real / batch_size))


class MixedBatchSampler(Sampler[list[int]]):
    """``steps`` batches of ``batch_size`` indices per epoch, drawn from real rows ``0..n_real-1``
    and synthetic rows ``n_real..n_real+n_synthetic-1``; call ``set_epoch`` first.

    ``synthetic_share`` None draws every batch from one shuffled stream over all rows (each
    image equally often); a number puts ``round(share * batch_size)`` synthetic rows in every
    batch (the rest real), each pool cycling through its own permutations. Batch ``i`` of epoch
    ``e`` depends on ``(seed, e, i)`` only, so a resumed run draws exactly the same batches.
    """

    def __init__(self, n_real: int, n_synthetic: int, batch_size: int, steps: int, seed: int,
                 synthetic_share: float | None = None) -> None:
        self.n_real, self.n_synthetic, self.batch_size = n_real, n_synthetic, batch_size
        self.steps, self.seed, self.epoch = steps, seed, 0
        if synthetic_share is None or n_synthetic == 0:
            self.k_synthetic = None
        else:
            self.k_synthetic = min(batch_size - 1, max(1 if synthetic_share > 0 else 0,
                                                       round(synthetic_share * batch_size)))

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose batches ``__iter__`` yields."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        b, steps = self.batch_size, self.steps
        if self.k_synthetic is None:
            flat = cyclic_indices(self.n_real + self.n_synthetic, self.seed, _STREAM_ORDER,
                                  self.epoch * steps * b, steps * b)
            batches = flat.reshape(steps, b)
        else:
            k_syn, k_real = self.k_synthetic, b - self.k_synthetic
            real = cyclic_indices(self.n_real, self.seed, _STREAM_ORDER, self.epoch * steps * k_real, steps * k_real)
            syn = self.n_real + cyclic_indices(self.n_synthetic, self.seed, _STREAM_SYNTHETIC,
                                               self.epoch * steps * k_syn, steps * k_syn)
            batches = np.concatenate([real.reshape(steps, k_real), syn.reshape(steps, k_syn)], axis=1)
        return iter(batches.tolist())


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Linear warm-up over ``warmup_steps`` (reaching 1 at the last warm-up step),
    then half a cosine from 1 to 0 over the remaining steps (Loshchilov & Hutter 2017,
    arXiv:1608.03983, without restarts).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def random_hflip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image of a batch (N, C, H, W) left-right with probability 1/2."""
    flip = (torch.rand(images.shape[0], generator=generator) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def class_weight_vector(labels: np.ndarray, n_classes: int, mode: str) -> torch.Tensor:
    """Per-class loss weights: ones, or sklearn's "balanced" weights (absent classes get 1)."""
    weights = np.ones(n_classes, dtype=np.float64)
    if mode == "balanced":
        present = np.unique(labels)
        weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return torch.tensor(weights, dtype=torch.float32)


def validation_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """Loss, accuracy, balanced accuracy and macro AUC of probabilities (N, C) on labels (N,)."""
    pred = proba.argmax(axis=1)
    picked = np.clip(proba[np.arange(len(y_true)), y_true], 1e-12, 1.0)
    return {
        "val_loss": float(-np.log(picked).mean()),
        "val_accuracy": float((pred == y_true).mean()),
        "val_balanced_accuracy": float(balanced_accuracy_score(y_true, pred)),
        "val_macro_auc": macro_auc(y_true, proba, skip_absent=True),
    }


@torch.no_grad()
def predict_proba(model: nn.Module, images: np.ndarray, batch_size: int = 128, tta: bool = False) -> np.ndarray:
    """Softmax probabilities (N, C) as float64 for uint8 images (N, S, S), computed in eval mode.

    With ``tta`` the probabilities are averaged over each image and its horizontal mirror.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device

    def probs(x: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(model(x).float(), dim=1)
        return (p + torch.softmax(model(x.flip(-1)).float(), dim=1)) / 2 if tta else p

    chunks = [probs(to_tensor(images[i : i + batch_size]).to(device)).cpu() for i in range(0, len(images), batch_size)]
    model.train(was_training)
    if not chunks:
        return np.zeros((0, model.head.out_features))
    return torch.cat(chunks).double().numpy()


def _check_arrays(images: np.ndarray, labels: np.ndarray, cfg: ClassifierConfig, n_classes: int, part: str) -> None:
    size = cfg.image_size
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (size, size):
        raise DataError(
            f"{part} images must be uint8 (N, {size}, {size}) (classifier.image_size), "
            f"got {images.dtype} {images.shape}"
        )
    if len(images) == 0 or len(labels) != len(images):
        raise DataError(f"{part}: {len(images)} images and {len(labels)} labels (need the same, > 0)")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise DataError(f"{part} labels must lie in [0, {n_classes}), got {labels.min()}..{labels.max()}")


def _data_hash(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(str((a.dtype, a.shape)).encode())
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()[:16]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv/linear weights only, not on norm weights and biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _mixup(x: torch.Tensor, labels: torch.Tensor, alpha: float, rng: np.random.Generator
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Mixup (Zhang et al. 2018, arXiv:1710.09412): a convex combination of the batch with a
    permutation of itself; returns (mixed images, labels, permuted labels, weight of the first)."""
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(len(labels)))
    return lam * x + (1 - lam) * x[perm], labels, labels[perm], lam


def _train_one_epoch(
    accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
    loss_fn: nn.Module, cfg: ClassifierConfig, seed: int, epoch: int, ema: AveragedModel | None = None,
    bar: Progress | None = None,
) -> tuple[float, float, int]:
    """One epoch of the budget (``len(loader)`` batches); returns (mean training loss, last
    learning rate, optimizer steps taken).

    Every process reads and augments the same global batch and computes its own share of
    rows (``local_rows``); DDP averages the gradients, so N processes take the steps of one.
    """
    model.train()
    loader.batch_sampler.set_epoch(epoch)
    torch.manual_seed(derived_seed(seed, epoch, _STREAM_DROPOUT))
    flips = torch.Generator().manual_seed(derived_seed(seed, epoch, _STREAM_FLIP))
    mixing = np.random.default_rng(derived_seed(seed, epoch, _STREAM_MIX))
    steps_per_epoch = math.ceil(len(loader) / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    loss_sum, n_seen, lr, steps = 0.0, 0, cfg.lr, 0
    for i, (images, labels) in enumerate(loader):
        lr = cfg.lr * lr_factor(epoch * steps_per_epoch + i // cfg.grad_accum, total_steps, warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = images.float().div_(255.0)
        if cfg.augment == "flip":
            x = random_hflip(x, flips)
        elif cfg.augment == "light":
            x, _ = augment_batch(x, LIGHT, flips)
        if cfg.mixup_alpha > 0:
            x, y_a, y_b, lam = _mixup(x, labels, cfg.mixup_alpha, mixing)
        else:
            y_a, y_b, lam = labels, labels, 1.0
        rows = local_rows(len(labels))
        with accelerator.accumulate(model):
            logits = model(x[rows].to(accelerator.device))
            loss = lam * loss_fn(logits, y_a[rows].to(accelerator.device))
            if lam < 1.0:
                loss = loss + (1 - lam) * loss_fn(logits, y_b[rows].to(accelerator.device))
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            steps += 1
            if ema is not None:
                ema.update_parameters(accelerator.unwrap_model(model))
        loss_sum += float(accelerator.reduce(loss.detach(), "mean")) * len(labels)
        n_seen += len(labels)
        if bar is not None:
            bar.update(1, epoch=epoch + 1, loss=loss_sum / n_seen)
    return loss_sum / max(n_seen, 1), lr, steps


def ema_decay(ema_epochs: float, batches_per_epoch: int) -> float:
    """Per-step decay of an exponential moving average whose horizon (1 / (1 - decay)
    steps) spans ``ema_epochs`` epochs of ``batches_per_epoch`` steps."""
    return 1.0 - 1.0 / max(1.0, ema_epochs * batches_per_epoch)


def _is_better(score: float, state: dict[str, Any], metric: str) -> bool:
    """True when ``score`` beats the best so far (lower is better for the loss); the first
    finite score always does."""
    if not math.isfinite(score):
        return state["best_epoch"] < 0
    if state["best_score"] is None:
        return True
    return score < state["best_score"] if metric == "loss" else score > state["best_score"]


def fit_classifier(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    cfg: ClassifierConfig,
    n_classes: int,
    out_dir: Path,
    seed: int = 0,
    tracker_log: Callable[[dict[str, Any], int], None] | None = None,
    cpu: bool = False,
    n_real: int | None = None,
) -> FitResult:
    """Train a classifier for a fixed budget and return it (chosen weights loaded, eval mode).

    Images are uint8 (N, S, S) at ``cfg.image_size``; labels int64 class indices. The first
    ``n_real`` rows (default: all) are the real training images, the rest synthetic. The
    budget is defined on the real rows alone: an epoch is ``ceil(n_real / batch_size)``
    batches, drawn from real + synthetic rows as ``cfg.synthetic_share`` says, so adding
    synthetic images never adds optimizer steps. With ``cfg.ema_epochs`` > 0 the weights
    evaluated and kept are an exponential moving average of the trained ones.
    ``cfg.select`` = "best" keeps the epoch with the best ``cfg.select_metric`` on the
    validation images (stopping after ``cfg.patience`` epochs without improvement); "last"
    trains all ``cfg.epochs`` and keeps the final weights.

    A folder with a ``state.json`` from an unfinished run of the same config and data
    is resumed at the next epoch; a finished one is just loaded. ``tracker_log(row,
    epoch)`` is called after each epoch's checkpoint is written; ``cpu`` forces the
    CPU even when a GPU is present. Raises RunStateError if the folder holds a
    different run.
    """
    out_dir = Path(out_dir)
    train_labels = np.asarray(train_labels, dtype=np.int64)
    val_labels = np.asarray(val_labels, dtype=np.int64)
    _check_arrays(train_images, train_labels, cfg, n_classes, "training")
    _check_arrays(val_images, val_labels, cfg, n_classes, "validation")
    n_real = len(train_images) if n_real is None else int(n_real)
    if not 0 < n_real <= len(train_images):
        raise DataError(f"training: n_real={n_real} must lie in 1..{len(train_images)} (the real rows come first)")
    run = {
        "seed": seed, "n_classes": n_classes, "config": cfg.model_dump(mode="json"), "n_real": n_real,
        "data_hash": _data_hash(train_images, train_labels, val_images, val_labels),
    }
    state = load_resume_state(out_dir)
    if state is not None:
        check_same_run(state, run, out_dir)
        if state["done"]:
            logger.debug("classifier in %s already trained (best epoch %d)", out_dir, state["best_epoch"])
            if records_behind(out_dir, state):  # killed after the last epoch's commit point
                write_epoch_records(out_dir, state)
            model = load_classifier(out_dir, cfg, n_classes)
            return FitResult(model, state["best_epoch"], _score(state), state["history"], state["steps"])

    accelerator = make_accelerator(cfg.mixed_precision, cfg.grad_accum, cpu, field="classifier.mixed_precision")
    torch.manual_seed(seed)
    model = build_classifier(cfg, n_classes)
    if cfg.channels_last:  # activations follow the weights' layout; checkpoints are saved contiguous
        model = model.to(memory_format=torch.channels_last)
    optimizer = adamw(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    batches_per_epoch = steps_per_epoch(n_real, cfg.batch_size)
    batches = MixedBatchSampler(n_real, len(train_images) - n_real, cfg.batch_size, batches_per_epoch, seed,
                                cfg.synthetic_share)
    dataset = TensorDataset(torch.from_numpy(train_images).unsqueeze(1), torch.from_numpy(train_labels))
    # Not prepared by accelerate: every process iterates the same global batches (see _train_one_epoch).
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers)
    ema = None
    if cfg.ema_epochs > 0:  # torch's own EMA wrapper; batch-norm statistics are averaged too
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay(cfg.ema_epochs, batches_per_epoch)),
                            use_buffers=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    weights = class_weight_vector(train_labels, n_classes, cfg.class_weights).to(accelerator.device)
    loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.label_smoothing)

    if state is None:
        state = {"version": STATE_VERSION, "run": run, "epoch": -1, "best_epoch": -1, "best_score": None,
                 "bad_epochs": 0, "done": False, "history": [], "steps": 0,
                 "rng": "epoch e draws order, flips and dropout from SeedSequence([seed, e, stream])"}
    else:
        load_last(out_dir / "last.safetensors", accelerator.unwrap_model(model), optimizer, ema)
        logger.info("resuming classifier in %s after epoch %d", out_dir, state["epoch"] + 1)

    started_fit, first_epoch = time.perf_counter(), state["epoch"] + 1
    bar = progress(cfg.epochs * batches_per_epoch, "classifier", initial=(state["epoch"] + 1) * batches_per_epoch,
                   enabled=accelerator.is_local_main_process, log=logger)
    for epoch in range(state["epoch"] + 1, cfg.epochs):
        started = time.perf_counter()
        train_loss, lr, steps = _train_one_epoch(accelerator, model, optimizer, loader, loss_fn, cfg, seed, epoch, ema,
                                                 bar)
        unwrapped = accelerator.unwrap_model(model)
        broadcast_buffers(unwrapped)
        kept = unwrapped if ema is None else ema.module
        last_epoch = epoch + 1 >= cfg.epochs
        if last_epoch or (epoch + 1) % cfg.eval_every == 0:
            metrics = validation_metrics(val_labels, predict_proba(kept, val_images, tta=cfg.tta))
        else:
            metrics = dict.fromkeys(VAL_KEYS)
        score = metrics[f"val_{cfg.select_metric}"]
        improved = last_epoch if cfg.select == "last" else _is_better(score, state, cfg.select_metric)
        if improved:
            state.update(best_epoch=epoch, best_score=finite_or_none(score), bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        row = {"epoch": epoch, "train_loss": train_loss, **metrics, "lr": lr,
               "seconds": round(time.perf_counter() - started, 3)}
        state["history"].append(row)
        state["steps"] += steps
        stop = cfg.select == "best" and state["bad_epochs"] >= cfg.patience
        state.update(epoch=epoch, done=last_epoch or stop)
        checkpoint = state["done"] or (epoch + 1) % cfg.checkpoint_every == 0
        save_epoch(out_dir, kept, unwrapped, optimizer, state, improved, epoch, score, ema,  # main process commits
                    checkpoint=checkpoint)
        logger.debug("classifier epoch %d: train loss %.4f, val %s %s%s", epoch + 1, train_loss,
                     cfg.select_metric, "-" if score is None else f"{score:.4f}", " (best)" if improved else "")
        if tracker_log is not None:
            tracker_log(row, epoch)
        if state["done"]:
            break
    bar.close()
    log_fit("classifier", state["epoch"] + 1 - first_epoch, time.perf_counter() - started_fit, unit="epoch", log=logger,
            steps=state["steps"], kept_epoch=state["best_epoch"] + 1, **{f"val_{cfg.select_metric}": _score(state)})
    model = load_best_weights(accelerator.unwrap_model(model), out_dir)
    return FitResult(model, state["best_epoch"], _score(state), state["history"], state["steps"])


def _score(state: dict[str, Any]) -> float:
    return float("-inf") if state["best_score"] is None else float(state["best_score"])


