"""Study results: per-cell table, mean ± sd per method, paired differences to ``real``.

Everything here is computed from the files of the run folder (``cells/*/*/metrics.json``
and ``predictions.csv``), so it can be recomputed without training anything.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from busynth.classify.metrics import METRIC_NAMES, format_mean_sd, paired_difference, summarize
from busynth.io import read_json, write_json, write_text

log = logging.getLogger(__name__)

METRICS = METRIC_NAMES
HEADLINE = ("balanced_accuracy", "macro_auc", "malignant_auc")
CELL_COLUMNS = ("method", "fold", "seed", "n_train_real", "n_synthetic", "n_val", "n_test", "best_epoch", "seconds")


def read_cells(run_dir: Path, methods: Sequence[str]) -> list[dict]:
    """Metric rows of every finished cell of ``methods``, in method order then fold, seed."""
    rows = []
    for method in methods:
        for path in sorted((run_dir / "cells" / method).glob("*/metrics.json")):
            rows.append(read_json(path))
    return rows


def cells_csv(rows: Sequence[dict], metrics: Sequence[str]) -> str:
    """CSV text of the per-cell table."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*CELL_COLUMNS, *metrics], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _pooled_predictions(run_dir: Path, method: str, keys: Sequence[str], classes: Sequence[str]):
    from busynth.experiment import read_predictions  # local: experiment imports this module's users

    ids, ys, ps, groups = [], [], [], []
    for g, key in enumerate(keys):
        cid, y, p = read_predictions(run_dir / "cells" / method / key / "predictions.csv", classes)
        ids.extend(cid)
        ys.append(y)
        ps.append(p)
        groups.append(np.full(len(y), g))
    return ids, np.concatenate(ys), np.concatenate(ps), np.concatenate(groups)


def paired_vs_reference(run_dir: Path, method: str, reference: str, classes: Sequence[str],
                        metrics: Sequence[str], n_boot: int, seed: int = 0) -> dict:
    """method − reference per metric on the same test images, pooled over the cells both have,
    with a paired stratified bootstrap CI (resampling test images within each cell)."""
    keys_a = {p.parent.name for p in (run_dir / "cells" / method).glob("*/metrics.json")}
    keys_b = {p.parent.name for p in (run_dir / "cells" / reference).glob("*/metrics.json")}
    keys = sorted(keys_a & keys_b)
    if not keys:
        return {}
    ids_a, y, pa, groups = _pooled_predictions(run_dir, method, keys, classes)
    ids_b, y_b, pb, _ = _pooled_predictions(run_dir, reference, keys, classes)
    if ids_a != ids_b or not np.array_equal(y, y_b):
        raise AssertionError(f"{method} and {reference} were not scored on the same test images")
    return {
        m: paired_difference(y, pa, pb, m, classes, groups=groups, n_boot=n_boot, seed=seed)
        for m in metrics
    }


def summarize_run(run_dir: Path, methods: Sequence[str], classes: Sequence[str],
                  n_boot: int = 2000, reference: str = "real") -> dict:
    """Write results/cells.csv and results/summary.json; returns the summary dict."""
    rows = read_cells(run_dir, methods)
    metrics = [m for m in METRICS if any(m in r for r in rows)]
    summary: dict = {"classes": list(classes), "metrics": metrics, "reference": reference,
                     "methods": {}, "paired": {}, "cells": len(rows)}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        if mine:
            summary["methods"][method] = {m: summarize([r[m] for r in mine]) for m in metrics}
    if reference in summary["methods"]:
        for method in summary["methods"]:
            if method != reference:
                summary["paired"][method] = paired_vs_reference(run_dir, method, reference, classes, metrics, n_boot)
    write_text(run_dir / "results" / "cells.csv", cells_csv(rows, metrics))
    write_json(run_dir / "results" / "summary.json", summary)
    return summary


def format_summary(summary: dict, metrics: Sequence[str] = HEADLINE) -> str:
    """A plain-text table: mean ± sd per method and metric, then paired differences with CIs."""
    metrics = [m for m in metrics if m in summary["metrics"]]
    width = 24
    lines = ["method".ljust(14) + "".join(m.ljust(width) for m in metrics)]
    for method, stats in summary["methods"].items():
        cells = "".join(format_mean_sd(stats[m]["mean"], stats[m]["sd"]).ljust(width) for m in metrics)
        lines.append(method.ljust(14) + cells + f"(n={stats[metrics[0]]['n']})")
    if summary["paired"]:
        lines.append("")
        lines.append(f"paired difference vs {summary['reference']} (95% bootstrap CI):")
        for method, diffs in summary["paired"].items():
            cells = "".join(
                f"{d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]".ljust(width)
                for m in metrics if (d := diffs.get(m))
            )
            lines.append(method.ljust(14) + cells)
    return "\n".join(lines)
