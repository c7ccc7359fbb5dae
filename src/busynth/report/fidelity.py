"""Report sections on the synthetic images themselves: fidelity and memorisation tables, the
closest synthetic/training pairs, and image/mask pairs.

Numbers come from ``results/fidelity.json`` (or, when it is missing, from the cells'
``fidelity.json`` summarised on the fly); the pair images are the PNG copies that
:func:`busynth.evaluate.cell.evaluate_cell` wrote into ``cells/<method>/<cell>/closest/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from busynth.evaluate.summary import aggregate_fidelity, read_cell_fidelity
from busynth.io import read_json, read_png, read_png_mask
from busynth.report.common import (
    Run,
    cell_dirs,
    esc,
    fmt,
    html_table,
    natural_key,
    note,
    num,
    png_to_img,
)
from busynth.report.grid import RED, Tile, grid_to_img

MASK_PAIRS_PER_CLASS = 4
# (key in fidelity.json, column title, scale, decimals); arrows say which direction is better.
COLUMNS = (
    ("fid", "classifier-feature FID ↓", 1.0, 3),
    ("kid_mean", "KID ×10³ ↓", 1e3, 2),
    ("precision", "precision ↑", 1.0, 3),
    ("recall", "recall ↑", 1.0, 3),
    ("diversity", "MS-SSIM ↓ (diversity)", 1.0, 3),
    ("memorization_share", "memorised (pixels) ↓", 1.0, 3),
    ("memorization_share_feature", "memorised (features) ↓", 1.0, 3),
)
REFERENCE_ROW = "real train vs real test"


def load_fidelity_summary(run: Run) -> tuple[dict[str, Any] | None, str]:
    """(summary, source): results/fidelity.json, else the cells' fidelity.json aggregated now,
    else (None, reason)."""
    path = run.root / "results" / "fidelity.json"
    if path.is_file():
        return read_json(path), "results/fidelity.json"
    cells = read_cell_fidelity(run.root, [m for m in run.methods if m != run.reference])
    if cells:
        return aggregate_fidelity(cells), "cells/*/*/fidelity.json (results/fidelity.json missing)"
    return None, "no fidelity.json found: fidelity is computed per generator cell once the real-only cell exists"


def _stat(stats: dict[str, Any], key: str, scale: float, digits: int) -> str:
    entry = stats.get(key) or {}
    mean, sd = num(entry.get("mean")) * scale, num(entry.get("sd")) * scale
    if np.isnan(mean):
        return "–"
    return f"{fmt(mean, digits)} ± {fmt(sd, digits)}"


def _score_table(rows: list[tuple[str, int | str, dict[str, Any]]]) -> str:
    head = ('<tr><th class="l">method</th><th>cells</th>'
            + "".join(f"<th>{esc(c[1])}</th>" for c in COLUMNS) + "</tr>")
    body = "".join(
        f'<tr><td class="l">{esc(name)}</td><td>{esc(n)}</td>'
        + "".join(f"<td>{esc(_stat(stats, key, scale, d))}</td>" for key, _, scale, d in COLUMNS) + "</tr>"
        for name, n, stats in rows
    )
    return f'<table class="fid">{head}{body}</table>'


def section_fidelity(run: Run) -> str:
    """Fidelity, diversity and memorisation per generator (overall, then per class), each next to
    the real-vs-real reference; mean ± sd over cells."""
    title = "<h2>Fidelity, diversity and memorisation</h2>"
    summary, source = load_fidelity_summary(run)
    if summary is None:
        return title + note(source)
    methods = [m for m in run.methods if m in summary.get("methods", {})]
    methods += [m for m in summary.get("methods", {}) if m not in methods]
    ref = summary.get("real_vs_real") or {}

    def rows(pick) -> list[tuple[str, int | str, dict[str, Any]]]:
        out = [(m, summary["methods"][m].get("cells", "?"), pick(summary["methods"][m])) for m in methods]
        if ref:
            out.append((REFERENCE_ROW, ref.get("cells", "?"), pick(ref)))
        return out

    parts = [title, note(f"Source: {source}."), "<h3>All classes</h3>",
             _score_table(rows(lambda s: s.get("overall", {})))]
    for c in run.classes:
        parts += [f"<h3>{esc(c)}</h3>", _score_table(rows(lambda s, c=c: s.get("per_class", {}).get(c, {})))]
    for method, reasons in (summary.get("skipped") or {}).items():
        parts.append(note(f"{method}: {len(reasons)} cell(s) not scored: " + "; ".join(reasons[:3])))
    parts.append(note(
        "Features: the penultimate layer of the real-only classifier of the same fold and seed. "
        "FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018) compare synthetic images with the real "
        "training images; precision/recall use k-NN manifolds (Kynkäänniemi et al. 2019); diversity is the "
        "mean pairwise MS-SSIM within a class (Wang et al. 2003; lower = more diverse, compare with the real "
        "row). Memorised share: synthetic images closer "
        "to a training image (or its mirror) than the 5th percentile of training-to-training nearest-neighbour "
        f"distances. The '{REFERENCE_ROW}' row scores the real test images the same way (its diversity is that "
        "of the training images): a generator close to it is as good as new real data. FID depends on set "
        "size (the test set is smaller than the synthetic set); KID does not."
    ))
    return "".join(parts)


def section_label_fidelity(run: Run) -> str:
    """Per generator and intended class: the share of its images the fold's real-only classifier
    puts in that class and the mean probability it gives the class, next to the same numbers on
    the real test images of the same cells; mean ± sd over cells."""
    title = "<h2>Label fidelity: do the synthetic images carry their class?</h2>"
    summary, source = load_fidelity_summary(run)
    labels = (summary or {}).get("label_fidelity") or {}
    if not labels:
        return title + note("no label_fidelity.json in the generator cells" if summary else source)
    classes = [c for c in [*run.classes, "overall"] if any(c in v.get("synthetic", {}) for v in labels.values())]
    head = ["method", "cells", *[f"{c}: accuracy (real test)" for c in classes],
            *[f"{c}: mean p (real test)" for c in classes]]

    def cell(entry: dict, c: str, m: str) -> str:
        syn, real = entry.get("synthetic", {}).get(c, {}).get(m), entry.get("real_test", {}).get(c, {}).get(m)
        if not syn:
            return "–"
        return f"{fmt(syn['mean'], 2)} ± {fmt(syn['sd'], 2)} ({fmt((real or {}).get('mean'), 2)})"

    methods = [m for m in run.methods if m in labels] + [m for m in labels if m not in run.methods]
    rows = [[m, labels[m].get("cells", "?"), *[cell(labels[m], c, "accuracy") for c in classes],
             *[cell(labels[m], c, "mean_probability") for c in classes]] for m in methods]
    return title + html_table(head, rows) + note(
        "The real-only classifier of the same fold and seed scores every synthetic image: accuracy is the share "
        "classified as the intended class, mean p the probability it gives that class. In brackets: the same "
        "classifier on the fold's real test images. Far below the brackets, the synthetic set is partly label noise."
    ) + _cas_table(summary.get("cas") or {}, methods) + _filter_table(summary.get("filter") or {})


def _filter_table(filtered: dict) -> str:
    """Kept / requested (passed of sampled) per class of each filtered arm (synthesis.filter)."""
    if not filtered:
        return ""
    classes = list(dict.fromkeys(c for e in filtered.values() for c in e["per_class"]))
    rows = [[m, e["threshold"], *[(f"{v['kept']}/{v['requested']} ({v['passed']} of {v['sampled']})"
                                   if (v := e["per_class"].get(c)) else "–") for c in classes]]
            for m, e in filtered.items()]
    return "<h3>Filtered arms</h3>" + html_table(["arm", "threshold", *classes], rows) + note(
        "Images kept / requested per class, summed over folds; in brackets how many of those sampled passed: the "
        "fold's real-only classifier gave the intended class at least the threshold probability.")


def _cas_table(cas: dict, order: list[str]) -> str:
    """Train on synthetic, test on real (run.cas): per method, the synthetic-only classifier's scores on
    the real test images next to the real-only classifier's of the same cells."""
    if not cas:
        return ""
    metrics = ("balanced_accuracy", "macro_auc", "malignant_auc")
    rows = [[m, cas[m]["cells"], *[f"{fmt(cas[m]['synthetic_only'][k]['mean'])} ± "
                                   f"{fmt(cas[m]['synthetic_only'][k]['sd'])}"
                                   f" ({fmt(cas[m]['real_only'][k]['mean'])})" for k in metrics]]
            for m in [*[m for m in order if m in cas], *[m for m in cas if m not in order]]]
    return "<h3>Train on synthetic, test on real (CAS)</h3>" + html_table(["method", "cells", *metrics], rows) + note(
        "A classifier trained on the generator's images alone, for the same number of steps as every classifier "
        "of the study, scored on the fold's real test images (Ravuri & Vinyals 2019); in brackets the real-only "
        "classifier of the same cells.")


