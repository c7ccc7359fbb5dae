"""Per-image segmentation scores with MONAI's metrics: Dice, IoU and the 95th-percentile Hausdorff
distance (HD95, in pixels of the working resolution).

MONAI returns no finite HD95 when the prediction (or the truth) is empty. An empty prediction of a
lesion is scored as the farthest miss the image allows: HD95 = the image diagonal, Dice = IoU = 0,
so every test image counts and a model that predicts nothing is not rewarded by being skipped.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from busynth.classify.metrics import SCORE_NAMES

SCORES = SCORE_NAMES  # the columns of segmentation_scores, in order


def segmentation_scores(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(N, 3) float64: Dice, IoU and HD95 of each predicted bool mask (N, H, W) against the true one."""
    if pred.shape != true.shape or pred.ndim != 3:
        raise ValueError(f"pred and true must both be (N, H, W), got {pred.shape} and {true.shape}")
    if len(pred) == 0:
        return np.zeros((0, len(SCORES)))
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU  # MONAI: see segment/train.py

    p = torch.from_numpy(pred.astype(np.float32))[:, None]
    t = torch.from_numpy(true.astype(np.float32))[:, None]
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(p, t)[:, 0].numpy()
    iou = MeanIoU(include_background=True, reduction="none", ignore_empty=False)(p, t)[:, 0].numpy()
    with warnings.catch_warnings():  # "the prediction of class 0 is all 0": handled below
        warnings.filterwarnings("ignore", message="the (prediction|ground truth) of class")
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        hd95 = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(p, t)[:, 0].numpy()
    diagonal = float(np.hypot(*pred.shape[1:]))
    hd95 = np.where(np.isfinite(hd95), hd95, diagonal)
    return np.stack([dice, iou, hd95], axis=1).astype(np.float64)
