"""Shared parts of the report: the parsed run folder (:class:`Run`) and small HTML/plot helpers.

Plots are drawn with matplotlib's Agg canvas (``Figure`` objects, no pyplot state) and
embedded as base64 PNG data URIs; the page loads nothing from elsewhere.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure

from busynth.classify.metrics import restrict_proba
from busynth.classify.predictions import read_predictions
from busynth.errors import RunStateError
from busynth.io import read_json, write_atomic
from busynth.registry import cell_folder, study_arms

logger = logging.getLogger(__name__)

MAX_LIST = 50  # longest list (skipped files, near groups) printed in full
CSS = """
body{font-family:system-ui,sans-serif;max-width:1280px;margin:2em auto;padding:0 1em;color:#222;line-height:1.4}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.82em;display:block;overflow-x:auto;max-width:100%}
th,td{border:1px solid #bbb;padding:.25em .5em;text-align:right;vertical-align:top}
th{background:#f2f2f2}td.l,th.l{text-align:left}
td.better{background:#d7f5d7}td.worse{background:#f8d4d4}p.worse{background:#f8d4d4;padding:4px}
.diff{color:#555;font-size:.85em;white-space:nowrap}.note{color:#777;font-style:italic}
img{max-width:100%}pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em}
.pairs{display:flex;flex-wrap:wrap;gap:.8em}.pair{margin:0;padding:.3em;border:2px solid #ddd;font-size:.75em}
.pair img{margin-right:2px;image-rendering:pixelated}.pair.flagged{border-color:#d33}
.path{color:#777;word-break:break-all}figcaption{max-width:260px}table.fid td{white-space:nowrap}
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
    synthesis = config.get("synthesis") or {}
    methods = study_arms(config.get("run", {}).get("methods") or [], synthesis.get("ratios"),
                         synthesis.get("filter") is not None)
    methods += [m for m in summary.get("methods", {}) if m not in methods]
    return Run(root, config, config_text, summary, info, classes, methods, summary.get("reference", "real"))



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


def figure_to_img(fig: Figure, alt: str, save_to: Path | None = None) -> str:
    """Render a matplotlib figure (Agg) to PNG once and return an ``<img>`` tag with a data URI;
    with ``save_to`` the same PNG is also written there (atomically), for use outside the report."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)  # every figure has layout="constrained": one draw
    return png_to_img(buf.getvalue(), alt, save_to=save_to)


def html_table(header: Sequence[str], rows: Iterable[Sequence[Any]], left: int = 1) -> str:
    """A plain table; cells are escaped, the first ``left`` columns are left-aligned."""
    cls = lambda i: ' class="l"' if i < left else ""
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
    folder = cell_folder(run.root, method)
    return sorted((p for p in folder.glob("*") if p.is_dir()), key=lambda p: natural_key(p.name))


def pooled_predictions(run: Run, method: str, filename: str = "predictions.csv",
                       among: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """The predictions (``filename`` in each cell folder: the test part, or ``external/<name>.csv``)
    of all cells of a method, concatenated: y_true (N,) and probabilities (N, C) in ``run.classes``
    order, read as the results read them (with ``among``, renormalised over those classes); None
    when no cell has any."""
    cells = [read_predictions(d / filename, run.classes)[1:] for d in cell_dirs(run, method)
             if (d / filename).is_file()]
    if not cells:
        return None
    proba = np.concatenate([p for _, p in cells])
    return np.concatenate([y for y, _ in cells]), proba if among is None else restrict_proba(proba, among)




def read_csv_or_none(path: Path) -> pd.DataFrame | None:
    """The CSV file as a DataFrame, or None when it does not exist."""
    return pd.read_csv(path) if path.is_file() else None


def png_to_img(data: bytes, alt: str, width: int | None = None, save_to: Path | None = None) -> str:
    """An ``<img>`` tag embedding PNG bytes as a data URI (optionally with a display width); with
    ``save_to`` the same PNG is also written there (atomically), for use outside the report."""
    if save_to is not None:
        write_atomic(save_to, lambda tmp: tmp.write_bytes(data))
    size = f' width="{width}"' if width else ""
    return f'<img alt="{esc(alt)}"{size} src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'
