"""Report section of a dose-response study (``synthesis.ratios``): the primary metric's paired
difference to the reference against the number of synthetic images added."""

from __future__ import annotations

from matplotlib.figure import Figure

from busynth.report.common import Run, esc, figure_to_img, note


def section_dose_response(run: Run) -> str:
    """One line per generator method: difference to the reference on the primary metric (with its
    interval) at each ratio of synthetic to real training images; absent without ``synthesis.ratios``."""
    doses = run.summary.get("dose_response") or {}
    if not doses:
        return ""
    primary = run.summary.get("protocol", {}).get("primary_metric", "balanced_accuracy")
    fig = Figure(figsize=(5.2, 3.4), layout="constrained")
    ax = fig.subplots()
    for k, (method, rows) in enumerate(doses.items()):
        x = [r["ratio"] * (1 + 0.03 * (k - (len(doses) - 1) / 2)) for r in rows]  # side by side, not on top
        y = [r["diff"] for r in rows]
        err = [[r["diff"] - r["ci_low"] for r in rows], [r["ci_high"] - r["diff"] for r in rows]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method)
    ratios = sorted({r["ratio"] for rows in doses.values() for r in rows})
    ax.set_xscale("log")
    ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
    ax.minorticks_off()
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set(xlabel="synthetic images per real training image (synthesis ratio)",
           ylabel=f"{primary}: difference to {run.reference}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    rows = "".join(f"<tr><td class=\"l\">{esc(m)}</td>" + "".join(
        f"<td>{r['ratio']:g}: {r['diff']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] {esc(r['verdict'] or '')}</td>"
        for r in rs) + "</tr>" for m, rs in doses.items())
    return ("<h2>Dose-response</h2>" + figure_to_img(fig, "dose-response") + f"<table>{rows}</table>" + note(
        f"Each point: one arm (a generator at one synthesis ratio, its set a prefix of the set sampled at the "
        f"largest ratio), paired with {run.reference} on the same folds, seeds and test images; bars: the "
        f"study's interval; verdicts Holm-adjusted across all arms."))
