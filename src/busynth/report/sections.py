"""The report's main sections: results, plots, samples, data and config.

Each section is one function ``section_*(run) -> str`` returning an HTML fragment; a section
whose optional input is absent returns a short note instead.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import auc, confusion_matrix, roc_curve

from busynth.io import read_json, read_png, read_png_mask
from busynth.report.common import (
    MAX_LIST,
    Run,
    cell_dirs,
    esc,
    figure_to_img,
    fmt,
    html_table,
    kv_table,
    natural_key,
    note,
    pooled_predictions,
    read_csv_or_none,
)
from busynth.report.grid import RED, Tile, grid_to_img
from busynth.results import summary_interval_text

BAR_METRICS = ("balanced_accuracy", "macro_auc", "malignant_auc")
SAMPLES_PER_CLASS = 8


def section_header(run: Run) -> str:
    """Title, data source, dates, methods, folds × seeds and how to read the page."""
    cfg, info = run.config, run.info
    split_cfg = cfg.get("split", {})
    folds = 1 if split_cfg.get("mode") == "holdout" else split_cfg.get("folds", "?")
    if split_cfg.get("repeats", 1) > 1:
        folds = f"{folds} folds × {split_cfg['repeats']} repeats"
    seeds = cfg.get("run", {}).get("seeds", "?")
    rows = [
        ("data", info.get("data", "unknown (no run.json)")),
        ("run started", info.get("started", "unknown")),
        ("report built", dt.datetime.now().isoformat(timespec="seconds")),
        ("busynth version", info.get("busynth_version", "unknown")),
        ("config fingerprint", info.get("fingerprint", "unknown")),
        ("classes", ", ".join(run.classes)),
        ("methods", ", ".join(run.methods)),
        ("folds × seeds", f"{folds} × {seeds}"),
    ]
    return (
        f"<h1>busynth report: {esc(run.root.name)}</h1>" + kv_table(rows)
        + f"<p>Each method trains a classifier on real training images plus that method's synthetic "
        f"images, for the same number of optimiser steps, and is scored on held-out <b>real</b> test "
        f"images; numbers are mean ± sd over folds × seeds. Differences to <b>{esc(run.reference)}</b> "
        f"are paired by fold and classifier seed, and their intervals include training randomness. "
        f"Only the primary metric gets a verdict (Holm-adjusted across methods); the A/A row shows "
        f"how far the reference moves against itself under other seeds: the noise floor.</p>"
    )


VERDICT_CLASS = {"helps": "better", "hurts": "worse"}


def _interval_text(d: dict[str, Any] | None) -> str:
    if not d:
        return "–"
    return f"{fmt(d.get('diff'), sign=True)} [{fmt(d.get('ci_low'), sign=True)}, {fmt(d.get('ci_high'), sign=True)}]"


def _result_cell(stats: dict[str, Any], paired: dict[str, Any] | None, verdict: str | None) -> str:
    text = f"{fmt(stats.get('mean'))} ± {fmt(stats.get('sd'))}"
    if not paired:
        return f"<td>{esc(text)}</td>"
    cls = f' class="{VERDICT_CLASS[verdict]}"' if verdict in VERDICT_CLASS else ""
    title = f"p={fmt(paired.get('p'))}, test images n={paired.get('n', '?')}, cells={paired.get('cells', '?')}"
    diff = "Δ " + _interval_text(paired)
    return f'<td{cls} title="{esc(title)}">{esc(text)}<br><span class="diff">{esc(diff)}</span></td>'


def _procedure(summary: dict[str, Any]) -> tuple[str, str, float]:
    proto = summary.get("protocol", {})
    return (proto.get("primary_metric", "balanced_accuracy"), summary_interval_text(summary),
            float(proto.get("alpha", 0.05)))


def section_verdicts(run: Run) -> str:
    """The answer: per method, the primary metric's paired difference to the reference and to
    the classical baseline with intervals, Holm-adjusted p-values and verdicts; the A/A row first."""
    summary = run.summary
    primary, how, alpha = _procedure(summary)
    aa = summary.get("aa", {})
    ref, base = run.reference, summary.get("baseline", "classical")
    head = (f'<tr><th class="l">method</th><th>Δ {esc(primary)} vs {esc(ref)}</th><th>Holm p</th><th>verdict</th>'
            f'<th>Δ vs {esc(base)}</th><th>Holm p</th><th>verdict</th></tr>')
    seeds = summary.get("protocol", {}).get("aa_seeds", [[], []])
    aa_primary = aa.get(primary) if isinstance(aa, dict) else None
    aa_text = _interval_text(aa_primary) if aa_primary else esc(aa.get("note", "not available"))
    rows = [(f'<tr class="aa"><td class="l">A/A: {esc(ref)} seeds {esc(seeds[0])} vs {esc(seeds[1])}</td>'
             f'<td>{esc(aa_text)}</td><td>p={fmt((aa_primary or {}).get("p"))}</td><td>(noise floor)</td>'
             '<td></td><td></td><td></td></tr>')]
    for method in run.methods:
        vs_ref = summary.get("paired", {}).get(method)
        if method == ref or not vs_ref:
            continue
        vs_base = summary.get("vs_baseline", {}).get(method, {})
        cols = []
        for block in (vs_ref, vs_base):
            v = block.get("verdict")
            cls = f' class="{VERDICT_CLASS[v]}"' if v in VERDICT_CLASS else ""
            cols.append(f"<td{cls}>{esc(_interval_text(block.get(primary)))}</td><td>{fmt(block.get('p_holm'))}</td>"
                        f"<td{cls}><b>{esc(v or '–')}</b></td>")
        rows.append(f'<tr><td class="l">{esc(method)}</td>{"".join(cols)}</tr>')
    leaky = _leaky_note(run)
    return ("<h2>Verdicts</h2>" + leaky + "<table>" + head + "".join(rows) + "</table>" + note(
        f"Primary metric: {primary}. Interval: {round(100 * (1 - alpha))}% {how}. Verdict: helps / hurts when "
        f"the Holm-adjusted p-value across the methods compared is below {alpha}, else no evidence; no verdict "
        "when some fold has a single classifier seed (no interval can see training randomness then). "
        "A difference no larger than the A/A row's is indistinguishable from re-training with another seed."
    ))


def _leaky_note(run: Run) -> str:
    path = run.root / "data" / "split_leaks.json"
    if not path.is_file():
        return ""
    leaks = read_json(path)
    if not leaks.get("leaky"):
        return ""
    return ('<p class="worse"><b>leaky split</b>: the given split file puts near-duplicates of test images in '
            f"training ({len(leaks.get('groups', []))} groups, kept as given with split.on_leak=keep); "
            "every number below is optimistic.</p>")


def section_results(run: Run) -> str:
    """Per method: mean ± sd of every metric and the paired difference vs the reference; only the
    primary metric is coloured, by its verdict."""
    metrics = list(run.summary.get("metrics") or [])
    primary, how, _ = _procedure(run.summary)
    stats, paired = run.summary.get("methods", {}), run.summary.get("paired", {})
    head = '<tr><th class="l">method</th><th>cells</th>' + "".join(
        f"<th>{esc(m)}{' (primary)' if m == primary else ''}</th>" for m in metrics) + "</tr>"
    rows = []
    for method in (m for m in run.methods if m in stats):
        n = next((s.get("n") for s in stats[method].values() if isinstance(s, dict)), "?")
        mine = paired.get(method, {})
        cells = "".join(
            _result_cell(stats[method].get(m, {}), mine.get(m), mine.get("verdict") if m == primary else None)
            for m in metrics)
        rows.append(f'<tr><td class="l">{esc(method)}</td><td>{esc(n)}</td>{cells}</tr>')
    absent = [m for m in run.methods if m not in stats]
    missing = f" No results for: {', '.join(absent)}." if absent else ""
    return "<h2>Results</h2>" + _leaky_note(run) + "<table>" + head + "".join(rows) + "</table>" + note(
        f"cells = folds × seeds. Δ: paired difference to {run.reference} with its interval ({how}); "
        f"hover for p and the number of distinct test images. Only {primary} is coloured (by its verdict); "
        f"the other metrics are descriptive.{missing}"
    )


def section_metric_bars(run: Run) -> str:
    """Bar chart per key metric: mean ± sd over cells, with each cell as a point."""
    cells = read_csv_or_none(run.root / "results/cells.csv")
    stats = run.summary.get("methods", {})
    wanted = ("dice", "iou") if run.summary.get("task") == "segmentation" else BAR_METRICS  # HD95 is in pixels
    metrics = [m for m in wanted if m in run.summary.get("metrics", wanted)]
    methods = [m for m in run.methods if m in stats]
    if not metrics or not methods:
        return "<h2>Metrics per method</h2>" + note("no metrics to plot")
    fig = Figure(figsize=(3.6 * len(metrics), 3.4), layout="constrained")
    for ax, metric in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics):
        x = np.arange(len(methods))
        means = [stats[m].get(metric, {}).get("mean", np.nan) for m in methods]
        sds = [stats[m].get(metric, {}).get("sd", np.nan) for m in methods]
        ax.bar(x, means, yerr=sds, capsize=4, color="#9ecae1", edgecolor="#3182bd")
        if cells is not None and metric in cells:
            for i, m in enumerate(methods):
                vals = cells.loc[cells["method"] == m, metric].dropna().to_numpy()
                ax.scatter(i + np.linspace(-0.15, 0.15, len(vals)), vals, s=14, color="k", zorder=3)
        ax.set_xticks(x, methods, rotation=30, ha="right")
        ax.set_title(metric)
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    extra = "" if cells is not None else note("results/cells.csv missing: per-cell points not shown")
    return "<h2>Metrics per method</h2>" + figure_to_img(fig, "metric bars") + extra + note(
        "Bars: mean over cells, error bars: sd over cells, dots: single cells."
    )


def section_roc(run: Run, filename: str = "predictions.csv", heading: str = "h2",
                among: Sequence[int] | None = None) -> str:
    """ROC curves, positive class vs rest, one curve per method pooled over its cells (from each
    cell's ``filename``: the test part, or an external set's predictions, with ``among`` renormalised
    over those classes as its summary scores them)."""
    fig = Figure(figsize=(5.2, 4.6), layout="constrained")
    ax = fig.subplots()
    drawn = 0
    k = run.classes.index(run.positive)
    for method in run.methods:
        pooled = pooled_predictions(run, method, filename, among)
        if pooled is None or len(np.unique(pooled[0])) < 2:
            continue
        y, p = pooled
        fpr, tpr, _ = roc_curve(y == k, p[:, k])
        ax.plot(fpr, tpr, label=f"{method} (AUC {auc(fpr, tpr):.3f}, n={len(y)})")
        drawn += 1
    title = f"<{heading}>ROC curves ({esc(run.positive)} vs rest)</{heading}>"
    if not drawn:
        return title + note(f"no {filename} found under cells/")
    ax.plot([0, 1], [0, 1], color="#999", ls="--", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    return title + figure_to_img(fig, "ROC curves") + note(
        "Test predictions of all cells pooled per method; the pooled AUC can differ from the mean per-cell AUC."
    )


def section_confusion(run: Run) -> str:
    """One confusion matrix per method (pooled over cells): counts, coloured by row share."""
    k = len(run.classes)
    pooled = [(m, yp) for m in run.methods if (yp := pooled_predictions(run, m)) is not None]
    if not pooled:
        return "<h2>Confusion matrices</h2>" + note("no predictions.csv found under cells/")
    fig = Figure(figsize=(3.2 * len(pooled) + 0.8, 3.4), layout="constrained")
    for n, (ax, (method, (y, p))) in enumerate(zip(fig.subplots(1, len(pooled), squeeze=False)[0], pooled)):
        counts = confusion_matrix(y, p.argmax(axis=1), labels=list(range(k)))
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{counts[i, j]}\n{share[i, j]:.0%}", ha="center", va="center",
                        fontsize=8, color="white" if share[i, j] > 0.6 else "black")
        ax.set_xticks(range(k), run.classes, rotation=30, ha="right")
        ax.set_yticks(range(k), run.classes if n == 0 else [])
        ax.set(title=method, xlabel="predicted", ylabel="true" if n == 0 else "")
    return "<h2>Confusion matrices</h2>" + figure_to_img(fig, "confusion matrices") + note(
        "Counts over all cells; percentages and colour are shares of each true-class row (argmax prediction)."
    )


def section_training(run: Run) -> str:
    """Validation metric per epoch, one small plot per method with a line per cell."""
    panels = []
    for method in run.methods:
        model = "segmenter" if run.summary.get("task") == "segmentation" else "classifier"
        hists = [(d.name, pd.read_csv(p)) for d in cell_dirs(run, method) if (p := d / model / "history.csv").is_file()]
        if hists:
            panels.append((method, hists))
    if not panels:
        return "<h2>Training curves</h2>" + note("no classifier/ or segmenter/ history.csv found under cells/")
    fig = Figure(figsize=(3.4 * len(panels), 2.9), layout="constrained")
    for ax, (method, hists) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for name, h in hists:
            col = next((c for c in ("val_balanced_accuracy", "val_macro_auc", "val_dice", "train_loss")
                        if c in h and h[c].notna().any()), None)
            if col is None:
                continue
            x = h["epoch"] if "epoch" in h else pd.Series(np.arange(1, len(h) + 1))
            scored = h[col].notna()  # epochs without validation (classifier.eval_every) are empty
            ax.plot(x[scored], h[col][scored], marker=".", lw=1, label=name)
            ax.set_ylabel(col)
        ax.set(title=method, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return "<h2>Training curves</h2>" + figure_to_img(fig, "training curves")


def _sample_grid(folder: Path, classes: Sequence[str]) -> list[list[Tile]]:
    """Up to SAMPLES_PER_CLASS images per class (rows) with mask outlines in red; [] when there are none."""
    rows = []
    for c in classes:
        files = [p for p in (folder / c).glob("*.png") if not p.stem.endswith("_mask")]
        picks = sorted(files, key=lambda p: natural_key(p.name))[:SAMPLES_PER_CLASS]
        row = []
        for j, path in enumerate(picks):
            mask_path = path.with_name(f"{path.stem}_mask.png")
            mask = read_png_mask(mask_path) if mask_path.is_file() else None
            outlines = [(mask, RED)] if mask is not None and mask.any() else []
            row.append(Tile(read_png(path), outlines, c if j == 0 else ""))
        if row:
            rows.append(row)
    return rows


def section_samples(run: Run) -> str:
    """A sample grid per generator method from the first fold/seed folder present."""
    root = run.root / "synthetic"
    names = [p.name for p in root.glob("*") if p.is_dir()]
    ordered = [m for m in run.methods if m in names] + sorted(n for n in names if n not in run.methods)
    parts = []
    for method in ordered:
        for cell in sorted((p for p in (root / method).glob("*") if p.is_dir()), key=lambda p: natural_key(p.name)):
            if rows := _sample_grid(cell, run.classes):
                png = run.root / "results" / "samples" / f"{method}.png"
                parts.append(f"<h3>{esc(method)} <small>({esc(cell.name)})</small></h3>"
                             + grid_to_img(rows, method, save_to=png))
                break
        else:
            parts.append(f"<h3>{esc(method)}</h3>" + note("no images found"))
    if not parts:
        return "<h2>Synthetic samples</h2>" + note("no synthetic/ folder: no generator method produced images")
    return "<h2>Synthetic samples</h2>" + note(
        "Red outlines: the mask that goes with the image. Each grid is also saved as "
        "results/samples/<method>.png.") + "".join(parts)


def _load_summary_html(load: dict[str, Any]) -> str:
    scalars = [(k, v) for k, v in load.items() if not isinstance(v, (dict, list))]
    out = "<h3>Loading</h3>" + kv_table(scalars)
    per_class = load.get("per_class") or {}
    if per_class:
        rows = [(c, *(v.values() if isinstance(v, dict) else [v])) for c, v in per_class.items()]
        first = next(iter(per_class.values()))
        header = ["class", *(first.keys() if isinstance(first, dict) else ["images"])]
        out += html_table(header, rows)
    skipped = load.get("skipped") or []
    if skipped:
        out += f"<p>Skipped files ({len(skipped)}):</p>" + html_table(
            ["path", "reason"], [(s.get("path", ""), s.get("reason", "")) for s in skipped[:MAX_LIST]], left=2)
    return out


def _groups_html(title: str, groups: Sequence[Any]) -> str:
    if not groups:
        return f"<p>{esc(title)}: none</p>"
    shown = (", ".join(map(str, g)) if isinstance(g, list) else g for g in groups[:MAX_LIST])
    items = "".join(f"<li>{esc(g)}</li>" for g in shown)
    more = f"<li>… {len(groups) - MAX_LIST} more</li>" if len(groups) > MAX_LIST else ""
    return f"<p>{esc(title)} ({len(groups)}):</p><ul>{items}{more}</ul>"


def _split_table(split: pd.DataFrame, classes: Sequence[str]) -> str:
    counts = split.groupby(["fold", "part", "label"]).size().unstack("label", fill_value=0)
    cols = [c for c in classes if c in counts] + [c for c in counts if c not in classes]
    counts = counts.reindex(columns=cols, fill_value=0)
    order = {p: i for i, p in enumerate(("train", "val", "test", "excluded"))}
    keys = sorted(counts.index, key=lambda fp: (fp[0], order.get(fp[1], 9), str(fp[1])))
    rows = [(f, p, *counts.loc[(f, p)].tolist(), int(counts.loc[(f, p)].sum())) for f, p in keys]
    return html_table(["fold", "part", *cols, "total"], rows, left=2)


def section_data(run: Run) -> str:
    """Load summary, audit findings (cross-class duplicates, overlays) and the split table."""
    data = run.root / "data"
    out = "<h2>Data</h2>"
    load_path, audit_path = data / "load_summary.json", data / "audit.json"
    out += _load_summary_html(read_json(load_path)) if load_path.is_file() else note("data/load_summary.json missing")
    if audit_path.is_file():
        audit = read_json(audit_path)
        out += "<h3>Audit</h3>" + kv_table((k, v) for k, v in audit.items() if k.startswith("n_"))
        cross = audit.get("cross_class_groups", [])
        out += _groups_html("Cross-class duplicate groups (same image, different labels)", cross)
        out += _groups_html("Images with coloured overlays", audit.get("overlays", []))
        out += _groups_html("Near-duplicate groups", audit.get("near_groups", []))
    else:
        out += note("data/audit.json missing")
    split = read_csv_or_none(data / "split.csv")
    out += "<h3>Split</h3>"
    out += _split_table(split, run.classes) if split is not None else note("data/split.csv missing")
    return out


def section_config(run: Run) -> str:
    """The resolved config as written by the run."""
    return "<h2>Config</h2><pre>" + esc(run.config_text) + "</pre>"