def _first_scored_cell(run: Run, method: str) -> tuple[Path, dict[str, Any]] | None:
    for cell in cell_dirs(run, method):
        path = cell / "fidelity.json"
        if path.is_file() and (result := read_json(path)).get("status") == "ok":
            return cell, result
    return None


def _pair_html(cell: Path, pair: dict[str, Any]) -> str:
    images = []
    for side in ("synthetic", "train"):
        png = cell / str(pair.get(f"{side}_png", ""))
        label = f"{side}: {pair.get(f'{side}_id', '?')}"
        images.append(png_to_img(png.read_bytes(), label, width=128) if png.is_file()
                      else note(f"{png.name} missing"))
    flag = " — memorised" if pair.get("flagged") else ""
    mirrored = " (mirrored)" if pair.get("mirrored") else ""
    caption = (f"#{pair.get('rank', '?')}: d = {fmt(pair.get('pixel_distance'))}{flag}<br>"
               f"{esc(pair.get('synthetic_id', '?'))} ({esc(pair.get('synthetic_label', '?'))})<br>"
               f"↔ {esc(pair.get('train_id', '?'))}{mirrored} ({esc(pair.get('train_label', '?'))})<br>"
               f'<span class="path">{esc(pair.get("train_path", ""))}</span>')
    cls = "pair flagged" if pair.get("flagged") else "pair"
    return f'<figure class="{cls}">{"".join(images)}<figcaption>{caption}</figcaption></figure>'


