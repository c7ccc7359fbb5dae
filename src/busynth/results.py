"""Study results: per-cell table, mean ± sd per method, paired comparisons, A/A row, verdicts.

Everything here is computed from the files of the run folder (``cells/*/*/metrics.json``
and ``predictions.csv``), so it can be recomputed without training anything.

Comparisons (``busynth.evaluate.intervals``): every method against the reference ``real``,
and every generator against ``classical`` when it was run, on every metric, paired by fold
and classifier seed, with an interval that resamples seeds as well as test images (or the
corrected resampled t-test, ``run.interval``). Only the primary metric (``run.primary_metric``)
gets a verdict, Holm-adjusted across the methods of one comparison. The A/A row compares the
reference with itself under other seeds through the same procedure: seeds ``0..k-1`` against
``k..2k-1`` with ``k = seeds // 2`` (with one seed, the study trains one extra reference seed
per fold for it), so it shows how large a difference pure training randomness produces.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from busynth.classify.metrics import (
    METRIC_NAMES,
    SCORE_NAMES,
    format_mean_sd,
    positive_index,
    restrict_proba,
    summarize,
)
from busynth.classify.predictions import read_predictions
from busynth.errors import RunStateError
from busynth.evaluate.intervals import FoldScores, compare, holm, interval_text, verdict
from busynth.io import read_json, write_json, write_text
from busynth.registry import arm_parts, cell_folder, cell_key

log = logging.getLogger(__name__)

METRICS = METRIC_NAMES + SCORE_NAMES
HEADLINE = ("balanced_accuracy", "macro_auc", "malignant_auc")
SEGMENTATION_HEADLINE = SCORE_NAMES
BASELINE = "classical"
CELL_COLUMNS = ("method", "fold", "seed", "generator_seed", "n_train_real", "n_synthetic", "n_val", "n_test",
                "train_steps", "best_epoch", "seconds")


@dataclass
class Protocol:
    """How methods are compared (the ``run`` settings that decide the statistics)."""

    reference: str = "real"
    primary_metric: str = "balanced_accuracy"
    interval: str = "bootstrap"
    alpha: float = 0.05
    n_boot: int = 2000
    seeds: list[int] = field(default_factory=lambda: [0])
    task: str = "classification"
    external_classes: str = "present"  # run.external_classes

    @property
    def scores_file(self) -> tuple[str, Sequence[str] | None]:
        """A cell's per-image results file and its value columns (None: the class probabilities)."""
        return ("scores.csv", SCORE_NAMES) if self.task == "segmentation" else ("predictions.csv", None)

    @property
    def aa_seeds(self) -> tuple[list[int], list[int]]:
        """The seeds of the reference the A/A row compares (see :func:`aa_seed_halves`)."""
        return aa_seed_halves(self.seeds)

    @classmethod
    def from_config(cls, run) -> Protocol:
        """The protocol of a ``RunConfig``."""
        seeds = [run.base_seed + i for i in range(run.seeds)]
        return cls(primary_metric=run.primary_metric, interval=run.interval, alpha=run.alpha,
                   n_boot=run.bootstrap, seeds=seeds, task=run.task, external_classes=run.external_classes)


