"""Benchmark: calibration and power of the paired intervals, on the built-in phantom.

Each repetition draws a fresh phantom data set (its own seed) and grouped folds, then trains
the real-only classifier under 2S seeds per fold and a positive control under S seeds:
"more real", which adds genuinely new images from the same simulator (as many per class as
the fold's real training part has), under the same equal training budget. Three procedures
compare method - reference on the primary metric:

* ``test-only``: the earlier interval (bootstrap of test images within each cell; seeds of
  one fold resampled as if independent): ``busynth.classify.metrics.paired_difference``;
* ``bootstrap``: the two-level bootstrap (seeds within folds + test images shared);
* ``corrected_t``: the corrected resampled t-test of Nadeau & Bengio (2003).

A/A: the reference under seeds 0..S-1 against seeds S..2S-1 (no true difference): the share
of intervals excluding 0 should be near alpha. Power: the share of repetitions where "more
real" comes out "helps" (interval above 0). Prints a table, writes
bench/results/calibration.json.

    OMP_NUM_THREADS=1 python bench/bench_calibration.py --reps 20 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_diffusion import device_info, load_avg  # bench/ is on sys.path when run as a script

from busynth.classify.metrics import paired_difference, positive_index
from busynth.classify.train import fit_classifier, predict_proba
from busynth.config import ClassifierConfig, PhantomConfig, SplitConfig, AuditConfig
from busynth.data.audit import audit_records
from busynth.data.phantom import make_phantom
from busynth.data.splits import make_split
from busynth.data.transforms import label_indices, stack_images
from busynth.evaluate.intervals import FoldScores, compare

RESULTS = Path(__file__).parent / "results"
CLASSES = ["normal", "benign", "malignant"]
PROCEDURES = ("test-only", "bootstrap", "corrected_t")


def classifier_config(args: argparse.Namespace) -> ClassifierConfig:
    """The classifier of the benchmark: the library's defaults at a small size."""
    return ClassifierConfig(image_size=args.size, width=args.width, epochs=args.epochs, batch_size=16,
                            lr=3e-3, select=args.select, ema_epochs=args.ema_epochs, select_metric="loss",
                            patience=args.epochs, warmup_epochs=1.0)


