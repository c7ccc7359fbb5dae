"""The segmentation model of ``run.task=segmentation``: MONAI's UNet as a stage of the training engine.

The UNet (Ronneberger et al., MICCAI 2015; MONAI's variant with residual units, Kerfoot et al.
2019) maps a grayscale image to one lesion logit per pixel and trains on Dice + binary
cross-entropy (MONAI's ``DiceCELoss``). Batches mix real and synthetic image-mask pairs exactly as
the classifier's do, and the budget is counted on the real pairs (``busynth.classify.train``), so
every method trains the same number of optimizer steps. The run folder is the engine's
(``checkpoint-N/``, ``history.csv``) plus ``best.safetensors``: the weights kept after the last
epoch (their moving average with ``ema_epochs``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from busynth.accel import local_rows
from busynth.classify.checkpoints import BEST, has_own_weights, load_best_weights, save_safetensors
from busynth.classify.train import EpochStage, data_hash, steps_per_epoch
from busynth.config import SegmenterConfig
from busynth.data.augment import ON_THE_FLY, augment_batch
from busynth.data.transforms import map_batches
from busynth.engine import train_stage
from busynth.errors import DataError
from busynth.segment.metrics import segmentation_scores


@dataclass
class SegmenterFit:
    """A trained segmenter (kept weights loaded, eval mode) and its training."""

    model: nn.Module
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)


def build_segmenter(cfg: SegmenterConfig, pretrained: bool = True) -> nn.Module:
    """MONAI's 2-D UNet, AttentionUnet or DynUNet, or a U-Net on a pretrained backbone (``segmenter.arch``;
    its pretrained weights unless ``pretrained`` is False): one input channel (grayscale), one output
    channel (the lesion logit)."""
    if cfg.arch == "backbone_unet":
        from busynth.segment.backbone import build_backbone_unet  # imports transformers

        return build_backbone_unet(cfg, pretrained)
    # MONAI is imported where it is used: its package import takes seconds (it loads all of its
    # networks), paid by every process that imports the study code (each Ray worker too).
    from monai.networks.nets import AttentionUnet, DynUNet, UNet

    if cfg.arch == "dynunet":  # the input level at stride 1, then the levels of segmenter.strides
        model = DynUNet(spatial_dims=2, in_channels=1, out_channels=1, kernel_size=[3] * len(cfg.channels),
                        strides=[1, *cfg.strides], upsample_kernel_size=list(cfg.strides), filters=list(cfg.channels),
                        dropout=cfg.dropout or None, norm_name=cfg.norm, res_block=cfg.num_res_units > 0,
                        deep_supervision=cfg.deep_supervision > 0, deep_supr_num=max(cfg.deep_supervision, 1))
        # DynUNet registers its layers twice: as input_block, downsamples, bottleneck, upsamples and
        # deep_supervision_heads, and again inside skip_layers, the recursive module its forward runs.
        # Its state dict then holds every tensor under two names, which safetensors refuses to write.
        # skip_layers becomes a plain attribute: forward runs the same layers, each saved once.
        params = {id(p) for p in model.parameters()}
        object.__setattr__(model, "skip_layers", model._modules.pop("skip_layers"))
        assert {id(p) for p in model.parameters()} == params  # every weight is still registered
        return model
    if cfg.arch == "attention_unet":
        model = AttentionUnet(spatial_dims=2, in_channels=1, out_channels=1, channels=tuple(cfg.channels),
                              strides=tuple(cfg.strides), dropout=cfg.dropout)
        if cfg.norm == "instance":
            instance_norm(model)
        return model
    return UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=tuple(cfg.channels),
                strides=tuple(cfg.strides), num_res_units=cfg.num_res_units, dropout=cfg.dropout, norm=cfg.norm)


def instance_norm(model: nn.Module) -> None:
    """Swap the batch norms of MONAI's AttentionUnet (fixed in its blocks, no option) for the instance
    norms of MONAI's UNet, except the one-channel norm of each gate's attention logit, which stays a
    learned scale and shift: normalising it per image would force every image's gate half open."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.BatchNorm2d) and child.num_features > 1:
                setattr(parent, name, nn.InstanceNorm2d(child.num_features))


