"""Benchmark: calibration and power of the paired intervals, on the built-in phantom.

Each repetition draws a fresh phantom data set (its own seed; size, classes and the classifier
from a preset, by default ``demo``) and grouped folds, then trains the real-only classifier under
2S seeds per fold and positive controls under S seeds: "more real x k", which adds k times as many
genuinely new images from the same simulator as the fold's real training part has (per class),
under the same equal training budget. Three procedures compare method - reference on the
primary metric:

* ``test-only``: the earlier interval (bootstrap of test images within each cell; seeds of
  one fold resampled as if independent): ``busynth.classify.metrics.paired_difference``;
* ``bootstrap``: the two-level bootstrap (seeds within folds + test images shared);
* ``components``: the variance split into test-image and seed parts (interaction counted once);
* ``corrected_t``: the corrected resampled t-test of Nadeau & Bengio (2003).

A/A: the reference under seeds 0..S-1 against seeds S..2S-1 (no true difference): the share
of intervals excluding 0 should be near alpha. Power: the share of repetitions where "more
real x k" comes out "helps" (interval above 0). Prints a table, writes
bench/results/calibration.json. Trained predictions are cached under ``--work`` in a folder
named by a hash of the arguments that change them, so a rerun with other settings never
reuses stale ones.

    OMP_NUM_THREADS=1 python bench/bench_calibration.py --reps 20 --seeds 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_diffusion import (  # bench/ is on sys.path when run as a script
    device_info,
    load_avg,
)

from busynth.classify.metrics import paired_difference, positive_index
from busynth.classify.train import fit_classifier, predict_proba
from busynth.config import AuditConfig, ClassifierConfig, PhantomConfig
from busynth.data.audit import audit_records
from busynth.data.phantom import make_phantom
from busynth.data.splits import make_split
from busynth.data.transforms import label_indices, stack_images
from busynth.evaluate.intervals import FoldScores, compare
from busynth.presets import load_config

RESULTS = Path(__file__).parent / "results"
CLASSES = ["normal", "benign", "malignant"]
PROCEDURES = ("test-only", "bootstrap", "components", "corrected_t")


def classifier_config(args: argparse.Namespace) -> ClassifierConfig:
    """The preset's classifier (its fixed budget, EMA and size), with --epochs if given."""
    cfg = load_config(args.preset).classifier
    return cfg.model_copy(update={"epochs": args.epochs or cfg.epochs})


def phantom_config(args: argparse.Namespace, seed: int, factor: int = 1, twins: float | None = None) -> PhantomConfig:
    """The preset's phantom under another seed, its counts scaled by ``--scale`` and ``factor``."""
    base = load_config(args.preset).phantom
    counts = {c: max(2, round(n * args.scale)) * factor for c, n in base.n_per_class.items()}
    return base.model_copy(update={"seed": seed, "n_per_class": counts,
                                   **({} if twins is None else {"near_duplicate_rate": twins})})


def control_name(k: int) -> str:
    """The positive control adding k times the training part: ``more1``, ``more2``, ..."""
    return f"more{k}"


def one_repetition(rep: int, args: argparse.Namespace, work: Path) -> dict:
    """Train every cell of one repetition (or read them back from ``work/r<rep>.npz``); returns
    per fold the test ids, labels and probabilities of ``real`` and of each ``more<k>``."""
    cache = work / f"r{rep}.npz"
    keys = ["ids", "y", "real", *map(control_name, args.extra), "n_train"]
    if cache.is_file():
        z = np.load(cache)
        return {"cached": True, "folds": [{key: z[f"{key}{k}"] for key in keys} | {"ids": z[f"ids{k}"].tolist()}
                                          for k in range(int(z["n_folds"]))]}
    records = make_phantom(phantom_config(args, 1000 + rep), CLASSES)
    extra_pool = make_phantom(phantom_config(args, 50_000 + rep, max(args.extra), twins=0.0), CLASSES)
    split = make_split(records, audit_records(records, AuditConfig()),
                       load_config(args.preset).split.model_copy(update={"seed": rep}))
    cfg = classifier_config(args)
    seeds = list(range(2 * args.seeds))
    folds = []
    for fold in split.folds:
        train, val, test = (split.select(records, fold, p) for p in ("train", "val", "test"))
        per_class = {c: sum(r.label == c for r in train) for c in CLASSES}
        pool = {c: [x for x in extra_pool if x.label == c] for c in CLASSES}
        x_val, y_val = stack_images(val, cfg.image_size), label_indices(val, CLASSES)
        x_test = stack_images(test, cfg.image_size)

        def fit(rows, seed, name, x_val=x_val, y_val=y_val, fold=fold, train=train, x_test=x_test):
            res = fit_classifier(stack_images(rows, cfg.image_size), label_indices(rows, CLASSES), x_val, y_val, cfg,
                                 len(CLASSES), work / f"r{rep}" / f"f{fold}" / f"{name}{seed}", seed=seed, cpu=True,
                                 n_real=len(train))
            return predict_proba(res.model, x_test, tta=cfg.tta)

        entry = {"ids": [r.id for r in test], "y": label_indices(test, CLASSES), "n_train": len(train),
                 "real": np.stack([fit(train, s, "real") for s in seeds])}
        for k in args.extra:
            extra = [r for c in CLASSES for r in pool[c][: k * per_class[c]]]
            entry[control_name(k)] = np.stack([fit(train + extra, s, control_name(k)) for s in seeds[: args.seeds]])
        folds.append(entry)
    arrays = {f"{key}{k}": np.asarray(f[key]) for k, f in enumerate(folds) for key in keys}
    np.savez(cache, n_folds=len(folds), **arrays)
    return {"cached": False, "folds": folds}