def one_repetition(rep: int, args: argparse.Namespace, work: Path) -> dict:
    """Train every cell of one repetition (or read them back from ``work/r<rep>.npz``); returns
    per fold the test ids, labels and probabilities."""
    cache = work / f"r{rep}.npz"
    if cache.is_file():
        z = np.load(cache)
        return {"folds": [{"ids": z[f"ids{k}"].tolist(), "y": z[f"y{k}"], "real": z[f"real{k}"], "more": z[f"more{k}"],
                           "n_train": int(z[f"n_train{k}"])} for k in range(int(z["n_folds"]))]}
    counts = {"normal": args.n // 4, "benign": args.n // 2, "malignant": args.n // 3}
    phantom = PhantomConfig(n_per_class=counts, size=args.phantom_size, seed=1000 + rep, near_duplicate_rate=0.05)
    records = make_phantom(phantom, CLASSES)
    extra_pool = make_phantom(PhantomConfig(n_per_class=counts, size=args.phantom_size, seed=50_000 + rep,
                                            near_duplicate_rate=0.0), CLASSES)
    split = make_split(records, audit_records(records, AuditConfig()), SplitConfig(folds=args.folds, seed=rep))
    cfg = classifier_config(args)
    seeds = list(range(2 * args.seeds))
    folds = []
    for fold in split.folds:
        train, val, test = (split.select(records, fold, p) for p in ("train", "val", "test"))
        per_class = {c: sum(r.label == c for r in train) for c in CLASSES}
        extra = [r for c in CLASSES for r in [x for x in extra_pool if x.label == c][: per_class[c]]]
        x_val, y_val = stack_images(val, cfg.image_size), label_indices(val, CLASSES)
        x_test = stack_images(test, cfg.image_size)

        def fit(rows, seed, name):
            res = fit_classifier(stack_images(rows, cfg.image_size), label_indices(rows, CLASSES), x_val, y_val, cfg,
                                 len(CLASSES), work / f"r{rep}" / f"f{fold}" / f"{name}{seed}", seed=seed, cpu=True,
                                 n_real=len(train))
            return predict_proba(res.model, x_test, tta=cfg.tta)

        real = np.stack([fit(train, s, "real") for s in seeds])
        more = np.stack([fit(train + extra, s, "more") for s in seeds[: args.seeds]])
        folds.append({"ids": [r.id for r in test], "y": label_indices(test, CLASSES), "real": real, "more": more,
                      "n_train": len(train)})
    arrays = {f"{key}{k}": np.asarray(f[key]) for k, f in enumerate(folds) for key in ("ids", "y", "real", "more",
                                                                                       "n_train")}
    np.savez(cache, n_folds=len(folds), **arrays)
    return {"folds": folds}


def intervals(folds: list[dict], a: str, a_seeds: slice, b: str, b_seeds: slice, metric: str,
              n_boot: int, seed: int) -> dict[str, dict]:
    """The three procedures' intervals for (a, a_seeds) - (b, b_seeds) on ``metric``."""
    pos = positive_index(CLASSES, "malignant")
    scores = [FoldScores(f["ids"], f["y"], f[a][a_seeds], f[b][b_seeds], f["n_train"]) for f in folds]
    out = {p: compare(metric, scores, p, pos, n_boot=n_boot, seed=seed) for p in ("bootstrap", "corrected_t")}
    y = np.concatenate([np.tile(f.y, len(f.a)) for f in scores])
    pa = np.concatenate([f.a.reshape(-1, f.a.shape[-1]) for f in scores])
    pb = np.concatenate([f.b.reshape(-1, f.b.shape[-1]) for f in scores])
    groups = np.concatenate([np.repeat(np.arange(len(f.a)) + 100 * k, f.y.size) for k, f in enumerate(scores)])
    old = paired_difference(y, pa, pb, metric, CLASSES, groups=groups, n_boot=n_boot, seed=seed)
    out["test-only"] = {**old, "p": old["p_boot"]}
    return out


def rate(hits: int, n: int) -> dict[str, float]:
    """Share with its exact (Clopper-Pearson) 95% interval."""
    ci = stats.binomtest(hits, n).proportion_ci(0.95) if n else None
    return {"share": hits / n if n else float("nan"), "ci_low": ci.low if ci else float("nan"),
            "ci_high": ci.high if ci else float("nan"), "hits": hits, "n": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3, help="classifier seeds per arm and fold")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--n", type=int, default=180, help="phantom images (normal n/4, benign n/2, malignant n/3)")
    parser.add_argument("--phantom-size", type=int, default=48)
    parser.add_argument("--size", type=int, default=32, help="classifier image size")
    parser.add_argument("--width", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--select", default="last")
    parser.add_argument("--ema-epochs", type=float, default=3.0)
    parser.add_argument("--metric", default="balanced_accuracy")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/busynth-calibration"))
    parser.add_argument("--out", type=Path, default=RESULTS / "calibration.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    started, load_before = time.perf_counter(), load_avg()
    s = args.seeds
    per_rep = []
    for rep in range(args.reps):
        t0 = time.perf_counter()
        data = one_repetition(rep, args, args.work)
        aa = intervals(data["folds"], "real", slice(0, s), "real", slice(s, 2 * s), args.metric, args.bootstrap, rep)
        pc = intervals(data["folds"], "more", slice(0, s), "real", slice(0, s), args.metric, args.bootstrap, rep)
        acc = float(np.mean([np.mean([(p.argmax(1) == f["y"]).mean() for p in f["real"]]) for f in data["folds"]]))
        per_rep.append({"rep": rep, "aa": aa, "positive": pc, "real_accuracy": acc})
        print(f"rep {rep + 1}/{args.reps} ({time.perf_counter() - t0:.0f} s, real accuracy {acc:.3f}): " + "  ".join(
            f"{p}: A/A {aa[p]['diff']:+.3f} [{aa[p]['ci_low']:+.3f}, {aa[p]['ci_high']:+.3f}] "
            f"more-real [{pc[p]['ci_low']:+.3f}, {pc[p]['ci_high']:+.3f}]" for p in PROCEDURES), flush=True)
    table = {}
    for p in PROCEDURES:
        false_pos = sum(r["aa"][p]["ci_low"] > 0 or r["aa"][p]["ci_high"] < 0 for r in per_rep)
        power = sum(r["positive"][p]["ci_low"] > 0 for r in per_rep)
        width = float(np.mean([r["aa"][p]["ci_high"] - r["aa"][p]["ci_low"] for r in per_rep]))
        table[p] = {"aa_exclude_zero": rate(false_pos, len(per_rep)), "power": rate(power, len(per_rep)),
                    "mean_aa_width": width,
                    "mean_positive_effect": float(np.mean([r["positive"][p]["diff"] for r in per_rep]))}
    print(f"\n{args.reps} repetitions, {args.folds} folds x {s} seeds per arm, {args.metric}, nominal 5%")
    print(f"{'procedure':<14}{'A/A excl. 0':<26}{'power (more real)':<26}{'mean A/A width':<16}")
    for p, t in table.items():
        a, w = t["aa_exclude_zero"], t["power"]
        print(f"{p:<14}{a['share']:>5.0%} [{a['ci_low']:.0%}, {a['ci_high']:.0%}]".ljust(40)
              + f"{w['share']:>5.0%} [{w['ci_low']:.0%}, {w['ci_high']:.0%}]".ljust(26) + f"{t['mean_aa_width']:.3f}")
    minutes = (time.perf_counter() - started) / 60
    print(f"wall time {minutes:.1f} min")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "args": {k: str(v) for k, v in vars(args).items()}, "device": device_info(), "load_before": load_before,
        "load_after": load_avg(), "wall_minutes": round(minutes, 2), "table": table, "repetitions": per_rep,
    }, indent=1, default=float))


if __name__ == "__main__":
    main()
