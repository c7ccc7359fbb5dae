"""report.html: one self-contained page that shows a finished (or partial) run of the study.

Every number on the page is read from files in the run folder (``config.yaml``,
``results/summary.json``, ``results/cells.csv``, per-cell ``predictions.csv`` and
``history.csv``, ``data/*``, ``synthetic/*``), so the report can be rebuilt without
retraining. Plots are drawn with matplotlib's Agg canvas (``Figure`` objects, no pyplot
state) and embedded as base64 PNG data URIs; the page loads nothing from elsewhere.

Each section is one function ``section_*(run) -> str`` returning an HTML fragment; a
section whose optional input is absent returns a short note instead. New sections are
added by appending a function to :data:`SECTIONS`.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import auc, roc_curve

from busynth.errors import RunStateError
from busynth.io import read_json, write_text

logger = logging.getLogger(__name__)

BAR_METRICS = ("balanced_accuracy", "macro_auc", "malignant_auc")
SAMPLES_PER_CLASS = 8
MAX_LIST = 50  # longest list (skipped files, near groups) printed in full
CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.4}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #bbb;padding:.25em .5em;text-align:right;vertical-align:top}
th{background:#f2f2f2}td.l,th.l{text-align:left}
td.better{background:#d7f5d7}td.worse{background:#f8d4d4}
.diff{color:#555;font-size:.85em;white-space:nowrap}.note{color:#777;font-style:italic}
img{max-width:100%}pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em}
"""


@dataclass
class Run:
    """What every section needs: the folder plus the two required files, parsed."""

    root: Path
    config: dict[str, Any]
    config_text: str
    summary: dict[str, Any]
    info: dict[str, Any]
    classes: list[str]
    methods: list[str]
    reference: str

    @property
    def positive(self) -> str:
        """The class scored by the ``malignant_*`` metrics and the ROC curves."""
        return "malignant" if "malignant" in self.classes else self.classes[-1]


def load_run(run_dir: Path) -> Run:
    """Read the required files of a run folder; raise RunStateError naming a missing one."""
    root = Path(run_dir)
    for rel in ("config.yaml", "results/summary.json"):
        if not (root / rel).is_file():
            raise RunStateError(f"cannot build a report: {root / rel} is missing")
    config_text = (root / "config.yaml").read_text()
    config = yaml.safe_load(config_text) or {}
    summary = read_json(root / "results/summary.json")
    info = read_json(root / "run.json") if (root / "run.json").is_file() else {}
    classes = list(summary.get("classes") or config.get("data", {}).get("classes") or [])
    methods = list(config.get("run", {}).get("methods") or [])
    methods += [m for m in summary.get("methods", {}) if m not in methods]
    return Run(root, config, config_text, summary, info, classes, methods, summary.get("reference", "real"))


# ----------------------------------------------------------------------------- helpers


def esc(value: Any) -> str:
    """HTML-escape anything read from a file."""
    return html.escape(str(value))


def note(text: str) -> str:
    """A short italic note, e.g. why a section is empty."""
    return f'<p class="note">{esc(text)}</p>'


def num(x: Any) -> float:
    """``x`` as a float; NaN for None or anything that is not a number."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def fmt(x: Any, digits: int = 3, sign: bool = False) -> str:
    """Format a number with fixed decimals; '–' for missing or NaN."""
    v = num(x)
    return "–" if np.isnan(v) else f"{v:{'+' if sign else ''}.{digits}f}"


def figure_to_img(fig: Figure, alt: str) -> str:
    """Render a matplotlib figure (Agg) to PNG and return an ``<img>`` tag with a data URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def html_table(header: Sequence[str], rows: Iterable[Sequence[Any]], left: int = 1) -> str:
    """A plain table; cells are escaped, the first ``left`` columns are left-aligned."""
    cls = lambda i: ' class="l"' if i < left else ""  # noqa: E731
    head = "".join(f"<th{cls(i)}>{esc(h)}</th>" for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f"<td{cls(i)}>{esc(c)}</td>" for i, c in enumerate(r)) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def kv_table(pairs: Iterable[tuple[Any, Any]]) -> str:
    """A two-column name/value table without a header row."""
    body = "".join(f'<tr><th class="l">{esc(k)}</th><td class="l">{esc(v)}</td></tr>' for k, v in pairs)
    return f"<table>{body}</table>"


