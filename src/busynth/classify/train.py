"""The classifier's training: a stage of the training engine (``busynth.engine``), with validation,
model selection and the chosen weights.

A run folder holds the engine's ``checkpoint-N/`` folders (weights with batch-norm statistics,
optimizer, moving average, ``state.json``) and ``history.csv`` (one row per optimizer step; the
last step of an epoch also carries the epoch's mean training loss and, when scored, the validation
numbers), and ``best.safetensors``: the weights kept (config in its metadata). Everything random
in a step -- the batch, flips and crops, mixup, dropout -- is seeded from ``(seed, step)``, so a
run resumed from a checkpoint continues exactly as an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from busynth.accel import broadcast_buffers, local_rows
from busynth.classify.checkpoints import (
    BEST,
    finite_or_none,
    has_own_weights,
    load_best_weights,
    save_safetensors,
)
from busynth.classify.metrics import macro_auc
from busynth.classify.models import build_classifier
from busynth.config import ClassifierConfig, SegmenterConfig
from busynth.data.augment import ON_THE_FLY, augment_batch
from busynth.data.transforms import map_batches
from busynth.engine import Stage, StageConfig, train_stage
from busynth.errors import DataError
from busynth.io import derived_seed

logger = logging.getLogger(__name__)

# Independent streams of batch order: real rows and synthetic rows.
_STREAM_ORDER, _STREAM_SYNTHETIC = 0, 3
# The validation scores of one epoch (None in an epoch that was not scored; see eval_every).
VAL_KEYS = ("val_loss", "val_accuracy", "val_balanced_accuracy", "val_macro_auc")
# ClassifierConfig fields that do not change what is trained: a run may resume with other values.
RESUME_FREE_FIELDS = frozenset({"eval_every", "checkpoint_every"})


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


def synthetic_per_batch(batch_size: int, n_synthetic: int, synthetic_share: float | None) -> int | None:
    """Synthetic rows in every batch: None (one shuffled stream over all rows, each image equally
    often) or ``round(share * batch_size)``, at least 1 for a positive share and at most batch - 1."""
    if synthetic_share is None or n_synthetic == 0:
        return None
    return min(batch_size - 1, max(1 if synthetic_share > 0 else 0, round(synthetic_share * batch_size)))


def mixed_batch(micro_step: int, n_real: int, n_synthetic: int, batch_size: int, seed: int,
                k_synthetic: int | None) -> np.ndarray:
    """Row indices of batch ``micro_step``: real rows ``0..n_real-1`` and synthetic rows after them.

    ``k_synthetic`` None draws the batch from one stream over all rows; a number puts that many
    synthetic rows in every batch (the rest real), each pool cycling through its own permutations.
    Batch ``i`` depends on ``(seed, i)`` only, so a resumed run draws exactly the same batches."""
    b = batch_size
    if k_synthetic is None:
        return cyclic_indices(n_real + n_synthetic, seed, _STREAM_ORDER, micro_step * b, b)
    k_real = b - k_synthetic
    real = cyclic_indices(n_real, seed, _STREAM_ORDER, micro_step * k_real, k_real)
    syn = n_real + cyclic_indices(n_synthetic, seed, _STREAM_SYNTHETIC, micro_step * k_synthetic, k_synthetic)
    return np.concatenate([real, syn])


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

    chunks = map_batches(probs, images, batch_size, device)
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


def _check_masks(masks: np.ndarray | None, has_mask: np.ndarray | None, n: int, cfg: ClassifierConfig
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The training masks and the rows that have one, checked for ``classifier.mask_weight`` > 0."""
    size = cfg.image_size
    if masks is None:
        raise DataError("classifier.mask_weight > 0 needs the lesion masks of the training images")
    has = np.ones(n, dtype=bool) if has_mask is None else np.asarray(has_mask, dtype=bool)
    if masks.dtype != bool or masks.shape != (n, size, size) or has.shape != (n,):
        raise DataError(f"training masks must be bool (N, {size}, {size}) with one has_mask flag per image, "
                        f"got {masks.dtype} {masks.shape} and {has.shape} for {n} images")
    if not has.any():
        logger.warning("classifier.mask_weight > 0, but none of the %d training images has a mask: "
                       "the mask loss is 0", n)
    return masks, has


def data_hash(*arrays: np.ndarray) -> str:
    """A digest of arrays (dtype, shape, bytes): the training data's part of a fit key where a model
    is handed arrays rather than image ids (the classifier, the segmenter)."""
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
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """Mixup (Zhang et al. 2018, arXiv:1710.09412): a convex combination of the batch with a
    permutation of itself; returns (mixed images, labels, permuted labels, weight of the first,
    the permutation)."""
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(len(labels)))
    return lam * x + (1 - lam) * x[perm], labels, labels[perm], lam, perm


