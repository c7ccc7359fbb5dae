"""Filtering a synthetic set by the fold's real-only classifier (``synthesis.filter``).

A generator's filtered arm (``cvae+filter``) samples ``filter_pool`` times the requested number of
images per class, lets the real-only classifier of the same fold (trained on that fold's training
part only, never on a test image) score them, and keeps, in sampling order, the first images whose
intended class gets at least the threshold probability, up to the requested count. A class where
too few pass keeps what passed, and the shortfall is logged and recorded. ``filter.json`` in the
arm's synthetic folder holds the counts per class and the kept ids, so a rerun keeps the same images.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from busynth.classify.checkpoints import load_classifier
from busynth.classify.train import predict_proba
from busynth.config import StudyConfig
from busynth.data.records import Record
from busynth.data.transforms import label_indices, stack_images
from busynth.errors import RunStateError
from busynth.io import read_json, write_json

logger = logging.getLogger(__name__)

FILTER_JSON = "filter.json"


def filter_synthetic(pool: Sequence[Record], requested: Mapping[str, int], classifier_dir: Path, config: StudyConfig,
                     folder: Path, name: str) -> list[Record]:
    """The records of ``pool`` the classifier in ``classifier_dir`` keeps (see the module docstring),
    decided once and recorded in ``folder/filter.json``; ``name`` labels the log line."""
    path = Path(folder) / FILTER_JSON
    if path.is_file():
        kept = set(read_json(path)["kept"])
        return [r for r in pool if r.id in kept]
    if not (Path(classifier_dir) / "best.safetensors").is_file():
        raise RunStateError(f"{name}: synthesis.filter needs the real-only classifier {classifier_dir}, which has "
                            "not finished (real runs before the filtered arms of its fold and seed)")
    classes, cfg, threshold = list(config.data.classes), config.classifier, config.synthesis.filter
    model = load_classifier(classifier_dir, cfg, len(classes))
    proba = predict_proba(model, stack_images(pool, cfg.image_size), tta=cfg.tta)
    intended = proba[np.arange(len(pool)), label_indices(pool, classes)] if pool else np.zeros(0)
    kept: list[int] = []
    per_class = {}
    for c in classes:
        members = [i for i, r in enumerate(pool) if r.label == c]
        passed = [i for i in members if intended[i] >= threshold]
        keep = passed[:requested.get(c, 0)]
        kept += keep
        per_class[c] = {"requested": requested.get(c, 0), "sampled": len(members), "passed": len(passed),
                        "kept": len(keep)}
    short = {c: v for c, v in per_class.items() if v["kept"] < v["requested"]}
    logger.info("filter %s: kept %s%s", name, ", ".join(f"{c} {v['kept']}/{v['requested']} ({v['passed']} of "
                                                         f"{v['sampled']} passed)" for c, v in per_class.items()),
                f"; short of the requested count in {', '.join(short)}" if short else "")
    write_json(path, {"threshold": threshold, "classifier": str(classifier_dir), "per_class": per_class,
                      "kept": [pool[i].id for i in sorted(kept)]})
    return [pool[i] for i in sorted(kept)]
