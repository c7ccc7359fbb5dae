"""The report's section on external test sets (``results/external/<name>.json``, ``busynth.external``)."""

from __future__ import annotations

import dataclasses

from busynth.io import read_json
from busynth.report.common import Run, esc, kv_table, note
from busynth.report.sections import section_results, section_roc, section_verdicts


def section_external(run: Run) -> str:
    """Per external set: where it comes from, the verdicts, the results table and ROC curves, made
    exactly as for the study's own test folds; nothing when the run scored no external set."""
    paths = sorted((run.root / "results" / "external").glob("*.json"))
    if not paths:
        return ""
    parts = ["<h2>External test sets</h2>", note(
        "Images from elsewhere (another hospital or scanner), never used for training, validation or model "
        "selection, scored by the classifier (segmentation: the segmenter) of every cell. All folds score the "
        "same images, so a resample "
        "draws them once for every fold, seed and method; the unit drawn is a duplicate group of the set.")]
    for path in paths:
        summary = read_json(path)
        info = summary.get("external", {})
        name = esc(info.get("name", path.stem))
        sub = dataclasses.replace(run, summary=summary)
        parts.append(f"<h3>{name}</h3>" + kv_table([
            ("folder", info.get("path", "?")), ("images", info.get("n_images", "?")),
            ("classes present", ", ".join(info.get("classes_present", []))),
            ("scored among", ", ".join(info.get("scored_among", run.classes))),
            *[(f"{m}: images called an absent class", f"{share:.1%}")
              for m, share in info.get("called_absent_class", {}).items()],
            ("duplicate groups (resampling units)", info.get("duplicate_groups", "?")),
        ]))
        parts.append(section_verdicts(sub).replace("<h2>Verdicts</h2>", f"<h3>{name}: verdicts</h3>"))
        parts.append(section_results(sub).replace("<h2>Results</h2>", f"<h3>{name}: results</h3>"))
        if summary.get("task") != "segmentation":  # per-pair scores have no ROC curve
            among = [run.classes.index(c) for c in info.get("scored_among", run.classes)]
            parts.append(section_roc(sub, f"external/{path.stem}.csv", heading="h3",
                                     among=among if len(among) < len(run.classes) else None))
    return "".join(parts)