def lesion_share_loss(mask_logits: torch.Tensor, masks: torch.Tensor, has_mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of lesion logits (N, 1, h, w) against the share of lesion pixels of masks
    (N, 1, S, S) in each cell of the h x w grid (area pooling), averaged over the rows that have a
    mask (``has_mask``, bool (N,)); 0 when none has."""
    target = nn.functional.adaptive_avg_pool2d(masks.float(), mask_logits.shape[-2:])
    per_row = nn.functional.binary_cross_entropy_with_logits(mask_logits.float(), target, reduction="none")
    weights = has_mask.to(per_row.dtype)
    return (per_row.mean(dim=(1, 2, 3)) * weights).sum() / weights.sum().clamp(min=1.0)


class EpochStage(Stage):
    """A downstream model (classifier, segmenter) for :func:`busynth.engine.train_stage`, trained for
    ``cfg.epochs`` epochs of the *real* training rows: an epoch is ``batches_per_epoch`` batches
    (``grad_accum`` to an optimizer step) mixed from the real rows and the synthetic rows after them
    (``mixed_batch``), so every method trains the same number of steps. At the end of each epoch it
    records the epoch and its mean training loss in the history row and hands the kept weights -- the
    moving average when there is one -- to :meth:`end_epoch`, with whether the validation part is scored
    this epoch (every ``cfg.eval_every`` epochs and after the last).

    Every process gets the same global batch with process 0's generator and computes the loss on its
    own rows, so N processes take the steps of one."""

    global_batch = True

    def __init__(self, model: nn.Module, cfg: ClassifierConfig | SegmenterConfig, n_real: int, n_synthetic: int,
                 batches_per_epoch: int, out_dir: Path, grad_accum: int = 1) -> None:
        self.model = self.net = model  # ``net``: the module itself, whatever wrapper ``model`` gets
        self.cfg, self.out_dir, self.grad_accum = cfg, Path(out_dir), grad_accum
        self.n_real, self.n_synthetic = n_real, n_synthetic
        self.k_synthetic = synthetic_per_batch(cfg.batch_size, n_synthetic, cfg.synthetic_share)
        self.steps_per_epoch = math.ceil(batches_per_epoch / grad_accum)
        self._losses: list[float] = []

    def schedule(self) -> StageConfig:
        """The engine settings of ``cfg.epochs`` epochs: warm-up over ``warmup_epochs``, cosine to 0,
        no clipping, a checkpoint every ``checkpoint_every`` epochs (the newest kept)."""
        cfg, per_epoch = self.cfg, self.steps_per_epoch
        return StageConfig(steps=cfg.epochs * per_epoch, batch_size=cfg.batch_size, grad_accum=self.grad_accum,
                           lr=cfg.lr, warmup_steps=round(cfg.warmup_epochs * per_epoch), min_lr_ratio=0.0,
                           weight_decay=cfg.weight_decay, max_grad_norm=None, prompt_dropout=0.0,
                           checkpoint_every=cfg.checkpoint_every * per_epoch, keep_checkpoints=1)

    def moving_average_decay(self) -> float | None:
        """The engine's moving-average decay for ``cfg.ema_epochs`` (None: no moving average)."""
        return ema_decay(self.cfg.ema_epochs, self.steps_per_epoch) if self.cfg.ema_epochs > 0 else None

    def batch_rows(self, n: int, batch_size: int, micro_step: int, seed: int) -> torch.Tensor:
        rows = mixed_batch(micro_step, self.n_real, self.n_synthetic, batch_size, seed, self.k_synthetic)
        return torch.from_numpy(rows)

    def end_step(self, step: int, row: dict[str, Any]) -> bool:
        self._losses.append(row["loss"])
        if (step + 1) % self.steps_per_epoch:
            return False
        epoch = (step + 1) // self.steps_per_epoch - 1
        broadcast_buffers(self.net)
        kept = self.net if self.ema is None else self.ema.module
        last = epoch + 1 >= self.cfg.epochs
        row.update(epoch=epoch, train_loss=float(np.mean(self._losses)))
        self._losses = []
        return self.end_epoch(epoch, kept, last, last or (epoch + 1) % self.cfg.eval_every == 0, row)

    def end_epoch(self, epoch: int, kept: nn.Module, last: bool, scored: bool, row: dict[str, Any]) -> bool:
        """Score ``kept`` (when ``scored``), add the numbers to ``row``, write the weights kept so far;
        True stops training."""
        raise NotImplementedError

    def fit_summary(self, history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return {"epochs": history[-1]["epoch"] + 1}


class ClassifierStage(EpochStage):
    """The classifier: class-weighted cross-entropy on augmented (and optionally mixed-up) batches; at
    the end of an epoch the kept weights are scored on the validation images, the best or last
    epoch's weights written to ``best.safetensors``, and training stopped after ``patience`` epochs
    without improvement under ``select=best``."""

    name = "classifier"

    def __init__(self, model: nn.Module, cfg: ClassifierConfig, loss_fn: nn.Module, n_real: int, n_synthetic: int,
                 batches_per_epoch: int, val: tuple[np.ndarray, np.ndarray], out_dir: Path, best_meta: dict[str, Any],
                 tracker_log: Callable[[dict[str, Any], int], None] | None = None) -> None:
        super().__init__(model, cfg, n_real, n_synthetic, batches_per_epoch, out_dir, cfg.grad_accum)
        self.loss_fn, self.val, self.best_meta, self.tracker_log = loss_fn, val, best_meta, tracker_log
        self.best_epoch, self.best_score, self.bad_epochs = -1, None, 0

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        return param_groups(self.net, weight_decay)

    def loss(self, batch: Mapping[str, torch.Tensor],
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, labels = self.cfg, batch["labels"]
        mixing = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
        x = batch["images"].float().div_(255.0)
        # Masks (N, 1, S, S) ride along with the images through the same flips and warps.
        masks = batch["masks"].float() if cfg.mask_weight > 0 else None
        has_mask = batch.get("has_mask")
        if cfg.augment == "flip":
            if masks is None:
                x = random_hflip(x, generator)
            else:
                both = random_hflip(torch.cat([x, masks], dim=1), generator)
                x, masks = both[:, :1], both[:, 1:]
        elif cfg.augment in ON_THE_FLY:
            x, masks = augment_batch(x, ON_THE_FLY[cfg.augment], generator, masks=masks)
        y_a, y_b, lam = labels, labels, 1.0
        if cfg.mixup_alpha > 0:
            x, y_a, y_b, lam, perm = _mixup(x, labels, cfg.mixup_alpha, mixing)
            if masks is not None:  # a mixed image's target: the mixed masks, where both have one
                masks = lam * masks + (1 - lam) * masks[perm]
                has_mask = has_mask & has_mask[perm]
        rows = local_rows(len(labels))
        if masks is None:
            logits, extras = self.model(x[rows]), {}
        else:
            logits, mask_logits = self.model(x[rows], with_mask=True)
            mask_loss = lesion_share_loss(mask_logits, masks[rows], has_mask[rows])
            extras = {"mask_loss": float(mask_loss.detach())}
        self.loss_fn.to(logits.device)  # its class weights
        loss = lam * self.loss_fn(logits, y_a[rows])
        if lam < 1.0:
            loss = loss + (1 - lam) * self.loss_fn(logits, y_b[rows])
        if masks is not None:
            loss = loss + cfg.mask_weight * mask_loss
        return loss, extras

    def end_epoch(self, epoch: int, kept: nn.Module, last: bool, scored: bool, row: dict[str, Any]) -> bool:
        cfg = self.cfg
        if scored:
            metrics = validation_metrics(self.val[1], predict_proba(kept, self.val[0], tta=cfg.tta))
        else:
            metrics = dict.fromkeys(VAL_KEYS)
        score = metrics[f"val_{cfg.select_metric}"]
        improved = last if cfg.select == "last" else _is_better(score, self.best_score, self.best_epoch,
                                                                 cfg.select_metric)
        if improved:
            self.best_epoch, self.best_score, self.bad_epochs = epoch, finite_or_none(score), 0
            save_safetensors(self.out_dir / BEST, kept.state_dict(),
                             {**self.best_meta, "epoch": epoch, "score": finite_or_none(score)})
        else:
            self.bad_epochs += 1
        row.update(metrics)
        logger.debug("classifier epoch %d: train loss %.4f, val %s %s%s", epoch + 1, row["train_loss"],
                     cfg.select_metric, "-" if score is None else f"{score:.4f}", " (best)" if improved else "")
        if self.tracker_log is not None:
            self.tracker_log({"epoch": epoch, "train_loss": row["train_loss"], **metrics, "lr": row["lr"]}, epoch)
        return cfg.select == "best" and self.bad_epochs >= cfg.patience

    def resume_state(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "best_score": self.best_score, "bad_epochs": self.bad_epochs}

    def load_resume_state(self, state: Mapping[str, Any]) -> None:
        self.best_epoch, self.best_score, self.bad_epochs = (state["best_epoch"], state["best_score"],
                                                             state["bad_epochs"])

    def fit_summary(self, history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return {**super().fit_summary(history), "kept_epoch": self.best_epoch + 1,
                f"val_{self.cfg.select_metric}": self.best_score}


def ema_decay(ema_epochs: float, batches_per_epoch: int) -> float:
    """Per-step decay of an exponential moving average whose horizon (1 / (1 - decay)
    steps) spans ``ema_epochs`` epochs of ``batches_per_epoch`` steps."""
    return 1.0 - 1.0 / max(1.0, ema_epochs * batches_per_epoch)


def _is_better(score: float, best: float | None, best_epoch: int, metric: str) -> bool:
    """True when ``score`` beats the best so far (lower is better for the loss); the first
    finite score always does."""
    if not math.isfinite(score):
        return best_epoch < 0
    if best is None:
        return True
    return score < best if metric == "loss" else score > best


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
    budget_rows: int | None = None,
    train_masks: np.ndarray | None = None,
    has_mask: np.ndarray | None = None,
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
    trains all ``cfg.epochs`` and keeps the final weights. ``budget_rows`` counts the budget on that
    many rows instead of ``n_real`` (a classifier trained on synthetic images alone for the budget of
    the real training part: busynth.evaluate.cas). With ``cfg.mask_weight`` > 0, ``train_masks``
    (bool (N, S, S)) are the lesion masks of the training images, and ``has_mask`` (bool (N,), default
    all) says which rows have one: only those feed the auxiliary mask loss.

    Training runs on the engine (:func:`busynth.engine.train_stage`): a folder with a checkpoint
    of the same config and data resumes from it; a finished one is just loaded. ``tracker_log(row,
    epoch)`` is called at the end of each epoch; ``cpu`` forces the CPU even when a GPU is present.
    Raises RunStateError if the folder holds a different run.
    """
    out_dir = Path(out_dir)
    train_labels = np.asarray(train_labels, dtype=np.int64)
    val_labels = np.asarray(val_labels, dtype=np.int64)
    _check_arrays(train_images, train_labels, cfg, n_classes, "training")
    _check_arrays(val_images, val_labels, cfg, n_classes, "validation")
    n_real = len(train_images) if n_real is None else int(n_real)
    if not 0 < n_real <= len(train_images):
        raise DataError(f"training: n_real={n_real} must lie in 1..{len(train_images)} (the real rows come first)")
    masks = _check_masks(train_masks, has_mask, len(train_images), cfg) if cfg.mask_weight > 0 else None
    settings = cfg.model_dump(mode="json")
    identity = {"n_classes": n_classes, "n_real": n_real, **({"budget_rows": budget_rows} if budget_rows else {}),
                "data_hash": data_hash(train_images, train_labels, val_images, val_labels),
                **({"mask_hash": data_hash(*masks)} if masks is not None else {}),
                **{f"classifier.{k}": v for k, v in settings.items() if k not in RESUME_FREE_FIELDS}}
    defaults = {f"classifier.{k}": v for k, v in ClassifierConfig().model_dump(mode="json").items()}

    torch.manual_seed(seed)
    model = build_classifier(cfg, n_classes, load_weights=not has_own_weights(out_dir))
    if cfg.channels_last:  # activations follow the weights' layout; checkpoints are saved contiguous
        model = model.to(memory_format=torch.channels_last)
    batches = steps_per_epoch(budget_rows or n_real, cfg.batch_size)
    weights = class_weight_vector(train_labels, n_classes, cfg.class_weights)
    loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.label_smoothing)
    stage = ClassifierStage(model, cfg, loss_fn, n_real, len(train_images) - n_real, batches,
                            (val_images, val_labels), out_dir, {"config": settings, "n_classes": n_classes},
                            tracker_log)
    data = {"images": torch.from_numpy(train_images).unsqueeze(1), "labels": torch.from_numpy(train_labels)}
    if masks is not None:
        data.update(masks=torch.from_numpy(masks[0]).unsqueeze(1), has_mask=torch.from_numpy(masks[1]))
    history = train_stage(stage, data, stage.schedule(), out_dir, seed=seed, mixed_precision=cfg.mixed_precision,
                          cpu=cpu, precision_field="classifier.mixed_precision", identity=identity,
                          identity_defaults=defaults, ema_decay=stage.moving_average_decay())
    epochs = [row for row in history if row.get("epoch") is not None]
    best = float("-inf") if stage.best_score is None else float(stage.best_score)
    model = load_best_weights(stage.model, out_dir)
    return FitResult(model, stage.best_epoch, best, epochs, len(history))