def natural_key(text: str) -> list[Any]:
    """Sort key that orders 'fold2' before 'fold10' and 'x (2)' before 'x (10)'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def cell_dirs(run: Run, method: str) -> list[Path]:
    """The cell folders (fold<f>_seed<s>) of a method, in natural order."""
    folder = run.root / "cells" / method
    return sorted((p for p in folder.glob("*") if p.is_dir()), key=lambda p: natural_key(p.name))


def pooled_predictions(run: Run, method: str) -> pd.DataFrame | None:
    """All predictions.csv of a method concatenated, with a 'pred' argmax column; None if none."""
    frames = [pd.read_csv(d / "predictions.csv") for d in cell_dirs(run, method) if (d / "predictions.csv").is_file()]
    if not frames:
        return None
    df = pd.concat(frames, ignore_index=True)
    if "label" not in df and "y_true" in df:
        df["label"] = [run.classes[int(i)] for i in df["y_true"]]
    probs = df[[f"p_{c}" for c in run.classes]].to_numpy(dtype=float)
    df["pred"] = [run.classes[i] for i in probs.argmax(axis=1)]
    return df


def _read_csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.is_file() else None


# ----------------------------------------------------------------------------- sections


def section_header(run: Run) -> str:
    """Title, data source, dates, methods, folds × seeds and how to read the page."""
    cfg, info = run.config, run.info
    folds = 1 if cfg.get("split", {}).get("mode") == "holdout" else cfg.get("split", {}).get("folds", "?")
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
        f"images and is scored on held-out <b>real</b> test images; numbers are mean ± sd over "
        f"folds × seeds. Below each mean is the paired difference to <b>{esc(run.reference)}</b> "
        f"with a bootstrap 95% CI: green means the CI lies above 0 (better), red below 0 (worse).</p>"
    )


def _result_cell(stats: dict[str, Any], paired: dict[str, Any] | None) -> str:
    text = f"{fmt(stats.get('mean'))} ± {fmt(stats.get('sd'))}"
    if not paired:
        return f"<td>{esc(text)}</td>"
    lo, hi = num(paired.get("ci_low")), num(paired.get("ci_high"))
    cls = ' class="better"' if lo > 0 else ' class="worse"' if hi < 0 else ""  # False for NaN
    diff = f"Δ {fmt(paired.get('diff'), sign=True)} [{fmt(lo, sign=True)}, {fmt(hi, sign=True)}]"
    title = f"p_boot={fmt(paired.get('p_boot'))}, n={paired.get('n', '?')}"
    return f'<td{cls} title="{esc(title)}">{esc(text)}<br><span class="diff">{esc(diff)}</span></td>'


def section_results(run: Run) -> str:
    """Per method: mean ± sd of every metric and the paired difference vs the reference."""
    metrics = list(run.summary.get("metrics") or [])
    stats, paired = run.summary.get("methods", {}), run.summary.get("paired", {})
    head = '<tr><th class="l">method</th><th>n</th>' + "".join(f"<th>{esc(m)}</th>" for m in metrics) + "</tr>"
    rows = []
    for method in (m for m in run.methods if m in stats):
        n = next((s.get("n") for s in stats[method].values() if isinstance(s, dict)), "?")
        cells = "".join(_result_cell(stats[method].get(m, {}), paired.get(method, {}).get(m)) for m in metrics)
        rows.append(f'<tr><td class="l">{esc(method)}</td><td>{esc(n)}</td>{cells}</tr>')
    absent = [m for m in run.methods if m not in stats]
    missing = f" No results for: {', '.join(absent)}." if absent else ""
    return "<h2>Results</h2><table>" + head + "".join(rows) + "</table>" + note(
        f"n = cells (folds × seeds). Hover a difference for its bootstrap p-value.{missing}"
    )


def section_metric_bars(run: Run) -> str:
    """Bar chart per key metric: mean ± sd over cells, with each cell as a point."""
    cells = _read_csv(run.root / "results/cells.csv")
    stats = run.summary.get("methods", {})
    metrics = [m for m in BAR_METRICS if m in run.summary.get("metrics", BAR_METRICS)]
    methods = [m for m in run.methods if m in stats]
    if not metrics or not methods:
        return "<h2>Metrics per method</h2>" + note("no metrics to plot")
    fig = Figure(figsize=(3.6 * len(metrics), 3.4))
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


def section_roc(run: Run) -> str:
    """ROC curves, positive class vs rest, one curve per method pooled over its cells."""
    fig = Figure(figsize=(5.2, 4.6))
    ax = fig.subplots()
    drawn = 0
    for method in run.methods:
        df = pooled_predictions(run, method)
        if df is None or df["label"].nunique() < 2:
            continue
        y = (df["label"] == run.positive).to_numpy()
        fpr, tpr, _ = roc_curve(y, df[f"p_{run.positive}"].to_numpy(dtype=float))
        ax.plot(fpr, tpr, label=f"{method} (AUC {auc(fpr, tpr):.3f}, n={len(df)})")
        drawn += 1
    title = f"<h2>ROC curves ({esc(run.positive)} vs rest)</h2>"
    if not drawn:
        return title + note("no predictions.csv found under cells/")
    ax.plot([0, 1], [0, 1], color="#999", ls="--", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    return title + figure_to_img(fig, "ROC curves") + note(
        "Test predictions of all cells pooled per method; the pooled AUC can differ from the mean per-cell AUC."
    )


def section_confusion(run: Run) -> str:
    """One confusion matrix per method (pooled over cells): counts, coloured by row share."""
    k = len(run.classes)
    pooled = [(m, df) for m in run.methods if (df := pooled_predictions(run, m)) is not None]
    if not pooled:
        return "<h2>Confusion matrices</h2>" + note("no predictions.csv found under cells/")
    fig = Figure(figsize=(3.2 * len(pooled) + 0.8, 3.4), layout="constrained")
    for n, (ax, (method, df)) in enumerate(zip(fig.subplots(1, len(pooled), squeeze=False)[0], pooled)):
        cm = pd.crosstab(df["label"], df["pred"]).reindex(index=run.classes, columns=run.classes, fill_value=0)
        counts = cm.to_numpy()
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
        hists = [(d.name, pd.read_csv(p)) for d in cell_dirs(run, method)
                 if (p := d / "classifier" / "history.csv").is_file()]
        if hists:
            panels.append((method, hists))
    if not panels:
        return "<h2>Training curves</h2>" + note("no classifier/history.csv found under cells/")
    fig = Figure(figsize=(3.4 * len(panels), 2.9), layout="constrained")
    for ax, (method, hists) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for name, h in hists:
            col = next((c for c in ("val_balanced_accuracy", "val_macro_auc", "train_loss") if c in h), None)
            if col is None:
                continue
            x = h["epoch"] if "epoch" in h else np.arange(1, len(h) + 1)
            ax.plot(x, h[col], marker=".", lw=1, label=name)
            ax.set_ylabel(col)
        ax.set(title=method, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return "<h2>Training curves</h2>" + figure_to_img(fig, "training curves")


def _sample_grid(folder: Path, classes: Sequence[str]) -> Figure | None:
    """Up to SAMPLES_PER_CLASS images per class (rows) with mask outlines in red."""
    picks = {}
    for c in classes:
        files = [p for p in (folder / c).glob("*.png") if not p.stem.endswith("_mask")]
        picks[c] = sorted(files, key=lambda p: natural_key(p.name))[:SAMPLES_PER_CLASS]
    rows = [c for c in classes if picks[c]]
    if not rows:
        return None
    ncols = max(len(picks[c]) for c in rows)
    fig = Figure(figsize=(1.3 * ncols, 1.4 * len(rows)))
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for r, c in enumerate(rows):
        for j, ax in enumerate(axes[r]):
            ax.set_axis_off()
            if j >= len(picks[c]):
                continue
            path = picks[c][j]
            ax.imshow(np.asarray(Image.open(path).convert("L")), cmap="gray", vmin=0, vmax=255)
            mask_path = path.with_name(f"{path.stem}_mask.png")
            if mask_path.is_file():
                mask = np.asarray(Image.open(mask_path).convert("L")) > 127
                if mask.any() and mask.shape[0] > 1 and mask.shape[1] > 1:
                    ax.contour(mask, levels=[0.5], colors="red", linewidths=0.8)
            if j == 0:
                ax.set_title(c, fontsize=9, loc="left")
    return fig


def section_samples(run: Run) -> str:
    """A sample grid per generator method from the first fold/seed folder present."""
    root = run.root / "synthetic"
    names = [p.name for p in root.glob("*") if p.is_dir()]
    ordered = [m for m in run.methods if m in names] + sorted(n for n in names if n not in run.methods)
    parts = []
    for method in ordered:
        for cell in sorted((p for p in (root / method).glob("*") if p.is_dir()), key=lambda p: natural_key(p.name)):
            if (fig := _sample_grid(cell, run.classes)) is not None:
                parts.append(f"<h3>{esc(method)} <small>({esc(cell.name)})</small></h3>" + figure_to_img(fig, method))
                break
        else:
            parts.append(f"<h3>{esc(method)}</h3>" + note("no images found"))
    if not parts:
        return "<h2>Synthetic samples</h2>" + note("no synthetic/ folder: no generator method produced images")
    return "<h2>Synthetic samples</h2>" + note("Red outlines: the mask that goes with the image.") + "".join(parts)


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
    split = _read_csv(data / "split.csv")
    out += "<h3>Split</h3>"
    out += _split_table(split, run.classes) if split is not None else note("data/split.csv missing")
    return out


def section_config(run: Run) -> str:
    """The resolved config as written by the run."""
    return "<h2>Config</h2><pre>" + esc(run.config_text) + "</pre>"


SECTIONS: list[Callable[[Run], str]] = [
    section_header, section_results, section_metric_bars, section_roc, section_confusion,
    section_training, section_samples, section_data, section_config,
]
_REQUIRED = {section_header, section_results, section_config}


def _render(section: Callable[[Run], str], run: Run) -> str:
    """Run one section; an optional section with unreadable input becomes a note, not a crash."""
    try:
        return section(run)
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        if section in _REQUIRED:
            raise
        logger.warning("report section %s skipped: %s", section.__name__, exc)
        return note(f"{section.__name__.removeprefix('section_')}: could not be drawn ({exc})")


def build_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` from the files in the run folder and return its path."""
    run = load_run(run_dir)
    body = "\n".join(_render(s, run) for s in SECTIONS)
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>busynth report: '
            f"{esc(run.root.name)}</title><style>{CSS}</style></head><body>\n{body}\n</body></html>\n")
    # Non-ASCII (±, Δ) as character references: the file is ASCII whatever the locale's encoding.
    out = write_text(run.root / "report.html", page.encode("ascii", "xmlcharrefreplace").decode("ascii"))
    logger.info("wrote %s", out)
    return out