def intervals(folds: list[dict], a: str, a_seeds: slice, b: str, b_seeds: slice, metric: str,
              n_boot: int, seed: int) -> dict[str, dict]:
    """The three procedures' intervals for (a, a_seeds) - (b, b_seeds) on ``metric``."""
    pos = positive_index(CLASSES, "malignant")
    scores = [FoldScores(f["ids"], f["y"], f[a][a_seeds], f[b][b_seeds], f["n_train"]) for f in folds]
    out = {p: compare(metric, scores, p, pos, n_boot=n_boot, seed=seed) for p in PROCEDURES if p != "test-only"}
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


def cache_folder(args: argparse.Namespace) -> Path:
    """``--work/<hash>``: one folder per setting that changes the trained predictions."""
    config = load_config(args.preset)
    fields = {"preset": args.preset, "epochs": args.epochs, "seeds": args.seeds, "extra": args.extra,
              **({"scale": args.scale} if args.scale != 1.0 else {}),
              "config": {k: getattr(config, k).model_dump(mode="json") for k in ("phantom", "split", "classifier")}}
    return args.work / hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def summarize(per_rep: list[dict], extra: list[int]) -> dict[str, dict]:
    """Per procedure: A/A false-positive share, power per positive control, mean widths and effects."""
    table = {}
    for p in PROCEDURES:
        false_pos = sum(r["aa"][p]["ci_low"] > 0 or r["aa"][p]["ci_high"] < 0 for r in per_rep)
        table[p] = {"aa_exclude_zero": rate(false_pos, len(per_rep)),
                    "mean_aa_width": float(np.mean([r["aa"][p]["ci_high"] - r["aa"][p]["ci_low"] for r in per_rep]))}
        for k in extra:
            name = control_name(k)
            table[p][f"power_{name}"] = rate(sum(r[name][p]["ci_low"] > 0 for r in per_rep), len(per_rep))
            table[p][f"mean_effect_{name}"] = float(np.mean([r[name][p]["diff"] for r in per_rep]))
    return table


def print_table(table: dict[str, dict], extra: list[int]) -> None:
    """The summary table: one row per procedure."""
    share = lambda r: f"{r['share']:>4.0%} [{r['ci_low']:.0%}, {r['ci_high']:.0%}]"
    head = f"{'procedure':<13}{'A/A excl. 0':<18}" + "".join(f"{'power ' + control_name(k):<18}" for k in extra)
    print(head + "mean A/A width  mean effect " + " / ".join(map(control_name, extra)))
    for p, t in table.items():
        print(f"{p:<13}{share(t['aa_exclude_zero']):<18}"
              + "".join(f"{share(t['power_' + control_name(k)]):<18}" for k in extra)
              + f"{t['mean_aa_width']:<15.3f}"
              + " / ".join(f"{t['mean_effect_' + control_name(k)]:+.3f}" for k in extra))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3, help="classifier seeds per arm and fold")
    parser.add_argument("--preset", default="demo", help="phantom, folds and classifier of this preset")
    parser.add_argument("--epochs", type=int, default=0, help="classifier epochs (0: the preset's)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="phantom images per class as a share of the preset's (smaller: a steeper learning curve)")
    parser.add_argument("--extra", default="1,2",
                        help="positive controls: new images as multiples of the training part")
    parser.add_argument("--metric", default="balanced_accuracy")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/busynth-calibration"))
    parser.add_argument("--out", type=Path, default=RESULTS / "calibration.json")
    args = parser.parse_args()
    args.extra = sorted({int(k) for k in args.extra.split(",")})
    logging.basicConfig(level=logging.WARNING)
    work = cache_folder(args)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    started, load_before = time.perf_counter(), load_avg()
    s = args.seeds
    per_rep = []
    for rep in range(args.reps):
        t0 = time.perf_counter()
        data = one_repetition(rep, args, work)
        aa = intervals(data["folds"], "real", slice(0, s), "real", slice(s, 2 * s), args.metric, args.bootstrap, rep)
        row = {"rep": rep, "cached": data["cached"], "aa": aa}
        for k in args.extra:
            row[control_name(k)] = intervals(data["folds"], control_name(k), slice(0, s), "real", slice(0, s),
                                             args.metric, args.bootstrap, rep)
        row["real_accuracy"] = float(np.mean([np.mean([(p.argmax(1) == f["y"]).mean() for p in f["real"]])
                                              for f in data["folds"]]))
        per_rep.append(row)
        show = lambda d: f"{d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
        print(f"rep {rep + 1}/{args.reps} ({time.perf_counter() - t0:.0f} s, real accuracy {row['real_accuracy']:.3f}) "
              + "  ".join(f"{p}: A/A {show(row['aa'][p])} " + " ".join(
                  f"{control_name(k)} {show(row[control_name(k)][p])}" for k in args.extra) for p in PROCEDURES),
              flush=True)
    table = summarize(per_rep, args.extra)
    print(f"\n{args.reps} repetitions, preset {args.preset} (phantom x{args.scale:g}), {s} seeds per arm and fold, "
          f"{args.metric}, nominal 5%")
    print_table(table, args.extra)
    minutes = (time.perf_counter() - started) / 60
    cached = sum(r["cached"] for r in per_rep)
    print(f"wall time {minutes:.1f} min" + (f" ({cached} repetitions read from {work})" if cached else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "args": {k: str(v) for k, v in vars(args).items()}, "device": device_info(), "load_before": load_before,
        "load_after": load_avg(), "wall_minutes": round(minutes, 2), "table": table, "repetitions": per_rep,
    }, indent=1, default=float))


if __name__ == "__main__":
    main()
