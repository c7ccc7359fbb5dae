"""Train on synthetic, test on real: the Classification Accuracy Score (CAS) of Ravuri & Vinyals
("Classification Accuracy Score for Conditional Generative Models", NeurIPS 2019).

For a generator cell, a classifier with the study's settings is trained on the cell's synthetic
images alone -- for the same number of optimizer steps as every classifier of the study (the budget
counted on the fold's real training part), with the fold's real validation part for its curves --
and scored on the fold's real test part. Beside the real-only classifier of the same fold and seed
it says how much of the real task the synthetic images alone teach: a generator whose classes come
out as label noise scores near chance. Written to ``cells/<method>/fold<f>_seed<s>/cas.json`` once
(the classifier in ``cas/``), only with ``run.cas``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from busynth.classify.metrics import classification_metrics
from busynth.classify.train import fit_classifier, predict_proba
from busynth.config import StudyConfig
from busynth.data.records import Record
from busynth.data.transforms import label_indices, masks_and_flags, stack_images
from busynth.evaluate.summary import CAS_JSON
from busynth.io import read_json, write_json
from busynth.registry import REFERENCE, cell_folder, cell_key

logger = logging.getLogger(__name__)

def evaluate_cas(run_dir: Path, method: str, fold: int, seed: int, config: StudyConfig, train: Sequence[Record],
                 val: Sequence[Record], test: Sequence[Record], synthetic: Sequence[Record]) -> dict:
    """Write (once) and return the cell's cas.json: the synthetic-only classifier's metrics on the real
    test part (``synthetic_only``) next to the real-only classifier's of the same fold and seed
    (``real_only``, from its metrics.json); ``{"status": "skipped", ...}`` without synthetic images."""
    key = cell_key(fold, seed)
    cell = cell_folder(run_dir, method, key)
    if (cell / CAS_JSON).is_file() and (done := read_json(cell / CAS_JSON)).get("status") == "ok":
        return done
    base = {"method": method, "fold": fold, "seed": seed}
    if not synthetic:
        result = {**base, "status": "skipped", "note": "no synthetic images"}
        write_json(cell / CAS_JSON, result)
        return result
    classes, cfg = list(config.data.classes), config.classifier
    masks, has_mask = masks_and_flags(synthetic, cfg.image_size) if cfg.mask_weight > 0 else (None, None)
    fit = fit_classifier(stack_images(synthetic, cfg.image_size), label_indices(synthetic, classes),
                         stack_images(val, cfg.image_size), label_indices(val, classes), cfg, len(classes),
                         cell / "cas", seed=seed, budget_rows=len(train), train_masks=masks, has_mask=has_mask)
    proba = predict_proba(fit.model, stack_images(test, cfg.image_size), tta=cfg.tta)
    real = cell_folder(run_dir, REFERENCE, key) / "metrics.json"
    result = {**base, "status": "ok", "n_synthetic": len(synthetic), "train_steps": fit.steps,
              "synthetic_only": classification_metrics(label_indices(test, classes), proba, classes),
              "real_only": read_json(real) if real.is_file() else None}
    logger.info("CAS of %s %s: balanced accuracy %.3f trained on %d synthetic images alone (real-only %s)",
                method, key, result["synthetic_only"]["balanced_accuracy"], len(synthetic),
                f"{result['real_only']['balanced_accuracy']:.3f}" if result["real_only"] else "not run")
    write_json(cell / CAS_JSON, result)
    return result