@torch.no_grad()
def predict_masks(model: nn.Module, images: np.ndarray, threshold: float = 0.5, batch_size: int = 64,
                  tta: bool = False) -> np.ndarray:
    """bool (N, S, S) lesion masks of uint8 images (N, S, S), computed in eval mode. With ``tta`` the
    lesion probability is averaged over each image and its horizontal mirror (mirrored back)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device

    def lesion(x: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(model(x).float())
        if tta:
            p = (p + torch.sigmoid(model(x.flip(-1)).float()).flip(-1)) / 2
        return p[:, 0] > threshold

    out = map_batches(lesion, images, batch_size, device)
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(images.shape, dtype=bool)


class SegmenterStage(EpochStage):
    """Dice + cross-entropy of the UNet on augmented batches (image and mask warped alike); at the end
    of every ``eval_every``-th epoch and of the last the kept weights are scored on the validation
    pairs (mean Dice), and after the last epoch written to ``best.safetensors``."""

    name = "segmenter"

    def __init__(self, model: nn.Module, cfg: SegmenterConfig, n_real: int, n_synthetic: int,
                 val: tuple[np.ndarray, np.ndarray], out_dir: Path) -> None:
        super().__init__(model, cfg, n_real, n_synthetic, steps_per_epoch(n_real, cfg.batch_size), out_dir)
        from monai.losses import DeepSupervisionLoss, DiceCELoss

        self.val = val
        self.loss_fn = DiceCELoss(sigmoid=True)
        self.deep_loss_fn = DeepSupervisionLoss(self.loss_fn, weight_mode="exp")

    def loss(self, batch: Mapping[str, torch.Tensor],
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        x, masks = batch["images"].float().div_(255.0), batch["masks"].float()
        if self.cfg.augment in ON_THE_FLY:
            x, masks = augment_batch(x, ON_THE_FLY[self.cfg.augment], generator, masks=masks)
        rows = local_rows(len(x))
        logits, target = self.model(x[rows]), masks[rows].float()
        if logits.dim() == 5:  # DynUNet's deep supervision in training: (N, heads, 1, S, S), main head first
            return self.deep_loss_fn(list(logits.unbind(1)), target), {}
        return self.loss_fn(logits, target), {}

    def end_epoch(self, epoch: int, kept: nn.Module, last: bool, scored: bool, row: dict[str, Any]) -> bool:
        val_dice = None
        if scored:
            pred = predict_masks(kept, self.val[0], self.cfg.threshold, tta=self.cfg.tta)
            val_dice = float(segmentation_scores(pred, self.val[1])[:, 0].mean()) if len(pred) else None
        if last:
            save_safetensors(self.out_dir / BEST, kept.state_dict(), {"epoch": epoch, "val_dice": val_dice})
        row["val_dice"] = val_dice
        return False

    def fit_summary(self, history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return {**super().fit_summary(history), "val_dice": history[-1]["val_dice"]}


def fit_segmenter(images: np.ndarray, masks: np.ndarray, val_images: np.ndarray, val_masks: np.ndarray,
                  cfg: SegmenterConfig, out_dir: Path, seed: int = 0, n_real: int | None = None,
                  cpu: bool = False) -> SegmenterFit:
    """Train the segmenter on uint8 images (N, S, S) and bool masks (N, S, S), the first ``n_real``
    pairs real (the budget is counted on them), for ``cfg.epochs`` epochs; resumes from the folder's
    last checkpoint and just loads a finished run. Returns the kept weights in eval mode."""
    size = cfg.image_size
    for part, x, m in (("training", images, masks), ("validation", val_images, val_masks)):
        if x.dtype != np.uint8 or x.shape[1:] != (size, size) or m.shape != x.shape or m.dtype != bool:
            raise DataError(f"segmenter {part} pairs must be uint8 images and bool masks (N, {size}, {size}) "
                            f"(segmenter.image_size), got {x.dtype} {x.shape} and {m.dtype} {m.shape}")
    if len(images) == 0:
        raise DataError("segmenter: no training pairs (the lesion classes have no image with a mask)")
    n_real = len(images) if n_real is None else n_real
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    # A fit under way or done has weights of its own: a pretrained backbone's are read only to start.
    stage = SegmenterStage(build_segmenter(cfg, pretrained=not has_own_weights(out_dir)), cfg, n_real,
                           len(images) - n_real, (val_images, val_masks), out_dir)
    settings = {k: v for k, v in cfg.model_dump(mode="json").items()
                if k not in ("eval_every", "checkpoint_every", "tta")}
    identity = {"n_real": n_real, "data_hash": data_hash(images, masks, val_images, val_masks),
                **{f"segmenter.{k}": v for k, v in settings.items()}}
    data = {"images": torch.from_numpy(images).unsqueeze(1), "masks": torch.from_numpy(masks).unsqueeze(1)}
    history = train_stage(stage, data, stage.schedule(), out_dir, seed=seed, mixed_precision=cfg.mixed_precision,
                          cpu=cpu, precision_field="segmenter.mixed_precision", identity=identity,
                          identity_defaults={f"segmenter.{k}": v
                                             for k, v in SegmenterConfig().model_dump(mode="json").items()},
                          ema_decay=stage.moving_average_decay())
    model = load_best_weights(stage.model, out_dir)
    return SegmenterFit(model, len(history), [r for r in history if r.get("epoch") is not None])


def load_segmenter(out_dir: Path, cfg: SegmenterConfig) -> nn.Module:
    """The kept weights of a segmenter folder (``best.safetensors``, read with safetensors), eval mode."""
    return load_best_weights(build_segmenter(cfg, pretrained=False), Path(out_dir))
