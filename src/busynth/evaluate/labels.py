"""Label fidelity: does a synthetic "malignant" image look malignant to a classifier of real images?

For a generator cell, the real-only classifier of the same fold and seed
(``cells/real/fold<f>_seed<s>/classifier``, trained on that fold's real training part only)
scores every synthetic image. Per intended class: the share classified as that class
(``accuracy``), the mean probability of that class, and the confusion matrix (intended x
predicted). The same classifier on the fold's real *test* images gives the reference: a
generator whose images carry their label as well as real ones do reaches about the same numbers.
If the classes come out much weaker than in the reference, the synthetic set is partly label
noise. Written to ``cells/<method>/fold<f>_seed<s>/label_fidelity.json`` once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix

from busynth.classify.checkpoints import load_classifier
from busynth.classify.train import predict_proba
from busynth.config import StudyConfig
from busynth.data.records import Record
from busynth.data.transforms import label_indices, stack_images
from busynth.evaluate.summary import LABEL_FIDELITY_JSON
from busynth.io import read_json, write_json
from busynth.registry import REFERENCE, cell_folder, cell_key

logger = logging.getLogger(__name__)

def label_fidelity(y_intended: np.ndarray, proba: np.ndarray, classes: Sequence[str]) -> dict:
    """Per class present in ``y_intended``: n, accuracy (share predicted as that class) and the mean
    probability of that class; overall accuracy and mean probability of the intended class; the
    confusion matrix (rows: intended class, columns: predicted class, in ``classes`` order)."""
    y, p = np.asarray(y_intended, dtype=np.int64), np.asarray(proba, dtype=np.float64)
    pred = p.argmax(axis=1)
    per_class = {}
    for k, name in enumerate(classes):
        rows = y == k
        if rows.any():
            per_class[name] = {"n": int(rows.sum()), "accuracy": float((pred[rows] == k).mean()),
                               "mean_probability": float(p[rows, k].mean())}
    return {
        "per_class": per_class,
        "overall": {"n": int(y.size), "accuracy": float((pred == y).mean()) if y.size else float("nan"),
                    "mean_probability": float(p[np.arange(y.size), y].mean()) if y.size else float("nan")},
        "confusion": confusion_matrix(y, pred, labels=list(range(len(classes)))).tolist(),
    }


def evaluate_label_fidelity(run_dir: Path, method: str, fold: int, seed: int, config: StudyConfig,
                            test: Sequence[Record], synthetic: Sequence[Record]) -> dict:
    """Write (once) and return the cell's label_fidelity.json: ``synthetic`` (the generator's
    images) and ``real_test`` (the reference), both scored by the fold's real-only classifier;
    ``{"status": "skipped", ...}`` until that classifier exists."""
    key = cell_key(fold, seed)
    out_path = cell_folder(run_dir, method, key) / LABEL_FIDELITY_JSON
    if out_path.is_file() and (done := read_json(out_path)).get("status") == "ok":
        return done
    base = {"method": method, "fold": fold, "seed": seed, "classes": list(config.data.classes)}
    real = cell_folder(run_dir, REFERENCE, key) / "classifier"
    if not (real / "best.safetensors").is_file() or not synthetic:
        note = "no synthetic images" if not synthetic else f"the real-only classifier {real} has not finished"
        result = {**base, "status": "skipped", "note": note}
        write_json(out_path, result)
        return result
    classes, cfg = list(config.data.classes), config.classifier
    model = load_classifier(real, cfg, len(classes))
    scores = {}
    for name, records in (("synthetic", synthetic), ("real_test", test)):
        proba = predict_proba(model, stack_images(records, cfg.image_size), tta=cfg.tta)
        scores[name] = label_fidelity(label_indices(records, classes), proba, classes)
    result = {**base, "status": "ok", "classifier": f"cells/{REFERENCE}/{key}/classifier", **scores}
    logger.info("label fidelity of %s %s: %s (real test images: %s)", method, key,
                _brief(scores["synthetic"]), _brief(scores["real_test"]))
    write_json(out_path, result)
    return result


def _brief(scores: dict) -> str:
    return ", ".join(f"{c} {v['accuracy']:.2f}" for c, v in scores["per_class"].items())