def section_closest_pairs(run: Run) -> str:
    """Per generator, the synthetic images closest to a training image (pixel space), each shown
    next to that training image, from the first scored cell."""
    title = "<h2>Closest synthetic–training pairs</h2>"
    parts = []
    for method in (m for m in run.methods if m != run.reference):
        found = _first_scored_cell(run, method)
        if found is None:
            continue
        cell, result = found
        mem = result.get("memorization", {})
        head = (f"<h3>{esc(method)} <small>({esc(cell.name)})</small></h3>"
                + note(f"distance in {mem.get('space', '?')}; threshold d ≤ {fmt(mem.get('threshold'))} "
                       f"(percentile {mem.get('percentile', '?')} of "
                       f"training nearest-neighbour distances); every synthetic image's nearest training image "
                       f"is in {cell.relative_to(run.root)}/{mem.get('nearest_csv', 'memorization.csv')}"))
        pairs = result.get("closest_pairs") or []
        body = "".join(_pair_html(cell, p) for p in pairs) if pairs else note("no pairs recorded")
        parts.append(head + f'<div class="pairs">{body}</div>')
    if not parts:
        return title + note("no scored generator cell (cells/<method>/<cell>/fidelity.json with status ok)")
    return title + note(
        "Left: synthetic image, right: its nearest real training image, both at the classifier's working "
        "resolution (0 = identical up to brightness and contrast). Red frame: below the memorisation threshold."
    ) + "".join(parts)


def _image_mask_pairs(folder: Path, label: str) -> list[tuple[Path, Path]]:
    """(image, mask) files of class ``label`` in a synthetic folder (``<label>/x.png`` with
    ``<label>/x_mask.png``), in natural order; masks without their image are left out."""
    masks = sorted((folder / label).glob("*_mask.png"), key=lambda p: natural_key(p.name))
    pairs = [(m.with_name(m.name.removesuffix("_mask.png") + ".png"), m) for m in masks]
    return [(image, mask) for image, mask in pairs if image.is_file()]


def _mask_pair_grid(folder: Path, classes: list[str]) -> list[list[Tile]]:
    rows = []
    for c in classes:
        row = []
        for j, (image_path, mask_path) in enumerate(_image_mask_pairs(folder, c)[:MASK_PAIRS_PER_CLASS]):
            row += [Tile(read_png(image_path), caption=f"{c} image" if j == 0 else "image"),
                    Tile(read_png(mask_path), caption="mask")]
        if row:
            rows.append(row)
    return rows


def section_mask_pairs(run: Run) -> str:
    """Image/mask pairs (image left, its mask right) for generators that write ``_mask.png``
    files (ControlNet, classical), from the first cell folder that has them."""
    parts = []
    root = run.root / "synthetic"
    for method in (m for m in run.methods if (root / m).is_dir()):
        for cell in sorted((p for p in (root / method).iterdir() if p.is_dir()), key=lambda p: natural_key(p.name)):
            if rows := _mask_pair_grid(cell, run.classes):
                parts.append(f"<h3>{esc(method)} <small>({esc(cell.name)})</small></h3>"
                             + grid_to_img(rows, f"{method} image/mask pairs"))
                break
    if not parts:
        return ""  # no generator wrote masks: nothing to show, no heading
    return "<h2>Synthetic image/mask pairs</h2>" + note(
        f"Up to {MASK_PAIRS_PER_CLASS} pairs per class: each synthetic image next to the lesion mask it was "
        "generated with (empty for normal images)."
    ) + "".join(parts)


