"""Per-image test predictions of a cell: ``predictions.csv`` (id, label, y_true, p_<class>...)."""

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


def read_predictions(path: Path, classes: Sequence[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """ids, y_true and (N, C) probabilities from a predictions.csv."""
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    ids = [r["id"] for r in rows]
    y = np.array([int(r["y_true"]) for r in rows], dtype=np.int64)
    p = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows], dtype=np.float64).reshape(len(rows), len(classes))
    return ids, y, p
