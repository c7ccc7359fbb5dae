"""Per-image test results of a cell: ``predictions.csv`` (id, label, y_true, p_<class>...) of a classifier,
``scores.csv`` (id, label, y_true, dice, iou, hd95) of a segmenter."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def predictions_csv(test: Sequence[Any], y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str]) -> str:
    """CSV text: id, label, y_true and one probability column per class."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "label", "y_true", *[f"p_{c}" for c in classes]])
    for r, y, p in zip(test, y_true, proba, strict=True):
        writer.writerow([r.id, r.label, int(y), *[f"{v:.6f}" for v in p]])
    return buf.getvalue()


def scores_csv(test: Sequence[Any], y_true: np.ndarray, scores: np.ndarray,
               names: Sequence[str] = ("dice", "iou", "hd95")) -> str:
    """CSV text: id, label, y_true and one column per per-image score (a segmenter's Dice, IoU, HD95)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "label", "y_true", *names])
    for r, y, row in zip(test, y_true, scores, strict=True):
        writer.writerow([r.id, r.label, int(y), *[f"{v:.6f}" for v in row]])
    return buf.getvalue()


def read_predictions(path: Path, columns: Sequence[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """ids, y_true and (N, C) values from a predictions.csv (``columns`` = the classes: their
    probabilities) or a scores.csv (``columns`` = the score names)."""
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    ids = [r["id"] for r in rows]
    y = np.array([int(r["y_true"]) for r in rows], dtype=np.int64)
    key = (lambda c: c) if rows and columns and columns[0] in rows[0] else (lambda c: f"p_{c}")
    p = np.array([[float(r[key(c)]) for c in columns] for r in rows], dtype=np.float64).reshape(len(rows), len(columns))
    return ids, y, p
