"""Benchmark: are ControlNet's sampling masks plausible and new? Deformed training masks vs the shape model.

For every fold of a run folder (its data, split and ``generators.controlnet`` settings) and every
lesion class, as many sampling masks as the fold has training masks of the class are drawn the way
``controlnet`` draws them, at its image size, from each source:

* ``training``: the class's training masks, drawn and transformed (flip, rotation, scale, elastic);
* ``shape_model``: new outlines from the shape model fitted to them (``masks.source: shape_model``);

and compared with the fold's *test* masks, which no generator sees: per shape feature (area,
elongation, irregularity; ``busynth.generators.diffusion.shapes.shape_features``), the 1-Wasserstein
distance between the sampled and the test masks' features (``scipy.stats.wasserstein_distance``),
beside the same distance for the training masks themselves (the floor: what the training part
already has). Novelty: the share of sampled masks whose best IoU with any training mask of the
class exceeds 0.8 (a near copy of a training layout). Prints a table, writes bench/results/masks.json.

    python bench/bench_masks.py RUN_DIR [--folds 0,1,2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.stats import wasserstein_distance

from busynth.data.splits import read_split
from busynth.generators.diffusion.controlnet import ControlNetGenerator
from busynth.generators.diffusion.masks import resize_masks, sampling_masks
from busynth.generators.diffusion.shapes import shape_features
from busynth.io import write_json
from busynth.rundir import run_config, run_records

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
FEATURES = ("area", "elongation", "irregularity")
NEAR_COPY_IOU = 0.8


def features(masks: np.ndarray) -> dict[str, np.ndarray]:
    """Each feature of every non-empty mask."""
    rows = [shape_features(m) for m in masks if m.any()]
    return {k: np.array([r[k] for r in rows]) for k in FEATURES}


def near_copies(drawn: np.ndarray, training: np.ndarray) -> float:
    """Share of ``drawn`` masks whose best IoU with a ``training`` mask exceeds NEAR_COPY_IOU."""
    a = drawn.reshape(len(drawn), -1).astype(np.float32)
    b = training.reshape(len(training), -1).astype(np.float32)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return float(((inter / np.maximum(union, 1)).max(axis=1) > NEAR_COPY_IOU).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--folds", default="", help="comma-separated folds (default: all)")
    args = parser.parse_args()
    config = run_config(args.run_dir)
    records = run_records(args.run_dir, config)
    split = read_split(args.run_dir / "data" / "split.csv", records)
    cn = ControlNetGenerator.parse_config(config.generators.get("controlnet", {}), fit_inputs=False)
    size = int(config.generators.get("sd-lora", {}).get("image_size", 128))
    folds = [int(f) for f in args.folds.split(",")] if args.folds else split.folds
    lesion_classes = [c for c in config.data.classes if c not in cn.empty_mask_classes]
    rows = []
    for fold in folds:
        train, test = split.select(records, fold, "train"), split.select(records, fold, "test")
        for stream, label in enumerate(config.data.classes):
            if label not in lesion_classes:
                continue
            pool = resize_masks([r.mask for r in train if r.label == label and r.mask is not None], size)
            pool = pool[pool.any(axis=(1, 2))]
            held_out = resize_masks([r.mask for r in test if r.label == label and r.mask is not None], size)
            reference = features(held_out)
            sources = {"training masks as they are": pool}
            for source in ("training", "shape_model"):
                cfg = cn.masks.model_copy(update={"source": source})
                # n + 1 masks, so that a pool of n is drawn from rather than used in order
                sources[source] = sampling_masks(list(pool), len(pool) + 1, size, cfg, seed=fold, stream=stream)
            for source, masks in sources.items():
                got = features(masks)
                row = {"fold": fold, "class": label, "source": source, "n": len(masks),
                       "near_copies": near_copies(masks, pool)}
                for k in FEATURES:
                    row[f"{k}_mean"] = float(got[k].mean())
                    row[f"{k}_w1_to_test"] = float(wasserstein_distance(got[k], reference[k]))
                rows.append(row)
            rows.append({"fold": fold, "class": label, "source": "test masks (held out)", "n": len(held_out),
                         **{f"{k}_mean": float(reference[k].mean()) for k in FEATURES}})
    header = (f"{'fold':>4} {'class':<10} {'source':<28} {'n':>4} {'near copy':>9} "
              + " ".join(f"{k[:5] + ' mean':>11} {'W1 to test':>10}" for k in FEATURES))
    print(header)
    for r in rows:
        cells = " ".join(f"{r[f'{k}_mean']:>11.3f} {r.get(f'{k}_w1_to_test', float('nan')):>10.3f}" for k in FEATURES)
        print(f"{r['fold']:>4} {r['class']:<10} {r['source']:<28} {r['n']:>4} "
              f"{r.get('near_copies', float('nan')):>9.2f} {cells}")
    out = write_json(RESULTS / "masks.json", {"run_dir": str(args.run_dir), "image_size": size,
                                              "near_copy_iou": NEAR_COPY_IOU, "rows": rows})
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
