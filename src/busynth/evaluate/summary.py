"""Fidelity over the whole study: mean ± sd over cells per method, next to real-vs-real.

Reads only the cells' ``fidelity.json`` files (light imports: the report uses it too).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from busynth.classify.metrics import summarize
from busynth.io import read_json, write_json
from busynth.registry import REFERENCE, cell_folder

logger = logging.getLogger(__name__)

FIDELITY_JSON = "fidelity.json"
LABEL_FIDELITY_JSON = "label_fidelity.json"  # written by busynth.evaluate.labels
CAS_JSON = "cas.json"  # written by busynth.evaluate.cas
SUMMARY_METRICS = ("fid", "kid_mean", "precision", "recall", "diversity", "memorization_share",
                   "memorization_share_feature")


def aggregate_fidelity(cells: dict[str, list[dict]]) -> dict:
    """Mean ± sd over cells per method (overall and per class) of :data:`SUMMARY_METRICS` and
    KID std, plus the real-vs-real reference over the distinct fold/seed cells. ``cells`` maps
    method -> list of fidelity.json contents; skipped cells are listed, not averaged."""
    out: dict = {"metrics": list(SUMMARY_METRICS), "methods": {}, "skipped": {}, "real_vs_real": {}}
    references: dict[tuple[int, int], dict] = {}
    for method, results in cells.items():
        ok = [r for r in results if r.get("status") == "ok"]
        skipped = [f"fold{r.get('fold')}_seed{r.get('seed')}: {r.get('note', '')}"
                   for r in results if r.get("status") != "ok"]
        if skipped:
            out["skipped"][method] = skipped
        if ok:
            out["methods"][method] = {"cells": len(ok), **_summarize_scores([r["generator"] for r in ok])}
        for r in ok:
            references.setdefault((r["fold"], r["seed"]), r["real_vs_real"])
    if references:
        out["real_vs_real"] = {"cells": len(references), **_summarize_scores(list(references.values()))}
    return out


def _summarize_scores(scores: list[dict]) -> dict:
    def stats(entries: list[dict]) -> dict:
        names = [*SUMMARY_METRICS, "kid_std"]
        return {m: summarize([e[m] for e in entries if e.get(m) is not None]) for m in names}

    classes = list(scores[0]["per_class"]) if scores else []
    return {"overall": stats([s["overall"] for s in scores]),
            "per_class": {c: stats([s["per_class"][c] for s in scores if c in s["per_class"]]) for c in classes}}


def read_cell_fidelity(run_dir: Path, methods: Sequence[str]) -> dict[str, list[dict]]:
    """method -> fidelity.json contents of its cells (natural fold/seed order); methods without any are left out."""
    out = {}
    for method in methods:
        folder = cell_folder(run_dir, method)
        paths = sorted(folder.glob(f"*/{FIDELITY_JSON}"), key=lambda p: _natural_key(p.parent.name))
        if paths:
            out[method] = [read_json(p) for p in paths]
    return out


def _natural_key(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def summarize_fidelity(run_dir: Path, methods: Sequence[str]) -> dict:
    """Write ``results/fidelity.json`` (mean ± sd over cells per method and the real-vs-real
    reference, from the cells' fidelity.json files; label fidelity from their label_fidelity.json, train
    on synthetic / test on real from their cas.json)
    and return it."""
    generators = [m for m in methods if m != REFERENCE]
    summary = aggregate_fidelity(read_cell_fidelity(run_dir, generators))
    summary["label_fidelity"] = aggregate_label_fidelity(read_cell_label_fidelity(run_dir, generators))
    summary["cas"] = aggregate_cas(run_dir, generators)
    summary["filter"] = aggregate_filter(run_dir, generators)
    write_json(Path(run_dir) / "results" / "fidelity.json", summary)
    return summary


def aggregate_label_fidelity(cells: dict[str, list[dict]]) -> dict:
    """Mean ± sd over a method's cells of the per-class accuracy and mean probability, for its
    synthetic images and for the real test images of the same cells (the reference)."""
    out = {}
    for method, results in cells.items():
        ok = [r for r in results if r.get("status") == "ok"]
        if not ok:
            continue
        entry: dict = {"cells": len(ok)}
        for part in ("synthetic", "real_test"):
            classes = list(dict.fromkeys(c for r in ok for c in r[part]["per_class"]))
            entry[part] = {
                c: {m: summarize([r[part]["per_class"][c][m] for r in ok if c in r[part]["per_class"]])
                    for m in ("accuracy", "mean_probability")} for c in classes}
            entry[part]["overall"] = {m: summarize([r[part]["overall"][m] for r in ok])
                                      for m in ("accuracy", "mean_probability")}
        out[method] = entry
    return out


def read_cell_label_fidelity(run_dir: Path, methods: Sequence[str]) -> dict[str, list[dict]]:
    """method -> label_fidelity.json contents of its cells."""
    out = {}
    for method in methods:
        paths = sorted(cell_folder(run_dir, method).glob(f"*/{LABEL_FIDELITY_JSON}"))
        if paths:
            out[method] = [read_json(p) for p in paths]
    return out


def aggregate_cas(run_dir: Path, methods: Sequence[str], metrics: Sequence[str] = (
        "balanced_accuracy", "macro_auc", "malignant_auc")) -> dict:
    """Per method with cas.json cells: mean ± sd over them of ``metrics`` trained on synthetic images
    alone, and of the real-only classifiers of the same cells."""
    out = {}
    for method in methods:
        ok = [r for p in sorted(cell_folder(run_dir, method).glob(f"*/{CAS_JSON}"))
              if (r := read_json(p)).get("status") == "ok"]
        if ok:
            out[method] = {"cells": len(ok), **{
                part: {m: summarize([r[part][m] for r in ok if r.get(part) and r[part].get(m) is not None])
                       for m in metrics} for part in ("synthetic_only", "real_only")}}
    return out


def aggregate_filter(run_dir: Path, methods: Sequence[str]) -> dict:
    """Per filtered arm (``synthesis.filter``): per class, requested, sampled, passed and kept images summed
    over its synthetic folders' filter.json (written by busynth.evaluate.filtering), and the threshold."""
    out = {}
    for method in methods:
        found = [read_json(p) for p in sorted((Path(run_dir) / "synthetic" / method).glob("*/filter.json"))]
        if found:
            per_class: dict = {}
            for entry in found:
                for c, counts in entry["per_class"].items():
                    mine = per_class.setdefault(c, dict.fromkeys(counts, 0))
                    for k, v in counts.items():
                        mine[k] += v
            out[method] = {"threshold": found[0]["threshold"], "sets": len(found), "per_class": per_class}
    return out
