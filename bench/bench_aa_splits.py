"""Benchmark: A/A calibration on a finished study's own cells, every split of the reference's seeds.

The study's A/A row compares ``real`` under one half of its seeds with the other half. A run folder
with 2k or more ``real`` seeds per fold holds many such comparisons: every way of choosing two
disjoint sets of k seeds (the same seeds in every fold; seed i of one arm paired with seed i of the
other, as the study pairs them). None has a true difference, so the share of intervals that exclude
0 estimates the false-positive rate of each procedure on real data, and the mean width its noise
floor. The splits share cells, so they are not independent repetitions: a check beside
``bench_calibration.py`` (independent phantom data sets), not a replacement.

    python bench/bench_aa_splits.py RUN_DIR [--per-arm 3] [--procedures components,bootstrap,corrected_t]

Prints a table and writes bench/results/aa_splits.json.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

from busynth.classify.metrics import positive_index
from busynth.evaluate.intervals import compare
from busynth.io import write_json
from busynth.registry import REFERENCE
from busynth.results import PredictionStore, paired_folds, read_cells
from busynth.rundir import run_config

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def seed_splits(seeds: list[int], k: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Every unordered pair of disjoint k-seed sets from ``seeds`` (each pair once)."""
    out = []
    for chosen in itertools.combinations(sorted(seeds), 2 * k):
        for a in itertools.combinations(chosen, k):
            if chosen[0] in a:
                out.append((a, tuple(s for s in chosen if s not in a)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--per-arm", type=int, default=3, help="seeds per arm (k)")
    parser.add_argument("--procedures", default="components,bootstrap,corrected_t")
    parser.add_argument("--metrics", default="", help="comma-separated (default: the run's primary and malignant_auc)")
    parser.add_argument("--bootstrap", type=int, default=2000)
    args = parser.parse_args()
    config = run_config(args.run_dir)
    classes = config.data.classes
    rows = read_cells(args.run_dir, [REFERENCE])
    folds = sorted({r["fold"] for r in rows})
    seeds = sorted(set.intersection(*({r["seed"] for r in rows if r["fold"] == f} for f in folds)))
    splits = seed_splits(seeds, args.per_arm)
    if not splits:
        sys.exit(f"{args.run_dir}: {len(seeds)} {REFERENCE} seed(s) in every fold, fewer than 2 x {args.per_arm}")
    metrics = args.metrics.split(",") if args.metrics else list(dict.fromkeys(
        [config.run.primary_metric, "malignant_auc"]))
    pos = positive_index(classes, "malignant")
    store = PredictionStore(args.run_dir, classes, rows)
    results = []
    for a, b in splits:
        fold_scores = paired_folds(store, (REFERENCE, a), (REFERENCE, b), folds)
        for procedure in args.procedures.split(","):
            for metric in metrics:
                r = compare(metric, fold_scores, procedure, pos, n_boot=args.bootstrap, alpha=config.run.alpha)
                results.append({"a": list(a), "b": list(b), "procedure": procedure, "metric": metric,
                                "diff": r["diff"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                                "excludes_0": bool(r["ci_low"] > 0 or r["ci_high"] < 0)})
    table = []
    print(f"{len(splits)} splits of seeds {seeds} into two arms of {args.per_arm}, folds {folds}")
    print(f"{'procedure':<12} {'metric':<18} {'exclude 0':>10} {'share':>6} {'mean width':>11}")
    for procedure in args.procedures.split(","):
        for metric in metrics:
            sel = [r for r in results if r["procedure"] == procedure and r["metric"] == metric]
            hits = sum(r["excludes_0"] for r in sel)
            width = sum(r["ci_high"] - r["ci_low"] for r in sel) / len(sel)
            table.append({"procedure": procedure, "metric": metric, "splits": len(sel), "exclude_0": hits,
                          "share": hits / len(sel), "mean_width": width})
            print(f"{procedure:<12} {metric:<18} {hits:>4} of {len(sel):<3} {hits / len(sel):>6.0%} {width:>11.3f}")
    out = write_json(RESULTS / "aa_splits.json", {"run_dir": str(args.run_dir), "seeds": seeds, "folds": folds,
                                                  "per_arm": args.per_arm, "table": table, "splits": results})
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