def aa_seed_halves(seeds: Sequence[int]) -> tuple[list[int], list[int]]:
    """The two disjoint seed sets of the A/A comparison, ``ceil(len(seeds) / 2)`` seeds each: the
    first half of ``seeds`` against the rest, topped up with the seeds after the last one when
    the count is odd (reference cells trained for the A/A row only). [0] -> [0] vs [1];
    [0, 1, 2] -> [0, 1] vs [2, 3]; [0, 1, 2, 3] -> [0, 1] vs [2, 3]."""
    seeds = list(seeds)
    k = -(-len(seeds) // 2)
    both = seeds + [seeds[-1] + 1 + i for i in range(2 * k - len(seeds))]
    return both[:k], both[k : 2 * k]


def read_cells(run_dir: Path, methods: Sequence[str]) -> list[dict]:
    """Metric rows of every finished cell of ``methods``, in method order then fold, seed."""
    return [read_json(path) for method in methods
            for path in sorted(cell_folder(run_dir, method).glob("*/metrics.json"))]


def cells_csv(rows: Sequence[dict], metrics: Sequence[str]) -> str:
    """CSV text of the per-cell table."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*CELL_COLUMNS, *metrics], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def within_fold_sd(rows: Sequence[dict], metric: str) -> float | None:
    """Mean over folds of the sd (ddof=1) of ``metric`` across that fold's seeds: the seed-to-seed
    spread of one method on fixed data (None with one seed per fold)."""
    by_fold: dict[int, list[float]] = {}
    for r in rows:
        if isinstance(r.get(metric), int | float) and math.isfinite(r[metric]):
            by_fold.setdefault(r["fold"], []).append(r[metric])
    sds = [float(np.std(v, ddof=1)) for v in by_fold.values() if len(v) > 1]
    return float(np.mean(sds)) if sds else None


class PredictionStore:
    """Predictions of a run folder's cells, read once: ``get(method, fold, seed)``.

    ``filename`` is the predictions file inside each cell folder: ``predictions.csv`` (the fold's
    test part) or ``external/<name>.csv`` (an external set); ``groups`` maps image ids to their
    resampling unit (duplicate group) where images are not drawn one by one; with ``among`` (class
    indices) the probabilities are renormalised over those classes (:func:`restrict_proba`)."""

    def __init__(self, run_dir: Path, classes: Sequence[str], rows: Sequence[dict],
                 filename: str = "predictions.csv", groups: dict[str, int] | None = None,
                 columns: Sequence[str] | None = None, among: Sequence[int] | None = None) -> None:
        self.run_dir, self.classes, self.filename, self.groups = Path(run_dir), list(classes), filename, groups
        self.among = None if among is None else list(among)
        self.columns = list(columns or classes)  # the value columns: class probabilities or per-image scores
        self.n_train = {(r["method"], r["fold"]): r["n_train_real"] for r in rows}
        self._cache: dict[tuple[str, int, int], tuple[list[str], np.ndarray, np.ndarray]] = {}

    def _cell(self, method: str, fold: int, seed: int) -> Path:
        return cell_folder(self.run_dir, method, cell_key(fold, seed))

    def has(self, method: str, fold: int, seed: int) -> bool:
        """True when the cell finished (its metrics.json exists) and has this predictions file."""
        cell = self._cell(method, fold, seed)
        return (cell / "metrics.json").is_file() and (cell / self.filename).is_file()

    def get(self, method: str, fold: int, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
        """ids, y_true and probabilities of one cell's predictions file."""
        key = (method, fold, seed)
        if key not in self._cache:
            ids, y, values = read_predictions(self._cell(method, fold, seed) / self.filename, self.columns)
            self._cache[key] = (ids, y, values if self.among is None else restrict_proba(values, self.among))
        return self._cache[key]


def paired_folds(store: PredictionStore, a: tuple[str, Sequence[int]], b: tuple[str, Sequence[int]],
                 folds: Sequence[int]) -> list[FoldScores]:
    """Per fold, the predictions of (method, seeds) ``a`` and ``b``, seed i of ``a`` paired with
    seed i of ``b``; only pairs where both cells finished. Raises RunStateError when the two were
    scored on different test images."""
    out = []
    for fold in folds:
        pairs = [(sa, sb) for sa, sb in zip(a[1], b[1], strict=False)
                 if store.has(a[0], fold, sa) and store.has(b[0], fold, sb)]
        if not pairs:
            continue
        ids, y, _ = store.get(a[0], fold, pairs[0][0])
        pa, pb = [], []
        for sa, sb in pairs:
            for method, seed, dest in ((a[0], sa, pa), (b[0], sb, pb)):
                cid, cy, p = store.get(method, fold, seed)
                if cid != ids or not np.array_equal(cy, y):
                    raise RunStateError(f"{store.run_dir}: cells {a[0]} and {method} of fold {fold} were not "
                                        "scored on the same test images; the run folder is inconsistent")
                dest.append(p)
        groups = None if store.groups is None else [store.groups[i] for i in ids]
        out.append(FoldScores(ids, y, np.stack(pa), np.stack(pb), store.n_train.get((a[0], fold), 0), groups))
    return out


def compare_methods(store: PredictionStore, a: tuple[str, Sequence[int]], b: tuple[str, Sequence[int]],
                    folds: Sequence[int], metrics: Sequence[str], protocol: Protocol) -> dict:
    """Per metric, the paired interval of ``a`` - ``b`` (empty when they share no cell)."""
    fold_scores = paired_folds(store, a, b, folds)
    if not fold_scores:
        return {}
    pos = positive_index(store.classes, "malignant")
    out = {}
    for m in metrics:
        if m.startswith("malignant_") and pos is None:
            continue
        out[m] = compare(m, fold_scores, protocol.interval, pos, n_boot=protocol.n_boot, alpha=protocol.alpha)
    return out


def add_verdicts(comparisons: dict[str, dict], protocol: Protocol) -> None:
    """Holm-adjust the primary metric's p-values across the methods of one comparison and add
    ``p_holm`` and ``verdict`` to each method's entry."""
    names = [m for m, c in comparisons.items() if protocol.primary_metric in c]
    adjusted = holm([comparisons[m][protocol.primary_metric]["p"] for m in names])
    for name, p_adj in zip(names, adjusted, strict=True):
        primary = comparisons[name][protocol.primary_metric]
        comparisons[name]["p_holm"] = p_adj
        comparisons[name]["verdict"] = verdict(primary["diff"], p_adj, protocol.alpha, primary.get("seeds_per_fold"))


def summarize_run(run_dir: Path, methods: Sequence[str], classes: Sequence[str],
                  protocol: Protocol | None = None) -> dict:
    """Write results/cells.csv and results/summary.json; returns the summary dict."""
    protocol = protocol or Protocol()
    run_dir = Path(run_dir)
    every_row = read_cells(run_dir, methods)  # also the A/A row's extra reference seed
    filename, columns = protocol.scores_file
    summary = build_summary(PredictionStore(run_dir, classes, every_row, filename, columns=columns), every_row, methods,
                            protocol)
    write_text(run_dir / "results" / "cells.csv", cells_csv(every_row, summary["metrics"]))
    write_json(run_dir / "results" / "summary.json", summary)
    return summary


def build_summary(store: PredictionStore, every_row: Sequence[dict], methods: Sequence[str],
                  protocol: Protocol) -> dict:
    """Mean ± sd per method, paired comparisons with verdicts and the A/A row, from the metric rows
    of the cells (``every_row``) and their predictions in ``store``; metrics undefined in every
    cell (e.g. an AUC of a class the test images lack) are left out."""
    ref, classes = protocol.reference, store.classes
    rows = [r for r in every_row if r["seed"] in protocol.seeds]
    metrics = [m for m in METRICS if any(isinstance(r.get(m), int | float) and math.isfinite(r[m]) for r in rows)]
    folds = sorted({r["fold"] for r in rows})
    summary: dict = {
        "classes": list(classes), "metrics": metrics, "reference": ref, "baseline": BASELINE,
        "task": protocol.task,
        "protocol": {"primary_metric": protocol.primary_metric, "interval": protocol.interval,
                     "alpha": protocol.alpha, "bootstrap": protocol.n_boot, "seeds": protocol.seeds,
                     "external_classes": protocol.external_classes,
                     "folds": folds, "aa_seeds": [list(s) for s in protocol.aa_seeds]},
        "methods": {}, "paired": {}, "vs_baseline": {}, "aa": {}, "cells": len(rows),
    }
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        if mine:
            summary["methods"][method] = {
                m: {**summarize([r[m] for r in mine]), "within_fold_sd": within_fold_sd(mine, m)} for m in metrics
            }
            summary["methods"][method]["train_steps"] = sorted({r.get("train_steps") for r in mine} - {None})
    seeds = protocol.seeds
    if ref in summary["methods"]:
        for method in summary["methods"]:
            if method != ref:
                summary["paired"][method] = compare_methods(store, (method, seeds), (ref, seeds), folds, metrics,
                                                            protocol)
        add_verdicts(summary["paired"], protocol)
        summary["aa"] = compare_methods(store, (ref, protocol.aa_seeds[0]), (ref, protocol.aa_seeds[1]),
                                        folds, metrics, protocol)
        if not summary["aa"]:
            summary["aa"] = {"note": f"no finished {ref} cells with seeds {protocol.aa_seeds[1]}"}
    summary["dose_response"] = dose_response(summary["paired"], protocol.primary_metric)
    if BASELINE in summary["methods"]:
        for method in summary["methods"]:
            if method not in (ref, BASELINE):
                summary["vs_baseline"][method] = compare_methods(store, (method, seeds), (BASELINE, seeds), folds,
                                                                 metrics, protocol)
        add_verdicts(summary["vs_baseline"], protocol)
    return summary


def dose_response(paired: dict[str, dict], primary: str) -> dict[str, list[dict]]:
    """Per generator method with dose-response arms (``synthesis.ratios``), its arms' paired
    differences to the reference on the primary metric, by ratio: ratio, diff, interval, Holm p, verdict."""
    out: dict[str, list[dict]] = {}
    for arm, diffs in paired.items():
        method, ratio = arm_parts(arm)
        if ratio is not None and primary in diffs:
            d = diffs[primary]
            out.setdefault(method, []).append({"ratio": ratio, "diff": d["diff"], "ci_low": d["ci_low"],
                                               "ci_high": d["ci_high"], "p_holm": diffs.get("p_holm"),
                                               "verdict": diffs.get("verdict")})
    return {m: sorted(rows, key=lambda r: r["ratio"]) for m, rows in out.items()}


def _interval(d: dict | None) -> str:
    if not d:
        return "-"
    return f"{d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"


def procedures_used(summary: dict) -> set[str]:
    """The interval procedures the summary's comparisons were made with (see ``compare``)."""
    blocks = [summary.get("aa", {}), *summary.get("paired", {}).values(), *summary.get("vs_baseline", {}).values()]
    return {d["procedure"] for block in blocks if isinstance(block, dict)
            for d in block.values() if isinstance(d, dict) and "procedure" in d}


def summary_interval_text(summary: dict) -> str:
    """How the summary's intervals were made, in words (run.interval, and its fallback if used)."""
    interval = summary.get("protocol", {}).get("interval", "bootstrap")
    return interval_text(interval, procedures_used(summary))


def format_summary(summary: dict, metrics: Sequence[str] | None = None) -> str:
    """A plain-text table: mean ± sd per method and metric (default: the task's headline metrics), the
    A/A row, then the paired differences with intervals and the verdicts on the primary metric."""
    if metrics is None:
        metrics = SEGMENTATION_HEADLINE if summary.get("task") == "segmentation" else HEADLINE
    proto = summary.get("protocol", {})
    primary = proto.get("primary_metric", "balanced_accuracy")
    metrics = [primary, *[m for m in metrics if m != primary]]
    metrics = [m for m in metrics if m in summary["metrics"]]
    width = 26
    ref, base = summary["reference"], summary.get("baseline", BASELINE)
    # the label column fits the longest row label ("<method> vs <baseline>")
    label = 2 + max([14, *(len(f"{m} vs {max(ref, base, key=len)}") for m in summary["methods"])])
    lines = ["method".ljust(label) + "".join(m.ljust(width) for m in metrics)]
    for method, stats in summary["methods"].items():
        cells = "".join(format_mean_sd(stats[m]["mean"], stats[m]["sd"]).ljust(width) for m in metrics)
        lines.append(method.ljust(label) + cells + f"(cells={stats[metrics[0]]['n']})")
    how = summary_interval_text(summary)
    level = round(100 * (1 - proto.get("alpha", 0.05)))
    if summary.get("aa") or summary["paired"]:
        lines += ["", f"paired difference, {level}% interval ({how}):"]
    aa = summary.get("aa", {})
    if aa and "note" not in aa:
        a, b = proto.get("aa_seeds", [[], []])
        lines.append(f"A/A {ref}".ljust(label) + "".join(_interval(aa.get(m)).ljust(width) for m in metrics)
                     + f"(seeds {a} vs {b}: the noise floor)")
    elif aa:
        lines.append(f"A/A {ref}".ljust(label) + aa["note"])
    for title, block in ((f"vs {ref}", summary["paired"]), (f"vs {base}", summary.get("vs_baseline", {}))):
        for method, diffs in block.items():
            if not diffs:
                continue
            cells = "".join(_interval(diffs.get(m)).ljust(width) for m in metrics)
            lines.append(f"{method} {title}".ljust(label) + cells
                         + f"{diffs.get('verdict', '')} (Holm p={diffs.get('p_holm', float('nan')):.3f})")
    if summary["paired"]:
        lines.append(f"verdicts on {primary} only (Holm-adjusted, alpha={proto.get('alpha', 0.05)}); "
                     "other metrics are descriptive")
    for method, rows in summary.get("dose_response", {}).items():
        lines.append(f"dose-response of {method} ({primary} vs {ref}, by synthesis ratio): "
                     + "; ".join(f"{r['ratio']:g}: {_interval(r)} {r['verdict'] or ''}".rstrip() for r in rows))
    return "\n".join(lines)
