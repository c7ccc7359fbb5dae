"""Fidelity, diversity and memorisation of one generator cell of the study.

The study runner calls :func:`evaluate_cell` after a generator cell has finished. Files written::

    cells/<method>/fold<f>_seed<s>/fidelity.json      scores of the cell + real-vs-real reference
    cells/<method>/fold<f>_seed<s>/memorization.csv   nearest training image of every synthetic one
    cells/<method>/fold<f>_seed<s>/closest/*.png      the closest synthetic/training pairs

(``results/fidelity.json``, the summary over cells, is written by
:func:`busynth.evaluate.summary.summarize_fidelity`.)

The feature space is the real-only classifier of the same fold and seed
(``cells/real/fold<f>_seed<s>/classifier/``); if that cell has not finished, the cell's
fidelity.json says so (``status: "skipped"``) and a later call computes it.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from busynth.classify.checkpoints import load_classifier
from busynth.config import StudyConfig
from busynth.data.records import Record
from busynth.data.transforms import stack_images
from busynth.evaluate.fidelity import FidelitySettings, compare_by_class, diversity_by_class, extract_features
from busynth.evaluate.memorization import Memorization, closest_pairs, mirror_images, nearest_training, pixel_embedding
from busynth.evaluate.summary import FIDELITY_JSON
from busynth.io import read_json, write_json, write_png, write_text
from busynth.registry import REFERENCE, cell_folder, cell_key

logger = logging.getLogger(__name__)

CLOSEST_DIR = "closest"


def evaluate_cell(run_dir: Path, method: str, fold: int, seed: int, config: StudyConfig, train: list[Record],
                  test: list[Record], synthetic: list[Record],
                  settings: FidelitySettings | None = None) -> dict:
    """Score the synthetic images of one cell against the fold's real training images.

    Writes ``cells/<method>/fold<f>_seed<s>/fidelity.json`` (plus memorization.csv and
    closest/*.png) and returns its content: per class and overall FID, KID (mean, std),
    precision, recall, diversity, memorisation shares, the closest pairs, and the same scores
    for real train vs real test (``real_vs_real``). An existing complete fidelity.json is
    returned as is; a missing real-only classifier gives ``{"status": "skipped", "note": ...}``.
    """
    run_dir = Path(run_dir)
    settings = settings or FidelitySettings(seed=seed)
    key = cell_key(fold, seed)
    cell_dir = cell_folder(run_dir, method, key)
    out_path = cell_dir / FIDELITY_JSON
    if out_path.is_file() and (done := read_json(out_path)).get("status") == "ok":
        return done
    base = {"method": method, "fold": fold, "seed": seed, "classes": list(config.data.classes)}
    real_cell = cell_folder(run_dir, REFERENCE, key)
    reason = _cannot_evaluate(real_cell, synthetic, train)
    if reason:
        logger.warning("fidelity of %s %s skipped: %s", method, key, reason)
        result = {**base, "status": "skipped", "note": reason}
        write_json(out_path, result)
        return result
    classes = list(config.data.classes)
    size = config.classifier.image_size
    model = load_classifier(real_cell / "classifier", config.classifier, len(classes))
    train_x, test_x, fake_x = (stack_images(r, size) for r in (train, test, synthetic))
    train_f, test_f, fake_f = (extract_features(model, x) for x in (train_x, test_x, fake_x))
    train_y, test_y, fake_y = ([r.label for r in rs] for rs in (train, test, synthetic))
    logger.info("fidelity of %s %s: %d synthetic vs %d training images (features: %d-d)",
                method, key, len(synthetic), len(train), train_f.shape[1])

    generator = compare_by_class(train_f, train_y, fake_f, fake_y, classes, settings)
    reference = compare_by_class(train_f, train_y, test_f, test_y, classes, settings)
    _add(generator, "diversity", diversity_by_class(fake_x, fake_y, classes, settings))
    _add(reference, "diversity", diversity_by_class(train_x, train_y, classes, settings))

    pixels = {name: pixel_embedding(x, settings.pixel_size) for name, x in
              (("train", train_x), ("mirror", mirror_images(train_x)), ("fake", fake_x), ("test", test_x))}
    pct = settings.memorization_percentile
    mem = nearest_training(pixels["fake"], pixels["train"], pixels["mirror"], pct)
    mem_feat = nearest_training(fake_f, train_f, percentile=pct)
    test_mem = nearest_training(pixels["test"], pixels["train"], pixels["mirror"], pct)
    test_mem_feat = nearest_training(test_f, train_f, percentile=pct)
    _add(generator, "memorization_share", _shares(mem, fake_y, classes))
    _add(generator, "memorization_share_feature", _shares(mem_feat, fake_y, classes))
    _add(reference, "memorization_share", _shares(test_mem, test_y, classes))
    _add(reference, "memorization_share_feature", _shares(test_mem_feat, test_y, classes))

    write_text(cell_dir / "memorization.csv", _memorization_csv(synthetic, train, mem, mem_feat))
    pairs = _write_closest(cell_dir, fake_x, train_x, synthetic, train, mem, fake_f, train_f, settings.n_closest)
    result = {
        **base, "status": "ok",
        "feature_space": f"penultimate layer ({train_f.shape[1]}-d) of cells/{REFERENCE}/{key}/classifier",
        "image_size": size, "settings": settings.to_dict(),
        "generator": generator,
        "real_vs_real": reference,
        "memorization": {
            "space": f"pixels: {settings.pixel_size}x{settings.pixel_size}, zero mean, unit norm, "
                     "nearest of the training image and its mirror",
            "percentile": pct, "threshold": mem.threshold, "threshold_feature": mem_feat.threshold,
            "nearest_csv": "memorization.csv",
        },
        "closest_pairs": pairs,
        "notes": [("real_vs_real compares the fold's real training images with its real test images; "
                   "its diversity is that of the real training images and its memorisation share is the "
                   "share of real test images under the threshold. FID is biased by set size: the test "
                   "set is smaller than the synthetic set, so compare KID across the two.")],
    }
    write_json(out_path, result)
    return result


def _cannot_evaluate(real_cell: Path, synthetic: Sequence[Record], train: Sequence[Record]) -> str | None:
    if not (real_cell / "metrics.json").is_file() or not (real_cell / "classifier" / "best.safetensors").is_file():
        return (f"the real-only cell {real_cell.parent.name}/{real_cell.name} has not finished, so its "
                "classifier (the feature space) is missing; run method 'real' first")
    if not synthetic:
        return "the generator produced no synthetic images"
    if len(train) < 2:
        return "fewer than 2 real training images"
    return None


def _add(scores: dict, name: str, values: dict) -> None:
    """Put ``values[class]`` / ``values['overall']`` into a compare_by_class result."""
    for c, entry in scores["per_class"].items():
        entry[name] = values.get(c)
    scores["overall"][name] = values.get("overall")


def _shares(mem: Memorization, labels: Sequence[str], classes: Sequence[str]) -> dict:
    labels = np.asarray(labels)
    return {**{c: mem.share(labels == c) for c in classes}, "overall": mem.share()}


def _memorization_csv(synthetic: Sequence[Record], train: Sequence[Record], mem: Memorization,
                      mem_feat: Memorization) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["synthetic_id", "label", "nearest_train_id", "pixel_distance", "mirrored", "flagged",
                     "nearest_train_id_feature", "feature_distance", "flagged_feature"])
    for k, r in enumerate(synthetic):
        writer.writerow([r.id, r.label, train[mem.index[k]].id, f"{mem.distance[k]:.6f}", int(mem.mirrored[k]),
                         int(mem.flagged[k]), train[mem_feat.index[k]].id, f"{mem_feat.distance[k]:.6f}",
                         int(mem_feat.flagged[k])])
    return buf.getvalue()


def _write_closest(cell_dir: Path, fake_x: np.ndarray, train_x: np.ndarray, synthetic: Sequence[Record],
                   train: Sequence[Record], mem: Memorization, fake_f: np.ndarray, train_f: np.ndarray,
                   n: int) -> list[dict]:
    """Write the n closest pairs (pixel space) as PNGs at the working resolution (what was
    compared; the training image mirrored when its mirror matched); return their descriptions."""
    folder = cell_dir / CLOSEST_DIR
    pairs = []
    for rank, (q, t, dist) in enumerate(closest_pairs(mem, n), start=1):
        syn, real = synthetic[q], train[t]
        names = (f"pair{rank:02d}_synthetic.png", f"pair{rank:02d}_train.png")
        write_png(folder / names[0], fake_x[q])
        write_png(folder / names[1], np.ascontiguousarray(train_x[t][:, ::-1] if mem.mirrored[q] else train_x[t]))
        pairs.append({
            "rank": rank, "synthetic_id": syn.id, "synthetic_label": syn.label, "synthetic_path": syn.path,
            "train_id": real.id, "train_label": real.label, "train_path": real.path,
            "pixel_distance": dist, "mirrored": bool(mem.mirrored[q]), "flagged": bool(mem.flagged[q]),
            "feature_distance": float(np.linalg.norm(fake_f[q] - train_f[t])),
            "synthetic_png": f"{CLOSEST_DIR}/{names[0]}", "train_png": f"{CLOSEST_DIR}/{names[1]}",
        })
    return pairs