# --- control adherence (mask-conditioned generators) ---------------------------------------------

ADHERENCE_COLUMNS = (("cnr_mean", "CNR ↑"), ("shuffled_cnr_mean", "CNR, shuffled masks"),
                     ("gap", "gap (matched − shuffled) ↑"), ("adherent_share", "share CNR > threshold ↑"),
                     ("n_scored", "pairs scored"))


def _adherence_cells(run: Run) -> dict[str, list[dict[str, Any]]]:
    """Every cells/<method>/<cell>/adherence.json with status ok, per method."""
    found: dict[str, list[dict[str, Any]]] = {}
    for method in run.methods:
        for cell in cell_dirs(run, method):
            path = cell / "adherence.json"
            if path.is_file() and (result := read_json(path)).get("status") == "ok":
                found.setdefault(method, []).append(result)
    return found


def _adherence_row(name: str, entries: list[dict[str, Any]]) -> str:
    cells = []
    for key, _ in ADHERENCE_COLUMNS:
        values = np.array([num(e.get(key)) for e in entries], dtype=float)
        values = values[np.isfinite(values)]
        if len(values) == 0:
            cells.append("–")
        elif key == "n_scored":
            cells.append(str(int(values.sum())))
        else:
            sd = values.std(ddof=1) if len(values) > 1 else 0.0
            cells.append(f"{fmt(values.mean())} ± {fmt(sd)}")
    return (f'<tr><td class="l">{esc(name)}</td><td>{len(entries)}</td>'
            + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")


def _overlay_grid(folder: Path, classes: list[str]) -> list[list[Tile]]:
    """Generated images with their mask's outline drawn on them (red), up to 6 per lesion class."""
    rows = []
    for c in classes:
        pairs = [(read_png(i), mask) for i, m in _image_mask_pairs(folder, c) if (mask := read_png_mask(m)).any()][:6]
        if pairs:
            rows.append([Tile(image, [(mask, RED)], c if j == 0 else "") for j, (image, mask) in enumerate(pairs)])
    return rows


def section_adherence(run: Run) -> str:
    """Control adherence of mask-conditioned generators (cells' adherence.json): per class, the lesion
    contrast (CNR) of generated pairs against shuffled masks and against real training pairs, and
    generated images with their mask outlines. Empty when no cell has an adherence.json."""
    found = _adherence_cells(run)
    if not found:
        return ""
    head = ('<tr><th class="l">pairs</th><th>cells</th>'
            + "".join(f"<th>{esc(title)}</th>" for _, title in ADHERENCE_COLUMNS) + "</tr>")
    parts = ["<h2>Control adherence</h2>", note(
        "How well images follow their lesion masks. CNR = (mean of a ring just outside the mask − mean inside) / "
        "sqrt(var inside + var ring): positive when the lesion is darker than its surroundings, as real "
        "(hypoechoic) lesions mostly are. 'Shuffled' scores the same images against other images' masks; the gap "
        "is the contrast that follows the given mask. Real training pairs of the same folds are the reference. "
        "Normal images (empty masks) are not scored. Mean ± sd over cells.")]
    for scope in ["overall", *run.classes]:
        rows = []
        for method, results in found.items():
            pick = (lambda r, s=scope: r[s] if s == "overall" else r["per_class"].get(s, {}))
            rows.append(_adherence_row(f"{method}: generated", [pick(r["generated"]) for r in results]))
        first = next(iter(found.values()))
        rows.append(_adherence_row("real training pairs", [
            (r["real_train"]["overall"] if scope == "overall" else r["real_train"]["per_class"].get(scope, {}))
            for r in first]))
        parts.append(f"<h3>{esc(scope if scope != 'overall' else 'all classes')}</h3>"
                     f"<table>{head}{''.join(rows)}</table>")
    root = run.root / "synthetic"
    for method in found:
        for cell in sorted((p for p in (root / method).glob("*") if p.is_dir()), key=lambda p: natural_key(p.name)):
            if rows := _overlay_grid(cell, run.classes):
                parts.append(f"<h3>{esc(method)} <small>({esc(cell.name)})</small>: "
                             "mask outlines on generated images</h3>"
                             + grid_to_img(rows, f"{method} generated images with mask outlines"))
                break
    return "".join(parts)
