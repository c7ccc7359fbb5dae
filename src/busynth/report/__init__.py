"""report.html: one self-contained page that shows a finished (or partial) run of the study.

Every number on the page is read from files in the run folder (``config.yaml``,
``results/summary.json``, ``results/cells.csv``, ``results/fidelity.json``, per-cell
``predictions.csv``, ``history.csv`` and ``fidelity.json``, ``data/*``, ``synthetic/*``),
so the report can be rebuilt without retraining. Images are embedded as data URIs; the
page loads nothing from elsewhere.

Each section is one function ``section_*(run) -> str`` returning an HTML fragment (in
:mod:`busynth.report.sections` and :mod:`busynth.report.fidelity`); a section whose optional
input is absent returns a short note instead. New sections are added to :data:`SECTIONS`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from busynth.io import write_text
from busynth.report.common import CSS, Run, esc, load_run, note
from busynth.report.dose import section_dose_response
from busynth.report.external import section_external
from busynth.report.fidelity import (
    section_adherence,
    section_closest_pairs,
    section_fidelity,
    section_label_fidelity,
    section_mask_pairs,
)
from busynth.report.sections import (
    section_config,
    section_confusion,
    section_data,
    section_header,
    section_metric_bars,
    section_results,
    section_roc,
    section_samples,
    section_training,
    section_verdicts,
)
from busynth.report.segmentation import section_segmentation

__all__ = ["SECTIONS", "Run", "build_report", "load_run"]

logger = logging.getLogger(__name__)

SECTIONS: list[Callable[[Run], str]] = [
    section_header, section_verdicts, section_results, section_dose_response, section_metric_bars, section_roc,
    section_confusion,
    section_external,
    section_fidelity, section_label_fidelity, section_closest_pairs, section_training, section_samples,
    section_mask_pairs,
    section_adherence, section_data, section_config,
]
# run.task=segmentation: no probabilities (ROC, confusion) and no classifier features (fidelity, label fidelity).
SEGMENTATION_SECTIONS: list[Callable[[Run], str]] = [
    section_header, section_verdicts, section_results, section_dose_response, section_metric_bars, section_segmentation,
    section_external, section_training,
    section_samples, section_mask_pairs, section_adherence, section_data, section_config,
]
_REQUIRED = {section_header, section_verdicts, section_results, section_config}


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
    sections = SEGMENTATION_SECTIONS if run.summary.get("task") == "segmentation" else SECTIONS
    body = "\n".join(_render(s, run) for s in sections)
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>busynth report: '
            f"{esc(run.root.name)}</title><style>{CSS}</style></head><body>\n{body}\n</body></html>\n")
    # Non-ASCII (±, Δ) as character references: the file is ASCII whatever the locale's encoding.
    out = write_text(run.root / "report.html", page.encode("ascii", "xmlcharrefreplace").decode("ascii"))
    logger.info("wrote %s", out)
    return out
